"""read_gguf_checkpoint: synthetic GGUF round-trips, bad files, and the real SmolLM2 GGUF."""

from __future__ import annotations

import numpy as np
import pytest

from opd.checkpoints.errors import CheckpointError
from opd.checkpoints.gguf_file import (
    llama3_rope_factors,
    read_gguf_checkpoint,
    read_gguf_metadata,
    rope_scaling_from_factors,
)
from opd.models.config import RopeScaling

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

V, D, I, L, H, KV = 128, 64, 96, 2, 4, 2


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf LlamaModel.permute), written from its spec."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(seed: int, head_dim: int, bias: bool = False, qk_norm: bool = False, tied: bool = True):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": f(V, D), "model.norm.weight": 1 + 0.1 * f(D)}
    if not tied:
        sd["lm_head.weight"] = f(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = f(H * head_dim, D)
        sd[p + "self_attn.k_proj.weight"] = f(KV * head_dim, D)
        sd[p + "self_attn.v_proj.weight"] = f(KV * head_dim, D)
        sd[p + "self_attn.o_proj.weight"] = f(D, H * head_dim)
        if bias:
            sd[p + "self_attn.q_proj.bias"] = f(H * head_dim)
            sd[p + "self_attn.k_proj.bias"] = f(KV * head_dim)
            sd[p + "self_attn.v_proj.bias"] = f(KV * head_dim)
        if qk_norm:
            sd[p + "self_attn.q_norm.weight"] = 1 + 0.1 * f(head_dim)
            sd[p + "self_attn.k_norm.weight"] = 1 + 0.1 * f(head_dim)
        sd[p + "mlp.gate_proj.weight"] = f(I, D)
        sd[p + "mlp.up_proj.weight"] = f(I, D)
        sd[p + "mlp.down_proj.weight"] = f(D, I)
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * f(D)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * f(D)
    return sd


_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, *stem, suffix = hf.split(".")
    return f"blk.{i}.{_TO_GGUF['.'.join(stem)]}.{suffix}"


def _qtype_for(hf: str) -> "Q":
    """A mix of storage types: q/k in Q8_0 (permutation + quantisation), mlp in Q4_0/Q4_1."""
    if hf.endswith(".bias") or "norm" in hf:
        return Q.F32
    if "q_proj" in hf or "k_proj" in hf or "embed" in hf:
        return Q.Q8_0
    if "gate_proj" in hf:
        return Q.Q4_0
    if "up_proj" in hf:
        return Q.Q4_1
    if "v_proj" in hf:
        return Q.F16
    return Q.F32  # o_proj, down_proj, lm_head


def _stored(w: np.ndarray, qtype) -> np.ndarray:
    """What a reader gets back after storing w as qtype (quantisation is row-wise)."""
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


def write_gguf(path, arch, sd, head_dim, *, key_length=False, drop=(), extra_tensors=None,
               qtypes=_qtype_for, rope_theta=10000.0, skip_meta=()):
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: w.add_block_count(L),
        "context_length": lambda: w.add_context_length(512),
        "embedding_length": lambda: w.add_embedding_length(D),
        "feed_forward_length": lambda: w.add_feed_forward_length(I),
        "head_count": lambda: w.add_head_count(H),
        "head_count_kv": lambda: w.add_head_count_kv(KV),
        "freq_base": lambda: w.add_rope_freq_base(rope_theta),
        "eps": lambda: w.add_layer_norm_rms_eps(1e-5),
        "vocab_size": lambda: w.add_vocab_size(V),
    }
    for k, fn in meta.items():
        if k not in skip_meta:
            fn()
    if key_length:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    for hf, t in sd.items():
        if hf in drop:
            continue
        if arch == "llama" and ".q_proj." in hf:
            t = _permute(t, H)
        elif arch == "llama" and ".k_proj." in hf:
            t = _permute(t, KV)
        qt = qtypes(hf)
        if qt == Q.F32:
            w.add_tensor(_gguf_name(hf), t)
        elif qt == Q.F16:
            w.add_tensor(_gguf_name(hf), t.astype(np.float16))
        else:
            w.add_tensor(_gguf_name(hf), gguf.quants.quantize(t, qt), raw_dtype=qt)
    for name, (arr, qt) in (extra_tensors or {}).items():
        w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ------------------------------------------------------------------------------ round trips


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    sd = _hf_weights(0, head_dim=16, tied=False)
    return write_gguf(tmp_path_factory.mktemp("g") / "llama.gguf", "llama", sd, 16), sd


def test_llama_roundtrip_unpermutes_qk(llama_gguf):
    path, ref = llama_gguf
    cfg, sd = read_gguf_checkpoint(path)
    assert set(sd) == set(ref)
    for k, w in ref.items():
        got = sd[k]
        assert got.dtype == np.float32 and got.shape == w.shape, k
        # Exactly what the stored type reproduces, in HF row order ...
        np.testing.assert_array_equal(got, _stored(w, _qtype_for(k)), err_msg=k)
        # ... and close to the original weights.
        tol = {Q.F32: 0, Q.F16: 2e-3, Q.Q8_0: 0.03, Q.Q4_0: 0.6, Q.Q4_1: 0.6}[_qtype_for(k)]
        np.testing.assert_allclose(got, w, atol=tol, err_msg=k)
    # The stored Q rows really were permuted (the test would not catch a missing un-permute otherwise).
    assert not np.allclose(_permute(ref["model.layers.0.self_attn.q_proj.weight"], H),
                           ref["model.layers.0.self_attn.q_proj.weight"], atol=0.1)
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", V, D, I)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (L, H, KV, 16)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 10000.0 and cfg.max_position_embeddings == 512
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.rope_scaling is None
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 0)
    assert read_gguf_metadata(path)["llama.block_count"] == L  # the metadata API is unchanged


def test_qwen3_roundtrip_qk_norm_no_permutation(tmp_path):
    ref = _hf_weights(1, head_dim=32, qk_norm=True, tied=True)
    path = write_gguf(tmp_path / "q3.gguf", "qwen3", ref, 32, key_length=True)
    cfg, sd = read_gguf_checkpoint(path)
    assert set(sd) == set(ref)
    for k, w in ref.items():
        np.testing.assert_array_equal(sd[k], _stored(w, _qtype_for(k)), err_msg=k)
    assert cfg.family == "qwen3" and cfg.qk_norm and cfg.head_dim == 32 and cfg.tie_word_embeddings
    assert sd["model.layers.1.self_attn.k_norm.weight"].shape == (32,)


def test_qwen2_roundtrip_bias(tmp_path):
    ref = _hf_weights(2, head_dim=16, bias=True, tied=True)
    path = write_gguf(tmp_path / "q2.gguf", "qwen2", ref, 16, qtypes=lambda k: Q.F32)
    cfg, sd = read_gguf_checkpoint(path)
    assert cfg.family == "qwen2" and cfg.attention_bias and not cfg.qk_norm
    assert set(sd) == set(ref)
    for k, w in ref.items():
        np.testing.assert_array_equal(sd[k], w, err_msg=k)


def test_llama3_rope_freqs_tensor(tmp_path):
    # head_dim 16 / theta 1e4: these parameters put 3 frequencies in the smoothing band.
    scaling = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=16.0,
                          original_max_position_embeddings=2048)
    factors = llama3_rope_factors(scaling, 10000.0, 16).astype(np.float32)
    ref = _hf_weights(3, head_dim=16)
    path = write_gguf(tmp_path / "l3.gguf", "llama", ref, 16,
                      extra_tensors={"rope_freqs.weight": (factors, Q.F32)})
    cfg, sd = read_gguf_checkpoint(path)
    assert "rope_freqs.weight" not in sd and set(sd) == set(ref)
    assert cfg.rope_scaling == scaling


def test_rope_scaling_from_llama31_factors():
    # Llama-3.1-8B's rope: head_dim 128, theta 5e5, factor 8, low 1, high 4, original 8192.
    want = RopeScaling(8.0, 1.0, 4.0, 8192)
    factors = llama3_rope_factors(want, 500000.0, 128).astype(np.float32)
    assert rope_scaling_from_factors(factors, 500000.0, 128) == want
    assert rope_scaling_from_factors(np.ones(64, np.float32), 500000.0, 128) is None
    with pytest.raises(CheckpointError, match="rope"):
        rope_scaling_from_factors(np.linspace(1, 3, 64), 500000.0, 128)


# ------------------------------------------------------------------------------ bad inputs


def test_not_found(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf_checkpoint(tmp_path / "nope.gguf")


def test_wrong_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf_checkpoint(str(p))


@pytest.mark.parametrize("frac", [0.5, 0.999, 0.02])
def test_truncated(llama_gguf, tmp_path, frac):
    data = open(llama_gguf[0], "rb").read()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf_checkpoint(str(p))


def test_missing_tensor(tmp_path):
    ref = _hf_weights(4, head_dim=16, tied=False)
    path = write_gguf(tmp_path / "m.gguf", "llama", ref, 16, drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        read_gguf_checkpoint(path)


def test_misshaped_tensor(tmp_path):
    ref = _hf_weights(5, head_dim=16)
    ref["model.layers.0.mlp.gate_proj.weight"] = ref["model.layers.0.mlp.gate_proj.weight"][:64]
    path = write_gguf(tmp_path / "m.gguf", "llama", ref, 16)
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight' has shape \(64, 64\), expected \(96, 64\)"):
        read_gguf_checkpoint(path)


def test_unexpected_tensor(tmp_path):
    ref = _hf_weights(6, head_dim=16)
    path = write_gguf(tmp_path / "m.gguf", "llama", ref, 16,
                      extra_tensors={"blk.0.ffn_gate_exps.weight": (np.zeros((4, 64), np.float32), Q.F32)})
    with pytest.raises(CheckpointError, match="unexpected GGUF tensor 'blk.0.ffn_gate_exps.weight'"):
        read_gguf_checkpoint(path)


def test_unsupported_arch(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", "gemma", _hf_weights(7, head_dim=16), 16)
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gemma'"):
        read_gguf_checkpoint(path)


def test_missing_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", _hf_weights(8, head_dim=16), 16, skip_meta={"block_count"})
    with pytest.raises(CheckpointError, match="'llama.block_count' is missing"):
        read_gguf_checkpoint(path)


def test_unsupported_quant_type(tmp_path):
    # IQ4_NL blocks: 32 values in 18 bytes. The bytes are never interpreted.
    raw = np.zeros((D, D // 32 * 18), np.uint8)
    ref = _hf_weights(9, head_dim=16)
    path = write_gguf(tmp_path / "m.gguf", "llama", ref, 16, drop={"model.layers.0.self_attn.o_proj.weight"},
                      extra_tensors={"blk.0.attn_output.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_output\.weight' uses GGUF type IQ4_NL"):
        read_gguf_checkpoint(path)


def test_nan_weights(tmp_path):
    ref = _hf_weights(10, head_dim=16)
    ref["model.norm.weight"][3] = np.nan
    path = write_gguf(tmp_path / "m.gguf", "llama", ref, 16)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' contains NaN"):
        read_gguf_checkpoint(path)


# ------------------------------------------------------------------------------ real file


def test_smollm2_matches_transformers(smollm2_gguf_path, monkeypatch):
    """Every tensor equals transformers' own dequantisation of the same GGUF (Q/K un-permutation)."""
    import functools

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg, sd = read_gguf_checkpoint(smollm2_gguf_path)
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.head_dim, cfg.intermediate_size) == (49152, 64, 1536)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 2)
    assert cfg.max_position_embeddings == 8192 and cfg.rope_scaling is None

    # transformers' GGUF path (what from_pretrained(gguf_file=...) runs, minus the need for
    # `accelerate`): a meta-device model gives the name map, then the dequantised tensors.
    # get_tensor_name_map is pure but transformers rebuilds it per module (~7 s): memoise it.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    out = load_gguf_checkpoint(smollm2_gguf_path, return_tensors=True, model_to_load=model)
    hf = out["config"]
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"]) == (30, 576, 1536)
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"]) == (9, 3, 49152)
    assert hf["tie_word_embeddings"] and hf["max_position_embeddings"] == 8192
    assert hf["rope_theta"] == cfg.rope_theta and hf["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps)
    ref = out["tensors"]
    assert set(ref) == set(sd)
    for k, v in ref.items():
        np.testing.assert_array_equal(sd[k], v.float().numpy(), err_msg=k)
