"""DFlash block drafter (z-lab/dflash `DFlashDraftModel`) as pure Flax linen functions.

One forward drafts a whole block. Inputs:
  * context: the target's hidden states of the layers `config.target_layer_ids` for the
    committed tokens x_1..x_{n-1}, concatenated and fused by `fc` [A*D, D] + RMSNorm;
  * the block [x_n, MASK x (Q-1)] (x_n = the last committed token), embedded with the
    target's (frozen, shared) embedding; a MASK position holds the embedding row of
    `mask_token_id` (z-lab) or, with `mask_embedding="learned"`, a trainable vector.
Every draft layer is a pre-norm decoder layer whose attention is NON-causal over
[context K/V, projected from the fused context by that layer's own k/v projections (no
input norm; k_norm applies)] U [the block's own K/V]. Queries come from the block only.
RoPE: context at its absolute positions 0..n-2, the block continuing at n-1..n-2+Q. After
the layers the drafter's own final norm (`norm.weight` in z-lab, *not* the target's final
norm) and the target's LM head (frozen, shared) give q_1..q_{Q-1} at block positions 1..Q-1;
with a draft vocabulary (`draft_vocab_size` W > 0) only the head's W columns of the draft
tokens are computed (`head_ids_W`, the target ids of the draft vocabulary, EAGLE-3's d2t maps).
q/k norms are always present (z-lab's drafter is Qwen3-based, whatever the target family).

Layer indexing: `target_layer_ids` use this project's convention (transformer.py: id i =
output of decoder layer i, 0-based = transformers' `output_hidden_states[i + 1]`). z-lab's
`extract_context_feature` reads `hidden_states[layer_id + 1]`, so z-lab's ids are the SAME
numbers as ours and are stored unchanged. (vLLM's `eagle_aux_hidden_state_layer_ids` count
layer *inputs*: they are z-lab ids + 1. Reading `hidden_states[layer_id]` is the off-by-one.)

Parameters split into a trainable tree (`init_params`) and the target's shared embedding /
LM head, which the functions here take as `target_params` (a slice of the target's tree).

Axis letters: B batch, T context positions in this call, S context cache length, Q block
positions (block_size), D width, A tapped target layers, N query heads, K kv heads,
G query heads per kv head, H head dim, F MLP width, V vocabulary, W the head's output
(the draft vocabulary, or V).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from opd.models import transformer as tfm
from opd.models.config import RopeScaling, TransformerConfig

Params = Any

MASK_EMBEDDINGS = ("token", "learned")  # DFlashConfig.mask_embedding


def default_target_layer_ids(num_target_layers: int, num_features: int) -> tuple:
    """z-lab's `build_target_layer_ids`: one layer -> L // 2; else `num_features` layers
    evenly spaced in [1, L - 3] (Python rounding, as the reference). A 2-layer target gets
    layer 0, not z-lab's 1 = L - 1, which the HF layout cannot hold (opd/drafters/dflash/hf.py)."""
    L, n = int(num_target_layers), int(num_features)
    if n < 1:
        raise ValueError(f"need at least one target feature layer, got {n}")
    if n == 1:
        return (min(L // 2, max(L - 2, 0)),)
    if L < 4:
        raise ValueError(
            f"a {L}-layer target is too shallow for {n} evenly spaced feature layers in [1, L-3]; "
            "pass target_layer_ids explicitly"
        )
    span = (L - 3) - 1
    return tuple(int(round(1 + i * span / (n - 1))) for i in range(n))


@dataclasses.dataclass(frozen=True)
class DFlashConfig:
    """Hyper-parameters of a DFlash drafter. Hashable: a jit static argument.

    `mask_token_id`: the id whose (target) embedding fills the block's MASK positions. z-lab
    uses a dedicated id no text token maps to (Qwen3 drafters: 151669, the first embedding
    row past the tokenizer's 151669 tokens); `opd.drafters.dflash.default_mask_token_id`
    makes the same choice for other targets.

    `draft_vocab_size`: 0 = the target's whole vocabulary (z-lab); W > 0 = the block logits
    cover only W draft tokens (the target LM head's columns of those tokens; the maps live in
    the drafter's frozen params, as EAGLE-3's d2t / t2d).
    `mask_embedding`: what fills the MASK positions: "token" (the target's embedding row of
    `mask_token_id`, z-lab) or "learned" (a trainable [D] vector, `params["mask_embedding"]`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    target_layer_ids: tuple  # our convention = z-lab's (see module docstring)
    num_target_layers: int
    mask_token_id: int
    num_layers: int = 1  # draft decoder layers (z-lab's 8B drafters: 5)
    block_size: int = 16  # Q: block positions; drafts up to Q - 1 tokens per forward
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # RoPE settings are copied from the target
    rope_scaling: Optional[RopeScaling] = None
    attention_bias: bool = False  # q/k/v/o biases (HF `attention_bias`)
    draft_vocab_size: int = 0  # W; 0 = the target's vocabulary
    mask_embedding: str = "token"  # one of MASK_EMBEDDINGS
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "num_layers", "num_target_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DFlashConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (one anchor + at least one MASK), got {self.block_size}")
        if not self.target_layer_ids:
            raise ValueError("target_layer_ids must name at least one target layer")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise ValueError(
                f"target_layer_ids {self.target_layer_ids} out of range for a {self.num_target_layers}-layer target "
                f"(ids are 0-based decoder-layer outputs)"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the vocabulary [0, {self.vocab_size})")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [0, {self.vocab_size}] (0: the whole vocabulary), "
                             f"got {self.draft_vocab_size}")
        if self.mask_embedding not in MASK_EMBEDDINGS:
            raise ValueError(f"mask_embedding must be one of {MASK_EMBEDDINGS}, got {self.mask_embedding!r}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def max_draft_tokens(self) -> int:
        return self.block_size - 1

    @property
    def head_size(self) -> int:
        """W: the width of the block logits (the draft vocabulary, or the target's V)."""
        return self.draft_vocab_size or self.vocab_size

    def replace(self, **kw) -> "DFlashConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- modules
# transformer.py's RMSNorm / MLP / `_param` read only fields DFlashConfig shares
# (hidden_size, intermediate_size, rms_norm_eps, dtype, param_dtype): reused, not copied.


class DFlashAttention(nn.Module):
    config: DFlashConfig

    def setup(self):
        c = self.config
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.wq = tfm._param(self, "q", (D, N, H), ("embed", "heads", "head_dim"))
        self.wk = tfm._param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.wv = tfm._param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim"))
        self.wo = tfm._param(self, "o", (N, H, D), ("heads", "head_dim", "embed"))
        if c.attention_bias:
            zeros = nn.initializers.zeros
            self.bq = tfm._param(self, "q_bias", (N, H), ("heads", "head_dim"), zeros)
            self.bk = tfm._param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zeros)
            self.bv = tfm._param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zeros)
            self.bo = tfm._param(self, "o_bias", (D,), ("embed",), zeros)
        self.q_norm = tfm.RMSNorm(c, H)
        self.k_norm = tfm.RMSNorm(c, H)

    def project_kv(self, x_BTD, positions_BT):
        """K/V of `x` (context features or block inputs) in the cache layout [B, K, T, H]."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        x = x_BTD.astype(dt)
        k = jnp.einsum("btd,dkh->btkh", x, self.wk.astype(dt))
        v = jnp.einsum("btd,dkh->btkh", x, self.wv.astype(dt))
        if c.attention_bias:
            k = k + self.bk.astype(dt)[None, None]
            v = v + self.bv.astype(dt)[None, None]
        k = tfm.apply_rope(self.k_norm(k), positions_BT, tfm.rope_inv_freq(c))
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, x_BQD, positions_BQ, ctx_k_BKSH, ctx_v_BKSH, ctx_valid_BS):
        c = self.config
        dt = jnp.dtype(c.dtype)
        B, Q = x_BQD.shape[:2]
        q = jnp.einsum("bqd,dnh->bqnh", x_BQD.astype(dt), self.wq.astype(dt))
        if c.attention_bias:
            q = q + self.bq.astype(dt)[None, None]
        q = tfm.apply_rope(self.q_norm(q), positions_BQ, tfm.rope_inv_freq(c))
        k_blk, v_blk = self.project_kv(x_BQD, positions_BQ)
        out = block_attention(q, ctx_k_BKSH.astype(dt), ctx_v_BKSH.astype(dt), ctx_valid_BS, k_blk, v_blk, dt)
        out = jnp.einsum("bqnh,nhd->bqd", out, self.wo.astype(dt))
        if c.attention_bias:
            out = out + self.bo.astype(dt)[None, None]
        return out


def block_attention(q_BQNH, ctx_k_BKSH, ctx_v_BKSH, ctx_valid_BS, k_BKQH, v_BKQH, dtype) -> jax.Array:
    """Non-causal attention of the block's queries over [valid context slots] U [the whole
    block]: one softmax over both, computed without concatenating the context K/V with the
    block's. (Under SFT's vmap over a row's anchors the context K/V is shared: a concatenation
    would copy it once per anchor, A x [B, K, S, H], which cost more than the matmuls.)"""
    B, Q, N, H = q_BQNH.shape
    K = ctx_k_BKSH.shape[1]
    G = N // K
    q = q_BQNH.reshape(B, Q, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * Q, H)
    scale = 1.0 / np.sqrt(H)
    s_ctx = jnp.einsum("bkqh,bksh->bkqs", q, ctx_k_BKSH, preferred_element_type=jnp.float32) * scale
    s_ctx = jnp.where(ctx_valid_BS[:, None, None, :], s_ctx, tfm.NEG_INF)
    s_blk = jnp.einsum("bkqh,bksh->bkqs", q, k_BKQH, preferred_element_type=jnp.float32) * scale
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(s_ctx, -1, keepdims=True), jnp.max(s_blk, -1, keepdims=True)))
    e_ctx, e_blk = jnp.exp(s_ctx - m), jnp.exp(s_blk - m)
    z = jnp.sum(e_ctx, -1, keepdims=True) + jnp.sum(e_blk, -1, keepdims=True)
    out = (jnp.einsum("bkqs,bksh->bkqh", (e_ctx / z).astype(dtype), ctx_v_BKSH)
           + jnp.einsum("bkqs,bksh->bkqh", (e_blk / z).astype(dtype), v_BKQH))
    return out.reshape(B, K, G, Q, H).transpose(0, 3, 1, 2, 4).reshape(B, Q, N, H)


class DFlashLayer(nn.Module):
    """Pre-norm decoder layer; `context_kv` projects context features with its attention."""

    config: DFlashConfig

    def setup(self):
        c = self.config
        self.attn_norm = tfm.RMSNorm(c, c.hidden_size)
        self.attn = DFlashAttention(c)
        self.mlp_norm = tfm.RMSNorm(c, c.hidden_size)
        self.mlp = tfm.MLP(c)

    def context_kv(self, ctx_BTD, positions_BT):
        return self.attn.project_kv(ctx_BTD, positions_BT)

    def __call__(self, x_BQD, positions_BQ, ctx_k, ctx_v, ctx_valid_BS):
        x = x_BQD + self.attn(self.attn_norm(x_BQD), positions_BQ, ctx_k, ctx_v, ctx_valid_BS)
        return x + self.mlp(self.mlp_norm(x))


class DFlash(nn.Module):
    config: DFlashConfig

    def setup(self):
        c = self.config
        A, D = len(c.target_layer_ids), c.hidden_size
        self.fc = tfm._param(self, "fc", (A * D, D), ("aux_embed", "embed"))
        self.hidden_norm = tfm.RMSNorm(c, D)
        self.layers = [DFlashLayer(c) for _ in range(c.num_layers)]
        self.final_norm = tfm.RMSNorm(c, D)
        if c.mask_embedding == "learned":  # read directly from the tree by `block_logits`
            self.mask_embedding = tfm._param(self, "mask_embedding", (D,), ("embed",))

    def context(self, aux_hidden: Sequence[jax.Array]):
        """A arrays [B, T, D] (target layer outputs, in `target_layer_ids` order) -> [B, T, D]."""
        dt = jnp.dtype(self.config.dtype)
        x = jnp.concatenate([a.astype(dt) for a in aux_hidden], axis=-1)
        return self.hidden_norm(x @ self.fc.astype(dt))

    def context_kv(self, ctx_BTD, positions_BT):
        kv = [layer.context_kv(ctx_BTD, positions_BT) for layer in self.layers]
        return tuple(k for k, _ in kv), tuple(v for _, v in kv)

    def block(self, x_BQD, positions_BQ, ctx_k, ctx_v, ctx_valid_BS):
        x = x_BQD.astype(jnp.dtype(self.config.dtype))
        for i, layer in enumerate(self.layers):
            x = layer(x, positions_BQ, ctx_k[i], ctx_v[i], ctx_valid_BS)
        return self.final_norm(x)

    def __call__(self, aux_hidden, ctx_positions_BT, x_BQD, positions_BQ):
        """Uncached path (init, tests): every context position is visible."""
        ctx_k, ctx_v = self.context_kv(self.context(aux_hidden), ctx_positions_BT)
        valid = jnp.ones(ctx_positions_BT.shape, bool)
        return self.block(x_BQD, positions_BQ, ctx_k, ctx_v, valid)


# ----------------------------------------------------------------------------- functional API


@functools.lru_cache(maxsize=None)
def model_for(config: DFlashConfig) -> DFlash:
    return DFlash(config)


def _dummy_inputs(config: DFlashConfig):
    D, A = config.hidden_size, len(config.target_layer_ids)
    aux = tuple(jnp.zeros((1, 1, D), jnp.dtype(config.dtype)) for _ in range(A))
    pos = jnp.zeros((1, 1), jnp.int32)
    return aux, pos, jnp.zeros((1, 2, D), jnp.dtype(config.dtype)), jnp.zeros((1, 2), jnp.int32)


def init_params(config: DFlashConfig, rng: jax.Array) -> Params:
    """Random trainable parameters (plain arrays; logical axis metadata stripped)."""
    return nn.unbox(model_for(config).init(rng, *_dummy_inputs(config))["params"])


def abstract_params(config: DFlashConfig):
    """Trainable parameter shapes with their logical-partitioning metadata, unallocated."""
    return jax.eval_shape(lambda: model_for(config).init(jax.random.PRNGKey(0), *_dummy_inputs(config))["params"])


def context_features(params: Params, config: DFlashConfig, aux_hidden: Sequence[jax.Array]) -> jax.Array:
    """Fused context features [B, T, D] from the A tapped target layers' outputs [B, T, D]."""
    if len(aux_hidden) != len(config.target_layer_ids):
        raise ValueError(f"expected {len(config.target_layer_ids)} target hidden states, got {len(aux_hidden)}")
    return model_for(config).apply({"params": params}, tuple(aux_hidden), method=DFlash.context)


def context_kv(params: Params, config: DFlashConfig, ctx_BTD: jax.Array, positions_BT: jax.Array):
    """Per draft layer K and V [B, K, T, H] of the context (RoPE applied at `positions_BT`)."""
    return model_for(config).apply({"params": params}, ctx_BTD, positions_BT, method=DFlash.context_kv)


def block_hidden(params: Params, config: DFlashConfig, x_BQD, positions_BQ, ctx_k, ctx_v, ctx_valid_BS) -> jax.Array:
    """Final-normed drafter hidden states [B, Q, D] of the block (context slots with
    `ctx_valid_BS` False are ignored)."""
    return model_for(config).apply({"params": params}, x_BQD, positions_BQ, ctx_k, ctx_v, ctx_valid_BS, method=DFlash.block)


def block_inputs(params: Params, target_params: Params, config: DFlashConfig, tconfig: TransformerConfig,
                 anchor_B: jax.Array) -> jax.Array:
    """The block's input embeddings [B, Q, D]: the anchor's, then Q - 1 MASK positions."""
    Q = config.block_size
    B = anchor_B.shape[0]
    if config.mask_embedding == "learned":
        x_anchor = tfm.embed(target_params, tconfig, anchor_B[:, None].astype(jnp.int32))
        mask = jnp.broadcast_to(params["mask_embedding"].astype(x_anchor.dtype), (B, Q - 1, x_anchor.shape[-1]))
        return jnp.concatenate([x_anchor, mask], axis=1)
    block_BQ = jnp.concatenate([anchor_B[:, None], jnp.full((B, Q - 1), config.mask_token_id, jnp.int32)], axis=1)
    return tfm.embed(target_params, tconfig, block_BQ.astype(jnp.int32))


def block_output(params: Params, target_params: Params, config: DFlashConfig, tconfig: TransformerConfig,
                 anchor_B: jax.Array, start_B: jax.Array, ctx_k, ctx_v, ctx_valid_BS) -> jax.Array:
    """Final-normed hidden states [B, Q-1, D] at block positions 1..Q-1: `block_logits` before
    the LM head."""
    Q = config.block_size
    x_BQD = block_inputs(params, target_params, config, tconfig, anchor_B)
    positions_BQ = start_B[:, None].astype(jnp.int32) + jnp.arange(Q, dtype=jnp.int32)[None]
    return block_hidden(params, config, x_BQD, positions_BQ, ctx_k, ctx_v, ctx_valid_BS)[:, 1:]


def block_logits(params: Params, target_params: Params, config: DFlashConfig, tconfig: TransformerConfig,
                 anchor_B: jax.Array, start_B: jax.Array, ctx_k, ctx_v, ctx_valid_BS,
                 head_ids_W: Optional[jax.Array] = None) -> jax.Array:
    """Float32 logits [B, Q-1, W] for the tokens after `anchor_B` (at position `start_B`).

    The block [anchor, MASK x (Q-1)] sits at positions start..start+Q-1; `target_params` must
    hold the target's `embedding` (and `lm_head` when untied). `head_ids_W`: the target ids of
    a draft vocabulary (only those LM-head columns are computed); None = all V."""
    h = block_output(params, target_params, config, tconfig, anchor_B, start_B, ctx_k, ctx_v, ctx_valid_BS)
    if head_ids_W is None:
        return tfm.lm_head(target_params, tconfig, h)
    return tfm.lm_head_columns(target_params, tconfig, h, head_ids_W)


def logits_from_features(params: Params, target_params: Params, config: DFlashConfig, tconfig: TransformerConfig,
                         aux_hidden: Sequence[jax.Array], anchor_B: jax.Array, ctx_len_B: jax.Array,
                         head_ids_W: Optional[jax.Array] = None) -> jax.Array:
    """Uncached reference / training path: `aux_hidden` are whole-sequence target layer
    outputs A x [B, T, D]; row b's context is positions [0, ctx_len_B[b]) and its block starts
    at ctx_len_B[b] with `anchor_B[b]`. Returns logits [B, Q-1, W] (`block_logits`)."""
    B, T = aux_hidden[0].shape[:2]
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    ctx_k, ctx_v = context_kv(params, config, context_features(params, config, aux_hidden), pos_BT)
    return block_logits(params, target_params, config, tconfig, anchor_B, ctx_len_B, ctx_k, ctx_v,
                        pos_BT < ctx_len_B[:, None], head_ids_W)


# ----------------------------------------------------------------------------- context cache


def init_context_cache(config: DFlashConfig, batch: int, max_len: int) -> tfm.KVCache:
    """Empty per-layer context K/V [B, K, S, H]; slot s holds absolute position s."""
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    dt = jnp.dtype(config.dtype)
    return tfm.KVCache(tuple(jnp.zeros(shape, dt) for _ in range(config.num_layers)),
                       tuple(jnp.zeros(shape, dt) for _ in range(config.num_layers)),
                       jnp.zeros((batch,), jnp.int32))


def write_context(params: Params, config: DFlashConfig, cache: tfm.KVCache, aux_hidden: Sequence[jax.Array],
                  start_B: jax.Array) -> tfm.KVCache:
    """Writes the context K/V of the T positions `aux_hidden` covers at slots start_B[b] + [0, T)
    (positions equal slots). `lengths` is left to the caller: slots at or past it are stale."""
    T = aux_hidden[0].shape[1]
    pos_BT = start_B[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)[None]
    ks, vs = context_kv(params, config, context_features(params, config, aux_hidden), pos_BT)
    k = tuple(tfm.update_rows(buf, new.astype(buf.dtype), start_B, axis=2) for buf, new in zip(cache.k, ks))
    v = tuple(tfm.update_rows(buf, new.astype(buf.dtype), start_B, axis=2) for buf, new in zip(cache.v, vs))
    return cache._replace(k=k, v=v)
