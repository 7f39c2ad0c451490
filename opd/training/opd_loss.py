"""Draft-OPD's acceptance-aware distillation loss (DESIGN §7 step 4), a pure function.

Per rollout round r of row b, the drafter proposed d_1..d_K and the target accepted the first
n of them. Offset i (1-based) of that round falls in
  the accepted stream       i <= n,
  the rejected stream       i == n + 1 (the first rejected proposal; none when n == K),
  the post-rejection suffix i > n + 1 (drafts made after the first error),
and carries the weight
  w_i = w_acc * [i <= n] + w_rej * decay^(i-1) * [i == n+1] + w_post * decay^(i-1) * [i > n+1]
(`first_rejected_only`: only the rejected-stream term). The loss is
  [sum_{b, r, i} w_i * D(q_i || p_i) + w_err * sum_{b, r: 1 <= n < K} D*(q^err || p_{n+1})]
  / (number of active rounds),
q_i the drafter's distribution at offset i (replayed, differentiable), p_i the target's on the
same draft-induced prefix (recorded during the rollout, no gradient). The optional error term
(w_err = `error_anchor_weight` > 0) distils q^err, the first draft of a fresh chain anchored at
the error position (`rollout.replay_logits(error_anchors=True)`), towards the teacher's
distribution recorded there; D* is the exact form of D (k3 -> reverse KL: the full teacher
distribution over the support is stored for that one offset).

Divergences D (the drafter's support is its vocabulary: EAGLE-3's W draft tokens, DFlash's V):
  "k3"          k3 estimator of reverse KL(q || p) on the drafted token x ~ q:
                (p(x)/q(x) - 1) - log(p(x)/q(x)); needs only log p(x) (the default: the
                teacher information is one float per offset). Its gradient through log q(x)
                is (1 - p(x)/q(x)) grad log q(x), whose mean under x ~ q is the gradient of
                the cross-entropy -sum_x p(x) log q(x) over the support: unbiased only when the
                drafts are sampled (rollout temperature > 0); greedy drafts (T = 0) give it
                information about the argmax token alone;
  "reverse_kl"  sum_w q_w (log q_w - log p_w): exact, since q is 0 outside its support;
  "forward_kl"  KL(p~ || q), p~ = p restricted to the support and renormalised;
  "tvd"         (sum_w |p_w - q_w| + p(outside the support)) / 2: exact; 1 - TVD is the
                probability that a draft from q is accepted;
  "jsd"         Jensen-Shannon divergence between p~ and q (natural log).
The exact divergences need log p on the support: [.., W] for EAGLE-3 (small), [.., V] for
DFlash (large at V = 150k: top-k storage is a later option).

Two entry points compute D: `divergence` from the drafter's log-probs [.., W] (`opd_loss`), and
`head_divergence` from its hidden states before its linear head, W columns scanned in chunks so
that no [.., W] logits or log-probs are stored (`opd.training.chunked_logprobs`; the Draft-OPD
step's default, `OPDConfig.vocab_chunk`). Both read the divergences' terms from `EXACT_TERMS`;
`loss_from_divergences` weights either's D into the loss.

Reference-style options (the public Draft-OPD implementation, `bingyang-lei/Draft-OPD`: its
`verl/trainer/distillation/losses.py`, DFlash student and run scripts; `preset` gives its configs):
  response stream  w_resp on every committed token of a round, offsets 1..min(n+1, K): the
                   accepted drafts and the target's correction token at n+1 (the reference's
                   response tokens; its block has K prediction slots, so when n == K the bonus
                   token at offset K+1 is not trained, here neither). Per-token loss
                   L = w_rev * k3(log q(c), log p(c)) + w_fwd * BFKL(log q(c), log p(c)) at the
                   committed token c (BFKL: `bernoulli_forward_kl`). EAGLE-3: a correction
                   token outside the draft vocabulary has no log q and is left out;
  suffix stream    w_suf * decay^(i-1) on the drafter's rejected drafts at every offset
                   n+1..K (the reference's rejected-draft stream), the same per-token L (k3
                   alone with `suffix_reverse_kl`), log p of d_i on the draft-induced prefix;
  clamps           `k3_clamps`: verl's kl_penalty("k3"): log p - log q clipped to [-20, 20], k3
                   to [-10, 10] (every k3 of the loss); `loss_max_clamp` > 0: every per-token loss
                   (after combining k3 and BFKL, before weighting) clipped to [-c, c];
  normalization    "rounds" (default): each stream's weighted sum / active rounds; "tokens": the
                   reference's shared denominator, sum_t w_t L_t / sum_t w_t over every stream's
                   tokens of the global batch (w_t: the stream weight times the decay; 0 when no
                   token has weight);
  expected acceptance (w_tv = `expected_acceptance_weight`): per active round,
                   a_i = 1 - TV(q_i, p_i) (exact, "tvd": the probability that the drafter's draft
                   at offset i is accepted given d_<i were) and E = sum_{i=1..K} prod_{j<=i} a_j,
                   the expected number of accepted drafts of the chain evaluated along the
                   recorded draft-induced prefixes (one sample of them: exact in the chain's own
                   a_i, not in the prefixes). Adds w_tv * sum_rounds (K - E) / active rounds
                   (>= 0, 0 iff every a_i = 1) under either normalization; needs the teacher's
                   log-probs over the support (like "tvd").

Axis letters: B rows, R rounds, K offsets, W support (draft vocabulary or V).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from opd.training import chunked_logprobs as cl

DIVERGENCES = ("k3", "reverse_kl", "forward_kl", "tvd", "jsd")
EXACT = DIVERGENCES[1:]
NORMALIZATIONS = ("rounds", "tokens")
# verl's kl_penalty("k3" / "low_var_kl") clamps (verl/trainer/ppo/core_algos.py)
K3_LOG_RATIO_CLAMP, K3_VALUE_CLAMP = 20.0, 10.0


@dataclasses.dataclass(frozen=True)
class OPDLossConfig:
    divergence: str = "k3"
    accepted_weight: float = 1.0  # w_acc
    rejected_weight: float = 1.0  # w_rej
    decay: float = 0.9  # position decay of the rejected stream and the suffix
    post_rejection_weight: float = 0.0  # w_post (off by default)
    first_rejected_only: bool = False
    error_anchor_weight: float = 0.0  # w_err: extra replay anchors at error positions (0 = off)
    # reference-style options (module docstring; all off by default)
    response_weight: float = 0.0  # w_resp: committed tokens, the correction token included
    suffix_weight: float = 0.0  # w_suf: rejected drafts at offsets n+1..K, times decay^(i-1)
    reverse_kl_weight: float = 1.0  # w_rev: k3 in the per-token loss of the two streams above
    forward_kl_weight: float = 0.0  # w_fwd: Bernoulli forward KL there
    suffix_reverse_kl: bool = False  # the suffix stream uses k3 alone (reference rejected_draft_use_reverse_kl)
    k3_clamps: bool = False  # verl's k3 clamps: log-ratio to +-20, k3 to +-10 (every k3)
    loss_max_clamp: float = 0.0  # > 0: every per-token loss clipped to [-c, c]
    log_prob_min_clamp: float = -80.0  # the Bernoulli forward KL's floor on both log-probs
    normalization: str = "rounds"  # NORMALIZATIONS
    expected_acceptance_weight: float = 0.0  # w_tv: the expected-acceptance TV objective

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        for name in ("accepted_weight", "rejected_weight", "post_rejection_weight", "error_anchor_weight",
                     "response_weight", "suffix_weight", "reverse_kl_weight", "forward_kl_weight", "loss_max_clamp",
                     "expected_acceptance_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")
        for name in ("first_rejected_only", "suffix_reverse_kl", "k3_clamps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        v = self.log_prob_min_clamp
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v >= 0:
            raise ValueError(f"log_prob_min_clamp must be a finite number < 0, got {v!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if ((self.response_weight > 0 or (self.suffix_weight > 0 and not self.suffix_reverse_kl))
                and self.reverse_kl_weight == 0 and self.forward_kl_weight == 0):
            raise ValueError("reverse_kl_weight and forward_kl_weight are both 0: the response / suffix streams "
                             "would have no per-token loss (set one > 0, or suffix_reverse_kl=True)")

    @property
    def token_streams(self) -> bool:
        """The response or suffix stream is on (they read log q and log p at single tokens)."""
        return self.response_weight > 0 or self.suffix_weight > 0

    @property
    def needs_teacher_support(self) -> bool:
        """The rollout must record the teacher's log-probs over the drafter's support."""
        return self.divergence in EXACT or self.expected_acceptance_weight > 0


# Named presets of the reference (bingyang-lei/Draft-OPD). Fields not listed keep their
# defaults: our own streams off (accepted / first-rejected / post weights 0), no error anchors.
PRESETS = {
    # verl/verl/trainer/config/distillation/distillation.yaml @ a73781096436 (distillation_loss):
    # loss_mode k3 (l. "loss_mode: k3"), reverse_kl_weight 1.0, forward_kl_weight 0.0,
    # response_stream_weight 1.0, rejected_draft_stream_weight 1.0, rejected_draft_use_reverse_kl
    # false, rejected_draft_position_decay 0.9 (enabled), loss_max_clamp null, log_prob_min_clamp
    # null (the Bernoulli KL's own floor, -80), use_tv_loss false; k3 clamps: verl's kl_penalty.
    "reference_yaml": dict(
        accepted_weight=0.0, rejected_weight=0.0, response_weight=1.0, suffix_weight=1.0, decay=0.9,
        reverse_kl_weight=1.0, forward_kl_weight=0.0, suffix_reverse_kl=False, k3_clamps=True,
        loss_max_clamp=0.0, log_prob_min_clamp=-80.0, normalization="tokens"),
    # verl/examples/on_policy_distillation_trainer/run_qwen_gsm8k_forward-ins.sh @ 69b03dab8697
    # (REVERSE_KL_WEIGHT 0.0, FORWARD_KL_WEIGHT 1.0, REJECTED_DRAFT_USE_REVERSE_KL True,
    # stream_weight 1.0, rejected_draft_stream_weight 1.0, REJECTED_DRAFT_POSITION_DECAY 0.8), which
    # execs run_qwen_gsm8k.sh @ 190017f68450 (DISTILLATION_LOSS_MODE k3,
    # DISTILLATION_LOSS_MAX_CLAMP 10.0, DISTILLATION_LOG_PROB_MIN_CLAMP -10.0).
    "reference_script": dict(
        accepted_weight=0.0, rejected_weight=0.0, response_weight=1.0, suffix_weight=1.0, decay=0.8,
        reverse_kl_weight=0.0, forward_kl_weight=1.0, suffix_reverse_kl=True, k3_clamps=True,
        loss_max_clamp=10.0, log_prob_min_clamp=-10.0, normalization="tokens"),
}


def preset(name: str, **overrides) -> OPDLossConfig:
    """The `OPDLossConfig` of a named reference preset (`PRESETS`), with `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown Draft-OPD loss preset {name!r}: one of {tuple(PRESETS)}")
    return OPDLossConfig(**{**PRESETS[name], **overrides})


class OPDLossOut(NamedTuple):
    loss: jax.Array  # scalar
    accepted_loss: jax.Array  # scalar: the accepted stream's weighted sum / active rounds
    rejected_loss: jax.Array  # scalar: the rejected stream's (first rejected offset)
    post_loss: jax.Array  # scalar: the post-rejection suffix's
    error_loss: jax.Array  # scalar: the error-position anchors' (0 when off)
    divergence_by_offset: jax.Array  # [K] mean D over active rounds (unweighted; monitoring)
    response_loss: jax.Array = 0.0  # scalar: the response stream's part of `loss` (0 when off)
    suffix_loss: jax.Array = 0.0  # scalar: the suffix stream's
    acceptance_loss: jax.Array = 0.0  # scalar: w_tv * mean (K - E) over active rounds
    expected_accepted: jax.Array = 0.0  # scalar: mean E over active rounds (monitoring; 0 when off)
    # scalar, no gradient: what the streams' sums were divided by before its clamp to >= 1 (the
    # total token weight with "tokens", else the active rounds): gradient accumulation sums it
    stream_denominator: jax.Array = 0.0


class TokenLogProbs(NamedTuple):
    """What the response and suffix streams read, each [B, R, K] (offset i at index i-1)."""

    logq_draft: jax.Array  # the drafter's log q of its draft d_i (differentiable)
    logq_commit: jax.Array  # its log q of the committed token c_i (differentiable)
    teacher_draft: jax.Array  # the target's log p of d_i on the draft-induced prefix
    teacher_commit: jax.Array  # its log p of c_i (`committed_teacher_logp`)
    commit_valid: jax.Array  # bool: c_i is in the drafter's support


def stream_weights(n_accepted_BR, active_BR, K: int, cfg: OPDLossConfig):
    """(accepted, rejected, post) weights, each float32 [B, R, K] (module docstring)."""
    i = jnp.arange(1, K + 1, dtype=jnp.int32)[None, None]  # 1-based offsets
    n = n_accepted_BR[..., None]
    act = active_BR[..., None].astype(jnp.float32)
    decay_i = jnp.asarray(cfg.decay, jnp.float32) ** (i - 1).astype(jnp.float32)
    acc = (i <= n).astype(jnp.float32) * act
    rej = (i == n + 1).astype(jnp.float32) * act * decay_i
    post = (i > n + 1).astype(jnp.float32) * act * decay_i
    if cfg.first_rejected_only:
        return jnp.zeros_like(acc), cfg.rejected_weight * rej, jnp.zeros_like(post)
    return cfg.accepted_weight * acc, cfg.rejected_weight * rej, cfg.post_rejection_weight * post


def token_stream_weights(n_accepted_BR, active_BR, K: int, cfg: OPDLossConfig, commit_valid_BRK=None):
    """(response, suffix) weights, each float32 [B, R, K] (module docstring): w_resp on offsets
    1..min(n+1, K) (where the committed token is in the support), w_suf * decay^(i-1) on n+1..K."""
    i = jnp.arange(1, K + 1, dtype=jnp.int32)[None, None]
    n = n_accepted_BR[..., None]
    act = active_BR[..., None].astype(jnp.float32)
    decay_i = jnp.asarray(cfg.decay, jnp.float32) ** (i - 1).astype(jnp.float32)
    resp = (i <= n + 1).astype(jnp.float32) * act
    if commit_valid_BRK is not None:
        resp = resp * commit_valid_BRK.astype(jnp.float32)
    suffix = (i >= n + 1).astype(jnp.float32) * act * decay_i
    return cfg.response_weight * resp, cfg.suffix_weight * suffix


def committed_teacher_logp(teacher_tok_BRK, teacher_commit_BR, n_accepted_BR):
    """The target's log p of the committed token at offsets 1..K [B, R, K]: the draft's for
    i <= n, the correction token's (`RolloutRecord.teacher_commit_BR`) at i = n + 1, 0 after."""
    K = teacher_tok_BRK.shape[2]
    i = jnp.arange(1, K + 1, dtype=jnp.int32)[None, None]
    n = n_accepted_BR[..., None]
    return jnp.where(i <= n, teacher_tok_BRK, jnp.where(i == n + 1, teacher_commit_BR[..., None], 0.0))


def expected_accepted(tv_BRK, valid_BRK=None) -> jax.Array:
    """E = sum_{i=1..K} prod_{j<=i} (1 - TV_j) [B, R]: the chain's expected accepted drafts."""
    a = jnp.clip(1.0 - tv_BRK.astype(jnp.float32), 0.0, 1.0)
    if valid_BRK is not None:
        a = a * valid_BRK.astype(jnp.float32)
    return jnp.sum(jnp.cumprod(a, axis=-1), axis=-1)


def _reverse_kl_terms(logq, logp):
    return jnp.exp(logq) * (logq - logp)


def _tvd_terms(logq, logp):  # + half the teacher's mass outside the support (`_teacher`)
    return 0.5 * jnp.abs(jnp.exp(logp) - jnp.exp(logq))


def _forward_kl_terms(logq, logp_n):
    p_n = jnp.exp(logp_n)
    return p_n * (logp_n - logq)


def _jsd_terms(logq, logp_n):
    p_n, q = jnp.exp(logp_n), jnp.exp(logq)
    log_m = jnp.log(jnp.maximum(0.5 * (p_n + q), 1e-30))
    return 0.5 * p_n * (logp_n - log_m) + 0.5 * q * (logq - log_m)


# exact divergence -> (elementwise terms over the support, summing to D; whether they read the
# teacher restricted to the support and renormalised, p~, rather than p itself)
EXACT_TERMS = {"reverse_kl": (_reverse_kl_terms, False), "forward_kl": (_forward_kl_terms, True),
               "tvd": (_tvd_terms, False), "jsd": (_jsd_terms, True)}


def _k3(logq_tok, teacher_logp_tok, clamps: bool = False):
    """k3 at the token; `clamps`: verl's (log-ratio to +-20 first, then k3 to +-10)."""
    log_ratio = jax.lax.stop_gradient(teacher_logp_tok.astype(jnp.float32)) - logq_tok
    if clamps:
        log_ratio = jnp.clip(log_ratio, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    k3 = jnp.expm1(log_ratio) - log_ratio
    return jnp.clip(k3, -K3_VALUE_CLAMP, K3_VALUE_CLAMP) if clamps else k3


def bernoulli_forward_kl(logq_tok, teacher_logp_tok, min_log_prob: float = -80.0):
    """The reference's Bernoulli forward KL at one token x: KL(Bern(p(x)) || Bern(q(x))) =
    p log(p/q) + (1-p) log((1-p)/(1-q)), both log-probs clipped to [min_log_prob, log(1 - eps)]
    (eps: float32's), the teacher without gradient."""
    hi = math.log1p(-float(jnp.finfo(jnp.float32).eps))
    lq = jnp.clip(logq_tok.astype(jnp.float32), min_log_prob, hi)
    lp = jnp.clip(jax.lax.stop_gradient(teacher_logp_tok.astype(jnp.float32)), min_log_prob, hi)
    p = jnp.exp(lp)
    return p * (lp - lq) + (1.0 - p) * (jnp.log1p(-p) - jnp.log1p(-jnp.exp(lq)))


def token_loss(logq_tok, teacher_logp_tok, cfg: OPDLossConfig, reverse_only: bool = False):
    """The per-token loss of the response / suffix streams (before `loss_max_clamp`):
    w_rev * k3 + w_fwd * Bernoulli forward KL, or k3 alone (`reverse_only`)."""
    k3 = _k3(logq_tok, teacher_logp_tok, cfg.k3_clamps)
    if reverse_only:
        return k3
    out = jnp.zeros_like(k3)
    if cfg.reverse_kl_weight > 0:
        out = out + cfg.reverse_kl_weight * k3
    if cfg.forward_kl_weight > 0:
        out = out + cfg.forward_kl_weight * bernoulli_forward_kl(logq_tok, teacher_logp_tok, cfg.log_prob_min_clamp)
    return out


def k3_divergence(logq_tok_BRK, teacher_logp_tok_BRK, cfg: OPDLossConfig) -> jax.Array:
    """The "k3" D at the drafted tokens from their log q [B, R, K] (as `divergence`)."""
    return _k3(logq_tok_BRK.astype(jnp.float32), teacher_logp_tok_BRK, cfg.k3_clamps)


def _teacher(teacher_logp_BRKW, cfg: OPDLossConfig):
    """(the teacher log-probs the terms of `cfg.divergence` read [.., W], D's part that does not
    depend on q [..]), no gradient."""
    if teacher_logp_BRKW is None:
        raise ValueError(f"the {cfg.divergence} divergence needs the teacher's log-probs over the drafter's support")
    logp = jax.lax.stop_gradient(teacher_logp_BRKW.astype(jnp.float32))
    const = jnp.zeros(logp.shape[:-1], jnp.float32)
    if cfg.divergence == "tvd":
        const = 0.5 * jnp.clip(1.0 - jnp.sum(jnp.exp(logp), axis=-1), 0.0, 1.0)
    return (jax.nn.log_softmax(logp, axis=-1) if EXACT_TERMS[cfg.divergence][1] else logp), const


def divergence(logq_BRKW, cfg: OPDLossConfig, drafted_BRK=None, teacher_logp_tok_BRK=None,
               teacher_logp_BRKW=None) -> jax.Array:
    """D(q || p) per offset, float32 [B, R, K]; differentiable in `logq_BRKW` (log-softmax of
    the drafter's logits over its support). `drafted_BRK` indexes the support."""
    logq = logq_BRKW.astype(jnp.float32)
    if cfg.divergence == "k3":
        if drafted_BRK is None or teacher_logp_tok_BRK is None:
            raise ValueError("the k3 divergence needs the drafted tokens and the teacher's log-prob of each")
        return _k3(jnp.take_along_axis(logq, drafted_BRK[..., None], axis=-1)[..., 0], teacher_logp_tok_BRK,
                   cfg.k3_clamps)
    logp, const = _teacher(teacher_logp_BRKW, cfg)
    return jnp.sum(EXACT_TERMS[cfg.divergence][0](logq, logp), axis=-1) + const


def head_divergence(head: cl.LinearHead, h_BRKD, cfg: OPDLossConfig, chunk: int, drafted_BRK=None,
                    teacher_logp_tok_BRK=None, teacher_logp_BRKW=None) -> jax.Array:
    """`divergence` of the drafter's q = softmax(head.logits(h_BRKD)) over its support, from its
    hidden states before the head, `chunk` support columns at a time (0: from the full logits):
    no [.., W] log q is stored (`opd.training.chunked_logprobs`). Float32 [B, R, K],
    differentiable in `h_BRKD` and the head's weight."""
    lead = h_BRKD.shape[:-1]
    h_ND = h_BRKD.reshape(-1, h_BRKD.shape[-1])
    if cfg.divergence == "k3":
        if drafted_BRK is None or teacher_logp_tok_BRK is None:
            raise ValueError("the k3 divergence needs the drafted tokens and the teacher's log-prob of each")
        logq_tok = cl.gathered_logits(head, h_ND, drafted_BRK.reshape(-1)) - cl.logsumexp(head, h_ND, chunk)
        return _k3(logq_tok.reshape(lead), teacher_logp_tok_BRK, cfg.k3_clamps)
    logp, const = _teacher(teacher_logp_BRKW, cfg)
    terms = EXACT_TERMS[cfg.divergence][0]
    return cl.sum_over_support(head, h_ND, logp.reshape(-1, logp.shape[-1]), terms, chunk).reshape(lead) + const


def error_anchor_config(cfg: OPDLossConfig) -> OPDLossConfig:
    """The divergence D* of the error-anchor term: the exact form of `cfg.divergence`."""
    return dataclasses.replace(cfg, divergence="reverse_kl" if cfg.divergence == "k3" else cfg.divergence)


def head_token_logprobs(head: cl.LinearHead, h_BRKD, ids, chunk: int):
    """log q at support ids of the drafter q = softmax(head.logits(h_BRKD)), one [B, R, K] per
    [B, R, K] index array in `ids`, sharing one (chunked) logsumexp."""
    lead = h_BRKD.shape[:-1]
    h_ND = h_BRKD.reshape(-1, h_BRKD.shape[-1])
    lse = cl.logsumexp(head, h_ND, chunk)
    return [(cl.gathered_logits(head, h_ND, x.reshape(-1)) - lse).reshape(lead) for x in ids]


def tv_config(cfg: OPDLossConfig) -> OPDLossConfig:
    """The divergence of the expected-acceptance objective: the exact TV."""
    return dataclasses.replace(cfg, divergence="tvd")


def opd_loss(logq_BRKW, n_accepted_BR, active_BR, cfg: OPDLossConfig, *, drafted_BRK=None,
             teacher_logp_tok_BRK=None, teacher_logp_BRKW=None, valid_BRK: Optional[jax.Array] = None,
             error_logq_BRW=None, teacher_error_BRW=None, error_mask_BR=None, committed_BRK=None,
             teacher_commit_BRK=None, commit_valid_BRK=None) -> OPDLossOut:
    """The acceptance-aware loss (module docstring) from the drafter's log-probs.

    Args:
      logq_BRKW: drafter log-probs over its support at every offset (from the replay).
      n_accepted_BR: accepted drafts per round (int, 0..K).
      active_BR: the round ran for this row (rows that finished earlier are masked).
      drafted_BRK, teacher_logp_tok_BRK: for "k3" and the suffix stream.
      teacher_logp_BRKW: for the exact divergences and the expected-acceptance objective.
      valid_BRK: optional extra mask (e.g. offsets past the end of the buffer).
      error_logq_BRW, teacher_error_BRW, error_mask_BR: the error-anchor term (when
        `cfg.error_anchor_weight` > 0): the fresh chains' first-draft log q, the teacher's log p
        at the error offset, and which rounds have an error anchor.
      committed_BRK, teacher_commit_BRK, commit_valid_BRK: for the response stream: the
        committed token at each offset (a support index), the teacher's log p of it
        (`committed_teacher_logp`) and whether it is in the support (default: all are).
    """
    D = divergence(logq_BRKW, cfg, drafted_BRK, teacher_logp_tok_BRK, teacher_logp_BRKW)
    D_err = None
    if cfg.error_anchor_weight > 0 and error_logq_BRW is not None and teacher_error_BRW is not None:
        D_err = divergence(error_logq_BRW[:, :, None], error_anchor_config(cfg),
                           teacher_logp_BRKW=teacher_error_BRW[:, :, None])[..., 0]
    tokens = None
    if cfg.token_streams:
        if drafted_BRK is None or teacher_logp_tok_BRK is None or committed_BRK is None or teacher_commit_BRK is None:
            raise ValueError("response_weight / suffix_weight > 0 need the drafted and the committed tokens and the "
                             "teacher's log-prob of each (drafted_BRK, teacher_logp_tok_BRK, committed_BRK, "
                             "teacher_commit_BRK)")
        at = lambda ids: jnp.take_along_axis(logq_BRKW.astype(jnp.float32), ids[..., None], axis=-1)[..., 0]
        valid = jnp.ones(committed_BRK.shape, bool) if commit_valid_BRK is None else commit_valid_BRK
        tokens = TokenLogProbs(at(drafted_BRK), at(committed_BRK), teacher_logp_tok_BRK, teacher_commit_BRK, valid)
    tv = None
    if cfg.expected_acceptance_weight > 0:
        tv = D if cfg.divergence == "tvd" else divergence(logq_BRKW, tv_config(cfg), teacher_logp_BRKW=teacher_logp_BRKW)
    return loss_from_divergences(D, n_accepted_BR, active_BR, cfg, valid_BRK, D_err, error_mask_BR, tokens, tv)


def loss_from_divergences(D_BRK, n_accepted_BR, active_BR, cfg: OPDLossConfig, valid_BRK: Optional[jax.Array] = None,
                          error_D_BR=None, error_mask_BR=None, tokens: Optional[TokenLogProbs] = None,
                          tv_BRK=None) -> OPDLossOut:
    """The acceptance-aware loss (module docstring) from the divergence at every offset
    `D_BRK` (`divergence` or `head_divergence`) and, when `cfg.error_anchor_weight` > 0, D* at
    the error anchors `error_D_BR` (`error_anchor_config`) with their mask; with the response /
    suffix streams on, the token log-probs they read (`tokens`); with the expected-acceptance
    objective on, the exact TV at every offset (`tv_BRK`); the rest as `opd_loss`."""
    D = D_BRK
    K = D.shape[2]
    clip = (lambda L: jnp.clip(L, -cfg.loss_max_clamp, cfg.loss_max_clamp)) if cfg.loss_max_clamp > 0 else (lambda L: L)
    v = None if valid_BRK is None else valid_BRK.astype(jnp.float32)
    w_acc, w_rej, w_post = stream_weights(n_accepted_BR, active_BR, K, cfg)
    Dc = clip(D)
    streams = [(w_acc, Dc), (w_rej, Dc), (w_post, Dc)]
    if cfg.token_streams:
        if tokens is None:
            raise ValueError("response_weight / suffix_weight > 0 need the drafter's and the teacher's log-probs at the "
                             "drafted and the committed tokens (TokenLogProbs)")
        w_resp, w_suf = token_stream_weights(n_accepted_BR, active_BR, K, cfg, tokens.commit_valid)
        L_resp = clip(token_loss(tokens.logq_commit, tokens.teacher_commit, cfg))
        L_suf = clip(token_loss(tokens.logq_draft, tokens.teacher_draft, cfg, reverse_only=cfg.suffix_reverse_kl))
        streams += [(w_resp, L_resp), (w_suf, L_suf)]
    if v is not None:
        streams = [(w * v, L) for w, L in streams]
    # a weight-0 token adds an exact 0 (its loss may be anything, e.g. an unsupported token's)
    sums = [jnp.sum(jnp.where(w > 0, w * L, 0.0)) for w, L in streams]
    rounds = jnp.maximum(jnp.sum(active_BR.astype(jnp.float32)), 1.0)
    if cfg.normalization == "tokens":  # one denominator: the total token weight of every stream
        raw = jax.lax.stop_gradient(sum(jnp.sum(w) for w, _ in streams))
        denom = jnp.where(raw > 0, raw, 1.0)
    else:
        raw, denom = jnp.sum(active_BR.astype(jnp.float32)), rounds
    parts = [s_ / denom for s_ in sums] + [jnp.zeros((), jnp.float32)] * (5 - len(sums))
    act = active_BR[..., None].astype(jnp.float32) * (1.0 if v is None else v)
    by_offset = jax.lax.stop_gradient(jnp.sum(act * D, axis=(0, 1)) / jnp.maximum(jnp.sum(act, axis=(0, 1)), 1.0))
    err = jnp.zeros((), jnp.float32)
    if cfg.error_anchor_weight > 0:
        if error_D_BR is None or error_mask_BR is None:
            raise ValueError("error_anchor_weight > 0 needs the error anchors' log q, the teacher's log p there "
                             "and their mask (replay with error_anchors=True, rollout with error_support=True)")
        m = (error_mask_BR & active_BR).astype(jnp.float32)
        err = cfg.error_anchor_weight * jnp.sum(m * error_D_BR) / rounds
    acc_loss = e_mean = jnp.zeros((), jnp.float32)
    if cfg.expected_acceptance_weight > 0:
        if tv_BRK is None:
            raise ValueError("expected_acceptance_weight > 0 needs the exact TV at every offset (the teacher's "
                             "log-probs over the drafter's support)")
        E = expected_accepted(tv_BRK, valid_BRK)
        a = active_BR.astype(jnp.float32)
        acc_loss = cfg.expected_acceptance_weight * jnp.sum(a * (K - E)) / rounds
        e_mean = jax.lax.stop_gradient(jnp.sum(a * E) / rounds)
    return OPDLossOut(loss=sum(parts) + err + acc_loss, accepted_loss=parts[0], rejected_loss=parts[1],
                      post_loss=parts[2], error_loss=err, divergence_by_offset=by_offset, response_loss=parts[3],
                      suffix_loss=parts[4], acceptance_loss=acc_loss, expected_accepted=e_mean,
                      stream_denominator=raw)
