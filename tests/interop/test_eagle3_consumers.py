"""EAGLE-3 exports against the loaders that serve them, replayed on our files.

SGLang, vLLM and EAGLE cannot be installed here (CUDA-only or unpackaged), so each test below
replays what that loader reads - config keys, tensor names and shapes, the aux-layer capture
rule - from its source (file named in each replay), and checks that our export satisfies it:
every tensor lands in a parameter, every parameter but the shared embedding is loaded, and the
tapped layers are ones the serving engine can capture. The other direction, EAGLE's own
training config (`LlamaForCausalLM` + EAGLE-3 fields), goes through `opd.load_drafter`.
"""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import opd
from conftest import make_target
from opd.drafters.eagle3 import model as e3

L, LAYERS, W = 5, (0, 2, 3), 48  # a 5-layer target, three distinct taps below L-1 = 4


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=5, num_hidden_layers=L)


@pytest.fixture(scope="module")
def export(target, tmp_path_factory):
    """(config.json dict, tensors) of an exported EAGLE-3 drafter."""
    drafter = opd.init_drafter("eagle3", target, seed=2, draft_vocab_size=W, target_layers=LAYERS,
                               token_counts=np.arange(target.config.vocab_size))
    path = tmp_path_factory.mktemp("eagle3")
    opd.export_drafter(drafter, str(path))
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def _drafter_shapes(cfg):
    """The EAGLE-3 layer's parameter shapes as the consumers build them from config.json."""
    D, N = cfg["hidden_size"], cfg["num_attention_heads"]
    H = cfg.get("head_dim") or D // N
    K, F = cfg.get("num_key_value_heads", N), cfg["intermediate_size"]
    fc_in = 3 * cfg.get("target_hidden_size", D)  # all three: hasattr(config, "target_hidden_size")
    return dict(D=D, N=N, H=H, K=K, F=F, fc_in=fc_in, V=cfg["vocab_size"], W=cfg["draft_vocab_size"])


def test_eagle_repo_loads_the_targets_embedding_and_every_weight(export):
    """SafeAILab/EAGLE `eagle/model/cnets.py` `Model.__init__` + `ea_model.py`: the target's
    embedding is loaded only `if load_emb and not hasattr(config, "target_hidden_size")`, then
    our tensors go in with `load_state_dict(strict=False)`: a tensor it does not have is
    ignored and one we lack stays random, silently."""
    cfg, sd = export
    s = _drafter_shapes(cfg)
    D, N, H, K, F = s["D"], s["N"], s["H"], s["K"], s["F"]
    assert "target_hidden_size" not in cfg  # else the embedding stays random (no error)
    module = {  # Model's state_dict: parameters and the d2t / t2d buffers
        "embed_tokens.weight": (s["V"], D), "lm_head.weight": (s["W"], D), "fc.weight": (D, s["fc_in"]),
        "norm.weight": (D,), "midlayer.hidden_norm.weight": (D,), "midlayer.input_layernorm.weight": (D,),
        "midlayer.post_attention_layernorm.weight": (D,),
        "midlayer.self_attn.q_proj.weight": (N * H, 2 * D), "midlayer.self_attn.k_proj.weight": (K * H, 2 * D),
        "midlayer.self_attn.v_proj.weight": (K * H, 2 * D), "midlayer.self_attn.o_proj.weight": (D, N * H),
        "midlayer.mlp.gate_proj.weight": (F, D), "midlayer.mlp.up_proj.weight": (F, D),
        "midlayer.mlp.down_proj.weight": (D, F), "d2t": (s["W"],), "t2d": (s["V"],),
    }
    if s["V"] == s["W"]:  # ea_model.py deletes the maps of a full-vocabulary drafter
        del module["d2t"], module["t2d"]
    assert {k: tuple(v.shape) for k, v in sd.items() if k in module} == {k: v for k, v in module.items() if k in sd}
    assert set(module) - set(sd) == {"embed_tokens.weight"}  # loaded from the target, as above
    assert set(sd) <= set(module)
    # LlamaAttention._init_rope: rope_theta if present (else 10000); rope_scaling must be None or
    # {"type": linear | dynamic} (EConfig rejects other kinds).
    rs = cfg["rope_scaling"]
    assert (rs is None or rs.get("type") in ("linear", "dynamic")) and "rope_theta" in cfg


def test_sglang_loads_every_weight_and_captures_the_layers(export):
    """sgl-project/sglang `python/sglang/srt/models/llama_eagle3.py` `LlamaForCausalLMEagle3.
    load_weights`: d2t -> hot_token_id, t2d skipped, q/k/v and gate/up stacked, each name
    looked up as-is or under `model.`, an unknown name silently skipped. Aux layers
    (`llama.py` `set_eagle3_layers_to_capture`): `layers_to_capture = [i + 1 for i in
    eagle_config.eagle_aux_hidden_state_layer_ids]`, captured as the input of layer i + 1."""
    cfg, sd = export
    s = _drafter_shapes(cfg)
    params = {"model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight",
              "model.midlayer.self_attn.qkv_proj.weight", "model.midlayer.self_attn.o_proj.weight",
              "model.midlayer.mlp.gate_up_proj.weight", "model.midlayer.mlp.down_proj.weight",
              "model.midlayer.input_layernorm.weight", "model.midlayer.hidden_norm.weight",
              "model.midlayer.post_attention_layernorm.weight"}
    stacked = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
               (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]
    loaded, hot = {}, None
    for name, w in sd.items():
        if "d2t" in name:
            hot = w + np.arange(w.shape[0])
            continue
        if "t2d" in name:
            continue
        shard = None
        for param, weight, shard_id in stacked:
            if weight in name:
                name, shard = name.replace(weight, param), shard_id
                break
        name = name if name in params else f"model.{name}"
        assert name in params, f"SGLang would silently drop {name}"
        loaded.setdefault(name, []).append(shard)
    assert set(params) - set(loaded) == {"model.embed_tokens.weight"}  # set_embed: the target's
    assert sorted(loaded["model.midlayer.self_attn.qkv_proj.weight"]) == ["k", "q", "v"]
    assert sorted(loaded["model.midlayer.mlp.gate_up_proj.weight"]) == [0, 1]
    assert sd["fc.weight"].shape == (s["D"], s["fc_in"]) and sd["lm_head.weight"].shape[0] == cfg["draft_vocab_size"]
    assert sorted(hot.tolist()) == sorted(np.flatnonzero(sd["t2d"]).tolist())
    capture = [i + 1 for i in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
    assert all(0 <= i < L for i in capture), capture  # the layer loop is range(L): L itself never runs
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(LAYERS)


def test_vllm_loads_every_weight_strictly_and_captures_the_layers(export):
    """vllm-project/vllm `vllm/model_executor/models/llama_eagle3.py`: t2d skipped, d2t ->
    draft_id_to_target_id, every other name but lm_head under `model.`, `midlayer.` ->
    `layers.0.`, then `params_dict[name]` (a KeyError for an unknown tensor). Aux layers:
    the top-level `eagle_aux_hidden_state_layer_ids`, captured as the input of layer i;
    max_position_embeddings read with a fallback of 8192."""
    cfg, sd = export
    params = {"model.fc.weight", "model.norm.weight", "lm_head.weight", "draft_id_to_target_id",
              "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.hidden_norm.weight",
              "model.layers.0.post_attention_layernorm.weight"}
    stacked = [(".qkv_proj", ".q_proj"), (".qkv_proj", ".k_proj"), (".qkv_proj", ".v_proj"),
               (".gate_up_proj", ".gate_proj"), (".gate_up_proj", ".up_proj")]
    loaded = set()
    for name in sd:
        if "t2d" in name:
            continue
        if "d2t" in name:
            name = name.replace("d2t", "draft_id_to_target_id")
        elif "lm_head" not in name:
            name = "model." + name
        name = name.replace("midlayer.", "layers.0.")
        for param, weight in stacked:
            if weight in name:
                name = name.replace(weight, param)
                break
        assert name in params, f"vLLM: KeyError {name!r}"
        loaded.add(name)
    assert loaded == params  # embed_tokens absent: skipped, the target's is shared
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in LAYERS]
    assert all(0 <= i < L for i in cfg["eagle_aux_hidden_state_layer_ids"])  # capturable inputs
    assert cfg.get("eagle_config", {}).get("use_aux_hidden_state", True)  # else no fc
    assert cfg["max_position_embeddings"] == 256  # the target's, not a loader's fallback


def test_eagle_training_config_loads(tmp_path, target):
    """EAGLE's `eagle/traineagle3/config.json` form: `LlamaForCausalLM` with draft_vocab_size,
    no eagle_config / head_dim / rope_theta, and the saved state dict's embed_tokens."""
    drafter = opd.init_drafter("eagle3", target, seed=3, draft_vocab_size=W, token_counts=np.arange(128))
    c = drafter.spec.config
    assert c.target_layers == e3.default_target_layers(L)  # EAGLE's fixed taps, as it has no ids
    sd = {k: np.ascontiguousarray(v) for k, v in e3.params_to_hf(c, drafter.params["eagle"]).items()}
    sd.update(d2t=np.asarray(drafter.params["vocab"]["d2t"], np.int64), t2d=np.asarray(drafter.params["vocab"]["t2d"]),
              **{"embed_tokens.weight": np.asarray(target.params["embedding"])})
    save_file(sd, str(tmp_path / "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 64,
          "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
          "num_key_value_heads": c.num_kv_heads, "num_hidden_layers": 1, "rms_norm_eps": c.rms_norm_eps,
          "max_position_embeddings": 2048, "vocab_size": 128, "draft_vocab_size": W, "tie_word_embeddings": False,
          "torch_dtype": "float16", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = opd.load_drafter(str(tmp_path), target)
    assert loaded.kind == "eagle3" and loaded.spec.config.target_layers == c.target_layers
    for a, b in zip(jax.tree.leaves(drafter.split()), jax.tree.leaves(loaded.split())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # a target model's own config (the same architecture, no EAGLE-3 fields) is not a drafter
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if k != "draft_vocab_size"}))
    with pytest.raises(opd.CheckpointError, match="not a supported drafter"):
        opd.load_drafter(str(tmp_path), target)


def test_a_tap_of_the_last_layer_is_refused_on_import(tmp_path, target):
    """Layer L-1 in the public layout means hidden_states[L] (final-normed), which SGLang / vLLM
    cannot capture and our target does not provide."""
    drafter = opd.init_drafter("eagle3", target, seed=2, draft_vocab_size=W, target_layers=(0, 2, L - 1))
    opd.export_drafter(drafter, str(tmp_path))
    with pytest.raises(opd.CheckpointError, match=r"aux hidden layer 4 is the target's last layer .* Use layers 0\.\.3"):
        opd.load_drafter(str(tmp_path), target)
