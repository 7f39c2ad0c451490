"""EAGLE-3 draft model as pure Flax linen functions.

The drafter reads *pairs* (f_t, x_{t+1}): f_t is the target's feature at position t (three
target layer outputs fused by `fc`) or, when drafting beyond the verified text, the
drafter's own pre-norm output hidden at the previous chain step; x_{t+1} is the token at
t + 1. Its output at pair t predicts x_{t+2}.

One decoder layer whose attention q/k/v read the 2D-wide concat
[input_norm(embed(x_{t+1})), hidden_norm(f_t)] and whose residual stream is f_t; then
post-attention norm + SwiGLU MLP; final norm; `lm_head` over a reduced *draft vocabulary*.
The token embedding is the target's (frozen, shared): it is passed in, never a parameter
here.

Draft vocabulary maps (as EAGLE stores them, non-trainable, kept in the checkpoint):
  d2t int32 [Vd]: target_id = draft_id + d2t[draft_id]
  t2d bool  [V]:  t2d[target_id] is True iff the token is in the draft vocabulary.
They are built once, at init, from token frequencies of the training data
(`build_draft_vocab`) and never rebuilt on fine-tuning or import.

Pair positions: pair t sits at RoPE position t (as EAGLE's training-time test and SGLang
do); chain step k of a draft from the last verified pair t sits at position t + k - 1.

Axis letters: B batch, T positions in this call, S cache length, D width, V target
vocabulary, W draft vocabulary (Vd), N query heads, K kv heads, G = N / K, H head dim, F MLP
width.

Logical axis names of the parameters (for the sharding rule table): "embed", "heads",
"kv_heads", "head_dim", "mlp", "norm" as the target's, plus "fused_embed" (fc input, 3D),
"concat_embed" (q/k/v input, 2D) and "draft_vocab" (lm_head output, W).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from opd.decoding.sampling import SamplingParams, process_logits
from opd.models import transformer as tfm
from opd.models.config import RopeScaling, TransformerConfig

Params = Any


def default_target_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default aux layers in our convention (layer i = *output* of decoder layer i).

    EAGLE (and SGLang's default capture) take the *inputs* of layers {2, L//2, L-3}, i.e.
    the outputs of layers {1, L//2 - 1, L - 4}; SpecForge's aux ids and SGLang's
    `eagle_config.eagle_aux_hidden_state_layer_ids` already use this output convention.
    Tiny targets (L < 5) get the ids clipped into [0, L - 2]: layer L - 1 cannot be exported
    (SGLang / vLLM cannot capture it; see opd/drafters/eagle3/hf.py).
    """
    ids = (1, num_layers // 2 - 1, num_layers - 4)
    return tuple(int(min(max(i, 0), max(num_layers - 2, 0))) for i in ids)


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """Hyper-parameters of an EAGLE-3 drafter. Hashable: a jit static argument."""

    vocab_size: int  # V, the target's vocabulary (t2d length, verification vocabulary)
    hidden_size: int  # D; equals the target's width (shared embedding)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    target_layers: tuple  # 3 target layers (output-of-layer convention, see above)
    draft_vocab_size: int  # W
    target_hidden_size: Optional[int] = None  # defaults to hidden_size; must equal it here
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.target_hidden_size is None:
            object.__setattr__(self, "target_hidden_size", self.hidden_size)
        object.__setattr__(self, "target_layers", tuple(int(i) for i in self.target_layers))
        for name in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "draft_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Eagle3Config.{name} must be positive, got {getattr(self, name)}")
        if len(self.target_layers) != 3:
            raise ValueError(f"EAGLE-3 fuses exactly 3 target layers, got target_layers={self.target_layers}")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size ({self.draft_vocab_size}) exceeds the target vocab_size ({self.vocab_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.target_hidden_size != self.hidden_size:
            raise ValueError(
                f"target_hidden_size ({self.target_hidden_size}) != hidden_size ({self.hidden_size}): a drafter "
                "narrower than its target needs its own embedding, which is not supported"
            )

    @classmethod
    def for_target(cls, target: TransformerConfig, **overrides) -> "Eagle3Config":
        """Copies width, heads, MLP width, norm eps and RoPE settings from the target's config."""
        kw = dict(
            vocab_size=target.vocab_size,
            hidden_size=target.hidden_size,
            num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            intermediate_size=target.intermediate_size,
            target_layers=default_target_layers(target.num_layers),
            draft_vocab_size=min(32000, target.vocab_size),
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta,
            rope_scaling=target.rope_scaling,
            max_position_embeddings=target.max_position_embeddings,
            dtype=target.dtype,
            param_dtype=target.param_dtype,
        )
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown EAGLE-3 options: {unknown}")
        kw.update(overrides)
        cfg = cls(**kw)
        for i in cfg.target_layers:
            if not 0 <= i < target.num_layers:
                raise ValueError(f"target layer {i} out of range [0, {target.num_layers}) for this target")
        if cfg.vocab_size != target.vocab_size or cfg.hidden_size != target.hidden_size:
            raise ValueError(
                f"drafter vocab/hidden ({cfg.vocab_size}, {cfg.hidden_size}) must equal the target's "
                f"({target.vocab_size}, {target.hidden_size})"
            )
        return cfg


# ----------------------------------------------------------------------------- draft vocabulary


def build_draft_vocab(token_counts, draft_vocab_size: int, always_include: Sequence[int] = ()):
    """The W most frequent target tokens (ties broken by lower id; `always_include` ids, e.g.
    EOS/special tokens, are taken first). Called once at init from training data, never on
    fine-tuning (the maps then live in the checkpoint).

    Args:
      token_counts: [V] counts (numpy-like).
      draft_vocab_size: W <= V.
      always_include: ids forced into the draft vocabulary.
    Returns:
      (d2t int32 [W] with target_id = draft_id + d2t[draft_id], t2d bool [V]); draft ids are
      the chosen target ids in increasing order.
    """
    counts = np.asarray(token_counts, np.float64)
    V = counts.shape[0]
    if counts.ndim != 1:
        raise ValueError(f"token_counts must be a [V] vector, got shape {counts.shape}")
    if not 0 < draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size must be in [1, {V}], got {draft_vocab_size}")
    forced = sorted({int(i) for i in always_include})
    for i in forced:
        if not 0 <= i < V:
            raise ValueError(f"always_include id {i} outside the vocabulary [0, {V})")
    if len(forced) > draft_vocab_size:
        raise ValueError(f"{len(forced)} always_include ids do not fit a draft vocabulary of {draft_vocab_size}")
    keep = np.zeros(V, bool)
    keep[forced] = True
    order = np.lexsort((np.arange(V), -counts))  # by count descending, then id ascending
    rest = [i for i in order if not keep[i]][: draft_vocab_size - len(forced)]
    keep[rest] = True
    ids = np.flatnonzero(keep)
    return (ids - np.arange(draft_vocab_size)).astype(np.int32), keep


def draft_target_ids(d2t_W: jax.Array) -> jax.Array:
    """[W] target id of every draft id."""
    return jnp.arange(d2t_W.shape[0], dtype=jnp.int32) + d2t_W.astype(jnp.int32)


def draft_to_target_logprobs(logq_xW: jax.Array, d2t_W: jax.Array, vocab_size: int) -> jax.Array:
    """Scatters draft-vocab log-probs to the target vocabulary: [..., W] -> [..., V], -inf
    (q = 0) outside the draft vocabulary."""
    full = jnp.full(logq_xW.shape[:-1] + (vocab_size,), -jnp.inf, logq_xW.dtype)
    return full.at[..., draft_target_ids(d2t_W)].set(logq_xW)


def sample_draft(key, logits_BW: jax.Array, d2t_W: jax.Array, vocab_size: int, sp: SamplingParams):
    """Draws one draft token per row. Returns (target ids [B], log q over the target
    vocabulary [B, V] or None when greedy)."""
    if sp.greedy:
        d = jnp.argmax(logits_BW, axis=-1).astype(jnp.int32)
        return d + d2t_W[d].astype(jnp.int32), None
    logq_BW = process_logits(logits_BW, sp)
    d = jax.random.categorical(key, logq_BW, axis=-1).astype(jnp.int32)
    return d + d2t_W[d].astype(jnp.int32), draft_to_target_logprobs(logq_BW, d2t_W, vocab_size)


# ----------------------------------------------------------------------------- modules


def _param(module: nn.Module, name: str, shape, axes, init=None):
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(module.config.param_dtype))


class Eagle3Attention(nn.Module):
    """GQA attention with 2D-wide q/k/v input and a one-layer KV cache (same masking rule as
    the target: keys at positions <= the query position; stale slots are overwritten first)."""

    config: Eagle3Config

    @nn.compact
    def __call__(self, x_BTE, positions_BT, cache_kv):
        c = self.config
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        E = 2 * D
        dt = jnp.dtype(c.dtype)
        wq = _param(self, "q", (E, N, H), ("concat_embed", "heads", "head_dim"))
        wk = _param(self, "k", (E, K, H), ("concat_embed", "kv_heads", "head_dim"))
        wv = _param(self, "v", (E, K, H), ("concat_embed", "kv_heads", "head_dim"))
        wo = _param(self, "o", (N, H, D), ("heads", "head_dim", "embed"))
        x = x_BTE.astype(dt)
        q = jnp.einsum("bte,enh->btnh", x, wq.astype(dt))
        k = jnp.einsum("bte,ekh->btkh", x, wk.astype(dt))
        v = jnp.einsum("bte,ekh->btkh", x, wv.astype(dt))
        inv_freq = tfm.rope_inv_freq(c)
        q = tfm.apply_rope(q, positions_BT, inv_freq)
        k = tfm.apply_rope(k, positions_BT, inv_freq).transpose(0, 2, 1, 3)  # [B, K, T, H]
        v = v.transpose(0, 2, 1, 3)
        B, T = x_BTE.shape[:2]
        if cache_kv is None:
            keys, values, key_pos_BS, new_kv = k, v, positions_BT, None
        else:
            k_all, v_all, lengths = cache_kv
            k_all = tfm.update_rows(k_all, k.astype(k_all.dtype), lengths, axis=2)
            v_all = tfm.update_rows(v_all, v.astype(v_all.dtype), lengths, axis=2)
            keys, values = k_all.astype(dt), v_all.astype(dt)
            S = keys.shape[2]
            key_pos_BS = jnp.broadcast_to(jnp.arange(S)[None, :], (B, S))
            new_kv = (k_all, v_all)
        mask_BTS = key_pos_BS[:, None, :] <= positions_BT[:, :, None]
        out = tfm.grouped_attention(q, keys, values, mask_BTS, dt)
        return jnp.einsum("btnh,nhd->btd", out, wo.astype(dt)), new_kv


class Eagle3(nn.Module):
    """fc (3D -> D), one decoder layer over [embedding, feature], final norm, draft LM head."""

    config: Eagle3Config

    def setup(self):
        c = self.config
        D = c.hidden_size
        # RMSNorm / MLP of the target read only hidden_size, intermediate_size, rms_norm_eps,
        # dtype and param_dtype, which Eagle3Config has too.
        self.fc = _param(self, "fc", (3 * c.target_hidden_size, D), ("fused_embed", "embed"))
        self.input_norm = tfm.RMSNorm(c, D)
        self.hidden_norm = tfm.RMSNorm(c, D)
        self.attn = Eagle3Attention(c)
        self.mlp_norm = tfm.RMSNorm(c, D)
        self.mlp = tfm.MLP(c)
        self.final_norm = tfm.RMSNorm(c, D)
        self.lm_head_kernel = _param(self, "lm_head", (D, c.draft_vocab_size), ("embed", "draft_vocab"))

    def fuse(self, aux):
        """Three target layer outputs [B, T, D] each -> the fused feature [B, T, D]."""
        dt = jnp.dtype(self.config.dtype)
        x = jnp.concatenate([a.astype(dt) for a in aux], axis=-1)
        return x @ self.fc.astype(dt)

    def head(self, hidden_BTD):
        """Pre-norm hidden -> float32 draft-vocab logits [B, T, W]."""
        dt = jnp.dtype(self.config.dtype)
        h = self.final_norm(hidden_BTD).astype(dt)
        return jnp.einsum("...d,dw->...w", h, self.lm_head_kernel.astype(dt), preferred_element_type=jnp.float32)

    def __call__(self, emb_BTD, feat_BTD, positions_BT, cache_kv):
        dt = jnp.dtype(self.config.dtype)
        feat = feat_BTD.astype(dt)
        x = jnp.concatenate([self.input_norm(emb_BTD.astype(dt)), self.hidden_norm(feat)], axis=-1)
        h, new_kv = self.attn(x, positions_BT, cache_kv)
        h = feat + h
        h = h + self.mlp(self.mlp_norm(h))
        return h, self.head(h), new_kv


# ----------------------------------------------------------------------------- functional API


class Eagle3Out(NamedTuple):
    hidden_BTD: jax.Array  # pre-norm output hidden: the feature fed back at the next chain step
    logits_BTW: jax.Array  # float32 draft-vocab logits
    cache: Optional[tfm.KVCache]


@functools.lru_cache(maxsize=None)
def model_for(config: Eagle3Config) -> Eagle3:
    return Eagle3(config)


def _init_all(module: Eagle3, D: int):
    z = jnp.zeros((1, 1, D), jnp.float32)
    module.fuse((z, z, z))
    return module(z, z, jnp.zeros((1, 1), jnp.int32), None)


def init_params(config: Eagle3Config, rng: jax.Array) -> Params:
    """Random trainable parameters (plain arrays; logical axis metadata stripped)."""
    variables = model_for(config).init(rng, config.hidden_size, method=_init_all)
    return nn.unbox(variables["params"])


def abstract_params(config: Eagle3Config):
    """Parameter shapes with their logical-partitioning metadata, without allocating."""
    return jax.eval_shape(lambda: model_for(config).init(jax.random.PRNGKey(0), config.hidden_size, method=_init_all)["params"])


def init_cache(config: Eagle3Config, batch: int, max_len: int) -> tfm.KVCache:
    """An empty one-layer cache ([B, K, S, H] keys/values) with per-row lengths."""
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    dt = jnp.dtype(config.dtype)
    return tfm.KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch,), jnp.int32))


def fuse(params: Params, config: Eagle3Config, aux) -> jax.Array:
    """fc over the concatenated three target layer outputs (in `config.target_layers` order)."""
    return model_for(config).apply({"params": params}, tuple(aux), method=Eagle3.fuse)


def logits(params: Params, config: Eagle3Config, hidden_BTD: jax.Array) -> jax.Array:
    return model_for(config).apply({"params": params}, hidden_BTD, method=Eagle3.head)


def forward(
    params: Params,
    config: Eagle3Config,
    embedding_VD: jax.Array,
    tokens_BT: jax.Array,
    feat_BTD: jax.Array,
    positions_BT: Optional[jax.Array] = None,
    cache: Optional[tfm.KVCache] = None,
) -> Eagle3Out:
    """Runs the drafter over pairs (feat[:, t], tokens[:, t]).

    `feat` is either `fuse(aux)` (target features) or fed-back `hidden_BTD`. Without a cache:
    causal over the T pairs at positions 0..T-1 (or `positions_BT`). With a cache: the T pairs
    of row b go to positions `cache.lengths[b] + [0, T)` and lengths advance by T (callers
    reset them to the number of valid pairs)."""
    if positions_BT is None:
        B, T = tokens_BT.shape
        base = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
        positions_BT = base[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    emb = jnp.take(embedding_VD, tokens_BT, axis=0)
    cache_kv = None if cache is None else (cache.k, cache.v, cache.lengths)
    h, lg, new_kv = model_for(config).apply({"params": params}, emb, feat_BTD, positions_BT, cache_kv)
    new_cache = None if cache is None else tfm.KVCache(new_kv[0], new_kv[1], cache.lengths + tokens_BT.shape[1])
    return Eagle3Out(h, lg, new_cache)


# ----------------------------------------------------------------------------- HF weights


def params_to_hf(config: Eagle3Config, params: Params) -> dict:
    """Our trainable params -> the public EAGLE-3 tensor names / layouts (Linear [out, in])."""
    c = config
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    a = p["attn"]
    return {
        "fc.weight": p["fc"].T,
        "midlayer.input_layernorm.weight": p["input_norm"]["scale"],
        "midlayer.hidden_norm.weight": p["hidden_norm"]["scale"],
        "midlayer.self_attn.q_proj.weight": a["q"].reshape(2 * D, N * H).T,
        "midlayer.self_attn.k_proj.weight": a["k"].reshape(2 * D, K * H).T,
        "midlayer.self_attn.v_proj.weight": a["v"].reshape(2 * D, K * H).T,
        "midlayer.self_attn.o_proj.weight": a["o"].reshape(N * H, D).T,
        "midlayer.post_attention_layernorm.weight": p["mlp_norm"]["scale"],
        "midlayer.mlp.gate_proj.weight": p["mlp"]["gate"].T,
        "midlayer.mlp.up_proj.weight": p["mlp"]["up"].T,
        "midlayer.mlp.down_proj.weight": p["mlp"]["down"].T,
        "norm.weight": p["final_norm"]["scale"],
        "lm_head.weight": p["lm_head"].T,
    }


def hf_tensor_shapes(config: Eagle3Config) -> dict:
    """Names and shapes of the trainable tensors of a public EAGLE-3 checkpoint."""
    c = config
    D, N, K, H, F, W = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.draft_vocab_size
    return {
        "fc.weight": (D, 3 * c.target_hidden_size),
        "midlayer.input_layernorm.weight": (D,),
        "midlayer.hidden_norm.weight": (D,),
        "midlayer.self_attn.q_proj.weight": (N * H, 2 * D),
        "midlayer.self_attn.k_proj.weight": (K * H, 2 * D),
        "midlayer.self_attn.v_proj.weight": (K * H, 2 * D),
        "midlayer.self_attn.o_proj.weight": (D, N * H),
        "midlayer.post_attention_layernorm.weight": (D,),
        "midlayer.mlp.gate_proj.weight": (F, D),
        "midlayer.mlp.up_proj.weight": (F, D),
        "midlayer.mlp.down_proj.weight": (D, F),
        "norm.weight": (D,),
        "lm_head.weight": (W, D),
    }


def params_from_hf(config: Eagle3Config, sd: dict) -> Params:
    """Public EAGLE-3 tensors (names of `hf_tensor_shapes`, already shape-checked) -> params."""
    c = config
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    dt = np.dtype(c.param_dtype) if c.param_dtype != "bfloat16" else None
    cast = (lambda x: np.asarray(x, dt)) if dt is not None else (lambda x: jnp.asarray(x, jnp.bfloat16))
    g = lambda k: np.asarray(sd[k], np.float32)
    p = {
        "fc": g("fc.weight").T,
        "input_norm": {"scale": g("midlayer.input_layernorm.weight")},
        "hidden_norm": {"scale": g("midlayer.hidden_norm.weight")},
        "attn": {
            "q": g("midlayer.self_attn.q_proj.weight").T.reshape(2 * D, N, H),
            "k": g("midlayer.self_attn.k_proj.weight").T.reshape(2 * D, K, H),
            "v": g("midlayer.self_attn.v_proj.weight").T.reshape(2 * D, K, H),
            "o": g("midlayer.self_attn.o_proj.weight").T.reshape(N, H, D),
        },
        "mlp_norm": {"scale": g("midlayer.post_attention_layernorm.weight")},
        "mlp": {
            "gate": g("midlayer.mlp.gate_proj.weight").T,
            "up": g("midlayer.mlp.up_proj.weight").T,
            "down": g("midlayer.mlp.down_proj.weight").T,
        },
        "final_norm": {"scale": g("norm.weight")},
        "lm_head": g("lm_head.weight").T,
    }
    return jax.tree.map(lambda x: cast(np.ascontiguousarray(x)), p)
