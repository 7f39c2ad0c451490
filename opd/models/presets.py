"""Architectures of the targets the pod configs launch, as their HF `config.json` states them.

These let a launch plan (the ahead-of-time compile check, `opd.training.aot`) build a
`TransformerConfig` without the weights. When the weights are loaded, `check_against` compares
the checkpoint's own config.json with the preset, so a config that names the wrong model (or a
preset that drifted from the checkpoint) is an error, not a silently different plan.

Values: the public config.json files of Qwen/Qwen3-4B, Qwen/Qwen3-8B and
meta-llama/Llama-3.1-8B-Instruct (only the fields `TransformerConfig.from_hf` reads).
"""

from __future__ import annotations

from opd.models.config import ConfigError, TransformerConfig

_QWEN3_COMMON = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                     attention_bias=False, bos_token_id=151643, eos_token_id=151645)

PRESETS: dict[str, dict] = {
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=False, attention_bias=False, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009]),
}

# fields compared by `check_against` (architecture only: execution choices are not in config.json)
_ARCH_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "tie_word_embeddings", "qk_norm", "attention_bias", "rope_theta")


def preset_config(name: str, **overrides) -> TransformerConfig:
    """The `TransformerConfig` of a preset; `overrides` replace fields (e.g. num_layers=2, dtype)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown target preset {name!r}; known: {sorted(PRESETS)}")
    return TransformerConfig.from_hf(PRESETS[name], **overrides)


def check_against(name: str, config: TransformerConfig) -> None:
    """Raises ConfigError when a loaded target's architecture differs from the preset `name`."""
    want = preset_config(name)
    diff = {f: (getattr(want, f), getattr(config, f)) for f in _ARCH_FIELDS if getattr(want, f) != getattr(config, f)}
    if diff:
        detail = ", ".join(f"{f}: preset {a!r} vs checkpoint {b!r}" for f, (a, b) in diff.items())
        raise ConfigError(f"the target checkpoint is not the {name!r} preset the config names ({detail})")
