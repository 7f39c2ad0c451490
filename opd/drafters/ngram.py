"""Prompt-lookup (n-gram) drafting: copy what followed the latest earlier occurrence of the
context's last n tokens (n from `max_ngram` down to `min_ngram`), as transformers' prompt
lookup and vLLM's n-gram proposer do. No parameters, no state; q is one-hot on the proposal,
so rejection sampling stays exact at any temperature.

Axis letters: B batch, S sequence buffer, K draft tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from opd.drafters.base import DraftContext, Drafter, DrafterSpec
from opd.drafters.registry import DrafterKind


@dataclasses.dataclass(frozen=True)
class NGramSpec(DrafterSpec):
    max_ngram: int = 3
    min_ngram: int = 1

    kind = "ngram"

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")

    def prefill(self, params, ctx, target_aux, cache_len):
        return ()

    def commit(self, params, state, ctx, n_accepted_B, target_aux):
        return ()

    def propose(self, params, state, ctx: DraftContext, key, num_draft_tokens: int, sp):
        tokens_BK = lookup(ctx.seq_BS, ctx.seq_len_B, num_draft_tokens, self.max_ngram, self.min_ngram)
        logq_BKV = None
        if not sp.greedy:
            logq_BKV = jnp.where(jax.nn.one_hot(tokens_BK, self.vocab_size, dtype=bool), 0.0, -jnp.inf)
        return tokens_BK, logq_BKV, state


class NGramKind(DrafterKind):
    """Prompt lookup: no parameters, nothing to train or load."""

    name = "ngram"

    def init(self, target, seed: int = 0, **overrides):
        return Drafter(NGramSpec(vocab_size=target.config.vocab_size, **overrides), None)


def lookup(seq_BS, seq_len_B, num_draft_tokens: int, max_ngram: int, min_ngram: int):
    """[B, K] proposals. Rows without any match repeat their last token (still lossless)."""
    B, S = seq_BS.shape
    pos_S = jnp.arange(S)
    last_B = jnp.take_along_axis(seq_BS, (seq_len_B - 1)[:, None], axis=1)[:, 0]
    best_end_B = jnp.full((B,), -1, jnp.int32)  # index of the match's last token
    for n in range(min_ngram, max_ngram + 1):  # longer n-grams overwrite shorter matches
        suffix_Bn = jnp.take_along_axis(seq_BS, jnp.clip(seq_len_B[:, None] - n + jnp.arange(n)[None], 0, S - 1), axis=1)
        match_BS = jnp.ones((B, S), bool)
        for j in range(n):  # window ending at position e: tokens e-n+1..e equal the suffix
            shifted = jnp.roll(seq_BS, n - 1 - j, axis=1)
            match_BS &= shifted == suffix_Bn[:, j : j + 1]
        # The match must end before the suffix itself and have a real continuation.
        valid_BS = (pos_S[None] >= n - 1) & (pos_S[None] < seq_len_B[:, None] - 1) & (seq_len_B[:, None] >= n + 1)
        end_B = jnp.max(jnp.where(match_BS & valid_BS, pos_S[None], -1), axis=1).astype(jnp.int32)
        best_end_B = jnp.where(end_B >= 0, end_B, best_end_B)
    # Continuation after the match; past the end of the known text, repeat its last token.
    idx_BK = jnp.minimum(best_end_B[:, None] + 1 + jnp.arange(num_draft_tokens)[None], seq_len_B[:, None] - 1)
    cont_BK = jnp.take_along_axis(seq_BS, jnp.clip(idx_BK, 0, S - 1), axis=1)
    return jnp.where(best_end_B[:, None] >= 0, cont_BK, last_B[:, None]).astype(jnp.int32)
