"""Supervised fine-tuning (SFT) of a drafter against a frozen target: the train state, the
shardings of a train step's inputs, and the SFT step itself.

One training step (`train_step`, a module-level pure function) does, inside one `jax.jit`
(built by `opd.training.run`) with explicit in/out shardings and the train state donated:
  1. the frozen target's causal forward over the batch (the drafter's tapped layers, and its
     final hidden state when `spec.needs_final_hidden`), under `jax.lax.stop_gradient` -
     or those features read from the batch (the feature cache);
  2. the drafter kind's SFT loss (`spec.sft_loss`);
  3. an optax update of the trainable drafter parameters only.

What is trained and what is frozen (`DrafterSpec.split_params` / `join_params`):
  TrainState.params      the drafter's trainable parameters;
  target_params          the target's whole tree (frozen); the drafter's shared embedding /
                         LM head are taken from it;
  drafter_frozen         the drafter's own frozen arrays (e.g. EAGLE-3's draft-vocabulary maps).
Frozen inputs are never donated nor returned, so they stay bit-identical.

Batches: {"tokens": int32 [B, T], "loss_mask": [B, T]} (loss_mask[b, j] = 1: the prediction
of token j is trained), sharded over ("data", "fsdp") on B; with cached features also "aux"
[B, T, n, D] and, when the loss reads the target's logits, "final" [B, T, D] and "top" int32
[B, T] (the target's argmax); packed rows add "positions" and "segment_ids" [B, T] (`Segments`).

Axis letters: B batch, T positions, S loss offsets (TTT steps / block offsets).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from opd import sharding as shd
from opd.drafters.base import DrafterSpec, Segments, TargetFeatures
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # trainable drafter parameters
    opt_state: Any
    rng: jax.Array  # PRNG key (uint32 [2]); split once per step


class Shardings(NamedTuple):
    """Shardings of a train step's inputs (SFT and Draft-OPD)."""

    state: TrainState
    target: Any
    drafter_frozen: Any
    batch: dict


def make_shardings(mesh, spec: DrafterSpec, target_config: TransformerConfig, optimizer: optax.GradientTransformation,
                   drafter_frozen, batch_ndims: dict, rules=shd.LOGICAL_AXIS_RULES) -> Shardings:
    """Shardings of every train-step input, derived from `jax.eval_shape(init)` boxes.

    Args:
      drafter_frozen: the drafter's frozen tree (arrays or ShapeDtypeStructs): replicated.
      batch_ndims: {batch key: rank}; every batch array is sharded over its leading axis.
    """
    boxed = spec.abstract_trainable()
    param_sh = shd.shardings_for(boxed, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, nn.unbox(boxed))
    rep = shd.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: rep)
    state = TrainState(rep, param_sh, opt_sh, rep)
    target = shd.shardings_for(tfm.abstract_params(target_config), mesh, rules)
    frozen = jax.tree.map(lambda _: rep, drafter_frozen)
    batch = {k: shd.batch_sharding(mesh, n, rules) for k, n in batch_ndims.items()}
    return Shardings(state, target, frozen, batch)


def initial_state(params, rng, *, optimizer) -> TrainState:
    """The step-0 state (pure; jitted by `opd.training.run`, shape-evaluated for restores)."""
    params = jax.tree.map(jnp.copy, params)  # the state owns its buffers (it is donated later)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


def sft_loss(params, target_params, drafter_frozen, batch, key, *, spec: DrafterSpec, target_config: TransformerConfig,
             loss_config):
    """The drafter's SFT loss on one batch; the target runs here, without gradient, unless the
    batch carries its cached hidden states ("aux" [B, T, n, D], maybe "final" [B, T, D])."""
    tokens = batch["tokens"].astype(jnp.int32)
    segments = None
    if "segment_ids" in batch:  # packed rows
        segments = Segments(batch["positions"].astype(jnp.int32), batch["segment_ids"].astype(jnp.int32))
    if "aux" in batch:
        features = TargetFeatures(batch["aux"], batch.get("final"), batch.get("top"))
    else:
        out = tfm.forward(target_params, target_config, tokens, hidden_layers=spec.target_hidden_layers,
                          **({} if segments is None else dict(positions_BT=segments.positions_BT,
                                                              segment_ids_BT=segments.ids_BT)))
        features = TargetFeatures(out.aux_hidden, out.hidden_BTD if spec.needs_final_hidden else None)
    features = jax.lax.stop_gradient(features)
    packed = {} if segments is None else {"segments": segments}
    return spec.sft_loss(params, drafter_frozen, jax.lax.stop_gradient(target_params), target_config, features,
                         tokens, batch["loss_mask"], key, loss_config, **packed)


def train_step(state: TrainState, target_params, drafter_frozen, batch, *, spec: DrafterSpec,
               target_config: TransformerConfig, optimizer: optax.GradientTransformation, loss_config):
    """One SFT update. Returns (new state, metrics {loss, per_step_loss [S], accuracy [S],
    grad_norm, supervised (predictions with a loss term)})."""
    rng, key = jax.random.split(state.rng)

    def loss_fn(params):
        out = sft_loss(params, target_params, drafter_frozen, batch, key, spec=spec, target_config=target_config,
                       loss_config=loss_config)
        return out.loss, out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "per_step_loss": out.per_step_loss, "accuracy": out.accuracy,
               "grad_norm": optax.global_norm(grads), "supervised": out.supervised, **(out.extra or {})}
    return TrainState(state.step + 1, params, opt_state, rng), metrics
