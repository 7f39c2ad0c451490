"""Target hidden states computed once and kept on disk (`config.sft.target_features = "cache"`).

The SFT step needs, per training row, the target's hidden states at the drafter's layers (and
for EAGLE-3 the target's next-token distribution). "online" recomputes them with a full target
forward in every step; "cache" runs the target once over every record and stores only the
records' real tokens (each truncated to T), back to back (L = sum of min(len(record), T)):
  offsets.npy [N + 1] int64  record i's tokens are rows offsets[i] .. offsets[i + 1];
  aux.npy     [L, n, D]      the drafter's target layers (n = len(spec.target_hidden_layers));
  final.npy   [L, D]         drafters whose loss reads the target's logits (`needs_final_hidden`,
                             EAGLE-3): the target's last hidden state; the step turns it into
                             logits with the frozen LM head (2·D·V FLOPs per token instead of a
                             whole target forward);
  top.npy     [L] int32      with final.npy: the target's greedy token (argmax over the full
                             vocabulary, from the unrounded hidden state) at each position;
  meta.json   what they were computed from (a different target, layer set, T or data, or a cache
              of an older layout, e.g. the one padded to [N, T, ...], is refused), plus the
              token count and the FLOPs the build spent.
The build tokenizes every record, sorts them longest first and runs the target over batches of
one token budget (batch_size · T): [batch_size · T // S, S], S = the batch's longest record
rounded up to a multiple of `BUCKET` (at most T), so at most ceil(T / BUCKET) shapes compile and
a batch pads records of about the same length. Causal attention keeps a record's features free
of the padding after it: they equal a forward over the record alone.
Costs: disk L·((n + 1)·D·bytes + 4) (float16: 2 bytes; values beyond float16's range are an
error, use float32); one target forward up front over the bucketed records (stdlib_code text
records, T = 640: 1.2·L tokens, where a padded [N, T] layout ran and stored 4·L); the step then
skips the target forward (about 2·N_target FLOPs per token). Worth it when training for more
than one epoch.

Batches get the features through `AttachFeatures`, a grain map after batching that looks them
up by the record indices `opd.data.pipeline.IndexedSource` puts in the batches: per row
(`record_index`, padded rows) or per token (`record_ids` with `positions`, packed rows).
"""

from __future__ import annotations

import functools
import json
import os

import grain
import jax
import numpy as np
from tqdm import tqdm

from opd.data.pipeline import TokenizeTrajectory
from opd.models import transformer as tfm
from opd.training.flops import target_forward_flops

DTYPES = ("float16", "float32")
BUCKET = 64  # build batches' lengths are multiples of this (or T)
_BUILT = ("tokens", "build_flops")  # meta.json entries the build adds (not compared on reuse)


def _path(directory: str, name: str, suffix: str = "") -> str:
    return os.path.join(directory, f"{name}.npy{suffix}")


def _meta(target, spec, folders, seq_len: int, dtype: str, n_records: int) -> dict:
    c = target.config
    return {"layout": "ragged",
            "target": {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
                       "source": str(getattr(target, "source", ""))},
            "layers": [int(i) for i in spec.target_hidden_layers], "final": bool(spec.needs_final_hidden),
            "top": bool(spec.needs_final_hidden),
            "data": [os.path.abspath(f) for f in folders], "records": int(n_records), "seq_len": int(seq_len),
            "dtype": dtype}


@functools.partial(jax.jit, static_argnames=("config", "layers", "top"))
def _features(params, tokens_BT, *, config, layers, top):
    """aux [B, T, n, D], final hidden [B, T, D] and (with `top`) the greedy tokens [B, T]."""
    out = tfm.forward(params, config, tokens_BT, hidden_layers=layers)
    greedy = tfm.lm_head(params, config, out.hidden_BTD).argmax(-1).astype(jax.numpy.int32) if top else None
    return jax.numpy.stack(out.aux_hidden, axis=2), out.hidden_BTD, greedy


def _batches(lengths: np.ndarray, seq_len: int, budget: int) -> list[tuple[int, int, np.ndarray]]:
    """(S, rows, record indices) per build batch (module docstring): longest records first, each
    batch [rows = budget // S, S] with S its first record's length rounded up to BUCKET, at most T."""
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]  # an empty record has no rows to compute
    out, k = [], 0
    while k < len(order):
        S = min(seq_len, -(-int(lengths[order[k]]) // BUCKET) * BUCKET)
        rows = max(1, budget // S)
        out.append((S, rows, order[k : k + rows]))
        k += rows
    return out


def build(target, spec, source, folders, seq_len: int, directory: str, dtype: str = "float16",
          batch_size: int = 8) -> dict:
    """Writes the cache for every record of `source` (skipped when a matching one exists); returns
    its meta, with "build_flops", the target-forward FLOPs its build spent (a record: SFT steps on
    the cache are charged their target forward, `opd.training.flops`)."""
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {DTYPES}, got {dtype!r}")
    meta = _meta(target, spec, folders, seq_len, dtype, len(source))
    meta_path = os.path.join(directory, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if {k: v for k, v in old.items() if k not in _BUILT} == meta:
            return old
        raise ValueError(f"the feature cache in {directory} was built from {old}, not {meta}; delete it to rebuild")
    os.makedirs(directory, exist_ok=True)
    N, T, D = len(source), int(seq_len), target.config.hidden_size
    layers = tuple(int(i) for i in spec.target_hidden_layers)
    tok = TokenizeTrajectory(T)
    tokens = [tok.map(source[i])["tokens"] for i in range(N)]  # truncated to T
    lengths = np.array([len(t) for t in tokens], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    L = int(offsets[-1])
    tmp = functools.partial(_path, directory, suffix=".tmp")
    with open(tmp("offsets"), "wb") as f:
        np.save(f, offsets)
    arrays = {"aux": np.lib.format.open_memmap(tmp("aux"), mode="w+", dtype=dtype, shape=(L, len(layers), D))}
    if meta["final"]:
        arrays["final"] = np.lib.format.open_memmap(tmp("final"), mode="w+", dtype=dtype, shape=(L, D))
    if meta["top"]:
        arrays["top"] = np.lib.format.open_memmap(tmp("top"), mode="w+", dtype=np.int32, shape=(L,))
    limit = np.finfo(dtype).max
    build_flops = 0
    with tqdm(total=L, desc="target feature cache", unit="tok", unit_scale=True) as bar:
        for S, rows, idx in _batches(lengths, T, batch_size * T):
            batch = np.zeros((rows, S), np.int32)  # one shape per S: few compiles; pad id 0
            for j, i in enumerate(idx):
                batch[j, : lengths[i]] = tokens[i]
            a, h, g = jax.device_get(_features(target.params, batch, config=target.config, layers=layers,
                                               top="top" in arrays))
            build_flops += target_forward_flops(target.config, rows, S)
            real = np.arange(S) < lengths[idx][:, None]  # [len(idx), S]: rows that are written
            for x in (a, h) if "final" in arrays else (a,):
                peak = np.abs(x[: len(idx)][real]).max()
                if peak > limit:
                    raise ValueError(f"target hidden states reach {peak:.3g}, beyond {dtype}; "
                                     "set config.sft.feature_cache_dtype = 'float32'")
            out = {"aux": a, "final": h, "top": g}
            for j, i in enumerate(idx):
                start, stop = offsets[i], offsets[i + 1]
                for name, dst in arrays.items():
                    dst[start:stop] = out[name][j, : stop - start]
            bar.update(int(lengths[idx].sum()))
    for arr in arrays.values():
        arr.flush()
    for name in ("offsets", *arrays):  # meta.json last: only a complete cache has one
        os.replace(tmp(name), _path(directory, name))
    meta = {**meta, "tokens": L, "build_flops": build_flops}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta


_ATTACHED = {"aux": np.float32, "final": np.float32, "top": np.int32}  # cache file -> batch dtype


class AttachFeatures(grain.transforms.Map):
    """grain map over batches: adds the cached "aux" [B, T, n, D] (and "final" [B, T, D] as
    float32, "top" [B, T] as int32) of each row's record, or in packed batches of each token's
    record at its position (zeros on padding)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._arrays = None

    def _open(self):
        if self._arrays is None:
            self._offsets = np.load(_path(self.directory, "offsets"))
            self._arrays = {name: np.load(_path(self.directory, name), mmap_mode="r") for name in _ATTACHED
                            if os.path.exists(_path(self.directory, name))}
        return self._arrays

    def map(self, batch):
        arrays = self._open()
        if "record_ids" in batch:  # packed: token (b, t) is record_ids[b, t]'s token positions[b, t]
            rec, pos = np.asarray(batch["record_ids"]), np.asarray(batch["positions"])
            real = np.asarray(batch["segment_ids"]) > 0
            rows = self._offsets[rec] + pos
        else:  # padded: row b holds record_index[b]'s tokens 0 .. its length
            rec = np.asarray(batch["record_index"])
            T = batch["tokens"].shape[1]
            pos = np.arange(T)
            real = pos < (self._offsets[rec + 1] - self._offsets[rec])[:, None]
            rows = self._offsets[rec][:, None] + pos
        rows = np.where(real, rows, 0).ravel()  # padding reads row 0, then zeroed
        out = {}
        for k, v in arrays.items():  # one gather of B·T rows per file
            x = np.asarray(v[rows], _ATTACHED[k]).reshape(real.shape + v.shape[1:])
            x[~real] = 0
            out[k] = x
        return {**batch, **out}
