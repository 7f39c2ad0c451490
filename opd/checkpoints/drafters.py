"""Drafter checkpoints in the public HF layouts that SGLang / vLLM load, behind one entry point.

`load_drafter(path, target)` reads `config.json`'s `architectures` and dispatches to the
EAGLE-3 or DFlash reader; both share the target's embedding (and LM head), so the target is
needed to load them. `export_drafter(drafter, path)` writes the matching layout.
"""

from __future__ import annotations

import json
import os

from opd.checkpoints.errors import CheckpointError


def _readers():
    from opd.checkpoints import dflash_hf, eagle3_hf

    return {
        eagle3_hf.ARCHITECTURE: eagle3_hf.load_eagle3_hf,
        dflash_hf.ARCHITECTURE: dflash_hf.load_dflash_hf,
    }


def load_drafter(path: str, target):
    """A drafter from an HF-layout directory (EAGLE-3 or DFlash), checked against `target`."""
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"drafter checkpoint directory does not exist: {path}")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} has no config.json (expected an EAGLE-3 or DFlash HF-layout drafter)")
    try:
        with open(cfg_path) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    readers = _readers()
    for arch in archs:
        if arch in readers:
            return readers[arch](path, target)
    raise CheckpointError(f"{cfg_path}: architectures {archs} is not a supported drafter; supported: {sorted(readers)}")


def export_drafter(drafter, path: str) -> None:
    """Writes an EAGLE-3 or DFlash drafter in its public HF layout (config.json + model.safetensors)."""
    from opd.checkpoints import dflash_hf, eagle3_hf

    writers = {"eagle3": eagle3_hf.export_eagle3_hf, "dflash": dflash_hf.export_dflash_hf}
    if drafter.kind not in writers:
        raise ValueError(f"no HF layout for a {drafter.kind!r} drafter; exportable kinds: {sorted(writers)}")
    writers[drafter.kind](drafter, path)
