"""Device mesh and the one logical-axis rule table of the project.

Every parameter is declared with logical axis names (`nn.with_logical_partitioning` in
`opd.models.*`); `LOGICAL_AXIS_RULES` maps each name to mesh axes of the 3-D mesh
("data", "fsdp", "tensor"). Shardings are derived from `jax.eval_shape(init)` boxes
(`abstract_params`), never from concrete arrays. A name missing from the table is an error
(no catch-all); a dimension the mesh axes do not divide is replicated and logged.

Mesh axes:
  data    pure data parallelism (batch only);
  fsdp    batch + parameter sharding over the model width ("embed");
  tensor  Megatron-style sharding of heads / MLP width / vocabulary.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opd import remote

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (str), axes (tuple) or None (replicated). One table for the
# whole project: target (transformer.py), EAGLE-3 (eagle3.py), DFlash (dflash.py), batches.
LOGICAL_AXIS_RULES: tuple = (
    ("batch", ("data", "fsdp")),  # activations / token batches
    ("vocab", "tensor"),  # target vocabulary (embedding rows, LM head columns)
    ("draft_vocab", "tensor"),  # EAGLE-3 draft vocabulary (its lm_head columns)
    ("embed", "fsdp"),  # model width D
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # scanned-layer axis of the target
    ("fused_embed", None),  # EAGLE-3 fc input (3D)
    ("concat_embed", None),  # EAGLE-3 q/k/v input (2D)
    ("aux_embed", None),  # DFlash fc input (A*D)
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all of `jax.devices()`).

    Raises:
      ValueError: a non-positive axis size, or data * fsdp * tensor != the device count.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, n in sizes.items():
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"mesh axis {name!r} must be a positive integer, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    total = data * fsdp * tensor
    if total != len(devices):
        hint = "" if len(devices) % total else f" (it divides it: pass devices=jax.devices()[:{total}] to use a subset)"
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {total} devices, but {len(devices)} "
            f"device(s) are available{hint}"
        )
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _rule_table(rules) -> dict:
    table = {}
    for name, axes in rules:
        if name in table:
            raise ValueError(f"logical axis {name!r} appears twice in the rule table")
        axes_t = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        for a in axes_t:
            if a not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {axes!r} names an unknown mesh axis {a!r}; mesh axes: {MESH_AXES}")
        table[name] = axes_t
    return table


def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES, what: str = "array") -> PartitionSpec:
    """PartitionSpec of one array from its logical axis names.

    A dimension whose size the product of its mesh axes does not divide is replicated (and
    logged); a mesh axis already used by an earlier dimension is not reused.

    Raises:
      ValueError: a logical name absent from `rules`, or names/shape of different rank.
    """
    table = _rule_table(rules)
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical axis names {tuple(names)} for a rank-{len(shape)} shape {tuple(shape)}")
    used, spec = set(), []
    for name, size in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"{what}: logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = tuple(a for a in table[name] if a not in used)
        n = math.prod(mesh.shape[a] for a in axes)
        if axes and size % n:
            logger.info("%s: dim %r of size %d not divisible by mesh axes %s (%d): replicated", what, name, size, axes, n)
            axes = ()
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def shardings_for(abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of `nn.Partitioned` boxes (the output of
    `jax.eval_shape(init)`, e.g. `transformer.abstract_params`), with the boxes removed:
    the result has the structure of the unboxed parameters.

    Raises:
      ValueError: a leaf without logical axis names, or a name without a rule.
    """

    def one(path, leaf):
        what = jax.tree_util.keystr(path)
        if not isinstance(leaf, nn.Partitioned):
            raise ValueError(f"{what}: no logical axis names (not an nn.Partitioned box); "
                             "declare them with nn.with_logical_partitioning or shard it explicitly")
        return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules, what))

    return jax.tree_util.tree_map_with_path(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Leading axis over the "batch" rule, the rest replicated (token batches [B, T, ...])."""
    axes = _rule_table(rules)["batch"]
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


# ----------------------------------------------------------------------------- multi-host
# Every process of a multi-host launch runs the same stage code on identical host data (the
# target checkpoint, the seeded data iterators): `jax.device_put` of that data onto a global
# sharding makes each process transfer only its own shards. Files are written by process 0
# only; the others wait at a barrier where they read what it wrote.


def is_main_process() -> bool:
    """True on process 0 (the one that writes files); always True in single-process runs."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True when `flag` is True on any process. A collective in multi-host runs (every process
    calls it at the same point): e.g. a SIGTERM that reached only some hosts stops all of them
    at the same step, so they save the same checkpoint together."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def barrier(name: str) -> None:
    """All processes wait here (no-op in single-process runs). With a URL workdir
    (`opd.remote`) each process first pushes what it wrote and afterwards pulls what the
    others wrote."""
    rw = remote.current()
    if rw is not None:
        rw.push()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        if rw is not None:
            rw.pull()


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly sharded, multi-host) arrays, gathered in full on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def put_process_rows(batch: Any, shardings: Any) -> Any:
    """Global batch arrays from this process's rows: row blocks of the processes in process
    order (how `grain.sharding.ShardByJaxProcess` splits the data); `jax.device_put` when
    there is one process."""
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return jax.tree.map(jax.make_array_from_process_local_data, shardings, batch)
