"""Orbax checkpoints of a drafter training run (SFT and Draft-OPD share the train state).

One orbax step directory per saved step, two items (orbax args API):
  "state"  the `TrainState` (step, trainable drafter params, optimizer state, PRNG key):
           `ocp.args.StandardSave`; restored straight onto the train step's shardings;
  "data"   the data iterator's state, a JSON-serialisable dict (`ocp.args.JsonSave`), e.g.
           {"epoch": 1, "position": 4096, "seed": 0}; saved with the model so a resumed run
           sees exactly the batches the interrupted one would have seen next.
Frozen inputs (target params, draft-vocabulary maps) are not saved here: they come from the
target checkpoint and the drafter checkpoint, which never change during training.

Resume order (the stages follow it; `stage_common.restore_state`):
  1. build the run (`opd.training.run`: mesh, optimizer, shardings, the jitted step);
  2. its abstract state (`TrainRun.abstract_state`: shapes from `jax.eval_shape(init)` + shardings);
  3. if the manager has a checkpoint: restore "state" onto the abstract state and "data";
     else: `TrainRun.init_state` and the caller's fresh iterator state;
  4. rebuild the data iterator from the "data" state, then loop from `int(state.step)`.
Saves are asynchronous: device arrays are copied to host before `save` returns, so the next
(donating) train step may run at once; call `wait_until_finished()` before exiting.

Integrity: `save` stores a checksum of the state's values in the "data" item
(`state_checksum`: 64 bits from the exact bits of every array, the same under any sharding,
computed on the devices); `restore` recomputes it and raises `CorruptCheckpoint` when the bytes
changed since they were written, or when its parameters are not all finite. A step is read in
the dtypes it was saved in (recorded next to the checksum), verified, then cast to the dtypes
asked for (e.g. float32 master weights into a bf16 run). Checkpoints
written before checksums existed restore with a warning. `restore_latest` falls back to the
newest step that restores and verifies, moving the bad ones aside (`<checkpoints>.corrupt/`),
so a damaged last step costs only the steps since the one before.
"""

from __future__ import annotations

import logging as logging_std
import os
import sys
import time
import warnings
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from opd import remote
from opd import sharding as shd
from opd.checkpoints.errors import CheckpointError
from opd.training import sft

STATE, DATA = "state", "data"
CHECKSUM = "checksum"  # key of the state's checksum in the "data" item
CHECKSUM_DTYPES = "checksum_dtypes"  # the dtypes it was computed on (a restore may cast, e.g. float32 -> bf16)


class CorruptCheckpoint(CheckpointError):
    """A checkpoint step cannot be restored or does not match the checksum saved with it."""


# ----------------------------------------------------------------------------- checksum


def _mix(bits, index, seed: int):
    """A bijection of uint32 `bits` for each `index` (xor, odd multiply, xorshift: all
    invertible), so changing any one value always changes the sum over an array."""
    v = (bits ^ (index * jnp.uint32(0x9E3779B9) + jnp.uint32(seed))) * jnp.uint32(0x85EBCA6B)
    v = v ^ (v >> 13)
    v = v * jnp.uint32(0xC2B2AE35)
    return v ^ (v >> 16)


def _leaf_bits(x):
    """uint32 view of an array's bits [..., k] (8-, 16-bit values widened; 64-bit split)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)[..., None]
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    b = jax.lax.bitcast_convert_type(x, unsigned)  # 8 bytes -> [..., 2] uint32
    return (b if size == 8 else b[..., None]).astype(jnp.uint32)


@jax.jit
def _tree_checksum(leaves):
    # Sums of uint32 wrap modulo 2^32: exact, so the same under any sharding and reduction order.
    total = jnp.zeros((2,), jnp.uint32)
    for n, x in enumerate(leaves):
        b = _leaf_bits(x)
        index = jnp.zeros(b.shape, jnp.uint32)
        stride = 1
        for d in reversed(range(b.ndim)):  # the element's flat index in the global array
            index = index + jax.lax.broadcasted_iota(jnp.uint32, b.shape, d) * jnp.uint32(stride % 2**32)
            stride *= b.shape[d]
        for k, seed in enumerate((0x243F6A88, 0x13198A2E)):
            leaf = jnp.sum(_mix(b, index, seed), dtype=jnp.uint32)
            total = total.at[k].add(_mix(leaf, jnp.uint32(n), seed))
    return total


@jax.jit
def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _dtypes(state) -> list:
    return [str(x.dtype) for x in jax.tree.leaves(state)]


def state_checksum(state) -> str:
    """A checksum of the exact values of every array in `state` (16 hex digits), computed on
    the arrays' devices: equal for equal values whatever their sharding."""
    leaves = [jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
              for x in jax.tree.leaves(state)]
    h = np.asarray(jax.device_get(_tree_checksum(leaves)), np.uint64)
    return f"{int(h[0]):08x}{int(h[1]):08x}"


# ----------------------------------------------------------------------------- save / restore


def make_manager(directory: str, max_to_keep: Optional[int] = 3, save_interval_steps: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager for `directory` (created if missing; made absolute for orbax; its
    place in the bucket when the run's workdir is a URL, `opd.remote`)."""
    if save_interval_steps < 1:
        raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           create=True, enable_async_checkpointing=async_save)
    # a URL workdir's checkpoints go straight to the bucket (orbax commits them there)
    directory = remote.checkpoint_location(os.path.abspath(os.fspath(directory)))
    return ocp.CheckpointManager(directory, options=options, item_names=(STATE, DATA))


def save(manager: ocp.CheckpointManager, state: sft.TrainState, data_state: dict, force: bool = False) -> bool:
    """Saves at step `int(state.step)` (subject to the save interval unless `force`), with the
    state's checksum in the data item."""
    step = int(jax.device_get(state.step))
    data = {**data_state, CHECKSUM: state_checksum(state), CHECKSUM_DTYPES: _dtypes(state)}
    return manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                          DATA: ocp.args.JsonSave(data)}), force=force)


def _short(e: BaseException, limit: int = 150) -> str:
    """`Type: reason` of an error in one short line. Orbax / tensorstore errors run to many lines
    and nest "what: why: root cause [specs]": the end of the first line is kept."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    first = first.split(" [tensorstore_spec")[0]
    return f"{type(e).__name__}: {first if len(first) <= limit else '...' + first[-limit:]}"


class _DropNeverRetrieved(logging_std.Filter):
    def filter(self, record):
        return "exception was never retrieved" not in str(record.msg)


def _quiet_failed_restore_leftovers() -> None:
    """When one array of a restore fails, orbax's event loop closes while tensorstore still
    reads the others: each of those reads then reports, possibly after our own error message,
    either a "RuntimeError: Event loop is closed" traceback (an unraisable exception) or, when
    its task is collected, asyncio's "Task exception was never retrieved" with the same
    tensorstore error. Those two (and only those) are dropped; installed once, before restores."""
    previous = sys.unraisablehook
    if getattr(previous, "_opd_quiet", False):
        return

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            previous(u)

    hook._opd_quiet = True
    sys.unraisablehook = hook
    logging_std.getLogger("asyncio").addFilter(_DropNeverRetrieved())


def _quiet_unawaited_coroutines() -> None:
    """After a failed restore, orbax's abandoned reads can also be collected as coroutines that
    were never awaited: Python then warns ("coroutine ... was never awaited" and "Enable
    tracemalloc ...") at collection, possibly after the run's last line. Installed only once a
    restore has failed (the stage stops or falls back to an older step)."""
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


def restore(manager: ocp.CheckpointManager, abstract: Any, step: Optional[int] = None):
    """(state, data_state) of `step` (default: the latest), its checksum verified; None when
    there is no checkpoint.

    Raises:
      CorruptCheckpoint: the step does not restore (short reason) or fails its checksum.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    where = f"cannot restore step {step} from {manager.directory}"
    _quiet_failed_restore_leftovers()
    try:
        data = dict(manager.restore(step, args=ocp.args.Composite(**{DATA: ocp.args.JsonRestore()}))[DATA])
        want, saved_dtypes = data.pop(CHECKSUM, None), data.pop(CHECKSUM_DTYPES, None)
        # read in the dtypes it was saved in (the checksum is over those bits), cast after checking
        leaves, treedef = jax.tree.flatten(abstract)
        as_saved = abstract
        if saved_dtypes is not None and len(saved_dtypes) == len(leaves):
            as_saved = treedef.unflatten([a if d == str(a.dtype) else
                                          jax.ShapeDtypeStruct(a.shape, jnp.dtype(d), sharding=a.sharding)
                                          for a, d in zip(leaves, saved_dtypes)])
        out = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(as_saved)}))
    except Exception as e:  # orbax raises many kinds (missing / truncated files, bad metadata, shapes)
        _quiet_unawaited_coroutines()
        raise CorruptCheckpoint(f"{where}: {_short(e)}") from e
    state = sft.TrainState(*out[STATE])
    if want is None:
        logging.warning("checkpoint step %d in %s has no checksum (written before checkpoints had one): not verified",
                        step, manager.directory)
    elif state_checksum(state) != want:
        raise CorruptCheckpoint(f"{where}: it fails its checksum (its bytes changed after they were written)")
    if as_saved is not abstract:  # e.g. float32 master weights restored for a bf16 run
        state = jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), state, abstract)
    if not bool(jax.device_get(_all_finite(state.params))):  # also catches damage to checksum-less steps
        raise CorruptCheckpoint(f"{where}: its parameters hold non-finite values")
    return state, data


def restore_latest(manager: ocp.CheckpointManager, abstract: Any):
    """(state, data_state) of the newest step that restores and verifies, or None when there is
    no checkpoint. Newer bad steps are then moved aside (`move_aside`) with a warning, so
    training continues from the good one and later saves do not collide with them. When no
    step restores (e.g. the checkpoints belong to another drafter), nothing is moved.

    Raises:
      CorruptCheckpoint: no step restores (naming the newest, why, and what to do).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    bad = []
    for step in steps:
        error = None
        try:
            out = restore(manager, abstract, step)
        except CorruptCheckpoint as e:
            error = e
        if not shd.any_process(error is not None):  # multi-host: all agree (each host reads its own shards)
            for b, e in bad:
                logging.warning("%s; moved it to %s; using step %d instead", e, move_aside(manager, b), step)
            return out
        bad.append((step, error or CorruptCheckpoint(f"cannot restore step {step} from {manager.directory}: it "
                                                     "does not restore on another host")))
    what = (f"It is the only step: move {manager.directory}/{steps[0]} away to start over" if len(steps) == 1 else
            f"No older step restores either: move {manager.directory} away to start over")
    raise CorruptCheckpoint(f"{bad[0][1]}. {what}, or use another --workdir.") from bad[0][1]


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves a bad step out of the manager's directory to `<directory>.corrupt/<step>-<time>`
    (process 0; every process then re-reads the steps); returns where."""
    src = os.path.join(str(manager.directory), str(step))
    dest = os.path.join(str(manager.directory) + ".corrupt", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if shd.is_main_process():
        try:
            from etils import epath

            epath.Path(dest).parent.mkdir(parents=True, exist_ok=True)
            epath.Path(src).rename(dest)
        except Exception as e:  # noqa: BLE001 - e.g. a bucket without rename
            raise CorruptCheckpoint(f"checkpoint step {step} in {manager.directory} is unusable and could not be "
                                    f"moved aside ({_short(e)}); move or delete {src} yourself, then rerun") from e
    shd.barrier(f"checkpoint step {step} moved aside")
    manager.reload()
    return dest
