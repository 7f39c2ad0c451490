"""Logit processing and token sampling shared by autoregressive and speculative decoding.

Speculative decoding is lossless only if the target's p and the drafter's q go through the
*same* processing, so there is exactly one implementation here (`process_logits`).

Axis letters: B batch, V vocabulary (any leading axes are allowed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. Hashable: a jit static argument.

    temperature == 0 means greedy (argmax); top_k == 0 and top_p == 1 disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits_V: jax.Array, sp: SamplingParams) -> jax.Array:
    """Float32 log-probabilities after temperature, top-k and top-p (filtered tokens: -inf).

    For greedy sampling the result is the plain log-softmax (argmax is unaffected by the
    filters)."""
    x = logits_V.astype(jnp.float32)
    if not sp.greedy:
        x = x / sp.temperature
        if sp.top_k > 0 and sp.top_k < x.shape[-1]:
            kth = jax.lax.top_k(x, sp.top_k)[0][..., -1:]
            x = jnp.where(x < kth, -jnp.inf, x)
        if sp.top_p < 1.0:
            sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
            probs = jax.nn.softmax(sorted_x, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep = mass_before < sp.top_p
            cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
            x = jnp.where(x < cutoff, -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


def sample(key: jax.Array, logits_BV: jax.Array, sp: SamplingParams) -> jax.Array:
    """Draws one token per row ([B] int32)."""
    if sp.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits_BV, sp), axis=-1).astype(jnp.int32)
