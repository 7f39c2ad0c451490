"""Classic speculative decoding with an independent small LM (same vocabulary as the target).

State: the drafter's own KV cache, holding every committed token but the pending one (the
same invariant as the target's cache), so `commit` only resets its per-row lengths.

Axis letters: B batch, P prompt, K draft tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from opd.decoding.sampling import process_logits
from opd.drafters.base import DraftContext, Drafter, DrafterSpec
from opd.drafters.registry import DrafterKind
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class LMSpec(DrafterSpec):
    config: TransformerConfig = None

    kind = "lm"

    def prefill(self, params, ctx: DraftContext, target_aux, cache_len):
        # At prefill `ctx` holds just the padded prompt bucket (+ the first generated token);
        # slots past each row's prompt are stale once lengths are reset.
        cache = tfm.init_cache(self.config, ctx.seq_BS.shape[0], cache_len)
        cache = tfm.forward(params, self.config, ctx.seq_BS, cache=cache).cache
        return cache._replace(lengths=ctx.seq_len_B - 1)

    def propose(self, params, cache, ctx: DraftContext, key, num_draft_tokens: int, sp):
        def step(carry, key_i):
            cache, tok = carry
            o = tfm.forward(params, self.config, tok[:, None], cache=cache)
            logits = tfm.lm_head(params, self.config, o.hidden_BTD[:, 0])
            if sp.greedy:
                return (o.cache, jnp.argmax(logits, -1).astype(jnp.int32)), (jnp.argmax(logits, -1).astype(jnp.int32), None)
            logq = process_logits(logits, sp)
            d = jax.random.categorical(key_i, logq, axis=-1).astype(jnp.int32)
            return (o.cache, d), (d, logq)

        (cache, last), (d_KB, logq_KBV) = jax.lax.scan(step, (cache, ctx.pending()), jax.random.split(key, num_draft_tokens))
        # Feed d_K too, so the cache holds every token a full acceptance can commit.
        cache = tfm.forward(params, self.config, last[:, None], cache=cache).cache
        logq = None if logq_KBV is None else jnp.swapaxes(logq_KBV, 0, 1)
        return jnp.swapaxes(d_KB, 0, 1), logq, cache

    def commit(self, params, cache, ctx: DraftContext, n_accepted_B, target_aux):
        return cache._replace(lengths=ctx.seq_len_B - 1)


class LMKind(DrafterKind):
    """An independent small LM with the target's vocabulary: `init(target, model=<opd.Target>)`."""

    name = "lm"

    def init(self, target, seed: int = 0, model=None, **overrides):
        if model is None:
            raise ValueError('init_drafter("lm", target, model=...) needs the small LM (an opd.Target)')
        if overrides:
            raise ValueError(f"unknown options for the lm drafter: {sorted(overrides)}")
        return Drafter(LMSpec(vocab_size=model.config.vocab_size, config=model.config), model.params, model.tokenizer)
