"""The one run builder: mesh + optimizer + shardings + the jitted, donated train step.

`sft_run` and `opd_run` take explicit arguments (no configs) and return a `TrainRun`. The SFT
stage, the Draft-OPD stage and the ahead-of-time check (`opd.training.aot`) all build their
step here, so the AOT check compiles exactly the program a launch runs
(tests/training/test_aot.py compares the two lowered programs).

A `TrainRun` knows the abstract (sharded `ShapeDtypeStruct`) form of every step input, so
  run.lower()                          lowers the step without any array (AOT);
  run.abstract_state()                 is what a checkpoint restores onto;
  run.init_state(trainable, seed)      builds the step-0 state on the step's shardings;
  run(state, target_params, frozen, batch)   runs one step (state donated).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from opd import sharding as shd
from opd.drafters.base import DrafterSpec
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig
from opd.training import opd_step as ops
from opd.training import sft


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """A built train step and the abstract form of its inputs (module docstring)."""

    mesh: Any
    spec: DrafterSpec
    target_config: TransformerConfig
    optimizer: optax.GradientTransformation
    shardings: sft.Shardings
    step: Callable  # jitted: step(state, target_params, drafter_frozen, batch, *extra) -> (state, metrics)
    batch: dict  # {key: ShapeDtypeStruct} of one global batch
    extra: tuple = ()  # further step inputs after the batch (Draft-OPD: the EOS ids), as ShapeDtypeStructs
    frozen: Any = None  # the drafter's frozen tree as ShapeDtypeStructs

    def abstract_state(self) -> sft.TrainState:
        init = functools.partial(sft.initial_state, optimizer=self.optimizer)
        shapes = jax.eval_shape(init, nn.unbox(self.spec.abstract_trainable()), jax.ShapeDtypeStruct((2,), jnp.uint32))
        return jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), shapes, self.shardings.state)

    def abstract_args(self) -> tuple:
        target = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), nn.unbox(tfm.abstract_params(self.target_config)),
                              self.shardings.target)
        return (self.abstract_state(), target, self.frozen, self.batch) + tuple(self.extra)

    def lower(self):
        """The step lowered on abstract inputs (nothing is allocated)."""
        return self.step.lower(*self.abstract_args())

    def init_state(self, trainable, seed: int = 0) -> sft.TrainState:
        """The step-0 state, built by a jit with the step's shardings (params copied, never aliased)."""
        init = jax.jit(functools.partial(sft.initial_state, optimizer=self.optimizer),
                       in_shardings=(self.shardings.state.params, self.shardings.state.rng),
                       out_shardings=self.shardings.state)
        return init(trainable, jax.random.PRNGKey(seed))

    def place_frozen(self, target_params, drafter_frozen) -> tuple:
        """(target params, drafter frozen parts) on the step's shardings."""
        return jax.device_put(target_params, self.shardings.target), jax.device_put(drafter_frozen,
                                                                                   self.shardings.drafter_frozen)

    def __call__(self, state, target_params, drafter_frozen, batch, *extra):
        return self.step(state, target_params, drafter_frozen, batch, *extra)


def _build(step_fn, *, mesh, spec, target_config, optimizer, drafter_frozen, batch_shapes: dict,
           extra_shapes: tuple = ()) -> TrainRun:
    """Shardings from `jax.eval_shape` boxes, then `step_fn` jitted with them (state donated)."""
    ndims = {k: len(shape) for k, (shape, _) in batch_shapes.items()}
    shardings = sft.make_shardings(mesh, spec, target_config, optimizer, drafter_frozen, ndims)
    rep = shd.replicated(mesh)
    extra_sh = tuple(rep for _ in extra_shapes)
    step = jax.jit(step_fn, in_shardings=(shardings.state, shardings.target, shardings.drafter_frozen, shardings.batch)
                   + extra_sh, out_shardings=(shardings.state, rep), donate_argnums=(0,))
    batch = {k: _sds(shape, dtype, shardings.batch[k]) for k, (shape, dtype) in batch_shapes.items()}
    frozen = jax.tree.map(lambda a, s: _sds(jnp.shape(a), a.dtype, s), drafter_frozen, shardings.drafter_frozen)
    extra = tuple(_sds(shape, dtype, rep) for shape, dtype in extra_shapes)
    return TrainRun(mesh, spec, target_config, optimizer, shardings, step, batch, extra, frozen)


def sft_run(spec: DrafterSpec, drafter_frozen, target_config: TransformerConfig, *, mesh,
            optimizer: optax.GradientTransformation, loss_config, batch_size: int, seq_len: int,
            cached_features: bool = False, packed: bool = False, cached_argmax: bool = True) -> TrainRun:
    """The SFT step (`opd.training.sft.train_step`) for global batches of `batch_size` rows of
    `seq_len` tokens (with the target's cached features when `cached_features`; several
    sequences per row with `packed`, for a `spec.packed_sft` kind).
    `cached_argmax=False` leaves the target's argmax ("top") out of a cached batch, so a loss
    that distils the target's logits computes all V columns (the step before the compact
    teacher; the throughput benchmark's baseline)."""
    B, T, D = int(batch_size), int(seq_len), target_config.hidden_size
    if packed and not spec.packed_sft:
        raise ValueError(f"{spec.kind} drafters do not support packed SFT rows")
    shapes = {"tokens": ((B, T), jnp.int32), "loss_mask": ((B, T), jnp.int32)}
    if packed:
        shapes["positions"] = shapes["segment_ids"] = ((B, T), jnp.int32)
    if cached_features:
        shapes["aux"] = ((B, T, len(spec.target_hidden_layers), D), jnp.float32)
        if spec.needs_final_hidden:
            shapes["final"] = ((B, T, D), jnp.float32)
            if cached_argmax:
                shapes["top"] = ((B, T), jnp.int32)
    fn = functools.partial(sft.train_step, spec=spec, target_config=target_config, optimizer=optimizer,
                           loss_config=loss_config)
    return _build(fn, mesh=mesh, spec=spec, target_config=target_config, optimizer=optimizer,
                  drafter_frozen=drafter_frozen, batch_shapes=shapes)


def opd_run(spec: DrafterSpec, drafter_frozen, target_config: TransformerConfig, *, mesh,
            optimizer: optax.GradientTransformation, opd_config: ops.OPDConfig, batch_size: int, prompt_len: int,
            num_eos: int) -> TrainRun:
    """The Draft-OPD step (`opd.training.opd_step.opd_step`) for global batches of `batch_size`
    prompts padded to `prompt_len` per micro-batch, `opd_config.accumulate` micro-batches per
    step (the batch holds batch_size x accumulate rows); its last input is the target's
    `num_eos` EOS ids."""
    spec.check_num_draft_tokens(opd_config.num_draft_tokens)
    B, P = int(batch_size) * int(opd_config.accumulate), int(prompt_len)
    shapes = {"tokens": ((B, P), jnp.int32), "lengths": ((B,), jnp.int32), "valid": ((B,), jnp.bool_)}
    fn = functools.partial(ops.opd_step, spec=spec, target_config=target_config, optimizer=optimizer, cfg=opd_config,
                           cache_len=opd_config.cache_len(P))
    return _build(fn, mesh=mesh, spec=spec, target_config=target_config, optimizer=optimizer,
                  drafter_frozen=drafter_frozen, batch_shapes=shapes, extra_shapes=(((max(1, int(num_eos)),), jnp.int32),))


def make_mesh(data: int, fsdp: int, tensor: int, batch_size: int, what: str = "train", devices=None):
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: the devices present; the AOT check
    passes a TPU topology's) with data = -1 meaning all the rest, checked against the global batch
    (rows divide over data x fsdp); ValueErrors name `what`."""
    n = jax.device_count() if devices is None else len(devices)
    try:
        if data == -1:
            if n % (fsdp * tensor):
                raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n} devices")
            data = n // (fsdp * tensor)
        mesh = shd.make_mesh(data, fsdp, tensor, devices)
    except ValueError as e:
        raise ValueError(f"config.{what}.mesh {dict(data=data, fsdp=fsdp, tensor=tensor)} on {n} devices: {e}") from None
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if int(batch_size) % rows:
        raise ValueError(f"config.{what}.batch_size {batch_size} must be divisible by the mesh's data x fsdp = {rows}")
    return mesh
