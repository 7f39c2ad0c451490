"""DFlash drafting on the engine's interface: one drafter forward proposes a whole block.

Engine invariants (opd.decoding.speculative): committed x_1..x_n per row, x_n pending; the
target's features are known for x_1..x_{n-1}. That is exactly DFlash's context (z-lab's
`dflash_generate` feeds the prompt's features at prefill, then the verify pass's features of
[pending, accepted drafts]; the block's anchor is the pending token whose own feature is not
known yet).

State: `KVCache` with, per draft layer, the context K/V of every committed position but the
pending one (slot s = position s) and `lengths = seq_len - 1` per row. Prefill writes the
prompt's features; commit writes the verify pass's K+1 positions at `lengths` and advances
`lengths` by n_accepted + 1, so the slots of rejected drafts are stale and masked by position.

Draft vocabulary (`draft_vocab_size` W > 0): the block's logits cover W draft tokens; drafts
are mapped back to target ids (d2t) before verification and sampled log q is scattered to the
target vocabulary (-inf outside), as EAGLE-3 does, so decoding stays lossless.

Axis letters: B batch, S cache length, K draft tokens, V vocabulary, W draft vocabulary (or V).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from opd.decoding.sampling import process_logits
from opd.drafters.base import DraftContext, Drafter, DrafterSpec, LossOut, Segments, TargetFeatures
from opd.drafters.dflash import model as dfm
from opd.drafters.dflash import training as tr
from opd.drafters.eagle3 import model as e3  # the draft-vocabulary maps (d2t / t2d) are EAGLE-3's
from opd.drafters.eagle3.drafter import special_token_ids
from opd.models.config import TransformerConfig

# Target parameters the drafter shares (frozen): the input embedding and, if untied, the LM head.
SHARED_TARGET_PARAMS = ("embedding", "lm_head")


@dataclasses.dataclass(frozen=True)
class DFlashSpec(DrafterSpec):
    """params = {"dflash": trainable tree (opd.drafters.dflash.model), "target": the target's
    `embedding` (+ `lm_head` when untied): the same arrays, never trained; with a draft
    vocabulary also "vocab": {"d2t": int32 [W], "t2d": bool [V]} (frozen, from init / the
    checkpoint)}."""

    config: dfm.DFlashConfig = None
    target_config: TransformerConfig = None

    kind = "dflash"
    packed_sft = True

    def __post_init__(self):
        if self.config is None or self.target_config is None:
            raise ValueError("DFlashSpec needs a DFlashConfig and the target's TransformerConfig")
        check_fits_target(self.config, self.target_config)
        object.__setattr__(self, "target_hidden_layers", self.config.target_layer_ids)

    @property
    def max_draft_tokens(self) -> int:
        return self.config.max_draft_tokens

    @property
    def target_hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_draft_tokens_why(self) -> str:
        return f"block_size - 1 = {self.config.max_draft_tokens}"

    def prefill(self, params, ctx: DraftContext, target_aux, cache_len: int):
        # target_aux covers the padded prompt: positions [0, len_b) are x_1..x_{n-1}, the rest stale.
        cache = dfm.init_context_cache(self.config, ctx.seq_BS.shape[0], cache_len)
        cache = dfm.write_context(params["dflash"], self.config, cache, target_aux, jnp.zeros_like(ctx.seq_len_B))
        return cache._replace(lengths=ctx.seq_len_B - 1)

    def propose(self, params, cache, ctx: DraftContext, key, num_draft_tokens: int, sp):
        self.check_num_draft_tokens(num_draft_tokens)
        S = jax.tree.leaves(cache.k)[0].shape[2]
        valid_BS = jnp.arange(S)[None] < cache.lengths[:, None]
        logits = dfm.block_logits(params["dflash"], params["target"], self.config, self.target_config,
                                  ctx.pending(), ctx.seq_len_B - 1, cache.k, cache.v, valid_BS,
                                  tr.head_ids(params.get("vocab")))[:, :num_draft_tokens]
        d2t = params["vocab"]["d2t"] if "vocab" in params else None
        if sp.greedy:
            d = jnp.argmax(logits, -1).astype(jnp.int32)
            return (d if d2t is None else d + d2t[d].astype(jnp.int32)), None, cache
        # q_i is the proposal for position i on its own, so independent samples keep the
        # rejection-sampling rule exact.
        logq_BKW = process_logits(logits, sp)
        d = jax.random.categorical(key, logq_BKW, axis=-1).astype(jnp.int32)
        if d2t is None:
            return d, logq_BKW, cache
        return d + d2t[d].astype(jnp.int32), e3.draft_to_target_logprobs(logq_BKW, d2t, self.vocab_size), cache

    def commit(self, params, cache, ctx: DraftContext, n_accepted_B, target_aux):
        # target_aux covers [pending, d_1..d_K] at positions lengths + [0, K]; the first
        # n_accepted + 1 are now committed context. Inactive rows keep their length.
        cache = dfm.write_context(params["dflash"], self.config, cache, target_aux, cache.lengths)
        return cache._replace(lengths=ctx.seq_len_B - 1)

    # ------------------------------------------------------------------ training hooks
    # params = {"dflash": trainable, "target": the target's embedding (+ untied lm_head),
    #           "vocab": {"d2t", "t2d"} (frozen; only with a draft vocabulary)}

    def split_params(self, params):
        return params["dflash"], {k: params[k] for k in ("vocab",) if k in params}

    def join_params(self, trainable, frozen, target_params):
        return {"dflash": trainable, **frozen,
                "target": {k: target_params[k] for k in SHARED_TARGET_PARAMS if k in target_params}}

    def shared_params(self, params):
        return dict(params["target"])

    def abstract_trainable(self):
        return dfm.abstract_params(self.config)

    def with_param_dtype(self, dtype: str) -> "DFlashSpec":
        return dataclasses.replace(self, config=self.config.replace(param_dtype=dtype))

    def sft_loss(self, trainable, frozen, target_params, target_config, features: TargetFeatures, tokens_BT,
                 loss_mask_BT, key, loss_config: tr.DFlashSFTLoss, segments: Segments | None = None) -> LossOut:
        shared = jax.lax.stop_gradient(self.join_params(trainable, frozen, target_params)["target"])
        anchors, keep = tr.sample_anchors(key, loss_mask_BT, loss_config.num_anchors,
                                          None if segments is None else segments.ids_BT)
        return tr.loss(trainable, shared, self.config, target_config, features.aux, tokens_BT, loss_mask_BT, anchors,
                       keep, gamma=loss_config.gamma, segments=segments, vocab=frozen.get("vocab"))

    def sft_flops(self, target_config, batch: int, seq_len: int, loss_config: tr.DFlashSFTLoss) -> int:
        return tr.sft_flops(self.config, target_config, batch, seq_len, loss_config.num_anchors)

    def support_ids(self, params) -> jax.Array:
        ids = tr.head_ids(params.get("vocab"))
        return super().support_ids(params) if ids is None else ids

    def replay_logits(self, trainable, params, target_config, rec, aux, error_anchors: bool = False):
        return tr.replay_logits(trainable, params, self.config, target_config, rec, aux, error_anchors)

    def replay_hidden(self, trainable, params, target_config, rec, aux, error_anchors: bool = False):
        return tr.replay_hidden(trainable, params, self.config, target_config, rec, aux, error_anchors)

    def opd_flops(self, target_config, batch: int, prompt_len: int, num_rounds: int, num_draft_tokens: int,
                  seq_len: int, error_anchors: bool = False) -> int:
        return tr.opd_flops(self.config, target_config, batch, prompt_len, num_rounds, num_draft_tokens, seq_len,
                            error_anchors)


def check_fits_target(config: dfm.DFlashConfig, tconfig: TransformerConfig, source: str = "DFlash drafter") -> None:
    """ValueError naming the first field of `config` that does not fit the target."""
    if config.hidden_size != tconfig.hidden_size:
        raise ValueError(f"{source}: hidden_size {config.hidden_size} != the target's {tconfig.hidden_size}")
    if config.vocab_size != tconfig.vocab_size:
        raise ValueError(f"{source}: vocab_size {config.vocab_size} != the target's {tconfig.vocab_size}")
    if config.num_target_layers != tconfig.num_layers:
        raise ValueError(
            f"{source}: built for a {config.num_target_layers}-layer target (num_target_layers), "
            f"the target has {tconfig.num_layers} layers"
        )
    bad = [i for i in config.target_layer_ids if not 0 <= i < tconfig.num_layers]
    if bad:
        raise ValueError(f"{source}: target_layer_ids {config.target_layer_ids} out of range for a "
                         f"{tconfig.num_layers}-layer target")


def shared_target_params(target) -> dict:
    """The target's embedding (+ untied LM head): references, not copies."""
    return {k: target.params[k] for k in SHARED_TARGET_PARAMS if k in target.params}


def default_mask_token_id(target) -> int:
    """z-lab's choice made general: the first embedding row no tokenizer token maps to (Qwen3:
    151669); without such a row, the pad token; else the last id."""
    V = target.config.vocab_size
    tok = getattr(target, "tokenizer", None)
    if tok is not None and tok.vocab_size < V:
        return int(tok.vocab_size)
    if target.config.pad_token_id is not None:
        return int(target.config.pad_token_id)
    return V - 1


CONFIG_OVERRIDES = ("num_layers", "block_size", "mask_token_id", "target_layer_ids", "num_target_features",
                    "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "attention_bias", "draft_vocab_size",
                    "mask_embedding", "dtype", "param_dtype")


def config_for_target(target, **overrides) -> dfm.DFlashConfig:
    """A DFlashConfig shaped like the target (width, heads, MLP, RoPE, norm eps).

    overrides: num_layers (1), block_size (16), mask_token_id (`default_mask_token_id`),
    target_layer_ids or num_target_features (default: as many as draft layers, z-lab's rule),
    intermediate_size, num_heads, num_kv_heads, head_dim, attention_bias, draft_vocab_size (0:
    the whole vocabulary), mask_embedding ("token"), dtype, param_dtype."""
    unknown = sorted(set(overrides) - set(CONFIG_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown options for the dflash drafter: {unknown}; known: {list(CONFIG_OVERRIDES)}")
    t = target.config
    num_layers = int(overrides.pop("num_layers", 1))
    n_feat = overrides.pop("num_target_features", num_layers)
    ids = overrides.pop("target_layer_ids", None)
    if ids is None:
        ids = dfm.default_target_layer_ids(t.num_layers, n_feat)
    kw = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, target_layer_ids=tuple(ids),
        num_target_layers=t.num_layers, mask_token_id=default_mask_token_id(target), num_layers=num_layers,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, rope_scaling=t.rope_scaling,
        dtype=t.dtype, param_dtype=t.param_dtype,
    )
    kw.update(overrides)
    return dfm.DFlashConfig(**kw)


def make_drafter(target, config: dfm.DFlashConfig, dflash_params, vocab=None) -> Drafter:
    """Wraps trainable DFlash parameters (and, with a draft vocabulary, its `vocab` maps
    {"d2t", "t2d"}) for `target` (checks that they fit it)."""
    spec = DFlashSpec(vocab_size=target.config.vocab_size, config=config, target_config=target.config)
    W = config.draft_vocab_size
    if (vocab is None) != (W == 0):
        raise ValueError(f"a DFlash drafter with draft_vocab_size {W} needs "
                         f"{'its d2t / t2d maps' if W else 'no draft-vocabulary maps'}")
    params = {"dflash": dflash_params, "target": shared_target_params(target)}
    if W:
        if tuple(vocab["d2t"].shape) != (W,) or tuple(vocab["t2d"].shape) != (config.vocab_size,):
            raise ValueError(f"draft-vocabulary maps of shapes d2t {tuple(vocab['d2t'].shape)}, t2d "
                             f"{tuple(vocab['t2d'].shape)}; expected ({W},) and ({config.vocab_size},)")
        params["vocab"] = {"d2t": jnp.asarray(vocab["d2t"], jnp.int32), "t2d": jnp.asarray(vocab["t2d"], bool)}
    return Drafter(spec, params)


def init_dflash(target, seed: int = 0, token_counts=None, **overrides) -> Drafter:
    """A randomly initialised DFlash drafter for `target` (`config_for_target` lists overrides).

    token_counts: [V] token frequencies of the training data; needed (only) with
      draft_vocab_size > 0: the draft vocabulary is the W most frequent tokens plus the target's
      EOS / BOS / PAD (EAGLE-3's `build_draft_vocab`), chosen once here, never rebuilt.
    A learned mask embedding starts at the mean of the target's embedding rows (a neutral MASK).

    Trainable: `drafter.params["dflash"]`; `drafter.params["target"]` shares the target's
    embedding / LM head (keep it out of the optimizer)."""
    config = config_for_target(target, **overrides)
    params = dfm.init_params(config, jax.random.PRNGKey(seed))
    if config.mask_embedding == "learned":
        mean = jnp.mean(jnp.asarray(target.params["embedding"], jnp.float32), axis=0)
        params = {**params, "mask_embedding": mean.astype(params["mask_embedding"].dtype)}
    vocab = None
    if config.draft_vocab_size:
        if token_counts is None:
            raise ValueError(f"a DFlash drafter with draft_vocab_size {config.draft_vocab_size} needs token_counts "
                             "(the training data's [V] token frequencies) to choose its draft vocabulary")
        counts = np.asarray(token_counts)
        if counts.shape != (config.vocab_size,):
            raise ValueError(f"token_counts must have shape ({config.vocab_size},) (the target vocabulary), "
                             f"got {counts.shape}")
        d2t, t2d = e3.build_draft_vocab(counts, config.draft_vocab_size, special_token_ids(target))
        vocab = {"d2t": d2t, "t2d": t2d}
    return make_drafter(target, config, params, vocab)
