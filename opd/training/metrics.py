"""Training metrics: one JSON line per logged step, and the same scalars as TensorBoard events.

`MetricsWriter(directory)` appends to `directory/metrics.jsonl` and writes TensorBoard event
files under `directory/tb/` (tensorboardX: no TensorFlow needed). Array metrics are split into
one scalar per entry, e.g. a per-offset `accuracy` [S] becomes `accuracy/1 .. accuracy/S`
(offsets are 1-based, like the paper's draft positions).

On resume the JSONL keeps its earlier lines; lines of steps after the restored checkpoint
(written by the interrupted run, then redone) are dropped first by `truncate_after`, so the
file holds each step once; a run that starts anew (killed before its first checkpoint) drops
every line, its step-0 probe included (`truncate_after(-1)`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

from opd.paths import append_jsonl, read_jsonl
from opd.sharding import is_main_process


def flatten(metrics: Mapping) -> dict:
    """{name: float}; arrays become `name/1 .. name/n`; non-finite values become None."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v, dtype=np.float64)
        if a.ndim == 0:
            out[k] = _finite(float(a))
        else:
            for i, x in enumerate(a.reshape(-1), start=1):
                out[f"{k}/{i}"] = _finite(float(x))
    return out


def _finite(x: float):
    return x if math.isfinite(x) else None


class MetricsWriter:
    """Appends `{"step": s, **scalars}` lines to metrics.jsonl and TensorBoard scalars."""

    def __init__(self, directory: str, tensorboard: bool = True):
        self.enabled = is_main_process()  # multi-host: process 0 writes, the others only return rows
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        if tensorboard and self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tb"), flush_secs=30)

    def truncate_after(self, step: int) -> None:
        """Drops lines of steps > `step` (work redone after a resume)."""
        if not self.enabled:
            return
        rows = read_jsonl(self.path)
        keep = [r for r in rows if r.get("step", 0) <= step]
        if len(keep) != len(rows):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping) -> dict:
        row = {"step": int(step), **flatten(metrics)}
        if not self.enabled:
            return row
        append_jsonl(self.path, [row])  # a torn last line (a crash mid-write) is dropped first
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, global_step=int(step))
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
