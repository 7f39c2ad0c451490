"""Shared pytest setup: strict numerics, tolerances keyed by dtype, tiny HF reference models, and a
loader for the repo's scripts (experiment configs and benchmarks are files, not a package)."""

import os

import jax
import numpy as np
import pytest

from opd.configs import load_module

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str):
    """The module of a script of the repo, e.g. `experiments/benchmarks/sft_sources.py` (flags defined
    under `__main__` stay undefined, so several scripts load into one test process)."""
    return load_module(os.path.join(REPO, relpath))


# One tolerance table for the whole suite (max |Δ| on logits / activations).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def tol(dtype="float32") -> float:
    return TOLERANCE[str(np.dtype(dtype)) if dtype != "bfloat16" else "bfloat16"]


FAMILIES = {
    # name: (HF config class name, HF model class name, extra config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    ),
    "llama_mha_tied": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "num_key_value_heads": 1}),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny randomly initialised transformers model and its HF config dict (with architectures)."""
    import torch
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, tie_word_embeddings=False)
    kw.update(extra)
    kw.update(overrides)
    hf_config = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(hf_config).eval()
    with torch.no_grad():  # non-trivial norm weights so norm bugs cannot hide behind ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    d = hf_config.to_dict()
    d["architectures"] = [model_name]
    return model, d


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched through the asset module."""
    from opd.data.assets import asset_path

    return asset_path("smollm2_gguf")


@pytest.fixture(scope="session")
def smollm2_target(smollm2_gguf_path):
    import opd

    return opd.load_target(smollm2_gguf_path)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf_path):
    """transformers' own GGUF loading of the same file (dequantised to float32)."""
    import transformers

    d, f = os.path.split(smollm2_gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype="float32").eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


def make_target(family: str = "llama", seed: int = 0, **overrides):
    """An `opd.Target` (no tokenizer) with the weights of `make_hf_model`."""
    import jax
    import jax.numpy as jnp

    import opd
    from opd.models import transformer as tfm

    model, d = make_hf_model(family, seed=seed, **overrides)
    config = opd.TransformerConfig.from_hf(d)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return opd.Target(config, jax.tree.map(jnp.asarray, tfm.params_from_hf(config, sd)))


def run_as_hosts(fn, n: int = 2, timeout: float = 120) -> tuple[list, list]:
    """Runs `fn(i)` on n threads standing in for n hosts (race tests); returns (results, errors),
    errors as "host i: Type: message"."""
    import threading

    results, errors = [None] * n, []

    def host(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(f"host {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=host, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results, errors
