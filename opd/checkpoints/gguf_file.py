"""GGUF files: metadata and dequantised tensors, read with the `gguf` package.

Only data is read (no code is ever executed from a checkpoint). Every failure to parse
becomes a `CheckpointError` naming the file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from opd.checkpoints.errors import CheckpointError


def open_gguf(path: str):
    """Opens a GGUF file with `gguf.GGUFReader`, turning parse failures into CheckpointError."""
    import gguf  # imported lazily: optional for users of HF checkpoints only

    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct.error on bad files
        raise CheckpointError(f"malformed or truncated GGUF file {path}: {type(e).__name__}: {e}") from e


def read_gguf_metadata(path_or_reader) -> dict[str, Any]:
    """Returns all key/value metadata of a GGUF file as plain Python values."""
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) else path_or_reader
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise CheckpointError(f"GGUF metadata field {key!r} cannot be decoded: {e}") from e
    return meta
