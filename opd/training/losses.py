"""Loss helpers shared by the drafter kinds' SFT losses (pure functions).

Axis letters: B batch, T positions, n tapped target layers, D width.
"""

from __future__ import annotations

import jax.numpy as jnp

def as_aux(target_hidden, n: int, what: str) -> tuple:
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


