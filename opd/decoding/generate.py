"""Autoregressive generation: prefill + one jitted `lax.while_loop` over decode steps.

Axis letters: B batch, P padded prompt length, N max new tokens, D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd.decoding import batching
from opd.decoding.sampling import SamplingParams, sample
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig


@dataclasses.dataclass
class GenerateOutput:
    tokens: list  # per prompt: generated ids (prompt excluded, cut before EOS)
    stats: dict


def prefill(params, config: TransformerConfig, tokens_BP, lengths_B, cache_len: int, hidden_layers=()):
    """Runs the padded prompts into a fresh cache.

    Returns (cache with per-row lengths, final-normed hidden at each row's last prompt
    token [B, D], forward output for the whole prompt)."""
    B = tokens_BP.shape[0]
    cache = tfm.init_cache(config, B, cache_len)
    out = tfm.forward(params, config, tokens_BP, cache=cache, hidden_layers=hidden_layers)
    cache = out.cache._replace(lengths=lengths_B)  # pad slots beyond a row's length are stale
    last_BD = out.hidden_BTD[jnp.arange(B), lengths_B - 1]
    return cache, last_BD, out


@functools.partial(jax.jit, static_argnames=("config", "sp", "max_new_tokens", "cache_len"))
def _generate_jit(params, tokens_BP, lengths_B, done_B, key, eos_ids, *, config, sp, max_new_tokens, cache_len):
    B = tokens_BP.shape[0]
    cache, last_BD, _ = prefill(params, config, tokens_BP, lengths_B, cache_len)
    key, sub = jax.random.split(key)
    tok_B = sample(sub, tfm.lm_head(params, config, last_BD), sp)
    out_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(tok_B)
    n_gen_B = jnp.where(done_B, 0, 1).astype(jnp.int32)
    done_B = done_B | jnp.isin(tok_B, eos_ids)

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, tok, out, done, n_gen, key = state
        o = tfm.forward(params, config, tok[:, None], cache=cache)
        key, sub = jax.random.split(key)
        nxt = sample(sub, tfm.lm_head(params, config, o.hidden_BTD[:, 0]), sp)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos_ids)
        return i + 1, o.cache, nxt, out, done, n_gen, key

    state = (jnp.int32(1), cache, tok_B, out_BN, done_B, n_gen_B, key)
    i, _, _, out_BN, _, n_gen_B, _ = jax.lax.while_loop(cond, body, state)
    return out_BN, n_gen_B, i  # i = number of target forwards (prefill included)


def generate(
    target,
    prompts: Sequence[batching.Prompt],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
) -> GenerateOutput:
    """Autoregressive generation from a target (`opd.Target`).

    Args:
      prompts: list of token-id lists (ragged) or of strings (chat template applied).
      batch_size: prompts per compiled batch (default: all of them at once).
    Returns:
      GenerateOutput with `tokens` (per prompt, EOS excluded) and `stats`.
    """
    sp = SamplingParams(temperature, top_k, top_p)
    config = target.config
    ids = batching.encode_prompts(target, prompts)
    batching.check_lengths(ids, max_new_tokens, config.max_position_embeddings)
    eos = batching.resolve_eos(target, eos_token_ids)
    key = jax.random.PRNGKey(seed)
    results, forwards, t0 = [], 0, time.perf_counter()
    for chunk in batching.chunks(ids, config.pad_token_id or 0, batch_size):
        P = chunk.tokens.shape[1]
        cache_len = min(batching.round_up(P + max_new_tokens, 128), batching.round_up(config.max_position_embeddings, 128))
        cache_len = max(cache_len, P + max_new_tokens)
        key, sub = jax.random.split(key)
        out, n_gen, n_fwd = _generate_jit(
            target.params, chunk.tokens, chunk.lengths, ~chunk.valid, sub, batching.eos_array(eos),
            config=config, sp=sp, max_new_tokens=max_new_tokens, cache_len=cache_len,
        )
        out = np.asarray(out)
        forwards += int(n_fwd)
        results += [batching.truncate_at_eos(out[r], max_new_tokens, eos) for r in range(len(chunk.prompts))]
    seconds = time.perf_counter() - t0
    generated = sum(len(r) for r in results)
    stats = {
        "tau": 1.0,
        "acceptance_by_offset": [],
        "target_forwards": forwards,
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_second": generated / seconds if seconds > 0 else float("nan"),
    }
    return GenerateOutput(results, stats)
