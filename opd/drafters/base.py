"""The drafter interface: what the speculative decoding engine, training and checkpoints call.

A drafter is a hashable, static `DrafterSpec` (its hyper-parameters and pure functions) plus
a parameter pytree. The engine (`opd.decoding.speculative`) calls, inside one jitted loop:

  state = spec.prefill(params, ctx, target_aux, cache_len)
  tokens_BK, logq_BKV, state = spec.propose(params, state, ctx, key, num_draft_tokens, sp)
  state = spec.commit(params, state, ctx, n_accepted_B, target_aux)

`ctx` is the committed text (`DraftContext`); `target_aux` the target's hidden states of the
layers named by `spec.target_hidden_layers` from the forward that just ran (the prompt
prefill, or the verify pass over [pending, d_1..d_K]), so drafting never costs an extra
target pass. `logq_BKV` are the drafter's *processed* log-probs (`process_logits` with the
same SamplingParams as the target): required when temperature > 0, where d_i must be a sample
from q_i; None is allowed for greedy decoding.

Trainable kinds also implement the training hooks below (SFT and Draft-OPD call only these;
they never look at `kind`). The parameter tree of a drafter splits into
  trainable   what the optimizer updates (`split_params(params)[0]`);
  frozen      the drafter's own non-trainable arrays (e.g. EAGLE-3's draft-vocabulary maps);
  shared      arrays it borrows from the target (its embedding / LM head), rebuilt from the
              target's params by `join_params`, never saved with the train state.

Axis letters: B batch, S sequence buffer, T positions, K draft tokens, V vocabulary,
W the drafter's output support (its draft vocabulary, or V), R rollout rounds.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp


class DraftContext(NamedTuple):
    """Committed tokens per row: prompt + generated (the last one is the *pending* token,
    whose target logits are computed by the next verify pass)."""

    seq_BS: jax.Array  # int32
    seq_len_B: jax.Array  # int32, number of committed tokens

    def pending(self) -> jax.Array:
        return jnp.take_along_axis(self.seq_BS, (self.seq_len_B - 1)[:, None], axis=1)[:, 0]


class LossOut(NamedTuple):
    """A drafter's SFT loss: the scalar and per-offset diagnostics (offsets: EAGLE-3's TTT
    steps, DFlash's block offsets, ...)."""

    loss: jax.Array  # scalar, the weighted total
    per_step_loss: jax.Array  # [S] unweighted loss per offset
    accuracy: jax.Array  # [S] top-1 accuracy per offset
    weights: jax.Array  # [S] offset weights
    supervised: jax.Array  # scalar: supervised predictions (position, offset) in the batch
    extra: Optional[dict] = None  # a kind's own scalar diagnostics (e.g. DFlash's oov_fraction), logged as metrics


class TargetFeatures(NamedTuple):
    """The frozen target's outputs an SFT loss reads (online, or from the feature cache)."""

    aux: Any  # the `target_hidden_layers` outputs: n arrays [B, T, D] (or one [B, T, n, D])
    final_BTD: Optional[jax.Array] = None  # final-normed last hidden (when `needs_final_hidden`)
    # int32 [B, T]: the target's argmax over its whole vocabulary at each position (the feature
    # cache stores it, so a loss over a draft vocabulary needs only those LM-head columns)
    top_BT: Optional[jax.Array] = None


class Segments(NamedTuple):
    """Packed training rows: several sequences per row. A sequence sees only its own tokens."""

    positions_BT: jax.Array  # int32: index of each token inside its own sequence (its RoPE position)
    ids_BT: jax.Array  # int32: 1, 2, ... per sequence in the row, 0 on padding


def _not_trainable(spec, what: str):
    return TypeError(f"{spec.kind} drafters are not trainable (no {what} hook)")


@dataclasses.dataclass(frozen=True)
class DrafterSpec(abc.ABC):
    """Base class of drafter specs. Subclasses are frozen dataclasses (jit static args)."""

    vocab_size: int

    kind = "base"
    target_hidden_layers: tuple = ()  # target layers whose outputs the drafter consumes
    needs_final_hidden = False  # the SFT loss reads the target's final hidden state (its logits)
    packed_sft = False  # the SFT loss takes packed rows (`segments`)
    # target LM-head columns the SFT loss computes from cached features (None: all V)
    teacher_columns = None

    # ------------------------------------------------------------------ inference

    @property
    def max_draft_tokens(self) -> Optional[int]:
        """The most tokens one round may draft (None: any number)."""
        return None

    max_draft_tokens_why = ""  # what sets `max_draft_tokens`, for the error message

    @property
    def target_hidden_size(self) -> Optional[int]:
        """Width of the target hidden states (`target_hidden_layers`) the drafter reads; None when
        it reads none. Decoding checks it against the target before any work."""
        return None

    def check_num_draft_tokens(self, num_draft_tokens: int) -> None:
        """ValueError unless 1 <= K <= `max_draft_tokens`."""
        K, most = int(num_draft_tokens), self.max_draft_tokens
        if most is None and K < 1:
            raise ValueError(f"num_draft_tokens (K) must be >= 1, got {num_draft_tokens}")
        if most is not None and not 1 <= K <= most:
            why = f" ({self.max_draft_tokens_why})" if self.max_draft_tokens_why else ""
            raise ValueError(f"num_draft_tokens (K={num_draft_tokens}) must be in [1, {most}] for this {self.kind} "
                             f"drafter{why}")

    @abc.abstractmethod
    def prefill(self, params, ctx: DraftContext, target_aux, cache_len: int):
        """Drafter state after the prompt (`ctx` holds the padded prompt bucket + first token)."""

    @abc.abstractmethod
    def propose(self, params, state, ctx: DraftContext, key, num_draft_tokens: int, sp):
        """-> (tokens [B, K] int32, processed log q [B, K, V] or None when greedy, state)."""

    @abc.abstractmethod
    def commit(self, params, state, ctx: DraftContext, n_accepted_B, target_aux):
        """State after a verify round committed `n_accepted + 1` tokens (ctx is already updated)."""

    # ------------------------------------------------------------------ training hooks

    def split_params(self, params) -> tuple:
        """(trainable, frozen) of a full parameter tree (module docstring)."""
        raise _not_trainable(self, "split_params")

    def join_params(self, trainable, frozen, target_params):
        """The full parameter tree (as `Drafter.params`) from its pieces and the target's params."""
        raise _not_trainable(self, "join_params")

    def shared_params(self, params) -> dict:
        """The target arrays a full parameter tree borrows, keyed as in the target's tree
        (what `join_params` reads from `target_params`)."""
        raise _not_trainable(self, "shared_params")

    def abstract_trainable(self):
        """Shapes of the trainable parameters with their logical axis names (nn.Partitioned
        boxes, as `jax.eval_shape(init)` gives them), for shardings."""
        raise _not_trainable(self, "abstract_trainable")

    def with_param_dtype(self, dtype: str) -> "DrafterSpec":
        """This spec with its trainable parameters stored in `dtype` (computation unchanged)."""
        raise _not_trainable(self, "with_param_dtype")

    def sft_loss(self, trainable, frozen, target_params, target_config, features: TargetFeatures, tokens_BT,
                 loss_mask_BT, key, loss_config, segments: Optional[Segments] = None) -> LossOut:
        """The SFT loss of one batch (differentiable in `trainable`; inputs are frozen). Kinds
        with `packed_sft` take `segments` (packed rows); others are only called without it."""
        raise _not_trainable(self, "sft_loss")

    def sft_flops(self, target_config, batch: int, seq_len: int, loss_config) -> int:
        """Training FLOPs of the drafter's part of one SFT step (`opd.training.flops` convention)."""
        raise _not_trainable(self, "sft_flops")

    def support_ids(self, params) -> jax.Array:
        """Target ids of the drafter's output support [W] (default: the whole vocabulary)."""
        return jnp.arange(self.vocab_size, dtype=jnp.int32)

    def replay_logits(self, trainable, params, target_config, rec, aux, error_anchors: bool = False):
        """Draft-OPD replay: the drafter's logits over its support at offsets 1..K of every
        recorded rollout round [B, R, K, W], recomputed exactly as it drafted them and
        differentiable in `trainable` (`opd.training.rollout`). With `error_anchors`, returns
        (that, the first-draft logits of fresh chains anchored at each round's error position
        [B, R, W])."""
        raise _not_trainable(self, "replay_logits")

    def replay_hidden(self, trainable, params, target_config, rec, aux, error_anchors: bool = False):
        """`replay_logits` before the drafter's final linear head, or None when the kind has no
        such head: (hidden states [B, R, K, D], the error anchors' [B, R, D] or None, the head as
        an `opd.training.chunked_logprobs.LinearHead` over the support), with
        `head.logits(hidden)` equal to `replay_logits`. Draft-OPD then computes log q in chunks of
        the support (`OPDConfig.vocab_chunk`) and never stores [B, R, K, W] logits."""
        return None

    def opd_flops(self, target_config, batch: int, prompt_len: int, num_rounds: int, num_draft_tokens: int,
                  seq_len: int, error_anchors: bool = False) -> int:
        """Training FLOPs of the drafter's part of one Draft-OPD step (its drafting in the
        rollout, forward only, plus the replay, forward and backward)."""
        raise _not_trainable(self, "opd_flops")


@dataclasses.dataclass
class Drafter:
    """What `opd.init_drafter` / `opd.load_drafter` return."""

    spec: DrafterSpec
    params: Any = None
    tokenizer: Optional[Any] = None  # set when the drafter has its own tokenizer (LM drafter)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def with_trainable(self, trainable) -> "Drafter":
        """This drafter with its trainable parameters replaced (inverse of `split_params`)."""
        _, frozen = self.spec.split_params(self.params)
        return dataclasses.replace(self, params=self.spec.join_params(trainable, frozen,
                                                                      self.spec.shared_params(self.params)))

    def with_param_dtype(self, dtype: str) -> "Drafter":
        """This drafter with its trainable parameters stored in `dtype` (e.g. float32 master
        weights, and so float32 AdamW moments, next to a bf16 target); the computation keeps the
        spec's compute dtype. "" keeps them as they are."""
        if not dtype:
            return self
        spec = self.spec.with_param_dtype(dtype)
        if spec == self.spec:
            return self
        trainable, frozen = self.split()
        cast = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, trainable)
        return dataclasses.replace(self, spec=spec, params=spec.join_params(cast, frozen, self.spec.shared_params(self.params)))

    def split(self) -> tuple:
        """(trainable, frozen) parameters (`DrafterSpec.split_params`)."""
        return self.spec.split_params(self.params)
