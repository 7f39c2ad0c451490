"""DFlash training: the SFT loss (anchored blocks), Draft-OPD replay and FLOPs.

Conventions (0-based positions): a training sequence is x_0..x_{T-1} (`tokens_BT`); the
target's causal forward over it gives, at position t, the aux features f_t of x_t and the
logits p_t of x_{t+1} given x_{<=t}. `loss_mask_BT[b, j] = 1` means "the prediction of token
x_j is trained" (e.g. j inside an assistant turn).

DFlash (SpecForge `OnlineDFlashModel`): per sequence `num_anchors` random anchor positions a
with loss_mask[a] = 1 and a <= T - 2 (without replacement; rows with fewer eligible positions
keep fewer anchors). Block [x_a, MASK x (Q-1)] at positions a..a+Q-1, context = target
features of positions < a (`opd.drafters.dflash.model.logits_from_features` semantics, K/V of the
context computed once and shared by every anchor of the row). Offset k = 1..Q-1 predicts
x_{a+k}: hard cross-entropy to the sequence token (what SpecForge does; on target-generated
sequences that token is the target's own sample), weight w = loss_mask[a+k] *
[a + k < T] * exp(-(k-1)/gamma), gamma = 7. Loss = sum w * CE / sum w. Accuracy of offset k
= argmax == token over positions with w > 0.

Packed rows (`segments`): the context is the anchor's own sequence before it, RoPE positions
restart per sequence, and offsets past the sequence's end have no loss.

Draft vocabulary (`vocab` = {"d2t", "t2d"}): the logits cover the W draft tokens, the label is
mapped target -> draft id, and a prediction whose token is outside the draft vocabulary has
no loss term (it leaves both sums of the weighted mean; the metric `oov_fraction` counts them); its
accuracy counts it as a miss (the drafter cannot propose it), over the same predictions as
without a draft vocabulary. `supervised` counts the predictions with a loss term.

Draft-OPD replay (`replay_logits`): the block [s_{n-1}, MASK x (Q-1)] at anchor n - 1 over
the target context of positions < n - 1 (`block_logits`) - exactly `DFlashSpec.propose`;
`replay_hidden` stops before the LM head, so that Draft-OPD can compute log q in chunks of the
vocabulary (`opd.training.chunked_logprobs`).
Error anchors run R more blocks, anchored at each round's error position. With a draft
vocabulary the replay's logits cover the W draft tokens (the drafter's support, `support_ids`)
and Draft-OPD's teacher is the target's log p on those ids, as for EAGLE-3.

Axis letters: B batch, T positions, D width, V target vocabulary, W the logits' width (draft
vocabulary, or V), A anchors per row, Q block size, K draft tokens, R rollout rounds.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from opd.drafters.base import LossOut, Segments
from opd.drafters.dflash import model as dfm
from opd.drafters.eagle3 import model as e3
from opd.training import chunked_logprobs as cl
from opd.training.losses import as_aux, shift_left
from opd.training.flops import count_params

GAMMA = 7.0


@dataclasses.dataclass(frozen=True)
class DFlashSFTLoss:
    """DFlash's SFT loss options (`config.sft.loss` of a dflash drafter)."""

    num_anchors: int = 4  # anchored blocks per sequence
    gamma: float = GAMMA  # weight of offset k: exp(-(k-1)/gamma)

    def __post_init__(self):
        if isinstance(self.num_anchors, bool) or not isinstance(self.num_anchors, int) or self.num_anchors < 1:
            raise ValueError(f"num_anchors must be a positive integer, got {self.num_anchors!r}")
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0, got {self.gamma!r}")

# ----------------------------------------------------------------------------- SFT loss


def sample_anchors(key, loss_mask_BT, num_anchors: int, segment_ids_BT=None):
    """Random anchor positions without replacement among {a : loss_mask[a] = 1, a <= T - 2}
    (packed rows: also x_{a+1} in the sequence of x_a, so every anchor has a target).

    Returns (anchors int32 [B, A], keep bool [B, A]); rows with fewer than A eligible
    positions have keep = False on the extra slots (their anchor is arbitrary)."""
    B, T = loss_mask_BT.shape
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    if num_anchors > T:
        raise ValueError(f"num_anchors ({num_anchors}) exceeds the sequence length ({T})")
    eligible = (loss_mask_BT > 0) & (jnp.arange(T)[None] <= T - 2)
    if segment_ids_BT is not None:
        eligible &= shift_left(segment_ids_BT, 1, fill=-1) == segment_ids_BT
    u = jnp.where(eligible, jax.random.uniform(key, (B, T)), 2.0)
    anchors = jnp.argsort(u, axis=1)[:, :num_anchors].astype(jnp.int32)
    return anchors, jnp.take_along_axis(eligible, anchors, axis=1)


def offset_weights(block_size: int, gamma: float = GAMMA) -> jax.Array:
    """[Q-1] weights exp(-(k-1)/gamma) of offsets k = 1..Q-1."""
    if gamma <= 0:
        raise ValueError(f"DFlash loss gamma must be > 0, got {gamma}")
    k = np.arange(1, block_size, dtype=np.float64)
    return jnp.asarray(np.exp(-(k - 1) / gamma), jnp.float32)


def block_logits(params, target_params, config: dfm.DFlashConfig, tconfig, target_hidden, tokens_BT,
                 anchors_BA, segments: Segments | None = None, head_ids_W=None) -> jax.Array:
    """Logits [B, A, Q-1, W] of the blocks anchored at `anchors_BA` (context: positions < anchor,
    in the anchor's own sequence with packed `segments`, whose positions are the RoPE positions;
    `head_ids_W`: the draft vocabulary's target ids, None = all V)."""
    block = lambda *a: dfm.block_logits(params, target_params, config, tconfig, *a, head_ids_W)
    return _per_anchor(params, config, target_hidden, tokens_BT, anchors_BA, segments, block)


def block_outputs(params, target_params, config: dfm.DFlashConfig, tconfig, target_hidden, tokens_BT, anchors_BA,
                  segments: Segments | None = None) -> jax.Array:
    """`block_logits` before the LM head (`lm_head`): final-normed hidden states [B, A, Q-1, D]."""
    block = lambda *a: dfm.block_output(params, target_params, config, tconfig, *a)
    return _per_anchor(params, config, target_hidden, tokens_BT, anchors_BA, segments, block)


def _per_anchor(params, config: dfm.DFlashConfig, target_hidden, tokens_BT, anchors_BA, segments, block):
    """`block(anchor_tok_B, start_B, ctx_k, ctx_v, visible_BT)` -> [B, ...] for every anchor,
    [B, A, ...], the context's K/V computed once."""
    B, T = tokens_BT.shape
    aux = as_aux(target_hidden, len(config.target_layer_ids), "DFlash")
    idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    pos_BT = idx_BT if segments is None else segments.positions_BT.astype(jnp.int32)
    ids_BT = jnp.zeros((B, T), jnp.int32) if segments is None else segments.ids_BT
    ctx_k, ctx_v = dfm.context_kv(params, config, dfm.context_features(params, config, aux), pos_BT)
    take = lambda x: jnp.take_along_axis(x, anchors_BA, axis=1)

    def one(anchor_tok_B, anchor_B, start_B, seg_B):
        visible = (idx_BT < anchor_B[:, None]) & (ids_BT == seg_B[:, None])
        return block(anchor_tok_B, start_B, ctx_k, ctx_v, visible)

    out = jax.vmap(one, in_axes=(1, 1, 1, 1))(take(tokens_BT), anchors_BA, take(pos_BT), take(ids_BT))
    return jnp.swapaxes(out, 0, 1)


def lm_head(target_params, tconfig, head_ids_W=None) -> cl.LinearHead:
    """The target's LM head as `block_logits` applies it: its columns `head_ids_W` (a draft
    vocabulary's target ids) or all V."""
    if tconfig.tie_word_embeddings:
        w, axis = target_params["embedding"], 0
    else:
        w, axis = target_params["lm_head"], 1
    if head_ids_W is not None:
        w = jnp.take(w, head_ids_W, axis=axis)
    return cl.LinearHead(w, axis, tconfig.dtype)


def head_ids(vocab):
    """Target ids [W] of a draft vocabulary {"d2t", "t2d"}; None (all V) without one."""
    return None if vocab is None else e3.draft_target_ids(vocab["d2t"])


def draft_labels(vocab, tokens):
    """(draft ids, in the draft vocabulary) of target ids `tokens` (0 where outside it)."""
    ids_W = head_ids(vocab)
    index_V = jnp.zeros(vocab["t2d"].shape, jnp.int32).at[ids_W].set(jnp.arange(ids_W.shape[0], dtype=jnp.int32))
    return index_V[tokens], vocab["t2d"][tokens]


def _supervision(tokens_BT, loss_mask_BT, anchors_BA, keep_BA, Km1: int, segment_ids_BT=None, vocab=None):
    """(labels [B, A, K] (draft ids with `vocab`), supervised predictions `on` [B, A, K],
    those with a loss term: `on` and the token in the draft vocabulary)."""
    B, A = anchors_BA.shape
    T = tokens_BT.shape[1]
    idx_BAK = anchors_BA[..., None] + jnp.arange(1, Km1 + 1, dtype=jnp.int32)[None, None]
    in_seq = idx_BAK < T
    safe = jnp.clip(idx_BAK, 0, T - 1).reshape(B, A * Km1)
    labels = jnp.take_along_axis(tokens_BT, safe, axis=1).reshape(B, A, Km1)
    lm = jnp.take_along_axis(loss_mask_BT.astype(jnp.float32), safe, axis=1).reshape(B, A, Km1)
    on = keep_BA[..., None].astype(jnp.float32) * in_seq.astype(jnp.float32) * lm  # [B, A, K]
    if segment_ids_BT is not None:
        seg = lambda idx: jnp.take_along_axis(segment_ids_BT, idx, axis=1)
        on = on * (seg(safe).reshape(B, A, Km1) == seg(anchors_BA)[..., None])
    if vocab is None:
        return labels, on, on
    labels, in_vocab = draft_labels(vocab, labels)
    return labels, on, on * in_vocab.astype(jnp.float32)


def loss_from_logits(logits_BAKW, tokens_BT, loss_mask_BT, anchors_BA, keep_BA,
                     gamma: float = GAMMA, segment_ids_BT=None, vocab=None) -> LossOut:
    """Weighted block CE (module docstring); K = Q - 1 offsets (packed rows: only those inside
    the anchor's sequence). With a draft vocabulary `vocab` ({"d2t", "t2d"}) the logits are
    over its W tokens and out-of-vocabulary tokens have no loss term."""
    Km1 = logits_BAKW.shape[2]
    labels, on, trained = _supervision(tokens_BT, loss_mask_BT, anchors_BA, keep_BA, Km1, segment_ids_BT, vocab)
    w_k = offset_weights(Km1 + 1, gamma)
    w = trained * w_k[None, None]
    logits = logits_BAKW.astype(jnp.float32)
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    loss = jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-6)
    per_offset = jnp.sum(trained * ce, axis=(0, 1)) / jnp.maximum(jnp.sum(trained, axis=(0, 1)), 1.0)
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    # accuracy over every supervised prediction: an out-of-vocabulary token is a miss
    acc = jax.lax.stop_gradient(jnp.sum(trained * hit, axis=(0, 1)) / jnp.maximum(jnp.sum(on, axis=(0, 1)), 1.0))
    extra = None if vocab is None else {"oov_fraction": 1.0 - jnp.sum(trained) / jnp.maximum(jnp.sum(on), 1.0)}
    return LossOut(loss, per_offset, acc, w_k, jnp.sum(trained), extra)


def loss(params, target_params, config: dfm.DFlashConfig, tconfig, target_hidden, tokens_BT, loss_mask_BT,
         anchors_BA, keep_BA, gamma: float = GAMMA, segments: Segments | None = None, vocab=None) -> LossOut:
    """DFlash SFT loss at given anchors (draw them with `sample_anchors`); differentiable in `params`.

    `target_params` holds the target's frozen `embedding` (+ untied `lm_head`); `vocab` the
    draft-vocabulary maps {"d2t", "t2d"} (None: the whole vocabulary)."""
    logits = block_logits(params, target_params, config, tconfig, target_hidden, tokens_BT, anchors_BA, segments,
                          head_ids(vocab))
    return loss_from_logits(logits, tokens_BT, loss_mask_BT, anchors_BA, keep_BA, gamma,
                            None if segments is None else segments.ids_BT, vocab)


# ----------------------------------------------------------------------------- Draft-OPD replay


def replay_hidden(trainable, params, config: dfm.DFlashConfig, tconfig, rec, aux, error_anchors: bool = False):
    """`replay_logits` before the LM head: (hidden states [B, R, K, D], the error anchors'
    first position [B, R, D] or None, the head over the support, `lm_head`)."""
    R, K = rec.drafts_BRK.shape[1:]
    anchors = jnp.maximum(rec.anchor_BR - 1, 0)
    if error_anchors:
        anchors = jnp.concatenate([anchors, jnp.maximum(rec.anchor_BR + rec.num_accepted_BR - 1, 0)], axis=1)
    h = block_outputs(trainable, params["target"], config, tconfig, aux, rec.seq_BS, anchors)
    head = lm_head(params["target"], tconfig, head_ids(params.get("vocab")))
    if not error_anchors:
        return h[:, :, :K], None, head
    return h[:, :R, :K], h[:, R:, 0], head


def replay_logits(trainable, params, config: dfm.DFlashConfig, tconfig, rec, aux, error_anchors: bool = False):
    """The blocks' logits at offsets 1..K of every recorded round [B, R, K, W] (module
    docstring); with `error_anchors` also the first draft of blocks at the error positions.
    W: the drafter's support (`DFlashSpec.support_ids`: the draft vocabulary, or V)."""
    h, err, head = replay_hidden(trainable, params, config, tconfig, rec, aux, error_anchors)
    return head.logits(h) if err is None else (head.logits(h), head.logits(err))


# ----------------------------------------------------------------------------- FLOPs


def _matmul_params(config: dfm.DFlashConfig, target_config) -> tuple[int, int]:
    """(N_block, N_context): the trainable params + the target's LM head columns the block runs
    through (frozen, but the backward pass flows through them: W = the draft vocabulary, or V);
    fc + every layer's k/v projections."""
    D, K, H = config.hidden_size, config.num_kv_heads, config.head_dim
    n_block = count_params(dfm.abstract_params(config)) + config.head_size * D
    return n_block, len(config.target_layer_ids) * D * D + config.num_layers * 2 * D * K * H


def sft_flops(config: dfm.DFlashConfig, target_config, batch: int, seq_len: int, num_anchors: int) -> int:
    """6 * N_block * B * A * Q over the anchored blocks + 6 * N_context * B * T."""
    n_block, n_context = _matmul_params(config, target_config)
    return 6 * n_block * batch * num_anchors * config.block_size + 6 * n_context * batch * seq_len


def opd_flops(config: dfm.DFlashConfig, target_config, batch: int, prompt_len: int, num_rounds: int,
              num_draft_tokens: int, seq_len: int, error_anchors: bool = False) -> int:
    """Rollout: the context of the prompt and of every round's K + 1 new positions, one block
    per round (forward); replay: R blocks (2R with error anchors) over an S-token context."""
    B, P, R, K = batch, prompt_len, num_rounds, num_draft_tokens
    n_block, n_ctx = _matmul_params(config, target_config)
    rollout = 2 * n_ctx * B * (P + R * (K + 1)) + 2 * n_block * B * R * config.block_size
    return rollout + sft_flops(config, target_config, B, seq_len, R * (2 if error_anchors else 1))
