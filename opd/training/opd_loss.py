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


@dataclasses.dataclass(frozen=True)
class OPDLossConfig:
    divergence: str = "k3"
    accepted_weight: float = 1.0  # w_acc
    rejected_weight: float = 1.0  # w_rej
    decay: float = 0.9  # position decay of the rejected stream and the suffix
    post_rejection_weight: float = 0.0  # w_post (off by default)
    first_rejected_only: bool = False
    error_anchor_weight: float = 0.0  # w_err: extra replay anchors at error positions (0 = off)

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        for name in ("accepted_weight", "rejected_weight", "post_rejection_weight", "error_anchor_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")


class OPDLossOut(NamedTuple):
    loss: jax.Array  # scalar
    accepted_loss: jax.Array  # scalar: the accepted stream's weighted sum / active rounds
    rejected_loss: jax.Array  # scalar: the rejected stream's (first rejected offset)
    post_loss: jax.Array  # scalar: the post-rejection suffix's
    error_loss: jax.Array  # scalar: the error-position anchors' (0 when off)
    divergence_by_offset: jax.Array  # [K] mean D over active rounds (unweighted; monitoring)


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


def _k3(logq_tok, teacher_logp_tok):
    log_ratio = jax.lax.stop_gradient(teacher_logp_tok.astype(jnp.float32)) - logq_tok
    return jnp.expm1(log_ratio) - log_ratio


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
        return _k3(jnp.take_along_axis(logq, drafted_BRK[..., None], axis=-1)[..., 0], teacher_logp_tok_BRK)
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
        return _k3(logq_tok.reshape(lead), teacher_logp_tok_BRK)
    logp, const = _teacher(teacher_logp_BRKW, cfg)
    terms = EXACT_TERMS[cfg.divergence][0]
    return cl.sum_over_support(head, h_ND, logp.reshape(-1, logp.shape[-1]), terms, chunk).reshape(lead) + const


def error_anchor_config(cfg: OPDLossConfig) -> OPDLossConfig:
    """The divergence D* of the error-anchor term: the exact form of `cfg.divergence`."""
    return dataclasses.replace(cfg, divergence="reverse_kl" if cfg.divergence == "k3" else cfg.divergence)


def opd_loss(logq_BRKW, n_accepted_BR, active_BR, cfg: OPDLossConfig, *, drafted_BRK=None,
             teacher_logp_tok_BRK=None, teacher_logp_BRKW=None, valid_BRK: Optional[jax.Array] = None,
             error_logq_BRW=None, teacher_error_BRW=None, error_mask_BR=None) -> OPDLossOut:
    """The acceptance-aware loss (module docstring) from the drafter's log-probs.

    Args:
      logq_BRKW: drafter log-probs over its support at every offset (from the replay).
      n_accepted_BR: accepted drafts per round (int, 0..K).
      active_BR: the round ran for this row (rows that finished earlier are masked).
      drafted_BRK, teacher_logp_tok_BRK: for "k3".
      teacher_logp_BRKW: for the exact divergences.
      valid_BRK: optional extra mask (e.g. offsets past the end of the buffer).
      error_logq_BRW, teacher_error_BRW, error_mask_BR: the error-anchor term (when
        `cfg.error_anchor_weight` > 0): the fresh chains' first-draft log q, the teacher's log p
        at the error offset, and which rounds have an error anchor.
    """
    D = divergence(logq_BRKW, cfg, drafted_BRK, teacher_logp_tok_BRK, teacher_logp_BRKW)
    D_err = None
    if cfg.error_anchor_weight > 0 and error_logq_BRW is not None and teacher_error_BRW is not None:
        D_err = divergence(error_logq_BRW[:, :, None], error_anchor_config(cfg),
                           teacher_logp_BRKW=teacher_error_BRW[:, :, None])[..., 0]
    return loss_from_divergences(D, n_accepted_BR, active_BR, cfg, valid_BRK, D_err, error_mask_BR)


def loss_from_divergences(D_BRK, n_accepted_BR, active_BR, cfg: OPDLossConfig, valid_BRK: Optional[jax.Array] = None,
                          error_D_BR=None, error_mask_BR=None) -> OPDLossOut:
    """The acceptance-aware loss (module docstring) from the divergence at every offset
    `D_BRK` (`divergence` or `head_divergence`) and, when `cfg.error_anchor_weight` > 0, D* at
    the error anchors `error_D_BR` (`error_anchor_config`) with their mask; arguments as `opd_loss`."""
    D = D_BRK
    K = D.shape[2]
    w_acc, w_rej, w_post = stream_weights(n_accepted_BR, active_BR, K, cfg)
    if valid_BRK is not None:
        v = valid_BRK.astype(jnp.float32)
        w_acc, w_rej, w_post = w_acc * v, w_rej * v, w_post * v
    rounds = jnp.maximum(jnp.sum(active_BR.astype(jnp.float32)), 1.0)
    parts = [jnp.sum(w * D) / rounds for w in (w_acc, w_rej, w_post)]
    act = active_BR[..., None].astype(jnp.float32) * (1.0 if valid_BRK is None else valid_BRK.astype(jnp.float32))
    by_offset = jax.lax.stop_gradient(jnp.sum(act * D, axis=(0, 1)) / jnp.maximum(jnp.sum(act, axis=(0, 1)), 1.0))
    err = jnp.zeros((), jnp.float32)
    if cfg.error_anchor_weight > 0:
        if error_D_BR is None or error_mask_BR is None:
            raise ValueError("error_anchor_weight > 0 needs the error anchors' log q, the teacher's log p there "
                             "and their mask (replay with error_anchors=True, rollout with error_support=True)")
        m = (error_mask_BR & active_BR).astype(jnp.float32)
        err = cfg.error_anchor_weight * jnp.sum(m * error_D_BR) / rounds
    return OPDLossOut(parts[0] + parts[1] + parts[2] + err, *parts, err, by_offset)
