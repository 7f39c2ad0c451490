"""read_hf_checkpoint against tiny random transformers models saved as safetensors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from opd.checkpoints.errors import CheckpointError
from opd.checkpoints.hf import expected_tensor_shapes, read_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _make(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    args = dict(TINY)
    args.update(kw)
    model = cls_model(cls_cfg(**args)).eval()
    # Norm weights start at exactly 1: randomise them so a swapped norm would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return str(path)


def _torch_sd(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Untied llama with llama-3 rope scaling, one model.safetensors."""
    rope = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
    }
    model = _make("llama", tie_word_embeddings=False, rope_parameters=rope, bos_token_id=1, eos_token_id=[2, 3])
    return _save(model, tmp_path_factory.mktemp("llama") / "m"), _torch_sd(model)


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **updates):
    p = os.path.join(d, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(updates)
    with open(p, "w") as f:
        json.dump(cfg, f)


def _assert_equal_sd(sd, ref, tied):
    want = {k for k in ref if not (tied and k == "lm_head.weight")}
    assert set(sd) == want
    for k in want:
        assert sd[k].dtype == np.float32, k
        np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)


# ------------------------------------------------------------------------------ happy paths


def test_llama_untied_llama3_rope(llama_dir):
    path, ref = llama_dir
    cfg, sd = read_hf_checkpoint(path)
    _assert_equal_sd(sd, ref, tied=False)
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", 128, 64, 96)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert cfg.rope_scaling.original_max_position_embeddings == 128
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2, 3)
    assert set(expected_tensor_shapes(cfg)) == set(sd)


def test_qwen2_tied_bias_sharded(tmp_path):
    model = _make("qwen2", seed=1, tie_word_embeddings=True)
    path = _save(model, tmp_path / "m", max_shard_size="40KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    cfg, sd = read_hf_checkpoint(path)
    _assert_equal_sd(sd, _torch_sd(model), tied=True)
    assert cfg.family == "qwen2" and cfg.attention_bias and cfg.tie_word_embeddings
    assert "model.layers.1.self_attn.k_proj.bias" in sd and "lm_head.weight" not in sd


def test_qwen3_qk_norm_bf16(tmp_path):
    model = _make("qwen3", seed=2, head_dim=32, tie_word_embeddings=True).to(torch.bfloat16)
    path = _save(model, tmp_path / "m")
    cfg, sd = read_hf_checkpoint(path)
    _assert_equal_sd(sd, _torch_sd(model), tied=True)  # bf16 -> f32 is exact
    assert cfg.family == "qwen3" and cfg.qk_norm and cfg.head_dim == 32
    assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)


def test_fp16(tmp_path):
    model = _make("llama", seed=3, tie_word_embeddings=True).to(torch.float16)
    cfg, sd = read_hf_checkpoint(_save(model, tmp_path / "m"))
    _assert_equal_sd(sd, _torch_sd(model), tied=True)


def test_tied_with_stale_lm_head_is_ignored(llama_dir, tmp_path):
    from safetensors.numpy import save_file

    src, ref = llama_dir
    d = _copy(src, tmp_path)
    _edit_config(d, tie_word_embeddings=True)
    sd = dict(ref)
    sd["lm_head.weight"] = np.zeros_like(ref["lm_head.weight"])  # differs from the embedding
    save_file(sd, str(d / "model.safetensors"))
    cfg, out = read_hf_checkpoint(d)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in out


# ------------------------------------------------------------------------------ bad inputs


def _rewrite(d, sd):
    from safetensors.numpy import save_file

    save_file(sd, str(d / "model.safetensors"))


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_hf_checkpoint(tmp_path / "nope")


def test_missing_config(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        read_hf_checkpoint(d)


def test_no_safetensors(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no safetensors"):
        read_hf_checkpoint(d)


def test_pickle_refused(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    os.remove(d / "model.safetensors")
    # A pickle that would run code if it were ever unpickled.
    (d / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned_opd'\ntR.")
    with pytest.raises(CheckpointError, match="only safetensors"):
        read_hf_checkpoint(d)
    assert not os.path.exists("/tmp/pwned_opd")


@pytest.mark.parametrize("keep", [0.5, 0.9999, 6])
def test_truncated_safetensors(llama_dir, tmp_path, keep):
    d = _copy(llama_dir[0], tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_hf_checkpoint(d)


def test_corrupt_header(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_hf_checkpoint(d)


def test_missing_shard(tmp_path):
    path = _save(_make("llama", seed=4), tmp_path / "m", max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(path) if f.startswith("model-"))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"shard {shard} .* missing"):
        read_hf_checkpoint(path)


def test_missing_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    sd = dict(llama_dir[1])
    del sd["model.layers.1.mlp.up_proj.weight"]
    _rewrite(d, sd)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        read_hf_checkpoint(d)


def test_misshaped_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    sd = dict(llama_dir[1])
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    _rewrite(d, sd)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \(16, 64\), expected \(32, 64\)"):
        read_hf_checkpoint(d)


def test_unexpected_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    sd = dict(llama_dir[1])
    sd["model.layers.0.self_attn.o_proj.bias"] = np.zeros((64,), np.float32)
    _rewrite(d, sd)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        read_hf_checkpoint(d)


def test_untied_without_lm_head(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    sd = dict(llama_dir[1])
    del sd["lm_head.weight"]
    _rewrite(d, sd)
    with pytest.raises(CheckpointError, match="lm_head"):
        read_hf_checkpoint(d)


def test_vocab_mismatch(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    _edit_config(d, vocab_size=130)
    with pytest.raises(CheckpointError, match=r"vocab_size .*130.* 128 rows"):
        read_hf_checkpoint(d)


def test_unsupported_architecture(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        read_hf_checkpoint(d)


def test_integer_tensor_refused(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    sd = dict(llama_dir[1])
    sd["model.norm.weight"] = np.ones((64,), np.int32)
    _rewrite(d, sd)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype I32"):
        read_hf_checkpoint(d)
