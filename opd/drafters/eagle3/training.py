"""EAGLE-3 training: the SFT loss (training-time test), Draft-OPD replay and FLOPs.

Conventions (0-based positions): a training sequence is x_0..x_{T-1} (`tokens_BT`); the
target's causal forward over it gives, at position t, the aux features f_t of x_t and the
logits p_t of x_{t+1} given x_{<=t}. `loss_mask_BT[b, j] = 1` means "the prediction of token
x_j is trained" (e.g. j inside an assistant turn).

EAGLE-3 training-time test (SafeAILab/EAGLE `traineagle3/cnets.py`, SpecForge): `steps`
(default 7, EAGLE's `length` / SpecForge's `ttt_length`) unrolled drafter steps over all
indices t at once.
  step 1, index t: pair (f_t, x_{t+1}) at RoPE position t -> output hidden h^1_t, predicts
          x_{t+2} (target distribution p_{t+1});
  step k, index t: pair (h^{k-1}_t, x_{t+k}) at position t + k - 1, i.e. the drafter's own
          output of the previous step at the same index (its feature for the chain step
          that drafts x_{t+k+1}) with the input token shifted by one more position; predicts
          x_{t+k+1} (target distribution p_{t+k}).
  Attention of step k at index t: the step-1 keys of indices <= t (causal) plus the keys of
  steps 2..k at index t only: exactly what a chain of k - 1 draft steps from the verified
  pair t sees at inference (`opd.drafters.eagle3`).
  Loss of step k: soft cross-entropy -sum_w p_W(w) log q(w) between the drafter's draft-vocab
  distribution q and the target distribution restricted to the draft vocabulary
  (renormalised softmax over the columns d2t selects), summed over positions with
  mask_k[t] = loss_mask[t + k + 1] (0 when t + k + 1 >= T) and, as EAGLE / SpecForge do,
  only where the target's argmax token is in the draft vocabulary (t2d); divided by
  sum_t mask_k[t] (a per-token mean; EAGLE divides by B*T instead). Total = sum_k
  decay^(k-1) * loss_k, decay = 0.8. Accuracy of step k: argmax q == argmax p_W at the same
  positions, over sum mask_k (out-of-draft-vocab targets count as misses).

Packed rows (`segments`): RoPE positions restart per sequence, attention and the loss stay
inside each sequence; otherwise the same loss. The teacher (`Teacher`) needs only the draft
vocabulary's columns of the target's logits plus whether its argmax is among them; the feature
cache stores the argmax, so the step computes W of the V LM-head columns (`compact_teacher`).

Draft-OPD replay (`replay_logits`): the training-time-test unroll with the drafter's own drafts
as the step inputs at the anchor indices t = n - 2 (`ttt_logits(step_tokens=...)`, its head
applied at those indices only): step 1 is the pair (f_{n-2}, s_{n-1}) over the drafter's
cache of true features, step k >= 2 the pair (own output of step k-1, d_{k-1}) - the chain of
`Eagle3Spec.propose`. Error anchors: EAGLE-3's first TTT step already computes the fresh
chain's first draft at every position (t = n_r + n - 2). `replay_hidden` stops before the draft
head's matmul, so that Draft-OPD can compute log q in chunks of the draft vocabulary
(`opd.training.chunked_logprobs`).

Axis letters: B batch, T positions, D width, V target vocabulary, W draft vocabulary,
N query heads (= K*G), K kv heads, G query heads per kv head, H head dim, S steps,
R rollout rounds, A anchors.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd.drafters.base import LossOut, Segments, TargetFeatures
from opd.drafters.eagle3 import model as e3
from opd.models import transformer as tfm
from opd.training import chunked_logprobs as cl
from opd.training.losses import as_aux, shift_left
from opd.training.flops import count_params

TTT_STEPS = 7  # EAGLE `length`, SpecForge `--ttt-length`
STEP_DECAY = 0.8


@dataclasses.dataclass(frozen=True)
class Eagle3SFTLoss:
    """EAGLE-3's SFT loss options (`config.sft.loss` of an eagle3 drafter)."""

    ttt_steps: int = TTT_STEPS  # unrolled training-time-test steps
    step_decay: float = STEP_DECAY  # weight of step k: step_decay^(k-1)
    head_capacity: float = 1.0  # < 1: head + loss only at trained positions when at most this share of B*T

    def __post_init__(self):
        if isinstance(self.ttt_steps, bool) or not isinstance(self.ttt_steps, int) or self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be a positive integer, got {self.ttt_steps!r}")
        if not (isinstance(self.step_decay, (int, float)) and 0.0 < self.step_decay <= 1.0):
            raise ValueError(f"step_decay must be in (0, 1], got {self.step_decay!r}")
        if not (isinstance(self.head_capacity, (int, float)) and 0.0 < self.head_capacity <= 1.0):
            raise ValueError(f"head_capacity must be in (0, 1], got {self.head_capacity!r}")

# ----------------------------------------------------------------------------- SFT loss


def _e3_inputs(module, emb_BTD, feat_BTD):
    return jnp.concatenate([module.input_norm(emb_BTD), module.hidden_norm(feat_BTD)], axis=-1)


def _e3_post(module, feat_BTD, attn_BTD):
    h = feat_BTD + attn_BTD
    return h + module.mlp(module.mlp_norm(h))


def _e3_head(module, h_BTD):
    return module.head(h_BTD)


def _e3_final_norm(module, h_BTD):  # `head` before its matmul
    return module.final_norm(h_BTD)


def ttt_hidden(params, config: e3.Eagle3Config, embedding_VD, tokens_BT, target_hidden,
               steps: int = TTT_STEPS, step_tokens=None, segments: Segments | None = None) -> jax.Array:
    """The drafter's output hidden state of every TTT step (module docstring), [S, B, T, D]
    (the draft head, `draft_head`, turns them into logits).

    Args:
      params: trainable EAGLE-3 params (`drafter.params["eagle"]`).
      embedding_VD: the target's (frozen) embedding.
      tokens_BT: int32 tokens x_0..x_{T-1}.
      target_hidden: the 3 target layers' outputs ([B, T, 3, D] or 3 x [B, T, D]), in
        `config.target_layers` order.
      step_tokens: optional `steps` arrays [B, T]: the input token of step k at index t
        (default x_{t+k}, i.e. `shift_left(tokens_BT, k)`). Draft-OPD's replay passes the
        drafter's own drafts here, as its chain fed them at inference.
      segments: packed rows: RoPE positions restart per sequence and attention stays inside it.
    """
    if steps < 1:
        raise ValueError(f"TTT steps must be >= 1, got {steps}")
    if step_tokens is not None and len(step_tokens) != steps:
        raise ValueError(f"step_tokens has {len(step_tokens)} entries for {steps} steps")
    c = config
    model = e3.model_for(c)
    dt = jnp.dtype(c.dtype)
    variables = {"params": params}
    B, T = tokens_BT.shape
    K, G, H = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    a = params["attn"]
    wq, wk, wv, wo = (a[n].astype(dt) for n in ("q", "k", "v", "o"))
    inv_freq = tfm.rope_inv_freq(c)
    scale = 1.0 / np.sqrt(H)
    causal_TT = jnp.tril(jnp.ones((T, T), bool))
    if segments is None:
        base_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
        visible = causal_TT[None, None, None]  # [1, 1, 1, T, T]
    else:  # causal inside each packed sequence
        base_BT = segments.positions_BT.astype(jnp.int32)
        ids = segments.ids_BT
        visible = (causal_TT[None] & (ids[:, :, None] == ids[:, None, :]))[:, None, None]  # [B, 1, 1, T, T]

    feat = e3.fuse(params, c, as_aux(target_hidden, 3, "EAGLE-3 TTT")).astype(dt)
    k1 = v1 = None
    diag_k, diag_v, out = [], [], []
    for step in range(1, steps + 1):
        toks = shift_left(tokens_BT, step) if step_tokens is None else step_tokens[step - 1]  # x_{t+step}
        emb = jnp.take(embedding_VD, toks, axis=0).astype(dt)
        x = model.apply(variables, emb, feat, method=_e3_inputs).astype(dt)
        pos_BT = base_BT + (step - 1)
        q = tfm.apply_rope(jnp.einsum("bte,enh->btnh", x, wq), pos_BT, inv_freq).reshape(B, T, K, G, H)
        k = tfm.apply_rope(jnp.einsum("bte,ekh->btkh", x, wk), pos_BT, inv_freq)
        v = jnp.einsum("bte,ekh->btkh", x, wv)
        if step == 1:
            k1, v1 = k, v
        else:
            diag_k.append(k)
            diag_v.append(v)
        s1 = jnp.einsum("btkgh,bskh->bkgts", q, k1, preferred_element_type=jnp.float32) * scale
        s1 = jnp.where(visible, s1, tfm.NEG_INF)
        sd = [jnp.einsum("btkgh,btkh->bkgt", q, kj, preferred_element_type=jnp.float32)[..., None] * scale for kj in diag_k]
        probs = jax.nn.softmax(jnp.concatenate([s1] + sd, axis=-1), axis=-1).astype(dt)
        o = jnp.einsum("bkgts,bskh->btkgh", probs[..., :T], v1)
        for j, vj in enumerate(diag_v):
            o = o + jnp.einsum("bkgt,btkh->btkgh", probs[..., T + j], vj)
        attn = jnp.einsum("btnh,nhd->btd", o.reshape(B, T, K * G, H), wo)
        feat = model.apply(variables, feat, attn, method=_e3_post)
        out.append(feat)
    return jnp.stack(out)


def draft_head(params, config: e3.Eagle3Config, h_ND) -> jax.Array:
    """Draft-vocab logits [..., W] of drafter hidden states [..., D]."""
    return e3.model_for(config).apply({"params": params}, h_ND, method=_e3_head)


def ttt_logits(params, config: e3.Eagle3Config, embedding_VD, tokens_BT, target_hidden,
               steps: int = TTT_STEPS, step_tokens=None, at_BA=None, segments: Segments | None = None) -> jax.Array:
    """Draft-vocab logits of every TTT step: float32 [S, B, T, W], or [S, B, A, W] at the
    positions `at_BA` only (the head runs on those A positions alone). Arguments as `ttt_hidden`."""
    h_SBTD = ttt_hidden(params, config, embedding_VD, tokens_BT, target_hidden, steps, step_tokens, segments)
    if at_BA is not None:
        h_SBTD = jnp.take_along_axis(h_SBTD, at_BA[None, ..., None], axis=2)
    return draft_head(params, config, h_SBTD)




class Teacher(NamedTuple):
    """The target's distribution as the TTT loss reads it."""

    logp_BTW: jax.Array  # float32: log-softmax of the target's logits over the draft vocabulary's columns
    in_vocab_BT: jax.Array  # float32: 1 where the target's argmax (whole vocabulary) is in the draft vocabulary


def teacher_from_logits(target_logits_BTV, d2t_W, t2d_V) -> Teacher:
    """The teacher from the target's full logits (or log-probs) p_t at every position."""
    tl = target_logits_BTV.astype(jnp.float32)
    logp = jax.nn.log_softmax(jnp.take(tl, e3.draft_target_ids(d2t_W), axis=-1), axis=-1)
    return Teacher(logp, jnp.take(t2d_V, jnp.argmax(tl, axis=-1), axis=0).astype(jnp.float32))


def compact_teacher(target_params, target_config, final_BTD, top_BT, d2t_W, t2d_V) -> Teacher:
    """The same teacher from the target's last hidden state and its argmax (the feature cache):
    only the draft vocabulary's W LM-head columns are computed (2*D*W FLOPs per token, not 2*D*V)."""
    logits = tfm.lm_head_columns(target_params, target_config, final_BTD, e3.draft_target_ids(d2t_W))
    return Teacher(jax.nn.log_softmax(logits, axis=-1), jnp.take(t2d_V, top_BT, axis=0).astype(jnp.float32))


def teacher_from_features(target_params, target_config, features: TargetFeatures, d2t_W, t2d_V) -> Teacher:
    """`compact_teacher` when the features carry the target's argmax, else from full logits."""
    if features.top_BT is not None:
        return compact_teacher(target_params, target_config, features.final_BTD, features.top_BT, d2t_W, t2d_V)
    return teacher_from_logits(tfm.lm_head(target_params, target_config, features.final_BTD), d2t_W, t2d_V)


def _step_terms(logits_NW, logp_NW, pm_N):
    """sum pm * CE(p, q) and sum pm * [argmax q == argmax p] over N positions."""
    logq = jax.nn.log_softmax(logits_NW.astype(jnp.float32), axis=-1)
    ce = -jnp.sum(jnp.exp(logp_NW) * logq, axis=-1)
    hit = (jnp.argmax(logq, -1) == jnp.argmax(logp_NW, -1)).astype(jnp.float32)
    return jnp.sum(pm_N * ce), jax.lax.stop_gradient(jnp.sum(pm_N * hit))


def ttt_loss_from_hidden(out_SBTX, head, teacher: Teacher, loss_mask_BT, decay: float = STEP_DECAY,
                         segment_ids_BT=None, head_capacity: float = 1.0) -> LossOut:
    """The TTT loss (module docstring) from each step's drafter output: `head` maps out [N, X] to
    draft logits [N, W] (the draft head on hidden states, or the identity on logits).

    With `head_capacity` < 1 the head and the loss of a step run only on the trained positions
    (the up to C = ceil(head_capacity * B * T) positions with a loss term, gathered), whenever a
    step has at most C of them; a step with more runs on every position (`lax.cond`: the same
    loss either way, only one branch executes).
    """
    S, B, T = out_SBTX.shape[:3]
    N = B * T
    C = min(N, int(np.ceil(head_capacity * N)))
    mask_BT = loss_mask_BT.astype(jnp.float32)
    losses, accs, counts = [], [], []
    for i in range(S):
        step = i + 1
        logp_t = shift_left(teacher.logp_BTW, step)  # p_{t+step}
        m = shift_left(mask_BT, step + 1)  # loss_mask[t + step + 1]
        if segment_ids_BT is not None:  # x_{t+step+1} in the sequence of x_t (sequences are contiguous)
            m = m * (shift_left(segment_ids_BT, step + 1, fill=-1) == segment_ids_BT)
        pm = m * shift_left(teacher.in_vocab_BT, step)
        x_N, logp_N, pm_N = out_SBTX[i].reshape(N, -1), logp_t.reshape(N, -1), pm.reshape(N)
        if C < N:
            def gathered(x, lp, w):
                idx = jnp.argsort(w <= 0, stable=True)[:C]  # trained positions first
                return _step_terms(head(x[idx]), lp[idx], w[idx])

            loss_sum, hits = jax.lax.cond(jnp.sum(pm_N > 0) <= C, gathered,
                                          lambda x, lp, w: _step_terms(head(x), lp, w), x_N, logp_N, pm_N)
        else:
            loss_sum, hits = _step_terms(head(x_N), logp_N, pm_N)
        counts.append(jnp.sum(m))
        denom = jnp.maximum(counts[-1], 1.0)
        losses.append(loss_sum / denom)
        accs.append(hits / denom)
    weights = jnp.asarray([decay ** i for i in range(S)], jnp.float32)
    per_step = jnp.stack(losses)
    return LossOut(jnp.sum(weights * per_step), per_step, jnp.stack(accs), weights, sum(counts))


def ttt_loss_from_logits(logits_SBTW, teacher: Teacher, loss_mask_BT, decay: float = STEP_DECAY,
                         segment_ids_BT=None) -> LossOut:
    """The TTT loss (module docstring) from the drafter's per-step logits [S, B, T, W].

    Args:
      teacher: the target's distribution at every position (`teacher_from_logits`).
      loss_mask_BT: 1 where the prediction of that token is trained.
      segment_ids_BT: packed rows: a prediction is trained only inside its own sequence.
    """
    return ttt_loss_from_hidden(logits_SBTW, lambda x: x, teacher, loss_mask_BT, decay, segment_ids_BT)


def ttt_loss(params, config: e3.Eagle3Config, embedding_VD, teacher: Teacher, target_hidden, tokens_BT, loss_mask_BT,
             steps: int = TTT_STEPS, decay: float = STEP_DECAY, segments: Segments | None = None,
             head_capacity: float = 1.0) -> LossOut:
    """EAGLE-3 training-time-test loss (module docstring); differentiable in `params`."""
    h = ttt_hidden(params, config, embedding_VD, tokens_BT, target_hidden, steps, segments=segments)
    return ttt_loss_from_hidden(h, lambda x: draft_head(params, config, x), teacher, loss_mask_BT, decay,
                                None if segments is None else segments.ids_BT, head_capacity)


# ----------------------------------------------------------------------------- Draft-OPD replay


def replay_hidden(trainable, params, config: e3.Eagle3Config, rec, aux, error_anchors: bool = False):
    """`replay_logits` before the draft head's matmul: (the chain's final-normed hidden states
    [B, R, K, D], the fresh chains' first step [B, R, D] or None, the draft head's kernel as a
    `LinearHead` over the W draft tokens)."""
    B, R, K = rec.drafts_BRK.shape
    rows = jnp.arange(B)[:, None]
    t_BR = jnp.maximum(rec.anchor_BR - 2, 0)  # the pair (f_{n-2}, s_{n-1}) drafts d_1
    step_tokens = []
    for k in range(1, K + 1):
        toks = shift_left(rec.seq_BS, k)
        if k >= 2:  # the chain fed its own previous draft
            toks = toks.at[rows, t_BR].set(rec.drafts_BRK[:, :, k - 2])
        step_tokens.append(toks)
    at = t_BR
    if error_anchors:  # the first rejected draft's position n_r + n
        at = jnp.concatenate([t_BR, jnp.maximum(rec.anchor_BR + rec.num_accepted_BR - 2, 0)], axis=1)
    h_KBTD = ttt_hidden(trainable, config, params["embedding"], rec.seq_BS, aux, steps=K, step_tokens=step_tokens)
    h_KBAD = jnp.take_along_axis(h_KBTD, at[None, ..., None], axis=2)
    h_KBAD = e3.model_for(config).apply({"params": trainable}, h_KBAD, method=_e3_final_norm)
    head = cl.LinearHead(trainable["lm_head"], 1, config.dtype)
    out = jnp.moveaxis(h_KBAD[:, :, :R], 0, 2)  # [B, R, K, D]
    if not error_anchors:
        return out, None, head
    return out, h_KBAD[0, :, R:], head  # step 1 at the error positions = a fresh chain's first draft


def replay_logits(trainable, params, config: e3.Eagle3Config, rec, aux, error_anchors: bool = False):
    """The chain's logits at offsets 1..K of every recorded round [B, R, K, W] (module
    docstring); with `error_anchors` also the fresh chains' first drafts [B, R, W]."""
    h, err, head = replay_hidden(trainable, params, config, rec, aux, error_anchors)
    return head.logits(h) if err is None else (head.logits(h), head.logits(err))


# ----------------------------------------------------------------------------- FLOPs


def sft_flops(config: e3.Eagle3Config, batch: int, seq_len: int, steps: int, head_capacity: float = 1.0) -> int:
    """Training-time test: 6 * N_drafter * B * T * steps (N_drafter: fc, the decoder layer and
    the draft LM head), the head's share at the C = ceil(head_capacity * B * T) gathered positions."""
    n_d = count_params(e3.abstract_params(config))
    n_head = config.hidden_size * config.draft_vocab_size
    N = batch * seq_len
    return 6 * ((n_d - n_head) * N + n_head * min(N, int(np.ceil(head_capacity * N)))) * steps


def opd_flops(config: e3.Eagle3Config, batch: int, prompt_len: int, num_rounds: int, num_draft_tokens: int,
              seq_len: int, error_anchors: bool = False) -> int:
    """Rollout: the drafter's prefill over P and per round K chained steps + the K + 1 committed
    positions' cache entries (forward); replay: K TTT steps over all S positions with the
    draft LM head applied at the R anchors only (2R with error anchors)."""
    B, P, R, K, S = batch, prompt_len, num_rounds, num_draft_tokens, seq_len
    n_d = count_params(e3.abstract_params(config))
    n_head = config.hidden_size * config.draft_vocab_size
    A = R * (2 if error_anchors else 1)
    return 2 * n_d * B * (P + R * (2 * K + 1)) + 6 * (n_d - n_head) * B * S * K + 6 * n_head * B * A * K
