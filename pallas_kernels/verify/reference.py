"""Plain-jnp specification of one lossless speculative-verification round.

Leviathan et al. 2023 / Chen et al. 2023.  Target distributions p_1..p_{K+1} (p_i conditioned
on the prefix and d_<i), drafts d_1..d_K ~ q_1..q_K.  p goes through exactly the processing of
`opd.decoding.sampling.process_logits` (temperature, top-k, top-p); q is passed in already
processed by the same function.

* temperature == 0: accept the longest prefix with d_i == argmax p_i; next = argmax p_{n+1}.
* temperature > 0: accept d_i iff u_i q_i(d_i) <= p_i(d_i) and p_i(d_i) > 0 (see
  `common.accept_mask`); at the first rejection j draw from normalize(max(0, p_j - q_j)) (or
  from p_j if that residual is all zero); if all K are accepted draw the bonus from p_{K+1}.
  Draws are Gumbel-max with the hash noise of `common.gumbel_noise`; the bonus case is the
  residual with q == 0.

This file materialises everything over V; the kernel in `kernel.py` must return identical
results for the same key.

Axis letters: B batch, K drafted tokens, K1 = K + 1 target positions, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd.decoding.sampling import SamplingParams, process_logits
from pallas_kernels.verify import common


def verify_reference(
    target_logits_BKV1: jax.Array,
    draft_tokens_BK: jax.Array,
    draft_logprobs_BKV: jax.Array | None,
    key: jax.Array | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> common.VerifyResult:
    """One verify round, materialised over the vocabulary.

    Args:
      target_logits_BKV1: [B, K+1, V] float32 or bfloat16 raw target logits.
      draft_tokens_BK: [B, K] int32 drafted tokens, in [0, V).
      draft_logprobs_BKV: [B, K, V] float32 (or bfloat16) processed drafter log-probs log q (-inf where
        q == 0), or None for greedy verification.
      key: PRNG key (unused and may be None when temperature == 0).
      temperature, top_k, top_p: as `SamplingParams` (static).
    Returns:
      `common.VerifyResult(num_accepted [B], next_token [B], accepted [B, K])`.
    """
    b, k, v = common.check_inputs(target_logits_BKV1, draft_tokens_BK, draft_logprobs_BKV, key, temperature)
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    logp_BKV1 = process_logits(target_logits_BKV1, sp)  # float32 (bfloat16 logits are upcast exactly)
    if draft_logprobs_BKV is not None:
        draft_logprobs_BKV = draft_logprobs_BKV.astype(jnp.float32)
    if sp.greedy:
        argmax_BK1 = jnp.argmax(logp_BKV1, axis=-1).astype(jnp.int32)
        accepted_BK = draft_tokens_BK == argmax_BK1[:, :k]
        n_B = common.num_accepted(accepted_BK)
        next_B = jnp.take_along_axis(argmax_BK1, n_B[:, None], axis=1)[:, 0]
        return common.VerifyResult(n_B, next_B, accepted_BK)

    uniforms_BK, row_seed_B1 = common.split_key(key, b, k)
    d_BK1 = draft_tokens_BK[:, :, None]
    logp_d_BK = jnp.take_along_axis(logp_BKV1[:, :k], d_BK1, axis=-1)[..., 0]
    logq_d_BK = jnp.take_along_axis(draft_logprobs_BKV, d_BK1, axis=-1)[..., 0]
    accepted_BK = common.accept_mask(logp_d_BK, logq_d_BK, uniforms_BK)
    n_B = common.num_accepted(accepted_BK)

    logp_BV = jnp.take_along_axis(logp_BKV1, n_B[:, None, None], axis=1)[:, 0]
    logq_BV = jnp.take_along_axis(draft_logprobs_BKV, jnp.minimum(n_B, k - 1)[:, None, None], axis=1)[:, 0]
    logq_BV = jnp.where((n_B < k)[:, None], logq_BV, -jnp.inf)  # bonus: residual with q = 0 is p
    noise_BV = common.gumbel_noise(row_seed_B1, jnp.arange(v, dtype=jnp.int32)[None, :])
    res_BV = common.residual_logits(logp_BV, logq_BV) + noise_BV
    res_best_B = jnp.max(res_BV, axis=-1)
    res_tok_B = jnp.argmax(res_BV, axis=-1)
    p_tok_B = jnp.argmax(logp_BV + noise_BV, axis=-1)
    return common.VerifyResult(n_B, common.select_next_token(res_best_B, res_tok_B, p_tok_B), accepted_BK)
