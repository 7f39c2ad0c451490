"""GGUF files: metadata and dequantised tensors, read with the `gguf` package.

Only data is read (no code is ever executed from a checkpoint). Every failure to parse
becomes a `CheckpointError` naming the file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from opd.checkpoints.errors import CheckpointError
from opd.checkpoints.hf import validate_state_dict
from opd.models.config import GGUF_ARCHITECTURES, ConfigError, RopeScaling, TransformerConfig


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


# --------------------------------------------------------------------------------------
# GGUF -> (TransformerConfig, HF-named float32 state dict)
# --------------------------------------------------------------------------------------

# Tensor storage types we dequantise (through `gguf.quants.dequantize`).
SUPPORTED_GGUF_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# GGUF per-layer tensor stems -> HF names (the suffix .weight/.bias is kept).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency llama-3 rope factors


def gguf_to_hf_name(name: str) -> str | None:
    """Maps a llama.cpp tensor name to its HF transformers name (None if unknown)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias"):
        stem = _LAYER_NAMES.get(parts[2])
        if stem is not None:
            return f"model.layers.{int(parts[1])}.{stem}.{parts[3]}"
    return None


def unpermute_llama_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's rotary row permutation of a llama Q or K weight (or bias).

    llama.cpp's converter stores `w.reshape(n_head, 2, r // n_head // 2, *rest).swapaxes(1, 2)`
    (interleaved rotary pairs); this returns the HF (half-split) row order.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot un-permute a Q/K tensor with {rows} rows over {n_head} heads")
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(scaling, rope_theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency factors llama.cpp stores as `rope_freqs.weight` for llama-3 rope."""
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / freqs
    orig = scaling.original_max_position_embeddings
    low_wl, high_wl = orig / scaling.low_freq_factor, orig / scaling.high_freq_factor
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, scaling.factor, mid))


def _snap(x: float, tol: float = 1e-4) -> float:
    """Rounds x to a 'nice' value (integer or 3 decimals) when it is within tol of one."""
    for nd in (0, 1, 2, 3):
        r = round(x, nd)
        if abs(r - x) <= tol * max(1.0, abs(x)):
            return float(r)
    return float(x)


def rope_scaling_from_factors(factors: np.ndarray, rope_theta: float, head_dim: int, source: str = "GGUF"):
    """Recovers Llama-3 RopeScaling parameters from llama.cpp's `rope_freqs.weight` factors.

    The factors are 1 for short wavelengths, `factor` for long ones and a smooth blend in
    between whose inverse is linear in 1/wavelength; the blend pins down the two wavelength
    bounds (orig/high_freq_factor, orig/low_freq_factor), which is all the rope depends on.
    Returns None when every factor is 1. Raises CheckpointError when the factors do not
    have the llama-3 form (result is checked by recomputing the factors).
    """
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if f.shape[0] != head_dim // 2:
        raise CheckpointError(
            f"{source}: {_ROPE_FREQS} has {f.shape[0]} entries, expected head_dim/2 = {head_dim // 2}"
        )
    if not np.isfinite(f).all() or (f <= 0).any():
        raise CheckpointError(f"{source}: {_ROPE_FREQS} holds non-positive or non-finite values")
    factor = float(f.max())
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    x = freqs / (2 * np.pi)  # 1 / wavelength
    tol = 1e-5 * factor
    mid = (f > 1 + tol) & (f < factor - tol)
    if mid.sum() < 2:
        raise CheckpointError(
            f"{source}: cannot recover llama-3 rope scaling from {_ROPE_FREQS} "
            f"(only {int(mid.sum())} frequencies in the smoothing band); unsupported rope layout"
        )
    smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(x[mid], smooth, 1)  # smooth = orig/(hi-lo) * x - lo/(hi-lo)
    if a <= 0 or b >= 0:
        raise CheckpointError(f"{source}: {_ROPE_FREQS} does not have the llama-3 rope-scaling form")
    low_wl, high_wl = -a / b, a / (1 - b)
    orig = int(round(low_wl))  # choose low_freq_factor ~ 1; only the two wavelengths matter
    scaling = RopeScaling(
        factor=_snap(factor),
        low_freq_factor=_snap(orig / low_wl),
        high_freq_factor=_snap(orig / high_wl),
        original_max_position_embeddings=orig,
    )
    if not np.allclose(llama3_rope_factors(scaling, rope_theta, head_dim), f, rtol=1e-3, atol=0):
        raise CheckpointError(f"{source}: {_ROPE_FREQS} does not match any llama-3 rope scaling")
    return scaling


def _meta(reader, key: str, default: Any = KeyError, source: str = "GGUF"):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise CheckpointError(f"{source}: required GGUF metadata key {key!r} is missing")
        return default
    try:
        return field.contents()
    except Exception as e:
        raise CheckpointError(f"{source}: GGUF metadata field {key!r} cannot be decoded: {e}") from e


def _config_from_gguf(reader, tensor_names: set[str], source: str):
    arch = _meta(reader, "general.architecture", source=source)
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def m(key, default=KeyError):
        return _meta(reader, f"{arch}.{key}", default, source)

    try:
        hidden = int(m("embedding_length"))
        heads = int(m("attention.head_count"))
        kv_heads = int(m("attention.head_count_kv", heads))
        head_dim = int(m("attention.key_length", 0) or (hidden // heads if heads else 0))
        value_dim = int(m("attention.value_length", head_dim))
        rope_dims = int(m("rope.dimension_count", head_dim))
        theta = float(m("rope.freq_base", 10000.0))
        vocab = m("vocab_size", None)
        if vocab is None:
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else None
        if vocab is None:
            raise CheckpointError(f"{source}: no {arch}.vocab_size and no tokenizer.ggml.tokens in metadata")
        if value_dim != head_dim:
            raise CheckpointError(f"{source}: key_length {head_dim} != value_length {value_dim} is not supported")
        if rope_dims != head_dim:
            raise CheckpointError(
                f"{source}: partial rotary embeddings (rope.dimension_count {rope_dims} != head_dim {head_dim}) "
                "are not supported"
            )
        scaling = None
        stype = m("rope.scaling.type", "none")
        if stype == "llama3":  # not written by llama.cpp today, accepted if present
            scaling = RopeScaling(
                factor=float(m("rope.scaling.factor")),
                low_freq_factor=float(m("rope.scaling.low_freq_factor")),
                high_freq_factor=float(m("rope.scaling.high_freq_factor")),
                original_max_position_embeddings=int(m("rope.scaling.original_context_length")),
            )
        elif stype not in ("none", None, ""):
            raise CheckpointError(f"{source}: unsupported rope scaling type {stype!r} (supported: none, llama3)")
        eos_ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            v = _meta(reader, key, None, source)
            if v is not None and int(v) not in eos_ids:
                eos_ids.append(int(v))
        bos = _meta(reader, "tokenizer.ggml.bos_token_id", None, source)
        pad = _meta(reader, "tokenizer.ggml.padding_token_id", None, source)
        attention_bias = "blk.0.attn_q.bias" in tensor_names
        if "blk.0.attn_output.bias" in tensor_names:
            raise CheckpointError(f"{source}: attention output bias (blk.N.attn_output.bias) is not supported")
        cfg = TransformerConfig(
            family=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(m("feed_forward_length")),
            num_layers=int(m("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            # GGUF stores float32: take the shortest decimal that round-trips (9.99999975e-06 -> 1e-05)
            rms_norm_eps=float(str(np.float32(m("attention.layer_norm_rms_epsilon", 1e-6)))),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(m("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=attention_bias,
            qk_norm=arch == "qwen3",
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(eos_ids),
            pad_token_id=None if pad is None else int(pad),
        )
    except CheckpointError:
        raise
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: invalid GGUF metadata value: {e}") from e
    return cfg


def read_gguf_checkpoint(path: str, reader=None) -> tuple["TransformerConfig", dict[str, np.ndarray]]:
    """Reads a llama / qwen2 / qwen3 GGUF file into `(TransformerConfig, state_dict)`.

    Tensors are dequantised to float32 and renamed/laid out as HF transformers does
    (Linear weights [out, in]); llama's Q/K rows are un-permuted back to HF's rotary
    layout. Llama-3 rope scaling stored as `rope_freqs.weight` becomes `config.rope_scaling`.
    Raises CheckpointError for anything malformed, truncated, missing or unsupported.
    """
    import gguf

    path = os.fspath(path)
    reader = reader if reader is not None else open_gguf(path)  # pass one to avoid parsing twice
    if getattr(reader, "endianess", 0) != 0:
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    file_size = os.path.getsize(path)
    by_name = {}
    for t in reader.tensors:
        if t.name in by_name:
            raise CheckpointError(f"{path}: tensor {t.name!r} appears twice")
        by_name[t.name] = t
    cfg = _config_from_gguf(reader, set(by_name), path)

    rope_freqs = None
    sd: dict[str, np.ndarray] = {}
    for name, t in by_name.items():
        hf_name = gguf_to_hf_name(name)
        if hf_name is None and name != _ROPE_FREQS:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name!r} for a {cfg.family} model")
        end = int(t.data_offset) + int(t.n_bytes)
        if end > file_size or getattr(t.data, "nbytes", -1) != int(t.n_bytes):
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} needs bytes up to {end} but the file has {file_size}"
            )
        try:
            qtype = gguf.GGMLQuantizationType(t.tensor_type)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown GGUF type id {t.tensor_type}") from None
        if qtype.name not in SUPPORTED_GGUF_TYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} uses GGUF type {qtype.name}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})"
            )
        try:
            arr = np.array(gguf.quants.dequantize(t.data, qtype), dtype=np.float32, copy=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantise tensor {name!r} ({qtype.name}): {e}") from e
        # GGUF lists dims innermost-first; numpy's (and HF's) order is the reverse.
        want = tuple(int(d) for d in reversed(list(t.shape)))
        if arr.shape != want:
            raise CheckpointError(f"{path}: tensor {name!r} dequantised to shape {arr.shape}, expected {want}")
        if name == _ROPE_FREQS:
            rope_freqs = arr
            continue
        if cfg.family == "llama":
            if ".attn_q." in name:
                arr = unpermute_llama_qk(arr, cfg.num_heads)
            elif ".attn_k." in name:
                arr = unpermute_llama_qk(arr, cfg.num_kv_heads)
        sd[hf_name] = arr
    if rope_freqs is not None:
        if cfg.rope_scaling is None:
            cfg = cfg.replace(rope_scaling=rope_scaling_from_factors(rope_freqs, cfg.rope_theta, cfg.head_dim, path))
        elif not np.allclose(
            llama3_rope_factors(cfg.rope_scaling, cfg.rope_theta, cfg.head_dim), rope_freqs, rtol=1e-3
        ):
            raise CheckpointError(f"{path}: {_ROPE_FREQS} disagrees with the rope.scaling metadata")
    return cfg, validate_state_dict(cfg, sd, path)
