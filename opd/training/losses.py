"""SFT losses of the EAGLE-3 and DFlash drafters (pure functions, jit/grad friendly).

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

DFlash (SpecForge `OnlineDFlashModel`): per sequence `num_anchors` random anchor positions a
with loss_mask[a] = 1 and a <= T - 2 (without replacement; rows with fewer eligible positions
keep fewer anchors). Block [x_a, MASK x (Q-1)] at positions a..a+Q-1, context = target
features of positions < a (`opd.models.dflash.logits_from_features` semantics, K/V of the
context computed once and shared by every anchor of the row). Offset k = 1..Q-1 predicts
x_{a+k}: hard cross-entropy to the sequence token (what SpecForge does; on target-generated
sequences that token is the target's own sample), weight w = loss_mask[a+k] *
[a + k < T] * exp(-(k-1)/gamma), gamma = 7. Loss = sum w * CE / sum w. Accuracy of offset k
= argmax == token over positions with w > 0.

Axis letters: B batch, T positions, D width, V target vocabulary, W draft vocabulary,
N query heads (= K*G), K kv heads, G query heads per kv head, H head dim, S steps,
A anchors per row, Q block size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd.models import dflash as dfm
from opd.models import eagle3 as e3
from opd.models import transformer as tfm

EAGLE3_TTT_STEPS = 7  # EAGLE `length`, SpecForge `--ttt-length`
EAGLE3_STEP_DECAY = 0.8
DFLASH_GAMMA = 7.0
_NEG_INF = -1e30


def _as_aux(target_hidden, n: int, what: str) -> tuple:
    """[B, T, n, D] array or a sequence of n arrays [B, T, D] -> tuple of n arrays."""
    if isinstance(target_hidden, (tuple, list)):
        aux = tuple(target_hidden)
    else:
        if target_hidden.ndim != 4:
            raise ValueError(f"{what}: target hidden states must be [B, T, {n}, D] or {n} arrays [B, T, D], "
                             f"got shape {target_hidden.shape}")
        aux = tuple(target_hidden[:, :, i] for i in range(target_hidden.shape[2]))
    if len(aux) != n:
        raise ValueError(f"{what}: expected {n} target hidden states, got {len(aux)}")
    return aux


def shift_left(x, k: int, fill=0):
    """y[:, t] = x[:, t + k] for t + k < T, else `fill` (axis 1; k >= 0)."""
    if k == 0:
        return x
    T = x.shape[1]
    if k >= T:
        return jnp.full_like(x, fill)
    pad = jnp.full(x.shape[:1] + (k,) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


# ----------------------------------------------------------------------------- EAGLE-3


def _e3_inputs(module, emb_BTD, feat_BTD):
    return jnp.concatenate([module.input_norm(emb_BTD), module.hidden_norm(feat_BTD)], axis=-1)


def _e3_post(module, feat_BTD, attn_BTD):
    h = feat_BTD + attn_BTD
    return h + module.mlp(module.mlp_norm(h))


def _e3_head(module, h_BTD):
    return module.head(h_BTD)


def eagle3_ttt_logits(params, config: e3.Eagle3Config, embedding_VD, tokens_BT, target_hidden,
                      steps: int = EAGLE3_TTT_STEPS, step_tokens=None, at_BA=None) -> jax.Array:
    """Draft-vocab logits of every TTT step (module docstring): float32 [S, B, T, W], or
    [S, B, A, W] at the positions `at_BA` only (the head runs on those A positions alone).

    Args:
      params: trainable EAGLE-3 params (`drafter.params["eagle"]`).
      embedding_VD: the target's (frozen) embedding.
      tokens_BT: int32 tokens x_0..x_{T-1}.
      target_hidden: the 3 target layers' outputs ([B, T, 3, D] or 3 x [B, T, D]), in
        `config.target_layers` order.
      step_tokens: optional `steps` arrays [B, T]: the input token of step k at index t
        (default x_{t+k}, i.e. `shift_left(tokens_BT, k)`). Draft-OPD's replay passes the
        drafter's own drafts here, as its chain fed them at inference.
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

    feat = e3.fuse(params, c, _as_aux(target_hidden, 3, "EAGLE-3 TTT")).astype(dt)
    k1 = v1 = None
    diag_k, diag_v, out = [], [], []
    for step in range(1, steps + 1):
        toks = shift_left(tokens_BT, step) if step_tokens is None else step_tokens[step - 1]  # x_{t+step}
        emb = jnp.take(embedding_VD, toks, axis=0).astype(dt)
        x = model.apply(variables, emb, feat, method=_e3_inputs).astype(dt)
        pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None] + (step - 1), (B, T))
        q = tfm.apply_rope(jnp.einsum("bte,enh->btnh", x, wq), pos_BT, inv_freq).reshape(B, T, K, G, H)
        k = tfm.apply_rope(jnp.einsum("bte,ekh->btkh", x, wk), pos_BT, inv_freq)
        v = jnp.einsum("bte,ekh->btkh", x, wv)
        if step == 1:
            k1, v1 = k, v
        else:
            diag_k.append(k)
            diag_v.append(v)
        s1 = jnp.einsum("btkgh,bskh->bkgts", q, k1, preferred_element_type=jnp.float32) * scale
        s1 = jnp.where(causal_TT[None, None, None], s1, _NEG_INF)
        sd = [jnp.einsum("btkgh,btkh->bkgt", q, kj, preferred_element_type=jnp.float32)[..., None] * scale for kj in diag_k]
        probs = jax.nn.softmax(jnp.concatenate([s1] + sd, axis=-1), axis=-1).astype(dt)
        o = jnp.einsum("bkgts,bskh->btkgh", probs[..., :T], v1)
        for j, vj in enumerate(diag_v):
            o = o + jnp.einsum("bkgt,btkh->btkgh", probs[..., T + j], vj)
        attn = jnp.einsum("btnh,nhd->btd", o.reshape(B, T, K * G, H), wo)
        feat = model.apply(variables, feat, attn, method=_e3_post)
        h = feat if at_BA is None else jnp.take_along_axis(feat, at_BA[..., None], axis=1)
        out.append(model.apply(variables, h, method=_e3_head))
    return jnp.stack(out)


class LossOut(NamedTuple):
    loss: jax.Array  # scalar, the weighted total
    per_step_loss: jax.Array  # [S] (EAGLE-3 steps) or [Q-1] (DFlash offsets), unweighted
    accuracy: jax.Array  # [S] or top-1 accuracy
    weights: jax.Array  # [S] or the step / offset weights


def eagle3_ttt_loss_from_logits(logits_SBTW, d2t_W, t2d_V, target_logits_BTV, loss_mask_BT,
                                decay: float = EAGLE3_STEP_DECAY) -> LossOut:
    """The TTT loss (module docstring) from the drafter's per-step logits.

    Args:
      logits_SBTW: drafter logits of steps 1..S ([S, B, T, W]).
      d2t_W, t2d_V: the draft-vocab maps (`opd.models.eagle3`).
      target_logits_BTV: target logits (or log-probs) p_t at every position.
      loss_mask_BT: 1 where the prediction of that token is trained.
    """
    S, B, T, W = logits_SBTW.shape
    mask_BT = loss_mask_BT.astype(jnp.float32)
    tl = target_logits_BTV.astype(jnp.float32)
    logp_BTW = jax.nn.log_softmax(jnp.take(tl, e3.draft_target_ids(d2t_W), axis=-1), axis=-1)
    in_vocab_BT = jnp.take(t2d_V, jnp.argmax(tl, axis=-1), axis=0).astype(jnp.float32)
    losses, accs = [], []
    for i in range(S):
        step = i + 1
        logp_t = shift_left(logp_BTW, step)  # p_{t+step}
        m = shift_left(mask_BT, step + 1)  # loss_mask[t + step + 1]
        pm = m * shift_left(in_vocab_BT, step)
        logq = jax.nn.log_softmax(logits_SBTW[i].astype(jnp.float32), axis=-1)
        ce_BT = -jnp.sum(jnp.exp(logp_t) * logq, axis=-1)
        denom = jnp.maximum(jnp.sum(m), 1.0)
        losses.append(jnp.sum(pm * ce_BT) / denom)
        hit = (jnp.argmax(logq, -1) == jnp.argmax(logp_t, -1)).astype(jnp.float32)
        accs.append(jax.lax.stop_gradient(jnp.sum(pm * hit) / denom))
    weights = jnp.asarray([decay ** i for i in range(S)], jnp.float32)
    per_step = jnp.stack(losses)
    return LossOut(jnp.sum(weights * per_step), per_step, jnp.stack(accs), weights)


def eagle3_ttt_loss(params, config: e3.Eagle3Config, embedding_VD, d2t_W, t2d_V, target_hidden, target_logits_BTV,
                    tokens_BT, loss_mask_BT, steps: int = EAGLE3_TTT_STEPS, decay: float = EAGLE3_STEP_DECAY) -> LossOut:
    """EAGLE-3 training-time-test loss (module docstring); differentiable in `params`."""
    logits = eagle3_ttt_logits(params, config, embedding_VD, tokens_BT, target_hidden, steps)
    return eagle3_ttt_loss_from_logits(logits, d2t_W, t2d_V, target_logits_BTV, loss_mask_BT, decay)


# ----------------------------------------------------------------------------- DFlash


def sample_anchors(key, loss_mask_BT, num_anchors: int):
    """Random anchor positions without replacement among {a : loss_mask[a] = 1, a <= T - 2}.

    Returns (anchors int32 [B, A], keep bool [B, A]); rows with fewer than A eligible
    positions have keep = False on the extra slots (their anchor is arbitrary)."""
    B, T = loss_mask_BT.shape
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    if num_anchors > T:
        raise ValueError(f"num_anchors ({num_anchors}) exceeds the sequence length ({T})")
    eligible = (loss_mask_BT > 0) & (jnp.arange(T)[None] <= T - 2)
    u = jnp.where(eligible, jax.random.uniform(key, (B, T)), 2.0)
    anchors = jnp.argsort(u, axis=1)[:, :num_anchors].astype(jnp.int32)
    return anchors, jnp.take_along_axis(eligible, anchors, axis=1)


def dflash_offset_weights(block_size: int, gamma: float = DFLASH_GAMMA) -> jax.Array:
    """[Q-1] weights exp(-(k-1)/gamma) of offsets k = 1..Q-1."""
    if gamma <= 0:
        raise ValueError(f"DFlash loss gamma must be > 0, got {gamma}")
    k = np.arange(1, block_size, dtype=np.float64)
    return jnp.asarray(np.exp(-(k - 1) / gamma), jnp.float32)


def dflash_block_logits(params, target_params, config: dfm.DFlashConfig, tconfig, target_hidden, tokens_BT,
                        anchors_BA) -> jax.Array:
    """Logits [B, A, Q-1, V] of the blocks anchored at `anchors_BA` (context: positions < anchor)."""
    B, T = tokens_BT.shape
    aux = _as_aux(target_hidden, len(config.target_layer_ids), "DFlash")
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    ctx_k, ctx_v = dfm.context_kv(params, config, dfm.context_features(params, config, aux), pos_BT)
    anchor_tok_BA = jnp.take_along_axis(tokens_BT, anchors_BA, axis=1)

    def one(anchor_B, start_B):
        return dfm.block_logits(params, target_params, config, tconfig, anchor_B, start_B, ctx_k, ctx_v,
                                pos_BT < start_B[:, None])

    return jnp.swapaxes(jax.vmap(one, in_axes=(1, 1))(anchor_tok_BA, anchors_BA), 0, 1)


def dflash_loss_from_logits(logits_BAKV, tokens_BT, loss_mask_BT, anchors_BA, keep_BA,
                            gamma: float = DFLASH_GAMMA) -> LossOut:
    """Weighted block CE (module docstring); K = Q - 1 offsets."""
    B, A, Km1, V = logits_BAKV.shape
    T = tokens_BT.shape[1]
    w_k = dflash_offset_weights(Km1 + 1, gamma)
    idx_BAK = anchors_BA[..., None] + jnp.arange(1, Km1 + 1, dtype=jnp.int32)[None, None]
    in_seq = idx_BAK < T
    safe = jnp.clip(idx_BAK, 0, T - 1).reshape(B, A * Km1)
    labels = jnp.take_along_axis(tokens_BT, safe, axis=1).reshape(B, A, Km1)
    lm = jnp.take_along_axis(loss_mask_BT.astype(jnp.float32), safe, axis=1).reshape(B, A, Km1)
    on = keep_BA[..., None].astype(jnp.float32) * in_seq.astype(jnp.float32) * lm  # [B, A, K]
    w = on * w_k[None, None]
    logits = logits_BAKV.astype(jnp.float32)
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    loss = jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-6)
    cnt_k = jnp.maximum(jnp.sum(on, axis=(0, 1)), 1.0)
    per_offset = jnp.sum(on * ce, axis=(0, 1)) / cnt_k
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    acc = jax.lax.stop_gradient(jnp.sum(on * hit, axis=(0, 1)) / cnt_k)
    return LossOut(loss, per_offset, acc, w_k)


def dflash_loss(params, target_params, config: dfm.DFlashConfig, tconfig, target_hidden, tokens_BT, loss_mask_BT,
                anchors_BA, keep_BA, gamma: float = DFLASH_GAMMA) -> LossOut:
    """DFlash SFT loss at given anchors (draw them with `sample_anchors`); differentiable in `params`.

    `target_params` holds the target's frozen `embedding` (+ untied `lm_head`)."""
    logits = dflash_block_logits(params, target_params, config, tconfig, target_hidden, tokens_BT, anchors_BA)
    return dflash_loss_from_logits(logits, tokens_BT, loss_mask_BT, anchors_BA, keep_BA, gamma)
