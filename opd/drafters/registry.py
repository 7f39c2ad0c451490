"""The drafter-kind registry: one `DrafterKind` plug-in per kind, looked up by name.

A kind bundles what is known before a drafter exists: how to build one for a target, its
HF-layout checkpoints, its SFT loss options and the launch-time checks. Everything that
needs a drafter's hyper-parameters lives on its `DrafterSpec` (`opd.drafters.base`):
inference (prefill / propose / commit) and the training hooks. Training, the launcher and
eval look kinds up here and never branch on a kind's name.

Built-in kinds (registered by `opd.drafters`): ngram, lm, eagle3, dflash. A new kind is a
`DrafterKind` subclass plus its spec, registered with `register(MyKind())` - from anywhere,
e.g. a test file (tests/drafters/test_plugin.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from safetensors import safe_open

from opd.checkpoints.errors import CheckpointError
from opd.drafters.base import Drafter


class DrafterKind:
    """A drafter plug-in (defaults: an inference-only kind without a checkpoint layout)."""

    name: str = ""
    trainable: bool = False  # SFT / Draft-OPD can train it (its spec implements the training hooks)
    architectures: tuple = ()  # `config.json` architectures of its HF-layout checkpoints
    uses_token_counts: bool = False  # `init` takes `token_counts` of the training data (e.g. a draft vocabulary)
    sft_loss_config: Optional[type] = None  # frozen dataclass of its SFT loss options (`config.sft.loss`)

    def init(self, target, seed: int = 0, **overrides) -> Drafter:
        """A fresh drafter for `target` (`overrides`: the kind's hyper-parameters)."""
        raise TypeError(f"drafter kind {self.name!r} does not implement init")

    def recognizes(self, hf_config: dict) -> bool:
        """Whether a parsed config.json is one of this kind's HF-layout checkpoints (default: its
        `architectures` names one of `self.architectures`)."""
        return any(a in self.architectures for a in hf_config.get("architectures") or [])

    def load(self, path: str, target) -> Drafter:
        raise CheckpointError(f"drafter kind {self.name!r} has no checkpoint layout to load from {path}")

    def export(self, drafter: Drafter, path: str) -> None:
        raise ValueError(f"no HF layout for a {self.name!r} drafter; exportable kinds: "
                         f"{[k for k in names() if get_kind(k).architectures]}")

    def loss_config(self, options=None):
        """The kind's SFT loss options from a mapping (unknown keys are an error)."""
        if self.sft_loss_config is None:
            raise ValueError(f"{self.name} drafters are not trainable: no SFT loss")
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(self.sft_loss_config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown {self.name} SFT loss option(s) {unknown}; known: {sorted(known)}")
        return self.sft_loss_config(**options)

    def draft_limit(self, overrides: dict, path: str = "") -> tuple:
        """(the most tokens a round may draft, what sets it), as far as it is known before
        loading: from the checkpoint directory `path` (its config.json only) or a fresh
        drafter's `overrides`; (None, "") when there is no limit."""
        return None, ""

    def scaled_overrides(self, overrides: dict, full_target_config, target_config) -> dict:
        """`overrides` for a reduced copy of the target (fewer layers, e.g. the AOT check) that
        keep the drafter's shapes (e.g. its tapped target layers mapped into the shorter stack)."""
        return dict(overrides)


_KINDS: dict[str, DrafterKind] = {}


def register(kind: DrafterKind) -> DrafterKind:
    """Adds (or replaces) a kind under `kind.name`; returns it."""
    if not kind.name or not isinstance(kind.name, str):
        raise ValueError(f"a drafter kind needs a name, got {kind.name!r}")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def get_kind(name: str) -> DrafterKind:
    if name not in _KINDS:
        raise ValueError(f"unknown drafter kind {name!r}; available: {names()}")
    return _KINDS[name]


def names(trainable: Optional[bool] = None) -> tuple:
    """Registered kind names (only the trainable / inference-only ones when asked)."""
    return tuple(n for n, k in _KINDS.items() if trainable is None or k.trainable == trainable)


def init_drafter(kind: str, target, seed: int = 0, **overrides) -> Drafter:
    """A fresh drafter of a registered kind for `target` (see each kind's `init`)."""
    return get_kind(kind).init(target, seed=seed, **overrides)


def load_drafter(path: str, target) -> Drafter:
    """A drafter from an HF-layout directory, of the kind that recognizes its config.json
    (`DrafterKind.recognizes`: by `architectures`, or a kind's own rule), checked against `target`."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"drafter checkpoint directory does not exist: {path}")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} has no config.json (expected an HF-layout drafter)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
        archs = hf.get("architectures") or []
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path} is not a valid JSON object: {e}") from e
    for kind in _KINDS.values():
        if kind.recognizes(hf):
            return kind.load(path, target)
    supported = sorted(a for k in _KINDS.values() for a in k.architectures)
    raise CheckpointError(f"{cfg_path}: architectures {archs} is not a supported drafter; supported: {supported}")


EXPORT_DTYPES = ("float32", "float16", "bfloat16")


def export_drafter(drafter: Drafter, path: str, dtype: str = "float32") -> None:
    """Writes a drafter in its kind's HF layout (config.json + model.safetensors), its floating
    tensors stored in `dtype` (e.g. float16 to ship it: half the bytes; loaders cast back)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    path = os.fspath(path)
    get_kind(drafter.kind).export(drafter, path)
    if dtype != "float32":
        _cast_export(path, dtype)


def _cast_export(path: str, dtype: str) -> None:
    """Rewrites an exported directory's float32 tensors in `dtype` and records it in config.json."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for name in files:
        fpath = os.path.join(path, name)
        with safe_open(fpath, framework="numpy") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        cast = {k: (v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype) if v.dtype == np.float32 else v)
                for k, v in tensors.items()}
        save_file(cast, fpath + ".tmp", metadata=meta)
        os.replace(fpath + ".tmp", fpath)
    cfg = os.path.join(path, "config.json")
    with open(cfg, encoding="utf-8") as f:
        hf = json.load(f)
    hf["torch_dtype"] = dtype
    with open(cfg + ".tmp", "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    os.replace(cfg + ".tmp", cfg)
