"""Pieces shared bit-for-bit by the verification kernel and its reference.

Both implementations must draw the *same* tokens for the same key, so everything random or
decision-making that is not a vocabulary reduction lives here, once:

* `split_key`: key -> acceptance uniforms [B, K] (jax.random, computed outside any kernel) and
  one uint32-derived int32 seed per row for the Gumbel noise.
* `gumbel_noise`: a counter-based hash of (row seed, vocabulary index) -> Gumbel(0, 1).  It
  uses only int32 adds/multiplies/xors/logical shifts, an int->float convert and two logs, so
  it can be evaluated inside a Pallas kernel tile by tile (Mosaic and Triton lower all of
  these) and in plain jnp over the whole vocabulary, giving identical values.
* `accept_mask` / `num_accepted`: the accept rule in log space.
* `residual_logits`: log max(0, p - q) elementwise in log space.
* `running_argmax` / `running_logsumexp`: one vocabulary tile's step of the streaming
  reductions, the same arithmetic in every kernel formulation (`kernel.py`, `split.py`).

Axis letters: B batch, K drafted tokens per round, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# murmur3 fmix32 constants and the golden-ratio increment, as wrapped int32 (the same bits
# as the usual uint32 constants; int32 multiplication wraps modulo 2**32 in XLA, Mosaic and
# Triton, and `shift_right_logical` makes the shifts unsigned).
_M1 = -2048144789  # 0x85EBCA6B
_M2 = -1028477387  # 0xC2B2AE35
_GOLDEN = -1640531527  # 0x9E3779B9
_MANTISSA_BITS = 23  # uniforms are (k + 0.5) / 2**23: strictly inside (0, 1) in float32
_BIG_INDEX = 2**31 - 1
LOGIT_DTYPES = ("float32", "bfloat16")  # accepted target logits / draft log-probs (read as float32)


class VerifyResult(NamedTuple):
    """Output of one verify round (unpacks as a tuple).

    num_accepted: [B] int32 in [0, K], length of the accepted draft prefix.
    next_token: [B] int32, the correction token at the first rejection, or the bonus token
        drawn from p_{K+1} when all K drafts are accepted.  The round commits
        `draft_tokens[:num_accepted] + [next_token]`.
    accepted: [B, K] bool, the per-offset accept test *before* the prefix rule (offset i is
        meaningful only where all offsets < i were accepted; P(accepted_i | prefix accepted)
        is the acceptance-by-offset statistic).
    """

    num_accepted: jax.Array
    next_token: jax.Array
    accepted: jax.Array


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser on int32 bit patterns (a bijection with full avalanche)."""
    h = h ^ jax.lax.shift_right_logical(h, jnp.int32(16))
    h = h * jnp.int32(_M1)
    h = h ^ jax.lax.shift_right_logical(h, jnp.int32(13))
    h = h * jnp.int32(_M2)
    return h ^ jax.lax.shift_right_logical(h, jnp.int32(16))


def row_seeds(seed: jax.Array, batch: int) -> jax.Array:
    """One decorrelated int32 seed per row ([B, 1]) from a scalar int32 seed."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (batch, 1), 0)
    return _fmix32(_fmix32(seed.astype(jnp.int32)) + rows * jnp.int32(_GOLDEN))


def gumbel_noise(row_seed: jax.Array, vocab_ids: jax.Array) -> jax.Array:
    """Gumbel(0, 1) noise, a pure function of (row seed, vocabulary index).

    Args:
      row_seed: int32, broadcastable against `vocab_ids` (e.g. [B, 1] or [1, 1]).
      vocab_ids: int32 absolute vocabulary indices (e.g. [1, V] or a [1, block_v] tile).
    Returns:
      float32 noise of the broadcast shape, finite (|g| < 17).
    """
    h = _fmix32(row_seed ^ _fmix32(vocab_ids * jnp.int32(_GOLDEN) + jnp.int32(1)))
    bits = jax.lax.shift_right_logical(h, jnp.int32(32 - _MANTISSA_BITS))
    u = (bits.astype(jnp.float32) + 0.5) * (1.0 / (1 << _MANTISSA_BITS))
    return -jnp.log(-jnp.log(u))


def split_key(key: jax.Array, batch: int, k: int) -> tuple[jax.Array, jax.Array]:
    """Acceptance uniforms [B, K] float32 in [0, 1) and per-row Gumbel seeds [B, 1] int32."""
    k_u, k_g = jax.random.split(key)
    uniforms_BK = jax.random.uniform(k_u, (batch, k), jnp.float32)
    seed = jax.lax.bitcast_convert_type(jax.random.bits(k_g, (), jnp.uint32), jnp.int32)
    return uniforms_BK, row_seeds(seed, batch)


def accept_mask(logp_d_BK: jax.Array, logq_d_BK: jax.Array, uniforms_BK: jax.Array) -> jax.Array:
    """Per-offset accept test of drafted tokens d_i ~ q_i: accept iff u * q(d) <= p(d) and p(d) > 0.

    Evaluated in log space, log u + log q(d) <= log p(d), which neither underflows for tiny
    probabilities nor produces NaN (log u and log q(d) may be -inf; log p(d) may be -inf).
    For d ~ q this is the standard rule (accept with probability min(1, p/q)).

    q(d) == 0 cannot happen for a correct drafter (d was sampled from q); if it does (a drafter
    bug, e.g. greedy drafting with sampling verification) the ratio p/q is +inf for p(d) > 0,
    so d is accepted, and 0/0 for p(d) == 0, which we reject.  The `p(d) > 0` guard also
    covers u == 0 exactly.  Consequence: a committed token never has target probability 0
    (after top-k/top-p); losslessness itself is only defined, and guaranteed, for d ~ q.
    """
    log_u = jnp.log(uniforms_BK)
    return (logp_d_BK > -jnp.inf) & (log_u + logq_d_BK <= logp_d_BK)


def num_accepted(accepted_BK: jax.Array) -> jax.Array:
    """Length of the all-accepted prefix, [B] int32 in [0, K]."""
    return jnp.sum(jnp.cumprod(accepted_BK.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def residual_logits(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """log max(0, p - q), elementwise; -inf where p <= q.  Unnormalised (Gumbel-max needs no Z)."""
    positive = logp > logq
    safe_diff = jnp.where(positive, logq - logp, -1.0)  # < 0 or -inf where used; never NaN
    return jnp.where(positive, logp + jnp.log1p(-jnp.exp(safe_diff)), -jnp.inf)


def log_softmax_from_stats(x: jax.Array, row_max: jax.Array, log_sum: jax.Array) -> jax.Array:
    """(x - max) - log(sum exp(x - max)), the same formula as `jax.nn.log_softmax`."""
    return (x - row_max) - log_sum


def running_argmax(best, idx, scores, ids):
    """One tile's step of a running (max, first argmax) along the last axis.

    Args:
      best, idx: the running max (float32) and its vocabulary index (int32), [..., 1].
      scores: float32 [..., T] of this tile (-inf where masked); ids: its int32 vocabulary ids.
    Returns:
      the updated (best, idx); ties keep the lower vocabulary index, as `jnp.argmax` does
      (tiles arrive in increasing vocabulary order and only a strictly larger max replaces).
    """
    tile_best = jnp.max(scores, axis=-1, keepdims=True)
    tile_idx = jnp.min(jnp.where(scores == tile_best, ids, _BIG_INDEX), axis=-1, keepdims=True)
    better = tile_best > best
    return jnp.where(better, tile_best, best), jnp.where(better, tile_idx, idx)


def running_logsumexp(m, s, xs):
    """One tile's step of an online log-sum-exp: running max m and sum s of exp(x - m), [..., 1].

    xs: float32 [..., T] (-inf where masked). A row that is all -inf so far keeps m = -inf, s = 0.
    """
    m_new = jnp.maximum(m, jnp.max(xs, axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    return m_new, s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(xs - m_safe), axis=-1, keepdims=True)


def check_inputs(target_logits_BKV1, draft_tokens_BK, draft_logprobs_BKV, key, temperature: float) -> tuple[int, int, int]:
    """Raises ValueError on malformed verify inputs; returns (B, K, V)."""
    if target_logits_BKV1.ndim != 3:
        raise ValueError(f"target_logits must be [B, K+1, V], got shape {target_logits_BKV1.shape}")
    if target_logits_BKV1.dtype.name not in LOGIT_DTYPES:
        raise ValueError(f"target_logits must be one of {LOGIT_DTYPES}, got {target_logits_BKV1.dtype}")
    b, k1, v = target_logits_BKV1.shape
    k = k1 - 1
    if k < 1:
        raise ValueError(f"need K >= 1 drafted tokens (target_logits [B, K+1, V]), got K = {k}")
    if draft_tokens_BK.shape != (b, k):
        raise ValueError(f"draft_tokens must be [B, K] = {(b, k)}, got {draft_tokens_BK.shape}")
    if draft_tokens_BK.dtype != jnp.int32:
        raise ValueError(f"draft_tokens must be int32, got {draft_tokens_BK.dtype}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0:
        if draft_logprobs_BKV is None:
            raise ValueError("sampling verification (temperature > 0) needs draft_logprobs [B, K, V]")
        if key is None:
            raise ValueError("sampling verification (temperature > 0) needs a PRNG key")
    if draft_logprobs_BKV is not None:
        if draft_logprobs_BKV.shape != (b, k, v):
            raise ValueError(f"draft_logprobs must be [B, K, V] = {(b, k, v)}, got {draft_logprobs_BKV.shape}")
        if draft_logprobs_BKV.dtype.name not in LOGIT_DTYPES:
            raise ValueError(f"draft_logprobs must be one of {LOGIT_DTYPES}, got {draft_logprobs_BKV.dtype}")
    return b, k, v


def select_next_token(res_best, res_tok, p_tok):
    """Correction/bonus token: Gumbel-max over the residual, or over p where the residual is 0."""
    return jnp.where(res_best > -jnp.inf, res_tok, p_tok).astype(jnp.int32)
