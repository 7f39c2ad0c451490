"""DFlash's block attention (split softmax over context and block, no K/V concatenation)
equals grouped attention over the concatenated K/V, values and gradients, also under a vmap
over anchors that share one context (the SFT loss's layout)."""

import jax
import jax.numpy as jnp
import numpy as np

from opd.drafters.dflash.model import block_attention
from opd.models import transformer as tfm


def _concat_reference(q, ck, cv, valid, kb, vb):
    B, Q = q.shape[:2]
    keys, values = jnp.concatenate([ck, kb], axis=2), jnp.concatenate([cv, vb], axis=2)
    v = jnp.concatenate([valid, jnp.ones((B, Q), bool)], axis=1)
    return tfm.grouped_attention(q, keys, values, jnp.broadcast_to(v[:, None, :], (B, Q, v.shape[-1])), jnp.float32)


def test_block_attention_equals_attention_over_the_concatenated_keys():
    B, Q, N, K, H, S, A = 2, 4, 6, 2, 8, 11, 3
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q = jax.random.normal(ks[0], (A, B, Q, N, H))
    kb, vb = jax.random.normal(ks[1], (A, B, K, Q, H)), jax.random.normal(ks[2], (A, B, K, Q, H))
    ck, cv = jax.random.normal(ks[3], (B, K, S, H)), jax.random.normal(ks[4], (B, K, S, H))
    # per anchor a different visible prefix; row 1 of anchor 0 sees no context at all
    valid = jnp.arange(S)[None, None, :] < jnp.array([[0, 5], [3, 11], [7, 1]])[:, :, None]

    def run(fn, q, ck, cv, kb, vb):
        return jax.vmap(lambda q, kb, vb, m: fn(q, ck, cv, m, kb, vb))(q, kb, vb, valid)

    new = lambda *a: run(lambda q, ck, cv, m, kb, vb: block_attention(q, ck, cv, m, kb, vb, jnp.float32), *a)
    ref = lambda *a: run(_concat_reference, *a)
    args = (q, ck, cv, kb, vb)
    np.testing.assert_allclose(new(*args), ref(*args), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(ks[5], new(*args).shape)
    g_new = jax.grad(lambda *a: jnp.sum(new(*a) * w), argnums=(0, 1, 2, 3, 4))(*args)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2, 3, 4))(*args)
    for a, b in zip(g_new, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
