"""Prompt preparation shared by every generator: encode, validate, pad and bucket.

Shapes are bucketed (batch to powers of two, prompt length to 2^k or 1.5 * 2^k, cache length
to a multiple of 128) so repeated calls with similar prompts reuse compiled programs.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

Prompt = Union[str, Sequence[int]]


class PromptError(ValueError):
    """A prompt cannot be generated from (empty, too long, token id out of range)."""


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest of {2^k, 1.5 * 2^k} >= n (and >= minimum): at most a third of a prefill is padding."""
    p = next_pow2(n, minimum)
    return p * 3 // 4 if p * 3 // 4 >= max(n, minimum) else p


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def encode_prompts(target, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token-id lists as they are; strings go through the target's chat template + tokenizer."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise PromptError("prompts must be a list of strings or a list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if target.tokenizer is None:
                raise PromptError("string prompts need a tokenizer; this target has none (pass token ids)")
            text = target.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            ids = target.tokenizer.encode(text)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise PromptError(f"prompt {i} is empty")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= target.config.vocab_size:
            raise PromptError(f"prompt {i} has token id {hi if hi >= target.config.vocab_size else lo} outside the vocabulary [0, {target.config.vocab_size})")
        out.append(ids)
    return out


def check_lengths(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, max_positions: int, extra: int = 0) -> None:
    """Raises PromptError naming the first prompt that cannot fit the model's context."""
    if max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, ids in enumerate(prompt_ids):
        need = len(ids) + max_new_tokens + extra
        if need > max_positions:
            raise PromptError(
                f"prompt {i} is too long: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens}"
                + (f" + {extra} lookahead" if extra else "")
                + f" = {need} > the model's context of {max_positions} positions"
            )


def pad_batch(prompt_ids: Sequence[Sequence[int]], pad_id: int, batch: int, length: int):
    """Right-pads to [batch, length]; missing rows are 1-token dummies. Returns tokens, lengths, valid."""
    tokens = np.full((batch, length), pad_id, np.int32)
    lengths = np.ones((batch,), np.int32)
    valid = np.zeros((batch,), bool)
    for i, ids in enumerate(prompt_ids):
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
        valid[i] = True
    return tokens, lengths, valid


def truncate_at_eos(row: Sequence[int], n: int, eos_ids: Sequence[int]) -> list[int]:
    """The first n tokens of a row, cut before the first EOS."""
    out = []
    eos = set(int(e) for e in eos_ids)
    for t in list(row)[:n]:
        if int(t) in eos:
            break
        out.append(int(t))
    return out


class Chunk(NamedTuple):
    """One compiled batch: right-padded prompts (rows past `len(prompts)` are dummies)."""

    prompts: list  # the chunk's token-id lists
    tokens: np.ndarray  # [B, P] int32, B a power of two, P = bucket_length(longest)
    lengths: np.ndarray  # [B] int32
    valid: np.ndarray  # [B] bool


def chunks(prompt_ids: Sequence[Sequence[int]], pad_id: int, batch_size: Optional[int]) -> Iterator[Chunk]:
    """Splits prompts into bucketed batches of at most `batch_size` (default: all at once)."""
    bs = batch_size or len(prompt_ids)
    for start in range(0, len(prompt_ids), bs):
        part = [list(p) for p in prompt_ids[start : start + bs]]
        B, P = next_pow2(len(part)), bucket_length(max(len(x) for x in part))
        yield Chunk(part, *pad_batch(part, pad_id, B, P))


def resolve_eos(target, eos_token_ids: Optional[Sequence[int]]) -> tuple:
    """The ids that end generation: given ones, else the target's; () disables EOS."""
    return tuple(int(e) for e in (target.eos_token_ids if eos_token_ids is None else eos_token_ids))


def eos_array(eos: Sequence[int]):
    import jax.numpy as jnp

    return jnp.asarray(eos if eos else (-1,), jnp.int32)  # -1 never matches a token
