"""grain pipelines: trajectories -> fixed-shape training batches for drafters.

Axis letters: B = batch rows (per process), T = sequence length, L = one example's length.

Per trajectory (a `decode_trajectory` dict, or a raw example of `builders.load_source`):
* pre-tokenized (`prompt_ids` and `response_ids` non-empty): tokens = prompt_ids + response_ids,
  loss_mask = 0 on the prompt, 1 on the response;
* text (`messages`): rendered with the target's chat template and tokenized; loss_mask = 1 on the
  tokens of every assistant message as the template writes it (the content and its end-of-turn
  token, e.g. `<|im_end|>`; not the role header nor the newline after the end token).
`loss_mask[t] = 1` means token t was written by the assistant, i.e. it is a prediction *target*:
the position that predicts it is t - 1 (same segment). Sequences longer than T are truncated.

Then, in this order (the order is part of the determinism contract):
1. shard by `grain.sharding.ShardOptions` (data-parallel host `shard_index` of `shard_count`
   takes records index, index + count, ...; `drop_remainder` trims the source to a multiple of
   the count so every host sees the same number of records);
2. shuffle with `seed` (a fresh permutation each epoch) and repeat for `num_epochs`
   (None: forever);
3. tokenize (+ loss mask), truncate to T;
4. pack (first-fit into B bins of length T, `grain.experimental.FirstFitPackIterDataset`) or pad
   (one sequence per row);
5. batch into B rows.

Batches are dicts of int32 numpy arrays [B, T]: `tokens`, `loss_mask`, `positions` (position of
each token inside its own sequence), `segment_ids` (1, 2, ... per packed sequence in a row, 0 on
padding; with padding every real token has segment 1). Padding has tokens = `pad_id`, loss_mask
= 0, positions = 0, segment_ids = 0.

With an `IndexedSource` the batches also say which record each token came from (to look up
per-record data, `opd.training.feature_cache`): padded rows `record_index` int64 [B], packed rows
`record_ids` int32 [B, T] (0 on padding; a row mixes records).

Iterator state: `it = iter(make_dataset(...))`; `it.get_state()` returns a small JSON-able dict and
`it.set_state(state)` on a fresh iterator of the same dataset continues exactly where the saved
one was. Save it with the model (orbax: `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)`, or `state_to_bytes` / `state_from_bytes` below).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import grain
import numpy as np

from opd.data import builders

_FEATURES = ("tokens", "loss_mask")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Shapes and order of a training data pipeline.

    Attributes:
      seq_len: T, tokens per row.
      batch_size: B, rows per batch on this process.
      packing: pack several sequences per row (else one padded sequence per row).
      num_packing_bins: rows the first-fit packer fills at once (default B); more bins waste less
        padding but mix sequences from further apart in the shuffled order.
      seed: shuffling (and bin-shuffling) seed; same seed, same batches.
      shuffle: shuffle records each epoch.
      num_epochs: passes over the records; None repeats forever.
      pad_id: token id written on padding.
      drop_remainder: drop a last partial batch (keeps every batch [B, T]).
    """

    seq_len: int
    batch_size: int
    packing: bool = True
    num_packing_bins: int | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    pad_id: int = 0
    drop_remainder: bool = True

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_packing_bins is not None and self.num_packing_bins < 1:
            raise ValueError(f"num_packing_bins must be >= 1, got {self.num_packing_bins}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")


# ----------------------------------------------------------------------------- tokenizing


def _end_tokens(tokenizer) -> list[str]:
    out = []
    for i in tokenizer.eos_token_ids:
        t = tokenizer.id_to_token(i)
        if t:
            out.append(t)
    return out


def assistant_spans(tokenizer, messages: Sequence[dict], template: str | None = None, **template_kwargs):
    """Renders a conversation and finds the characters each assistant message contributes.

    Returns:
      (text, spans): the rendered conversation and a list of [start, end) character spans, one
      per assistant message: from the end of the generation header to the end of the first
      end-of-turn token (any of the tokenizer's EOS tokens) the template writes after it.

    Raises:
      ValueError: the template rewrites earlier turns (the rendered prefix of a conversation is
        not a prefix of the whole), so assistant spans cannot be located.
    """
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, template=template,
                                                             **template_kwargs)
    text = render(messages, False)
    ends = _end_tokens(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        start = len(prefix)
        if not (text.startswith(upto) and upto.startswith(prefix)):
            raise ValueError(
                f"the chat template rewrites earlier turns (message {i}); cannot locate the assistant tokens"
            )
        tail = upto[start:]
        hits = [tail.find(e) + len(e) for e in ends if tail.find(e) >= 0]
        end = start + (min(hits) if hits else len(tail.rstrip()))
        spans.append((start, end))
    return text, spans


def chat_tokens_and_mask(tokenizer, messages: Sequence[dict], template: str | None = None, **template_kwargs):
    """Tokens of a rendered conversation and a mask that is 1 on assistant tokens only.

    Args:
      tokenizer: an `opd.data.tokenizer.Tokenizer` (its chat template unless `template` is given).
      messages: [{"role", "content"}, ...] with at least one assistant message.
      template, template_kwargs: as `Tokenizer.apply_chat_template`.

    Returns:
      tokens_L, loss_mask_L: int32 arrays. A token is masked in when its first character lies in
      an assistant span (see `assistant_spans`).
    """
    text, spans = assistant_spans(tokenizer, messages, template, **template_kwargs)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    starts = np.asarray([s for s, _ in enc.offsets], dtype=np.int64)
    mask = np.zeros(len(enc.ids), dtype=np.int32)
    for s, e in spans:
        mask[(starts >= s) & (starts < e)] = 1
    return np.asarray(enc.ids, dtype=np.int32), mask


def tokenize_trajectory(example: dict, tokenizer=None, template: str | None = None, **template_kwargs) -> dict:
    """One trajectory -> {"tokens": int32[L], "loss_mask": int32[L]} (see the module docstring)."""
    if "roles" in example:  # a raw tfds example
        example = builders.decode_trajectory(example)
    prompt_ids = np.asarray(example.get("prompt_ids", ()), dtype=np.int32).reshape(-1)
    response_ids = np.asarray(example.get("response_ids", ()), dtype=np.int32).reshape(-1)
    if prompt_ids.size and response_ids.size:
        tokens = np.concatenate([prompt_ids, response_ids])
        mask = np.concatenate([np.zeros_like(prompt_ids), np.ones_like(response_ids)])
        return {"tokens": tokens, "loss_mask": mask}
    messages = example.get("messages") or []
    if not messages:
        raise ValueError(f"trajectory {example.get('id')!r} has neither token ids nor messages")
    if tokenizer is None:
        raise ValueError(f"trajectory {example.get('id')!r} is text only: pass the target's tokenizer")
    tokens, mask = chat_tokens_and_mask(tokenizer, messages, template, **template_kwargs)
    return {"tokens": tokens, "loss_mask": mask}


class TokenizeTrajectory(grain.transforms.Map):
    """grain transform: trajectory -> tokens + loss mask, truncated to `seq_len`.

    An `IndexedSource` record keeps its index: as the scalar `record_index`, or with
    `per_token_records` (for packing, which mixes records in a row) as `record_ids` int32 [L]."""

    def __init__(self, seq_len: int, tokenizer=None, template: str | None = None, *,
                 per_token_records: bool = False, **template_kwargs):
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.template = template
        self.per_token_records = per_token_records
        self.template_kwargs = template_kwargs

    def map(self, element):
        out = tokenize_trajectory(element, self.tokenizer, self.template, **self.template_kwargs)
        out = {k: v[: self.seq_len] for k, v in out.items()}
        if "record_index" in element:
            if self.per_token_records:
                out["record_ids"] = np.full(len(out["tokens"]), element["record_index"], np.int32)
            else:
                out["record_index"] = np.int64(element["record_index"])
        return out


class PadToLength(grain.transforms.Map):
    """grain transform: one sequence -> a padded row with positions and segment ids."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id

    def map(self, element):
        n = len(element["tokens"])
        tokens = np.full((self.seq_len,), self.pad_id, np.int32)
        tokens[:n] = element["tokens"]
        mask = np.zeros((self.seq_len,), np.int32)
        mask[:n] = element["loss_mask"]
        positions = np.zeros((self.seq_len,), np.int32)
        positions[:n] = np.arange(n, dtype=np.int32)
        segment_ids = np.zeros((self.seq_len,), np.int32)
        segment_ids[:n] = 1
        out = {"tokens": tokens, "loss_mask": mask, "positions": positions, "segment_ids": segment_ids}
        if "record_index" in element:
            out["record_index"] = element["record_index"]
        return out


class _PackedToRow(grain.transforms.Map):
    """Renames the packer's outputs and writes `pad_id` on padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def map(self, element):
        seg = np.asarray(element["tokens_segment_ids"], np.int32)
        tokens = np.where(seg > 0, element["tokens"], self.pad_id).astype(np.int32)
        out = {
            "tokens": tokens,
            "loss_mask": np.asarray(element["loss_mask"], np.int32) * (seg > 0),
            "positions": np.asarray(element["tokens_positions"], np.int32),
            "segment_ids": seg,
        }
        if "record_ids" in element:
            out["record_ids"] = np.asarray(element["record_ids"], np.int32) * (seg > 0)
        return out


class IndexedSource:
    """A random-access source whose records carry `record_index` (their index in `source`); it
    reaches the batches as `record_index` [B] or, packed, `record_ids` [B, T] (module docstring)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {**self.source[i], "record_index": i}


# ----------------------------------------------------------------------------- datasets


def shard(ds: grain.MapDataset, shard_options: grain.sharding.ShardOptions | None) -> grain.MapDataset:
    """This host's records: every `shard_count`-th record from `shard_index`."""
    if shard_options is None:
        return ds
    count, index = shard_options.shard_count, shard_options.shard_index  # ShardOptions checks them
    n = len(ds)
    if shard_options.drop_remainder:
        n = n // count * count
    if n < count:
        raise ValueError(f"{len(ds)} records cannot be sharded over {count} processes")
    return ds[index:n:count]


def make_dataset(
    source,
    config: PipelineConfig,
    *,
    tokenizer=None,
    template: str | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
    **template_kwargs: Any,
) -> grain.IterDataset:
    """The training batches of a trajectory source (see the module docstring).

    Args:
      source: a random-access source of trajectories (`builders.load_source("trajectories:...")`,
        or any sequence of `decode_trajectory`-shaped dicts).
      config: shapes, seed, epochs.
      tokenizer: the target's `Tokenizer`; needed only for text trajectories.
      template, template_kwargs: chat template override (default the tokenizer's own).
      shard_options: this host's share, e.g. `grain.sharding.ShardByJaxProcess(drop_remainder=True)`;
        None reads everything.

    Returns:
      A `grain.IterDataset` of dicts of int32 [B, T] arrays; `iter()` it for a checkpointable
      iterator.
    """
    T, B = config.seq_len, config.batch_size
    ds = shard(grain.MapDataset.source(source), shard_options)
    if len(ds) == 0:
        raise ValueError("the trajectory source is empty")
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    ds = ds.map(TokenizeTrajectory(T, tokenizer, template, per_token_records=config.packing, **template_kwargs))
    if config.packing:
        features = _FEATURES + (("record_ids",) if isinstance(source, IndexedSource) else ())
        ds = grain.experimental.FirstFitPackIterDataset(
            ds.to_iter_dataset(),
            length_struct={k: T for k in features},
            num_packing_bins=config.num_packing_bins or B,
            seed=config.seed,
            shuffle_bins=config.shuffle,
        ).map(_PackedToRow(config.pad_id))
    else:
        ds = ds.map(PadToLength(T, config.pad_id)).to_iter_dataset()
    return ds.batch(B, drop_remainder=config.drop_remainder)


def make_iterator(source, config: PipelineConfig, **kwargs) -> grain.DatasetIterator:
    """`iter(make_dataset(source, config, **kwargs))`: a checkpointable batch iterator."""
    return iter(make_dataset(source, config, **kwargs))


def state_to_bytes(iterator: grain.DatasetIterator) -> bytes:
    """The iterator's position as JSON bytes (to store next to a model checkpoint)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode("utf-8")


def state_from_bytes(iterator: grain.DatasetIterator, state: bytes) -> grain.DatasetIterator:
    """Moves a fresh iterator of the same dataset to a saved position; returns it."""
    iterator.set_state(json.loads(state.decode("utf-8")))
    return iterator
