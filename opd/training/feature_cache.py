"""Target hidden states computed once and kept on disk (`config.sft.target_features = "cache"`).

The SFT step needs, per training row, the target's hidden states at the drafter's layers (and
for EAGLE-3 the target's next-token distribution). "online" recomputes them with a full target
forward in every step; "cache" runs the target once over every record (padded to T) and stores
  aux.npy    [N, T, n, D]  the drafter's target layers (n = len(spec.target_hidden_layers));
  final.npy  [N, T, D]     drafters whose loss reads the target's logits (`needs_final_hidden`,
                           EAGLE-3): the target's last hidden state; the step turns it into
                           logits with the frozen LM head (2·D·V FLOPs per token instead of a
                           whole target forward);
  meta.json  what they were computed from (a different target, layer set, T or data is refused).
Costs: disk N·T·(n + 1)·D·bytes (float16: 2 bytes; values beyond float16's range are an
error, use float32), one target forward per record up front; the step then skips the target
forward (about 2·N_target FLOPs per token). Worth it when training for more than one epoch.

Batches get the features through `AttachFeatures`, a grain map after batching that looks them
up by the `record_index` that `opd.data.pipeline.IndexedSource` puts in every row.
"""

from __future__ import annotations

import functools
import json
import os

import grain
import jax
import numpy as np
from tqdm import tqdm

from opd.data.pipeline import PadToLength, TokenizeTrajectory
from opd.models import transformer as tfm
from opd.training.flops import target_forward_flops

DTYPES = ("float16", "float32")


def _meta(target, spec, folders, seq_len: int, dtype: str, n_records: int) -> dict:
    c = target.config
    return {"target": {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
                       "source": str(getattr(target, "source", ""))},
            "layers": [int(i) for i in spec.target_hidden_layers], "final": bool(spec.needs_final_hidden),
            "data": [os.path.abspath(f) for f in folders], "records": int(n_records), "seq_len": int(seq_len),
            "dtype": dtype}


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _features(params, tokens_BT, *, config, layers):
    out = tfm.forward(params, config, tokens_BT, hidden_layers=layers)
    return jax.numpy.stack(out.aux_hidden, axis=2), out.hidden_BTD


def build(target, spec, source, folders, seq_len: int, directory: str, dtype: str = "float16",
          batch_size: int = 8) -> dict:
    """Writes the cache for every record of `source` (skipped when a matching one exists);
    returns its meta plus the target-forward FLOPs spent (0 when it already existed)."""
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {DTYPES}, got {dtype!r}")
    meta = _meta(target, spec, folders, seq_len, dtype, len(source))
    meta_path = os.path.join(directory, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old == meta:
            return {**meta, "flops": 0}
        raise ValueError(f"the feature cache in {directory} was built from {old}, not {meta}; delete it to rebuild")
    os.makedirs(directory, exist_ok=True)
    N, T, D = len(source), int(seq_len), target.config.hidden_size
    layers = tuple(int(i) for i in spec.target_hidden_layers)
    tok, pad = TokenizeTrajectory(T), PadToLength(T, 0)
    aux = np.lib.format.open_memmap(os.path.join(directory, "aux.npy.tmp"), mode="w+", dtype=dtype,
                                    shape=(N, T, len(layers), D))
    final = np.lib.format.open_memmap(os.path.join(directory, "final.npy.tmp"), mode="w+", dtype=dtype,
                                      shape=(N, T, D)) if meta["final"] else None
    limit = np.finfo(dtype).max
    for start in tqdm(range(0, N, batch_size), desc="target feature cache", unit="batch"):
        idx = list(range(start, min(N, start + batch_size)))
        tokens = np.zeros((batch_size, T), np.int32)  # fixed shape: one compile
        for j, i in enumerate(idx):
            tokens[j] = pad.map(tok.map(source[i]))["tokens"]
        a, h = jax.device_get(_features(target.params, tokens, config=target.config, layers=layers))
        for arr, dst in ((a, aux), (h, final)):
            if dst is None:
                continue
            if np.abs(arr).max() > limit:
                raise ValueError(f"target hidden states reach {np.abs(arr).max():.3g}, beyond {dtype}; "
                                 "set config.sft.feature_cache_dtype = 'float32'")
            dst[start : start + len(idx)] = arr[: len(idx)].astype(dtype)
    for name, arr in (("aux", aux), ("final", final)):
        if arr is not None:
            arr.flush()
            os.replace(os.path.join(directory, f"{name}.npy.tmp"), os.path.join(directory, f"{name}.npy"))
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return {**meta, "flops": target_forward_flops(target.config, N, T)}


class AttachFeatures(grain.transforms.Map):
    """grain map over batches: adds "aux" [B, T, n, D] (and "final" [B, T, D]) as float32."""

    def __init__(self, directory: str):
        self.directory = directory
        self._arrays = None

    def _open(self):
        if self._arrays is None:
            self._arrays = {name: np.load(os.path.join(self.directory, f"{name}.npy"), mmap_mode="r")
                            for name in ("aux", "final") if os.path.exists(os.path.join(self.directory, f"{name}.npy"))}
        return self._arrays

    def map(self, batch):
        idx = np.asarray(batch["record_index"])
        return {**batch, **{k: np.asarray(v[idx], np.float32) for k, v in self._open().items()}}
