"""Draft-OPD rollout (real speculative decoding with the current drafter, recorded) and replay
(the drafter's drafting recomputed from every recorded anchor, differentiably).

Rollout: `start_state` + R rounds of `opd.decoding.speculative.verify_round` (the engine's own
round, so the rollout is exactly inference) in a `lax.scan`, recording per row b and round r:
  anchor[b, r]        committed length n before the round; the pending token is s_{n-1};
  drafts[b, r, i]     d_1..d_K (target ids) and num_accepted / active;
  logq_tok[b, r, i]   the drafter's (processed) log q of d_i (0 when greedy);
  teacher_tok[b, r,i] log p(d_i) of the target at temperature 1 on the draft-induced prefix
                      s_{<n}, d_1..d_{i-1} (from the verify pass);
  teacher_support     optional: log p over the drafter's support at every offset (EAGLE-3: its
                      W draft tokens; DFlash: all V), for the exact divergences;
  teacher_error[b, r] optional: log p over the support at the error position (offset n + 1,
                      on the committed prefix), for the extra replay anchors below;
  teacher_commit[b,r] log p (T = 1) of the token committed at offset n + 1 (the target's
                      correction token, or its bonus token when n == K), on the committed prefix:
                      one float per round, for the response stream (`opd_loss`).
Also kept: the target-layer outputs the drafter reads (`features`, a tuple of [B, S, D]) at every
committed position, written as the prefill and each round's verify forward computed them (a
round's K + 1 inputs land at positions seq_len - 1 ..; the ones past the committed text are
overwritten by the next round, like the KV cache), so the replay needs no target forward of its
own and sees exactly the features the drafter saw while drafting.
The token committed at offset i (1 <= i <= n + 1) of round r is seq[b, anchor[b, r] + i - 1].
Rows that finished (EOS) stay inactive; their rounds are masked.

Replay, from the final committed text and the recorded features (`target_features` recomputes
them in one forward, equal up to float rounding: positions < n are committed): the drafter kind's
`spec.replay_logits` recomputes its drafting from every recorded anchor exactly as at inference
(EAGLE-3: its own fed-back features and tokens; DFlash: the block from the anchor), giving its
logits over its support at offsets 1..K: [B, R, K, W]; `spec.replay_hidden` stops before the
drafter's linear head, and the Draft-OPD step's loss reads log q from there in chunks of the
support (`opd.training.chunked_logprobs`).

Extra replay anchors at error positions (`error_anchors=True`): for a round that accepted
1 <= n < K drafts, the position of the first rejected draft, n_r + n, has a committed prefix
(s_{<n_r}, d_1..d_n). A fresh drafting chain anchored there - what the drafter computes when a
later round starts at that position - differs from the in-round chain, and its first draft is
scored by the teacher distribution recorded at that offset. Returned as [B, R, W].
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from opd.decoding.sampling import SamplingParams
from opd.decoding.speculative import start_state, verify_round
from opd.models import transformer as tfm

SUPPORTS = ("none", "draft")  # teacher distribution over the drafter's support: not stored / stored


class RolloutRecord(NamedTuple):
    seq_BS: jax.Array  # committed text after the rollout (prompt + generated), int32
    seq_len_B: jax.Array
    anchor_BR: jax.Array  # committed length before each round
    drafts_BRK: jax.Array  # target ids
    num_accepted_BR: jax.Array
    active_BR: jax.Array
    logq_tok_BRK: jax.Array  # the drafter's processed log q of each draft (0 when greedy)
    teacher_tok_BRK: jax.Array  # the target's log p (T = 1) of each draft
    teacher_support_BRKW: Optional[jax.Array]  # log p over the drafter's support, or None
    teacher_error_BRW: Optional[jax.Array] = None  # log p over the support at the error offset, or None
    teacher_commit_BR: Optional[jax.Array] = None  # log p of the token committed at offset n + 1
    features: Optional[tuple] = None  # the target-layer outputs at every committed position, [B, S, D] each


def rollout(tparams, dparams, tokens_BP, lengths_B, key, eos_ids, *, tconfig, dspec, sp: SamplingParams,
            num_draft_tokens: int, num_rounds: int, cache_len: int, teacher_support: str = "none",
            error_support: bool = False) -> RolloutRecord:
    """R recorded rounds of speculative decoding from the prompts (module docstring);
    `error_support` records the teacher's log p over the drafter's support at each round's
    error offset (for the extra replay anchors)."""
    if teacher_support not in SUPPORTS:
        raise ValueError(f"teacher_support must be one of {SUPPORTS}, got {teacher_support!r}")
    K, R = num_draft_tokens, num_rounds
    N = R * (K + 1) + 1  # never the reason a row stops: R rounds always run
    B = tokens_BP.shape[0]
    state, pre_aux = start_state(tparams, dparams, tokens_BP, lengths_B, jnp.zeros((B,), bool), key, eos_ids,
                                 tconfig=tconfig, dspec=dspec, sp=sp, max_new_tokens=N, cache_len=cache_len,
                                 with_features=True)
    P = tokens_BP.shape[1]
    feats = tuple(jnp.pad(f, ((0, 0), (0, cache_len - P), (0, 0))) for f in pre_aux)  # [B, S, D] each
    sup = dspec.support_ids(dparams) if (teacher_support == "draft" or error_support) else None
    rows = jnp.arange(B)

    def body(carry, _):
        s, feats = carry
        new, r = verify_round(s, tparams, dparams, eos_ids, tconfig=tconfig, dspec=dspec, sp=sp, num_draft_tokens=K,
                              max_new_tokens=N, verify_impl="reference")
        # the inputs' features at seq_len - 1 ..: a finished row rewrites its pending token's (the
        # same input at the same position over the same cache) and slots past its text
        feats = tuple(tfm.update_rows(f, a.astype(f.dtype), r.seq_len_B - 1, axis=1) for f, a in zip(feats, r.aux_hidden))
        # log p = logits - logsumexp at the few ids recorded: no [B, K, V] log-softmax array
        logits_BKV = r.logits_BKV1[:, :K].astype(jnp.float32)
        lse_BK = jax.nn.logsumexp(logits_BKV, axis=-1)
        teacher_tok = jnp.take_along_axis(logits_BKV, r.drafts_BK[..., None], axis=-1)[..., 0] - lse_BK
        logq_tok = (jnp.zeros_like(teacher_tok) if r.logq_BKV is None
                    else jnp.take_along_axis(r.logq_BKV, r.drafts_BK[..., None], axis=-1)[..., 0])
        err_BW = None
        if error_support:  # offset n + 1 (clamped: rounds with n == K carry no error term)
            at = jnp.minimum(r.num_accepted_B, K - 1)
            err_BW = jnp.take(logits_BKV[rows, at], sup, axis=-1) - lse_BK[rows, at][:, None]
        support = None
        if teacher_support == "draft":
            support = jnp.take(logits_BKV, sup, axis=-1) - lse_BK[..., None]
        # the committed token at offset n + 1 (correction or bonus) and its log p: one [B, V] row
        at_BV = r.logits_BKV1[rows, r.num_accepted_B].astype(jnp.float32)
        pos = jnp.clip(r.seq_len_B + r.num_accepted_B, 0, new["seq"].shape[1] - 1)
        tok = new["seq"][rows, pos]
        commit = jnp.take_along_axis(at_BV, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(at_BV, axis=-1)
        rec = (r.seq_len_B, r.drafts_BK, r.num_accepted_B, r.active_B, logq_tok, teacher_tok, support, err_BW, commit)
        return (new, feats), rec

    (s, feats), (anchor, drafts, n_acc, active, logq_tok, teacher_tok, support, err, commit) = jax.lax.scan(
        body, (state, feats), None, length=R)
    swap = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # [R, B, ...] -> [B, R, ...]
    return RolloutRecord(s["seq"], s["seq_len"], swap(anchor), swap(drafts), swap(n_acc), swap(active),
                         swap(logq_tok), swap(teacher_tok), swap(support), swap(err), swap(commit),
                         jax.lax.stop_gradient(feats))


def target_features(tparams, tconfig, spec, seq_BS):
    """The drafter's target-layer outputs over the committed text in one fresh forward (no
    gradient): what `RolloutRecord.features` holds at committed positions, up to float rounding."""
    out = tfm.forward(tparams, tconfig, seq_BS, hidden_layers=tuple(spec.target_hidden_layers))
    return jax.lax.stop_gradient(out.aux_hidden)


def error_anchor_mask(rec: RolloutRecord) -> jax.Array:
    """[B, R] rounds that get an extra replay anchor: active, 1 <= n < K."""
    K = rec.drafts_BRK.shape[2]
    n = rec.num_accepted_BR
    return rec.active_BR & (n >= 1) & (n < K)


def drafted_support_index(dparams, spec, drafts_BRK) -> jax.Array:
    """Index of each drafted target id in the drafter's support (`spec.support_ids`)."""
    return support_index(dparams, spec, drafts_BRK)[0]


def support_index(dparams, spec, ids_BRK):
    """(index of each target id in the drafter's support, whether it is in the support: an id
    outside it gets index 0 and False).

    A binary search over the sorted support, not a [V] inverse built by scatter: libtpu's
    compiler (jax 0.10.2's) aborts on `zeros.at[ids].set(arange)` when `ids` is itself an arange
    (the whole vocabulary: the same iota feeds the scatter's indices and updates)."""
    ids = spec.support_ids(dparams)
    order = jnp.argsort(ids)
    pos = jnp.clip(jnp.searchsorted(ids[order], ids_BRK), 0, ids.shape[0] - 1)
    idx = order[pos].astype(jnp.int32)
    ok = ids[idx] == ids_BRK
    return jnp.where(ok, idx, 0), ok


def committed_tokens(rec: RolloutRecord) -> jax.Array:
    """The token committed at offsets 1..K of every round [B, R, K] (target ids; meaningful at
    offsets <= n + 1: the accepted drafts, then the correction token): seq[anchor + i - 1]."""
    K = rec.drafts_BRK.shape[2]
    pos = rec.anchor_BR[..., None] + jnp.arange(K, dtype=rec.anchor_BR.dtype)[None, None]
    pos = jnp.clip(pos, 0, rec.seq_BS.shape[1] - 1)
    B, R = rec.anchor_BR.shape
    return jnp.take_along_axis(rec.seq_BS, pos.reshape(B, R * K), axis=1).reshape(B, R, K)
