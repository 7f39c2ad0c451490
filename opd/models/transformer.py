"""Decoder-only target transformer (Llama / Qwen2 / Qwen3) as pure Flax linen functions.

Axis letters used in names:
  B batch, T new positions in this call, S cache length, D model width, V vocabulary,
  N query heads, K key/value heads, G query heads per kv head (N = K*G), H head dim,
  F MLP width, L layers, A requested auxiliary hidden layers.

The KV cache is an explicit pytree (`KVCache`) with per-row lengths, so rows of a batch
advance raggedly; a cached call writes T new positions per row at `cache.lengths[b]` and
attends to every cache slot whose position is <= the query position. Entries beyond a
row's length are stale and always masked, so rejected speculative tokens need no cleanup.

Hidden-state indexing convention: `hidden_layers=(i, ...)` returns the *output* of decoder
layer i (0-based), i.e. transformers' `output_hidden_states[i + 1]`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from opd.models.config import TransformerConfig

Params = Any
NEG_INF = -1e30


class KVCache(NamedTuple):
    """Keys/values of every layer and the number of valid positions per row.

    `k`, `v`: a tuple of L arrays `[B, K, S, H]` (unrolled layers) or one stacked
    `[L, B, K, S, H]` array (`config.scan_layers`)."""

    k: Any
    v: Any
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[-2]


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows and `max_len` positions."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    lengths = jnp.zeros((batch,), jnp.int32)
    if config.scan_layers:
        shape = (config.num_layers,) + shape
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), lengths)
    # Separate per-layer buffers: each is updated in place without slicing a stacked array.
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)), lengths)


class ForwardOut(NamedTuple):
    hidden_BTD: jax.Array  # after the final norm
    aux_hidden: tuple  # A arrays [B, T, D], outputs of the requested layers (pre final norm)
    cache: Optional[KVCache]


# Batches up to this size update caches with one in-place dynamic_update_slice per row; a
# scatter with per-row indices lowers on CPU to a loop over the whole buffer (measured 2.4x
# slower decoding at batch 8), but unrolling costs compile time for large batches.
_UNROLL_ROWS = 16


def update_rows(buf: jax.Array, new: jax.Array, start_B: jax.Array, axis: int) -> jax.Array:
    """`buf[b, ..., start_B[b] : start_B[b] + T, ...] = new[b]`, slicing `axis` (>= 1) of buf."""
    B = buf.shape[0]

    def starts(s):
        return tuple(s if a == axis - 1 else 0 for a in range(buf.ndim - 1))

    if B <= _UNROLL_ROWS:
        for b in range(B):
            buf = jax.lax.dynamic_update_slice(buf, new[b][None], (b,) + starts(start_B[b]))
        return buf
    return jax.vmap(lambda x, u, s: jax.lax.dynamic_update_slice(x, u, starts(s)))(buf, new, start_B)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: TransformerConfig) -> np.ndarray:
    """Inverse frequencies [H/2], with Llama-3 frequency-dependent scaling when configured."""
    h = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    rs = config.rope_scaling
    if rs is not None:
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * np.pi / inv
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = np.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates pairs (i, i + H/2) as transformers' `rotate_half` convention does."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


# ----------------------------------------------------------------------------- attention core


def grouped_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array, dtype) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v with grouped-query heads (N = K * G); `mask_BTS` is True
    where query t may attend key s. Shared by the target, EAGLE-3 and DFlash layers."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    G = N // K
    # Queries of one kv group side by side: [B, K, G*T, H].
    q = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k_BKSH, preferred_element_type=jnp.float32) * (1.0 / np.sqrt(H))
    mask_BQS = jnp.broadcast_to(mask_BTS[:, None], (B, G, T, mask_BTS.shape[-1])).reshape(B, G * T, -1)
    scores = jnp.where(mask_BQS[:, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v_BKSH)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


# ----------------------------------------------------------------------------- modules


def _param(module: nn.Module, name: str, shape, axes, init=None, dtype=None):
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype or module.config.param_dtype))


class RMSNorm(nn.Module):
    config: TransformerConfig
    dim: int

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (self.dim,), ("norm",), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (self.dim,))
        return (xf * scale).astype(x.dtype)


class Attention(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache_kv, layer_idx, segment_ids_BT=None):
        """cache_kv: None (whole-sequence causal; with `segment_ids_BT`, causal inside each packed
        sequence) or (k [L,B,S,K,H], v, lengths [B])."""
        c = self.config
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dt = jnp.dtype(c.dtype)
        wq = _param(self, "q", (D, N, H), ("embed", "heads", "head_dim"))
        wk = _param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim"))
        wv = _param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim"))
        wo = _param(self, "o", (N, H, D), ("heads", "head_dim", "embed"))
        x = x_BTD.astype(dt)
        q = jnp.einsum("btd,dnh->btnh", x, wq.astype(dt))
        k = jnp.einsum("btd,dkh->btkh", x, wk.astype(dt))
        v = jnp.einsum("btd,dkh->btkh", x, wv.astype(dt))
        if c.attention_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (N, H), ("heads", "head_dim"), zeros).astype(dt)[None, None]
            k = k + _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)[None, None]
            v = v + _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)[None, None]
        if c.qk_norm:
            q = RMSNorm(c, H, name="q_norm")(q)
            k = RMSNorm(c, H, name="k_norm")(k)
        inv_freq = rope_inv_freq(c)
        q = apply_rope(q, positions_BT, inv_freq)
        k = apply_rope(k, positions_BT, inv_freq)

        B, T = x_BTD.shape[:2]
        k = k.transpose(0, 2, 1, 3)  # [B, K, T, H]: the cache layout, contiguous per (row, kv head)
        v = v.transpose(0, 2, 1, 3)
        if cache_kv is None:
            keys, values = k, v
            key_pos_BS = positions_BT
            new_cache = None
        else:
            k_all, v_all, lengths = cache_kv
            if isinstance(k_all, tuple):  # unrolled layers: one [B, K, S, H] array per layer
                k_l = update_rows(k_all[layer_idx], k.astype(k_all[0].dtype), lengths, axis=2)
                v_l = update_rows(v_all[layer_idx], v.astype(v_all[0].dtype), lengths, axis=2)
                k_all = k_all[:layer_idx] + (k_l,) + k_all[layer_idx + 1 :]
                v_all = v_all[:layer_idx] + (v_l,) + v_all[layer_idx + 1 :]
            else:  # scanned layers: stacked [L, B, K, S, H], traced layer index
                k_l = update_rows(k_all[layer_idx], k.astype(k_all.dtype), lengths, axis=2)
                v_l = update_rows(v_all[layer_idx], v.astype(v_all.dtype), lengths, axis=2)
                k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_l, layer_idx, 0)
                v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_l, layer_idx, 0)
            keys, values = k_l.astype(dt), v_l.astype(dt)
            S = keys.shape[2]
            key_pos_BS = jnp.broadcast_to(jnp.arange(S)[None, :], (B, S))
            new_cache = (k_all, v_all)

        mask_BTS = key_pos_BS[:, None, :] <= positions_BT[:, :, None]
        if segment_ids_BT is not None:  # packed rows (uncached): positions restart per sequence
            mask_BTS = mask_BTS & (segment_ids_BT[:, None, :] == segment_ids_BT[:, :, None])
        out = grouped_attention(q, keys, values, mask_BTS, dt)
        out = jnp.einsum("btnh,nhd->btd", out, wo.astype(dt))
        return out, new_cache


class MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.config
        dt = jnp.dtype(c.dtype)
        wg = _param(self, "gate", (c.hidden_size, c.intermediate_size), ("embed", "mlp"))
        wu = _param(self, "up", (c.hidden_size, c.intermediate_size), ("embed", "mlp"))
        wd = _param(self, "down", (c.intermediate_size, c.hidden_size), ("mlp", "embed"))
        x = x_BTD.astype(dt)
        h = jax.nn.silu(x @ wg.astype(dt)) * (x @ wu.astype(dt))
        return h @ wd.astype(dt)


class Block(nn.Module):
    """One pre-norm decoder layer. Carry-in/carry-out form so it can be `nn.scan`ned."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, carry, layer_idx):
        x, positions, cache_kv, aux, aux_ids, segment_ids = carry
        c = self.config
        h, new_kv = Attention(c, name="attn")(RMSNorm(c, c.hidden_size, name="attn_norm")(x), positions, cache_kv, layer_idx,
                                              segment_ids)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c, c.hidden_size, name="mlp_norm")(x))
        if new_kv is not None:
            cache_kv = (new_kv[0], new_kv[1], cache_kv[2])
        # Keep the requested layer outputs without stacking all L of them.
        aux = jnp.where((aux_ids == layer_idx)[:, None, None, None], x[None].astype(aux.dtype), aux)
        return (x, positions, cache_kv, aux, aux_ids, segment_ids), None


class Transformer(nn.Module):
    config: TransformerConfig

    def setup(self):
        c = self.config
        self.embedding = _param(self, "embedding", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        if not c.tie_word_embeddings:
            self.lm_head_kernel = _param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))
        self.final_norm = RMSNorm(c, c.hidden_size)
        block = nn.remat(Block) if c.remat else Block
        if c.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c)
        else:
            self.layers = [block(c) for _ in range(c.num_layers)]

    def embed(self, tokens_BT):
        return jnp.take(self.embedding, tokens_BT, axis=0).astype(jnp.dtype(self.config.dtype))

    def lm_head(self, hidden_BTD):
        """Final-normed hidden -> float32 logits."""
        dt = jnp.dtype(self.config.dtype)
        if self.config.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", hidden_BTD.astype(dt), self.embedding.astype(dt), preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", hidden_BTD.astype(dt), self.lm_head_kernel.astype(dt), preferred_element_type=jnp.float32)

    def lm_head_columns(self, hidden_BTD, ids_W):
        """The logits of the vocabulary ids `ids_W` only (the same numbers as `lm_head`'s columns)."""
        dt = jnp.dtype(self.config.dtype)
        if self.config.tie_word_embeddings:
            rows_WD = jnp.take(self.embedding, ids_W, axis=0)
        else:
            rows_WD = jnp.take(self.lm_head_kernel, ids_W, axis=1).T
        return jnp.einsum("...d,wd->...w", hidden_BTD.astype(dt), rows_WD.astype(dt), preferred_element_type=jnp.float32)

    def __call__(self, tokens_BT, positions_BT, cache: Optional[KVCache] = None, hidden_layers: Sequence[int] = (),
                 segment_ids_BT=None):
        return self.body(self.embed(tokens_BT), positions_BT, cache, hidden_layers, segment_ids_BT)

    def body(self, x_BTD, positions_BT, cache, hidden_layers, segment_ids_BT=None):
        c = self.config
        hidden_layers = tuple(int(i) for i in hidden_layers)
        for i in hidden_layers:
            if not 0 <= i < c.num_layers:
                raise ValueError(f"hidden layer {i} out of range [0, {c.num_layers})")
        B, T, D = x_BTD.shape
        aux = jnp.zeros((len(hidden_layers), B, T, D), x_BTD.dtype)
        aux_ids = jnp.asarray(hidden_layers, jnp.int32)
        cache_kv = None if cache is None else (cache.k, cache.v, cache.lengths)
        if segment_ids_BT is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are only supported without a KV cache")
        carry = (x_BTD, positions_BT, cache_kv, aux, aux_ids, segment_ids_BT)
        if c.scan_layers:
            carry, _ = self.layers(carry, jnp.arange(c.num_layers))
        else:
            for i, layer in enumerate(self.layers):
                carry, _ = layer(carry, i)
        x, _, cache_kv, aux, _, _ = carry
        new_cache = None
        if cache is not None:
            new_cache = KVCache(cache_kv[0], cache_kv[1], cache.lengths + T)
        return ForwardOut(self.final_norm(x), tuple(aux[j] for j in range(len(hidden_layers))), new_cache)


# ----------------------------------------------------------------------------- functional API


@functools.lru_cache(maxsize=None)
def model_for(config: TransformerConfig) -> Transformer:
    return Transformer(config)


def init_params(config: TransformerConfig, rng: jax.Array) -> Params:
    """Random parameters (plain arrays; logical axis metadata stripped)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = model_for(config).init(rng, tokens, tokens)
    return nn.unbox(variables["params"])


def abstract_params(config: TransformerConfig):
    """Parameter shapes with their logical-partitioning metadata, without allocating."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model_for(config).init(jax.random.PRNGKey(0), tokens, tokens)["params"])


def forward(
    params: Params,
    config: TransformerConfig,
    tokens_BT: jax.Array,
    positions_BT: Optional[jax.Array] = None,
    cache: Optional[KVCache] = None,
    hidden_layers: Sequence[int] = (),
    segment_ids_BT: Optional[jax.Array] = None,
) -> ForwardOut:
    """Runs the decoder. Without a cache: causal over `tokens_BT` (with `segment_ids_BT`, packed
    rows: causal inside each sequence, `positions_BT` restarting per sequence). With a cache: the
    T new tokens of row b go to positions `cache.lengths[b] + [0, T)`."""
    if positions_BT is None:
        T = tokens_BT.shape[1]
        base = jnp.zeros((tokens_BT.shape[0],), jnp.int32) if cache is None else cache.lengths
        positions_BT = base[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return model_for(config).apply({"params": params}, tokens_BT, positions_BT, cache, tuple(hidden_layers),
                                   segment_ids_BT)


def lm_head(params: Params, config: TransformerConfig, hidden_BTD: jax.Array) -> jax.Array:
    """Final-normed hidden states -> float32 logits."""
    return model_for(config).apply({"params": params}, hidden_BTD, method=Transformer.lm_head)


def lm_head_columns(params: Params, config: TransformerConfig, hidden_BTD: jax.Array, ids_W: jax.Array) -> jax.Array:
    """Float32 logits [..., W] of the vocabulary ids `ids_W` (a draft vocabulary's columns)."""
    return model_for(config).apply({"params": params}, hidden_BTD, ids_W, method=Transformer.lm_head_columns)


def embed(params: Params, config: TransformerConfig, tokens_BT: jax.Array) -> jax.Array:
    return model_for(config).apply({"params": params}, tokens_BT, method=Transformer.embed)


# ----------------------------------------------------------------------------- HF weights


def params_from_hf(config: TransformerConfig, sd: dict) -> Params:
    """HF-named state dict (Linear weights [out, in]) -> our parameter pytree (numpy)."""
    c = config
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    f32 = lambda a: np.asarray(a, dtype=np.dtype(c.param_dtype)) if c.param_dtype != "bfloat16" else jnp.asarray(a, jnp.bfloat16)

    def layer(i):
        p = f"model.layers.{i}."
        attn = {
            "q": sd[p + "self_attn.q_proj.weight"].T.reshape(D, N, H),
            "k": sd[p + "self_attn.k_proj.weight"].T.reshape(D, K, H),
            "v": sd[p + "self_attn.v_proj.weight"].T.reshape(D, K, H),
            "o": sd[p + "self_attn.o_proj.weight"].T.reshape(N, H, D),
        }
        if c.attention_bias:
            attn["q_bias"] = sd[p + "self_attn.q_proj.bias"].reshape(N, H)
            attn["k_bias"] = sd[p + "self_attn.k_proj.bias"].reshape(K, H)
            attn["v_bias"] = sd[p + "self_attn.v_proj.bias"].reshape(K, H)
        if c.qk_norm:
            attn["q_norm"] = {"scale": sd[p + "self_attn.q_norm.weight"]}
            attn["k_norm"] = {"scale": sd[p + "self_attn.k_norm.weight"]}
        return {
            "attn_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "attn": attn,
            "mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "mlp": {
                "gate": sd[p + "mlp.gate_proj.weight"].T,
                "up": sd[p + "mlp.up_proj.weight"].T,
                "down": sd[p + "mlp.down_proj.weight"].T,
            },
        }

    params = {"embedding": sd["model.embed_tokens.weight"], "final_norm": {"scale": sd["model.norm.weight"]}}
    if not c.tie_word_embeddings:
        params["lm_head"] = sd["lm_head.weight"].T
    layers = [layer(i) for i in range(c.num_layers)]
    if c.scan_layers:
        params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params.update({f"layers_{i}": l for i, l in enumerate(layers)})
    return jax.tree.map(f32, params)
