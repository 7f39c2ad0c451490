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
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from opd import remote
from opd.training import sft

STATE, DATA = "state", "data"


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
    """Saves at step `int(state.step)` (subject to the save interval unless `force`)."""
    step = int(jax.device_get(state.step))
    return manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                          DATA: ocp.args.JsonSave(dict(data_state))}), force=force)


def restore(manager: ocp.CheckpointManager, abstract: Any, step: Optional[int] = None):
    """(state, data_state) of `step` (default: the latest); None when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    out = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract),
                                                            DATA: ocp.args.JsonRestore()}))
    return sft.TrainState(*out[STATE]), dict(out[DATA])
