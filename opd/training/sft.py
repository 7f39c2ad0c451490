"""Supervised fine-tuning (SFT) of EAGLE-3 / DFlash drafters against a frozen target.

One training step (`train_step`, a module-level pure function) does, inside one `jax.jit`
with explicit in/out shardings and the train state donated:
  1. the frozen target's causal forward over the batch (aux hidden states of the drafter's
     layers, and for EAGLE-3 its logits), wrapped in `jax.lax.stop_gradient`;
  2. the drafter loss (`opd.training.losses`: EAGLE-3 training-time test, or DFlash blocks
     at random anchors drawn from the state's PRNG key);
  3. an optax update of the trainable drafter parameters only.

What is trained and what is frozen:
  TrainState.params      EAGLE-3: `drafter.params["eagle"]`; DFlash: `drafter.params["dflash"]`.
  target_params          the target's whole tree (frozen). The drafter's shared embedding /
                         LM head are taken from it (they are the same arrays as
                         `drafter.params["embedding"]` / `drafter.params["target"]`).
  drafter_frozen         EAGLE-3: {"vocab": {"d2t", "t2d"}}; DFlash: {} (nothing else).
Frozen inputs are never donated nor returned, so they stay bit-identical.

Batches: {"tokens": int32 [B, T], "loss_mask": [B, T]} (loss_mask[b, j] = 1: the prediction
of token j is trained), sharded over ("data", "fsdp") on B.

Axis letters: B batch, T positions, S TTT steps / DFlash offsets.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from opd import sharding as shd
from opd.drafters.base import Drafter, DrafterSpec
from opd.models import dflash as dfm
from opd.models import eagle3 as e3
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig
from opd.training import losses

KINDS = ("eagle3", "dflash")
DFLASH_SHARED = ("embedding", "lm_head")  # target params the DFlash drafter reads (frozen)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # trainable drafter parameters
    opt_state: Any
    rng: jax.Array  # PRNG key (uint32 [2]); split once per step


@dataclasses.dataclass(frozen=True)
class SFTLossConfig:
    """Loss options (hashable; see `opd.training.losses` for the definitions)."""

    ttt_steps: int = losses.EAGLE3_TTT_STEPS  # EAGLE-3 unrolled TTT steps
    step_decay: float = losses.EAGLE3_STEP_DECAY  # EAGLE-3 weight of step k: decay^(k-1)
    num_anchors: int = 4  # DFlash anchors per sequence
    gamma: float = losses.DFLASH_GAMMA  # DFlash weight of offset k: exp(-(k-1)/gamma)

    def __post_init__(self):
        if isinstance(self.ttt_steps, bool) or not isinstance(self.ttt_steps, int) or self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be a positive integer, got {self.ttt_steps!r}")
        if not (isinstance(self.step_decay, (int, float)) and 0.0 < self.step_decay <= 1.0):
            raise ValueError(f"step_decay must be in (0, 1], got {self.step_decay!r}")
        if isinstance(self.num_anchors, bool) or not isinstance(self.num_anchors, int) or self.num_anchors < 1:
            raise ValueError(f"num_anchors must be a positive integer, got {self.num_anchors!r}")
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0, got {self.gamma!r}")


def _check_kind(spec: DrafterSpec) -> str:
    if spec.kind not in KINDS:
        raise ValueError(f"SFT supports drafters {KINDS}, got {spec.kind!r}")
    return spec.kind


def split_drafter_params(drafter: Drafter):
    """(trainable, drafter_frozen) of an EAGLE-3 / DFlash drafter (module docstring)."""
    kind = _check_kind(drafter.spec)
    if kind == "eagle3":
        return drafter.params["eagle"], {"vocab": drafter.params["vocab"]}
    return drafter.params["dflash"], {}


def abstract_trainable(spec: DrafterSpec):
    """Boxed (logically partitioned) shapes of the trainable parameters."""
    return e3.abstract_params(spec.config) if _check_kind(spec) == "eagle3" else dfm.abstract_params(spec.config)


class SFTShardings(NamedTuple):
    state: TrainState
    target: Any
    drafter_frozen: Any
    batch: dict


def make_shardings(mesh, spec: DrafterSpec, target_config: TransformerConfig, optimizer: optax.GradientTransformation,
                   rules=shd.LOGICAL_AXIS_RULES, cached_features: bool = False) -> SFTShardings:
    """Shardings of every train-step input, derived from `jax.eval_shape(init)` boxes.

    cached_features: batches also carry the target's hidden states (`feature_cache`)."""
    boxed = abstract_trainable(spec)
    param_sh = shd.shardings_for(boxed, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, nn.unbox(boxed))
    rep = shd.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: rep)
    state = TrainState(rep, param_sh, opt_sh, rep)
    target = shd.shardings_for(tfm.abstract_params(target_config), mesh, rules)
    frozen = {"vocab": {"d2t": rep, "t2d": rep}} if spec.kind == "eagle3" else {}
    batch = {"tokens": shd.batch_sharding(mesh, 2, rules), "loss_mask": shd.batch_sharding(mesh, 2, rules)}
    if cached_features:
        batch["aux"] = shd.batch_sharding(mesh, 4, rules)
        if spec.kind == "eagle3":
            batch["final"] = shd.batch_sharding(mesh, 3, rules)
    return SFTShardings(state, target, frozen, batch)


def initial_state(params, rng, *, optimizer) -> TrainState:
    """The step-0 state (pure; jitted by `init_train_state`, shape-evaluated by checkpoint.py)."""
    params = jax.tree.map(jnp.copy, params)  # the state owns its buffers (it is donated later)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


def init_train_state(trainable, optimizer: optax.GradientTransformation, shardings: SFTShardings, seed: int = 0) -> TrainState:
    """The initial state, built by a jit with `out_shardings` (params copied, never aliased)."""
    init = jax.jit(functools.partial(initial_state, optimizer=optimizer),
                   in_shardings=(shardings.state.params, shardings.state.rng), out_shardings=shardings.state)
    return init(trainable, jax.random.PRNGKey(seed))


def sft_loss(params, target_params, drafter_frozen, batch, key, *, spec: DrafterSpec, target_config: TransformerConfig,
             loss_config: SFTLossConfig) -> losses.LossOut:
    """The drafter's SFT loss on one batch; the target runs here, without gradient, unless the
    batch carries its cached hidden states ("aux" [B, T, n, D], EAGLE-3 also "final" [B, T, D])."""
    tokens = batch["tokens"].astype(jnp.int32)
    loss_mask = batch["loss_mask"]
    if "aux" in batch:
        aux, final_BTD = batch["aux"], batch.get("final")
    else:
        out = tfm.forward(target_params, target_config, tokens, hidden_layers=spec.target_hidden_layers)
        aux, final_BTD = out.aux_hidden, out.hidden_BTD
    aux = jax.lax.stop_gradient(aux)
    if spec.kind == "eagle3":
        target_logits = jax.lax.stop_gradient(tfm.lm_head(target_params, target_config, final_BTD))
        vocab = drafter_frozen["vocab"]
        return losses.eagle3_ttt_loss(params, spec.config, jax.lax.stop_gradient(target_params["embedding"]),
                                      vocab["d2t"], vocab["t2d"], aux, target_logits, tokens, loss_mask,
                                      steps=loss_config.ttt_steps, decay=loss_config.step_decay)
    shared = {k: jax.lax.stop_gradient(target_params[k]) for k in DFLASH_SHARED if k in target_params}
    anchors, keep = losses.sample_anchors(key, loss_mask, loss_config.num_anchors)
    return losses.dflash_loss(params, shared, spec.config, target_config, aux, tokens, loss_mask, anchors, keep,
                              gamma=loss_config.gamma)


def train_step(state: TrainState, target_params, drafter_frozen, batch, *, spec: DrafterSpec,
               target_config: TransformerConfig, optimizer: optax.GradientTransformation,
               loss_config: SFTLossConfig):
    """One SFT update. Returns (new state, metrics {loss, per_step_loss [S], accuracy [S],
    grad_norm})."""
    rng, key = jax.random.split(state.rng)

    def loss_fn(params):
        out = sft_loss(params, target_params, drafter_frozen, batch, key, spec=spec, target_config=target_config,
                       loss_config=loss_config)
        return out.loss, out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "per_step_loss": out.per_step_loss, "accuracy": out.accuracy,
               "grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, params, opt_state, rng), metrics


def make_train_step(spec: DrafterSpec, target_config: TransformerConfig, optimizer: optax.GradientTransformation,
                    shardings: SFTShardings, loss_config: Optional[SFTLossConfig] = None):
    """`train_step` jitted with explicit shardings; the state (argument 0) is donated.

    Returns step(state, target_params, drafter_frozen, batch) -> (state, metrics)."""
    _check_kind(spec)
    loss_config = loss_config or SFTLossConfig()
    fn = functools.partial(train_step, spec=spec, target_config=target_config, optimizer=optimizer,
                           loss_config=loss_config)
    rep = jax.tree.leaves(shardings.state.rng)[0]
    return jax.jit(fn,
                   in_shardings=(shardings.state, shardings.target, shardings.drafter_frozen, shardings.batch),
                   out_shardings=(shardings.state, rep),
                   donate_argnums=(0,))


def check_finite(metrics, step: int) -> None:
    """Host-side check: FloatingPointError naming the step when the loss is NaN / Inf."""
    loss = float(np.asarray(jax.device_get(metrics["loss"])))
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite SFT loss {loss} at step {step}")


def run(step_fn, state: TrainState, target_params, drafter_frozen, batches: Iterable[dict], shardings: SFTShardings,
        flop_counter=None, on_metrics=None) -> TrainState:
    """Host loop: places each batch with `shardings.batch`, steps, checks the loss is finite,
    counts FLOPs (`opd.training.flops.FlopCounter`) and hands metrics to `on_metrics(step,
    metrics)`. Raises FloatingPointError at the first non-finite loss."""
    for step, batch in enumerate(batches, start=int(jax.device_get(state.step))):
        batch = jax.device_put({k: jnp.asarray(batch[k]) for k in shardings.batch}, shardings.batch)
        state, metrics = step_fn(state, target_params, drafter_frozen, batch)
        check_finite(metrics, step)
        if flop_counter is not None:
            flop_counter.add_step(batch["tokens"].shape)
        if on_metrics is not None:
            on_metrics(step, metrics)
    return state
