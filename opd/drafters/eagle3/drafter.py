"""EAGLE-3 drafting on the engine's drafter interface (chain drafting, one draft per step).

Parameters (`Drafter.params`):
  {"eagle": trainable EAGLE-3 params (`opd.drafters.eagle3.model`),
   "vocab": {"d2t": int32 [W], "t2d": bool [V]}   (non-trainable, from the checkpoint),
   "embedding": the target's embedding [V, D]      (frozen, shared: the target's own array)}
Only `params["eagle"]` is trained.

Positions (0-based) and the engine's invariants: the committed text is s_0..s_{n-1}
(n = seq_len), s_{n-1} pending; the target has features f_0..f_{n-2}. Pair t is
(f_t, s_{t+1}) at position t, and its output predicts s_{t+2}.

State (`Eagle3State`), between rounds:
  cache     the drafter's one-layer KV cache; slots 0..n-2 hold the pairs t = 0..n-2, all
            with *true* target features; `lengths` = n - 1 (= the target cache's length).
            Slots beyond are stale (chain steps, rejected pairs) and masked by position.
  hidden_BD pre-norm output hidden of pair n-2 (the last pair with a true feature),
  logits_BW its draft-vocab logits: they give d_1 (a prediction of s_n).

propose: d_1 from `logits_BW`; step k >= 2 runs the pair (h_{k-1}, d_{k-1}) at position
  n - 3 + k, h_1 = `hidden_BD`, h_k its own output (K - 1 drafter forwards). The chain's
  cache slots are written then dropped (lengths are restored).
commit: the verify pass gave target features at positions n-1..n-1+K (the pending token and
  d_1..d_K). With a accepted, the new text is s_0..s_{n-1}, d_1..d_a, b and the pairs
  t = n-1..n-1+a (features of the pending token and d_1..d_a, each with the token after it)
  become known: they run at positions n-1..n-1+K in one fixed-shape call (K + 1 pairs, the
  a + 1 first valid), lengths advance by a + 1 and the state keeps pair n-1+a's output.
  Rows that did not advance (finished) keep their state.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd.drafters.base import DraftContext, Drafter, DrafterSpec, LossOut, Segments, TargetFeatures
from opd.drafters.eagle3 import model as e3
from opd.drafters.eagle3 import training as tr
from opd.models import transformer as tfm


class Eagle3State(NamedTuple):
    cache: tfm.KVCache
    hidden_BD: jax.Array
    logits_BW: jax.Array


@dataclasses.dataclass(frozen=True)
class Eagle3Spec(DrafterSpec):
    config: e3.Eagle3Config = None

    kind = "eagle3"
    needs_final_hidden = True  # the TTT loss distils the target's distribution
    packed_sft = True

    @property
    def teacher_columns(self) -> int:  # the compact teacher: the draft vocabulary's columns
        return self.config.draft_vocab_size

    @property
    def target_hidden_size(self) -> int:
        return self.config.target_hidden_size

    def __post_init__(self):
        if self.config is None:
            raise ValueError("Eagle3Spec needs an Eagle3Config")
        if self.vocab_size != self.config.vocab_size:
            raise ValueError(f"Eagle3Spec vocab_size {self.vocab_size} != config.vocab_size {self.config.vocab_size}")
        object.__setattr__(self, "target_hidden_layers", tuple(self.config.target_layers))

    def _run(self, params, tokens_BT, feat_BTD, cache):
        return e3.forward(params["eagle"], self.config, params["embedding"], tokens_BT, feat_BTD, cache=cache)

    def prefill(self, params, ctx: DraftContext, target_aux, cache_len: int):
        # ctx: the padded prompt bucket [B, P] + the first generated token; target_aux: the
        # prompt's features [B, P, D] (valid for t < prompt length). Pairs t = 0..P-1 read
        # tokens 1..P; pair len-1 pairs the last prompt feature with the first generated token.
        B, P = target_aux[0].shape[:2]
        feat = e3.fuse(params["eagle"], self.config, target_aux)
        cache = e3.init_cache(self.config, B, cache_len)
        out = self._run(params, ctx.seq_BS[:, 1 : P + 1], feat, cache)
        last_B = ctx.seq_len_B - 2  # pair n-2
        rows = jnp.arange(B)
        return Eagle3State(out.cache._replace(lengths=ctx.seq_len_B - 1), out.hidden_BTD[rows, last_B], out.logits_BTW[rows, last_B])

    def propose(self, params, state: Eagle3State, ctx: DraftContext, key, num_draft_tokens: int, sp):
        d2t, V = params["vocab"]["d2t"], self.vocab_size
        keys = jax.random.split(key, num_draft_tokens)
        d1, logq1 = e3.sample_draft(keys[0], state.logits_BW, d2t, V, sp)

        def step(carry, key_i):
            cache, hidden, tok = carry
            o = self._run(params, tok[:, None], hidden[:, None], cache)
            d, logq = e3.sample_draft(key_i, o.logits_BTW[:, 0], d2t, V, sp)
            return (o.cache, o.hidden_BTD[:, 0], d), (d, logq)

        toks, logqs = [d1[:, None]], [None if logq1 is None else logq1[:, None]]
        cache = state.cache
        if num_draft_tokens > 1:
            (cache, _, _), (d_KB, logq_KBV) = jax.lax.scan(step, (cache, state.hidden_BD, d1), keys[1:])
            toks.append(jnp.swapaxes(d_KB, 0, 1))
            logqs.append(None if logq_KBV is None else jnp.swapaxes(logq_KBV, 0, 1))
        tokens_BK = jnp.concatenate(toks, axis=1)
        logq_BKV = None if sp.greedy else jnp.concatenate(logqs, axis=1)
        # Chain slots are dropped: only true-feature pairs count.
        return tokens_BK, logq_BKV, state._replace(cache=cache._replace(lengths=state.cache.lengths))

    def commit(self, params, state: Eagle3State, ctx: DraftContext, n_accepted_B, target_aux):
        # target_aux: [B, K+1, D] features of [pending, d_1..d_K] at positions start..start+K.
        B, K1 = target_aux[0].shape[:2]
        S = ctx.seq_BS.shape[1]
        start_B = state.cache.lengths  # n - 1 (old)
        valid_B = ctx.seq_len_B - 1 - start_B  # a + 1 for rows that advanced, 0 for finished rows
        idx_BT = jnp.clip(start_B[:, None] + 1 + jnp.arange(K1)[None], 0, S - 1)
        tokens_BT = jnp.take_along_axis(ctx.seq_BS, idx_BT, axis=1)
        feat = e3.fuse(params["eagle"], self.config, target_aux)
        out = self._run(params, tokens_BT, feat, state.cache)
        last_B = jnp.maximum(valid_B - 1, 0)
        rows = jnp.arange(B)
        moved = (valid_B > 0)[:, None]
        return Eagle3State(
            out.cache._replace(lengths=start_B + valid_B),
            jnp.where(moved, out.hidden_BTD[rows, last_B], state.hidden_BD),
            jnp.where(moved, out.logits_BTW[rows, last_B], state.logits_BW),
        )

    # ------------------------------------------------------------------ training hooks
    # params = {"eagle": trainable, "vocab": {"d2t", "t2d"} (frozen), "embedding": the target's}

    def split_params(self, params):
        return params["eagle"], {"vocab": params["vocab"]}

    def join_params(self, trainable, frozen, target_params):
        return {"eagle": trainable, "vocab": frozen["vocab"], "embedding": target_params["embedding"]}

    def shared_params(self, params):
        return {"embedding": params["embedding"]}

    def abstract_trainable(self):
        return e3.abstract_params(self.config)

    def with_param_dtype(self, dtype: str) -> "Eagle3Spec":
        return dataclasses.replace(self, config=dataclasses.replace(self.config, param_dtype=dtype))

    def sft_loss(self, trainable, frozen, target_params, target_config, features: TargetFeatures, tokens_BT,
                 loss_mask_BT, key, loss_config: tr.Eagle3SFTLoss, segments: Segments | None = None) -> LossOut:
        vocab = frozen["vocab"]
        teacher = jax.lax.stop_gradient(tr.teacher_from_features(target_params, target_config, features, vocab["d2t"],
                                                                 vocab["t2d"]))
        return tr.ttt_loss(trainable, self.config, jax.lax.stop_gradient(target_params["embedding"]), teacher,
                           features.aux, tokens_BT, loss_mask_BT, steps=loss_config.ttt_steps,
                           decay=loss_config.step_decay, segments=segments, head_capacity=loss_config.head_capacity)

    def sft_flops(self, target_config, batch: int, seq_len: int, loss_config: tr.Eagle3SFTLoss) -> int:
        return tr.sft_flops(self.config, batch, seq_len, loss_config.ttt_steps, loss_config.head_capacity)

    def support_ids(self, params) -> jax.Array:
        return e3.draft_target_ids(params["vocab"]["d2t"])

    def replay_logits(self, trainable, params, target_config, rec, aux, error_anchors: bool = False):
        return tr.replay_logits(trainable, params, self.config, rec, aux, error_anchors)

    def replay_hidden(self, trainable, params, target_config, rec, aux, error_anchors: bool = False):
        return tr.replay_hidden(trainable, params, self.config, rec, aux, error_anchors)

    def opd_flops(self, target_config, batch: int, prompt_len: int, num_rounds: int, num_draft_tokens: int,
                  seq_len: int, error_anchors: bool = False) -> int:
        return tr.opd_flops(self.config, batch, prompt_len, num_rounds, num_draft_tokens, seq_len, error_anchors)


def special_token_ids(target) -> tuple:
    """EOS / BOS / PAD ids of the target: always kept in the draft vocabulary."""
    c = target.config
    ids = set(int(i) for i in target.eos_token_ids)
    ids.update(int(i) for i in (c.bos_token_id, c.pad_token_id) if i is not None)
    return tuple(sorted(i for i in ids if 0 <= i < c.vocab_size))


def _warm_start(eagle, target, config: e3.Eagle3Config, d2t):
    tp, tc = target.params, target.config
    if config.target_hidden_size != config.hidden_size or config.hidden_size != tc.hidden_size:
        return eagle  # no pass-through when widths differ
    out_VD = tp["embedding"] if tc.tie_word_embeddings else tp["lm_head"].T
    D, dt = config.hidden_size, eagle["fc"].dtype
    fc = jnp.zeros_like(eagle["fc"]).at[2 * D :].set(jnp.eye(D, dtype=dt))
    rows = e3.draft_target_ids(jnp.asarray(d2t))  # d2t holds offsets: target id = draft id + d2t
    return {**eagle, "fc": fc, "lm_head": jnp.asarray(out_VD)[rows].T.astype(eagle["lm_head"].dtype),
            "final_norm": {"scale": jnp.asarray(tp["final_norm"]["scale"]).astype(dt)}}


def init_eagle3(target, seed: int = 0, token_counts=None, special_ids: Optional[Sequence[int]] = None,
                warm_start: bool = False, **overrides) -> Drafter:
    """A randomly initialised EAGLE-3 drafter for `target` (an `opd.Target`).

    Args:
      seed: PRNG seed of the trainable parameters.
      token_counts: [V] token frequencies of the training data, used once here to choose the
        draft vocabulary (`build_draft_vocab`); None keeps the lowest ids. Never rebuilt later.
      special_ids: ids always kept in the draft vocabulary (default: the target's EOS/BOS/PAD).
      warm_start: start from the target's "logit lens" at its last fused layer: `fc` passes
        that layer's output through (identity block, zeros elsewhere), and the final norm and
        draft LM head are the target's (its output rows at d2t); the decoder layer stays
        random. Default False (everything random, EAGLE-3's own initialisation); whether the
        warm start trains faster is not measured yet.
      **overrides: `Eagle3Config` fields (target_layers, draft_vocab_size, intermediate_size, ...).
    Returns:
      Drafter(Eagle3Spec, {"eagle": trainable, "vocab": {d2t, t2d}, "embedding": target's}).
    """
    config = e3.Eagle3Config.for_target(target.config, **overrides)
    V, W = config.vocab_size, config.draft_vocab_size
    counts = np.zeros(V) if token_counts is None else np.asarray(token_counts)
    if counts.shape != (V,):
        raise ValueError(f"token_counts must have shape ({V},) (the target vocabulary), got {counts.shape}")
    d2t, t2d = e3.build_draft_vocab(counts, W, special_token_ids(target) if special_ids is None else special_ids)
    eagle = e3.init_params(config, jax.random.PRNGKey(seed))
    if warm_start:
        eagle = _warm_start(eagle, target, config, d2t)
    params = {
        "eagle": eagle,
        "vocab": {"d2t": jnp.asarray(d2t), "t2d": jnp.asarray(t2d)},
        "embedding": target.params["embedding"],
    }
    return Drafter(Eagle3Spec(vocab_size=V, config=config), params)
