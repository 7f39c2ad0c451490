"""HF transformers checkpoints (safetensors only) -> (TransformerConfig, state_dict).

The state dict keeps transformers' parameter names and layouts (Linear weights are
[out_features, in_features]) and holds numpy arrays in the requested dtype (float32 by
default). Only safetensors files are read: pickled `*.bin` / `*.pt` checkpoints are
refused, never unpickled. Every problem (missing files, a truncated or corrupt file, a
tensor that is missing, unexpected or of the wrong shape) is a `CheckpointError`.

`expected_tensor_shapes` and `validate_state_dict` are shared with the GGUF reader.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

from opd.checkpoints.errors import CheckpointError
from opd.models.config import ConfigError, TransformerConfig

__all__ = ["read_hf_checkpoint", "expected_tensor_shapes", "validate_state_dict"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors dtype -> (numpy dtype of the stored bytes, itemsize). BF16 is read as raw uint16.
_ST_DTYPES = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
_MAP_DTYPES = {"I64": 8, "I32": 4, "BOOL": 1}  # integer / bool maps (e.g. a draft vocabulary's d2t / t2d)
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def expected_tensor_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a checkpoint for `cfg` must hold (HF names/layouts)."""
    d, hd, i_sz = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for li in range(cfg.num_layers):
        p = f"model.layers.{li}."
        shapes[p + "self_attn.q_proj.weight"] = (q_out, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q_out)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "mlp.gate_proj.weight"] = (i_sz, d)
        shapes[p + "mlp.up_proj.weight"] = (i_sz, d)
        shapes[p + "mlp.down_proj.weight"] = (d, i_sz)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def validate_state_dict(cfg: TransformerConfig, sd: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Checks names, shapes and finiteness against `cfg`; drops a redundant tied `lm_head`.

    Returns the (possibly reduced) dict; raises CheckpointError naming the first problem.
    """
    sd = dict(sd)
    if cfg.tie_word_embeddings:
        # Tied: the output projection is the embedding; a stored lm_head (some exporters
        # write one, sometimes stale) is ignored.
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" not in sd:
        raise CheckpointError(
            f"{source}: tie_word_embeddings is false but the checkpoint has no 'lm_head.weight'"
        )
    emb = sd.get("model.embed_tokens.weight")
    if emb is not None and emb.ndim == 2 and emb.shape[0] != cfg.vocab_size:
        raise CheckpointError(
            f"{source}: vocab_size in the config is {cfg.vocab_size} but 'model.embed_tokens.weight' "
            f"has {emb.shape[0]} rows (shape {tuple(emb.shape)})"
        )
    expected = expected_tensor_shapes(cfg)
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source}: missing tensor {missing[0]!r} (expected shape {expected[missing[0]]}){more}"
        )
    unexpected = sorted(k for k in sd if k not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]!r} with shape {tuple(sd[unexpected[0]].shape)}"
            f" for a {cfg.family} model with this config{more}"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {shape} from the config"
            )
    for k, v in sd.items():
        if not np.isfinite(v).all():
            raise CheckpointError(f"{source}: tensor {k!r} contains NaN or infinite values")
    return sd


def read_config_json(path: str, what: str = "checkpoint") -> tuple[str, dict[str, Any]]:
    """(path of, parsed) `config.json` of a checkpoint directory; CheckpointError if absent or bad."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"no config.json in {what} directory {path}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {cfg_path}: {e}") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path} does not hold a JSON object")
    return cfg_path, hf


def _config_from_json(path: str) -> tuple[TransformerConfig, dict[str, Any]]:
    cfg_path, hf = read_config_json(path)
    try:
        cfg = TransformerConfig.from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    except (TypeError, ValueError) as e:  # e.g. a null or non-numeric size
        raise CheckpointError(f"{cfg_path}: invalid value: {e}") from e
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{cfg_path}: unsupported hidden_act {act!r} (only silu / SwiGLU)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{cfg_path}: mlp_bias=true is not supported")
    if cfg.family != "qwen2" and cfg.attention_bias:
        raise CheckpointError(
            f"{cfg_path}: attention_bias=true for {cfg.family} (with an o_proj bias) is not supported"
        )
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
        raise CheckpointError(f"{cfg_path}: sliding-window attention layers are not supported")
    return cfg, hf


def _shard_files(path: str) -> dict[str, list[str] | None]:
    """Maps each safetensors file to read -> the tensor names wanted from it (None = all)."""
    index_path = os.path.join(path, _INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot parse {index_path}: {type(e).__name__}: {e}") from e
        files: dict[str, list[str] | None] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or os.path.basename(fname) != fname:
                raise CheckpointError(f"{index_path}: bad shard file name {fname!r} for tensor {name!r}")
            files.setdefault(fname, []).append(name)
        for fname in files:
            if not os.path.isfile(os.path.join(path, fname)):
                raise CheckpointError(f"shard {fname} listed in {index_path} is missing")
        return files
    if os.path.isfile(os.path.join(path, _SINGLE)):
        return {_SINGLE: None}
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if others:
        return {f: None for f in others}
    pickles = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickled checkpoint files ({', '.join(pickles)}); only safetensors "
            "checkpoints are loaded (pickle files are never unpickled). Convert to safetensors first."
        )
    raise CheckpointError(f"no safetensors files (model.safetensors or {_INDEX}) in {path}")


def _read_header(fpath: str, maps=()) -> tuple[dict[str, Any], int]:
    """Parses and checks a safetensors header; returns (tensor entries, data start offset).
    Tensors are floating point, except those named in `maps` (integer or bool)."""
    size = os.path.getsize(fpath)
    with open(fpath, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"safetensors file {fpath} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(
                f"safetensors file {fpath} is corrupt or truncated (header length {n}, file size {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"safetensors file {fpath} has a corrupt header: {e}") from e
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"safetensors file {fpath}: corrupt header entry for {name!r}") from err
        itemsize = _MAP_DTYPES.get(dtype) if name in maps else _ST_DTYPES.get(dtype, (None, None))[1]
        if itemsize is None:
            raise CheckpointError(
                f"safetensors file {fpath}: tensor {name!r} has dtype {dtype}; only floating-point "
                f"weights ({', '.join(_ST_DTYPES)}) are supported"
            )
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        if not (0 <= b <= e) or e - b != nbytes or any(s < 0 for s in shape):
            raise CheckpointError(
                f"safetensors file {fpath}: tensor {name!r} has inconsistent offsets {b}..{e} for shape {shape}"
            )
        if start + e > size:
            raise CheckpointError(
                f"safetensors file {fpath} is truncated: tensor {name!r} ends at byte {start + e} "
                f"but the file has {size} bytes"
            )
    return header, start


def _read_file(fpath: str, names: list[str] | None, dtype, maps=()) -> dict[str, np.ndarray]:
    """`names` (None = all) of one safetensors file as `dtype`; those in `maps` as stored."""
    from safetensors import safe_open

    header, start = _read_header(fpath, maps)
    wanted = list(header) if names is None else names
    for name in wanted:
        if name not in header:
            raise CheckpointError(f"tensor {name!r} is listed in the index but absent from {fpath}")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(fpath, framework="numpy") as f:
            for name in wanted:
                info = header[name]
                if info["dtype"] == "BF16":
                    # numpy has no bfloat16: read the raw 16 bits and widen them to float32
                    # (bf16 is the top half of an IEEE float32).
                    b, e = info["data_offsets"]
                    bits = np.fromfile(fpath, dtype="<u2", count=(e - b) // 2, offset=start + b)
                    arr = (bits.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
                else:
                    arr = f.get_tensor(name)
                out[name] = arr if name in maps else arr.astype(dtype, copy=False)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises SafetensorError/OSError on corrupt files
        raise CheckpointError(f"cannot read safetensors file {fpath}: {type(e).__name__}: {e}") from e
    return out


def read_hf_checkpoint(path: str, dtype=np.float32) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """Reads an HF transformers checkpoint directory (config.json + safetensors).

    Returns `(config, state_dict)`: state_dict maps HF parameter names to numpy arrays of
    `dtype` in HF layouts. Raises CheckpointError on anything missing, malformed or
    unsupported.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        if os.path.isfile(path) and path.endswith(_PICKLE_SUFFIXES):
            raise CheckpointError(
                f"{path} is a pickled checkpoint; only safetensors checkpoints are loaded (never unpickled)"
            )
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg, _ = _config_from_json(path)
    sd: dict[str, np.ndarray] = {}
    for fname, names in _shard_files(path).items():
        for name, arr in _read_file(os.path.join(path, fname), names, dtype).items():
            if name in sd:
                raise CheckpointError(f"tensor {name!r} appears in more than one safetensors file ({fname})")
            sd[name] = arr
    return cfg, validate_state_dict(cfg, sd, path)
