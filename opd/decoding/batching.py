"""Prompt preparation shared by every generator: encode, validate, pad and bucket.

Shapes are bucketed (batch to powers of two, prompt length to 2^k or 1.5 * 2^k, cache length
to a multiple of 128) so repeated calls with similar prompts reuse compiled programs.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

Prompt = Union[str, Sequence[int]]


class PromptError(ValueError):
    """Prompts cannot be generated from (none given, not strings or flat token-id lists, empty,
    too long, token id out of range)."""


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest of {2^k, 1.5 * 2^k} >= n (and >= minimum): at most a third of a prefill is padding."""
    p = next_pow2(n, minimum)
    return p * 3 // 4 if p * 3 // 4 >= max(n, minimum) else p


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def encode_prompts(target, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token-id lists as they are; strings go through the target's chat template + tokenizer.

    Raises PromptError (before any model work) for anything else: no prompts, a bare string /
    bytes / number instead of a list, rows that are not one string or one flat list of integer
    ids (None, bytes, floats, nested lists, lists of strings), empty rows, ids outside the vocabulary.
    """
    if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise PromptError(f"prompts must be a list of strings or a list of token-id lists, got {_describe(prompts)}")
    if len(prompts) == 0:
        raise PromptError("prompts is empty: pass at least one prompt (a string or a list of token ids)")
    if all(_is_int(p) for p in prompts):  # [5, 6, 7] where [[5, 6, 7]] was meant
        raise PromptError(f"prompts is a flat list of ints ({_describe(prompts)}): it must be a list of prompts; "
                          "pass one token-id prompt as [[id, id, ...]]")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if target.tokenizer is None:
                raise PromptError("string prompts need a tokenizer; this target has none (pass token ids)")
            text = target.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            ids = target.tokenizer.encode(text)
        else:
            ids = _token_ids(p, i)
        if not ids:
            raise PromptError(f"prompt {i} is empty")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= target.config.vocab_size:
            raise PromptError(f"prompt {i} has token id {hi if hi >= target.config.vocab_size else lo} outside the vocabulary [0, {target.config.vocab_size})")
        out.append(ids)
    return out


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _describe(x) -> str:
    """`type` and a short repr of a bad input, for error messages."""
    r = repr(x)
    return f"{type(x).__name__} {r[:40] + '...' if len(r) > 40 else r}"


def _token_ids(p, i: int) -> list[int]:
    """Prompt `i` as a list of ints: a flat sequence (or 1-D integer array) of integer ids."""
    if hasattr(p, "__array__") and not isinstance(p, (bytes, bytearray)):  # numpy / jax arrays
        a = np.asarray(p)
        if a.ndim == 1 and (a.dtype.kind in "iu" or a.size == 0):
            return [int(t) for t in a]
        bad = f"an array of shape {a.shape} and dtype {a.dtype}"
    elif isinstance(p, (bytes, bytearray)) or not isinstance(p, Sequence):
        bad = _describe(p)
    else:
        bad = next((f"an element {_describe(t)}" for t in p if not _is_int(t)), None)
        if bad is None:
            return [int(t) for t in p]
    raise PromptError(f"prompt {i} must be a string or a flat list of integer token ids, got {bad}")


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
