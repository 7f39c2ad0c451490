"""Target transformer configuration (Llama / Qwen2 / Qwen3 families).

One frozen dataclass describes every supported decoder-only target. Loaders
(`opd.checkpoints`) build it from an HF `config.json` or from GGUF metadata; the
model (`opd.models.transformer`) reads nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

# Architectures we can load, keyed by HF `architectures[0]` / GGUF `general.architecture`.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


class ConfigError(ValueError):
    """A model configuration value is missing, inconsistent or unsupported."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a decoder-only target. Hashable: used as a jit static arg."""

    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    # Execution choices (not part of the checkpoint).
    dtype: str = "float32"  # activation dtype
    param_dtype: str = "float32"
    scan_layers: bool = False  # nn.scan over layers (large models: faster compile)
    remat: bool = False  # rematerialise each layer in the backward pass

    def __post_init__(self):
        if self.family not in GGUF_ARCHITECTURES:
            raise ConfigError(f"unsupported model family {self.family!r}; expected one of {GGUF_ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "TransformerConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "TransformerConfig":
        """Builds a config from a parsed HF `config.json`."""
        archs = hf.get("architectures") or []
        family = None
        for a in archs:
            family = HF_ARCHITECTURES.get(a)
            if family:
                break
        if family is None:
            mt = hf.get("model_type")
            if mt in GGUF_ARCHITECTURES:
                family = mt
        if family is None:
            raise ConfigError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {sorted(HF_ARCHITECTURES)}"
            )
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            kw = dict(
                family=family,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing required key {e.args[0]!r}") from None
        # transformers >= 5 nests rope settings under `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or {})
        legacy = dict(hf.get("rope_scaling") or {})
        if legacy.get("rope_type", legacy.get("type", "default")) != "default":
            rope.update(legacy)
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = None
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rtype not in ("default", None):
            raise ConfigError(f"unsupported rope scaling type {rtype!r} (supported: default, llama3)")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        kw.update(
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)
