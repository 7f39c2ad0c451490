"""DFlash drafters in the z-lab/dflash HF layout (what SGLang / vLLM / z-lab load).

Layout (z-lab `DFlashDraftModel`, a Qwen3-style config):
  config.json: architectures ["DFlashDraftModel"], model_type "qwen3", the usual Qwen3 size
    fields (hidden_size = the target's, num_hidden_layers = draft layers,
    max_position_embeddings = the target's, ...), block_size, num_target_layers, and
    dflash_config {mask_token_id, target_layer_ids, block_size}.
    `target_layer_ids` are z-lab's = ours (0-based decoder-layer outputs; see
    opd/drafters/dflash/model.py), stored unchanged. The target's last layer L-1 is refused
    (export and import): z-lab reads it as `hidden_states[L]`, the final-normed output (ours is
    pre-norm), and SGLang / vLLM, which capture layer inputs, cannot capture it at all.
  model.safetensors: fc.weight [D, A*D], hidden_norm.weight, norm.weight (the drafter's
    final norm), layers.{i}.{input_layernorm, post_attention_layernorm}.weight,
    layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias with attention_bias),
    layers.{i}.self_attn.{q,k}_norm.weight, layers.{i}.mlp.{gate,up,down}_proj.weight.
    No embed_tokens / lm_head: the drafter shares the target's.

Two options of ours outside z-lab's layout (written only when used; z-lab / SGLang / vLLM do
not know them): a draft vocabulary, dflash_config.draft_vocab_size = W with EAGLE-3's d2t
(int64 [W]) and t2d (bool [V]) tensors (a checkpoint without them has the full vocabulary),
and a learned MASK embedding, dflash_config.mask_embedding = "learned" with the tensor
`mask_embedding` [D].

Every problem is a CheckpointError naming it (including a drafter that does not fit the
target: hidden size, vocabulary, target layers).

Loading an export in PyTorch: no modeling code is shipped (no `auto_map`, so no
`trust_remote_code`); z-lab's class is on PyPI (`pip install --no-deps dflash`, needs torch and
transformers):
    from dflash.model import DFlashDraftModel
    draft = DFlashDraftModel.from_pretrained(path, dtype=torch.bfloat16)
    draft.spec_generate(target, input_ids, max_new_tokens=..., stop_token_ids=[...])
(tests/interop/test_dflash_zlab.py runs that class on our exports and ours on its saves.)
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from opd.checkpoints.errors import CheckpointError
from opd.checkpoints.hf import _read_file, _shard_files, read_config_json
from opd.drafters.dflash import model as dfm
from opd.drafters.dflash.drafter import make_drafter
from opd.drafters.eagle3.hf import _vocab_maps  # EAGLE-3's d2t / t2d checks, shared
from opd.models.config import ConfigError, TransformerConfig

ARCHITECTURE = "DFlashDraftModel"
__all__ = ["export_dflash_hf", "read_dflash_hf", "load_dflash_hf", "ARCHITECTURE"]


def _last_layer_error(c: dfm.DFlashConfig) -> str:
    """Why a target_layer_ids that taps the target's last layer cannot be in this layout ("" if none does)."""
    L = c.num_target_layers
    if L - 1 not in c.target_layer_ids:
        return ""
    return (f"target_layer_ids {list(c.target_layer_ids)} include {L - 1}, the target's last layer (L-1 for L={L}): "
            f"z-lab reads it as hidden_states[{L}], the final-normed output (ours is pre-norm), and SGLang / vLLM "
            f"cannot capture it. Use layers 0..{L - 2}")


def _hf_config(c: dfm.DFlashConfig, max_position_embeddings: int) -> dict:
    rope_scaling = None
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                        "high_freq_factor": rs.high_freq_factor,
                        "original_max_position_embeddings": rs.original_max_position_embeddings}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(max_position_embeddings),  # loaders otherwise assume 32768
        "attention_bias": c.attention_bias,
        "attention_dropout": 0.0,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * c.num_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": c.num_layers,
        "block_size": c.block_size,
        "num_target_layers": c.num_target_layers,
        "dflash_config": {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids),
                          "block_size": c.block_size,
                          # our options, only when not z-lab's defaults (module docstring)
                          **({"draft_vocab_size": c.draft_vocab_size} if c.draft_vocab_size else {}),
                          **({"mask_embedding": c.mask_embedding} if c.mask_embedding != "token" else {})},
        "torch_dtype": "float32",
    }


def _tensor_shapes(c: dfm.DFlashConfig) -> dict:
    D, N, K, H, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {"fc.weight": (D, len(c.target_layer_ids) * D), "hidden_norm.weight": (D,), "norm.weight": (D,)}
    if c.mask_embedding == "learned":
        shapes["mask_embedding"] = (D,)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D), p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D), p + "self_attn.o_proj.weight": (D, N * H),
            p + "self_attn.q_norm.weight": (H,), p + "self_attn.k_norm.weight": (H,),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F),
        })
        if c.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (N * H,), p + "self_attn.k_proj.bias": (K * H,),
                           p + "self_attn.v_proj.bias": (K * H,), p + "self_attn.o_proj.bias": (D,)})
    return shapes


def state_dict_from_params(c: dfm.DFlashConfig, params) -> dict:
    """Our trainable tree -> z-lab names / torch Linear layouts ([out, in]), float32 numpy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    sd = {"fc.weight": p["fc"].T, "hidden_norm.weight": p["hidden_norm"]["scale"], "norm.weight": p["final_norm"]["scale"]}
    if c.mask_embedding == "learned":
        sd["mask_embedding"] = p["mask_embedding"]
    for i in range(c.num_layers):
        l, pre = p[f"layers_{i}"], f"layers.{i}."
        a = l["attn"]
        sd.update({
            pre + "input_layernorm.weight": l["attn_norm"]["scale"],
            pre + "post_attention_layernorm.weight": l["mlp_norm"]["scale"],
            pre + "self_attn.q_proj.weight": a["q"].reshape(D, N * H).T,
            pre + "self_attn.k_proj.weight": a["k"].reshape(D, K * H).T,
            pre + "self_attn.v_proj.weight": a["v"].reshape(D, K * H).T,
            pre + "self_attn.o_proj.weight": a["o"].reshape(N * H, D).T,
            pre + "self_attn.q_norm.weight": a["q_norm"]["scale"],
            pre + "self_attn.k_norm.weight": a["k_norm"]["scale"],
            pre + "mlp.gate_proj.weight": l["mlp"]["gate"].T,
            pre + "mlp.up_proj.weight": l["mlp"]["up"].T,
            pre + "mlp.down_proj.weight": l["mlp"]["down"].T,
        })
        if c.attention_bias:
            sd.update({pre + "self_attn.q_proj.bias": a["q_bias"].reshape(-1), pre + "self_attn.k_proj.bias": a["k_bias"].reshape(-1),
                       pre + "self_attn.v_proj.bias": a["v_bias"].reshape(-1), pre + "self_attn.o_proj.bias": a["o_bias"]})
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def params_from_state_dict(c: dfm.DFlashConfig, sd: dict):
    """z-lab-named state dict -> our trainable tree (numpy, `c.param_dtype` unless bfloat16)."""
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    params = {"fc": sd["fc.weight"].T, "hidden_norm": {"scale": sd["hidden_norm.weight"]},
              "final_norm": {"scale": sd["norm.weight"]}}
    if c.mask_embedding == "learned":
        params["mask_embedding"] = sd["mask_embedding"]
    for i in range(c.num_layers):
        pre = f"layers.{i}."
        attn = {
            "q": sd[pre + "self_attn.q_proj.weight"].T.reshape(D, N, H),
            "k": sd[pre + "self_attn.k_proj.weight"].T.reshape(D, K, H),
            "v": sd[pre + "self_attn.v_proj.weight"].T.reshape(D, K, H),
            "o": sd[pre + "self_attn.o_proj.weight"].T.reshape(N, H, D),
            "q_norm": {"scale": sd[pre + "self_attn.q_norm.weight"]},
            "k_norm": {"scale": sd[pre + "self_attn.k_norm.weight"]},
        }
        if c.attention_bias:
            attn.update(q_bias=sd[pre + "self_attn.q_proj.bias"].reshape(N, H), k_bias=sd[pre + "self_attn.k_proj.bias"].reshape(K, H),
                        v_bias=sd[pre + "self_attn.v_proj.bias"].reshape(K, H), o_bias=sd[pre + "self_attn.o_proj.bias"])
        params[f"layers_{i}"] = {
            "attn_norm": {"scale": sd[pre + "input_layernorm.weight"]},
            "attn": attn,
            "mlp_norm": {"scale": sd[pre + "post_attention_layernorm.weight"]},
            "mlp": {"gate": sd[pre + "mlp.gate_proj.weight"].T, "up": sd[pre + "mlp.up_proj.weight"].T,
                    "down": sd[pre + "mlp.down_proj.weight"].T},
        }
    if c.param_dtype == "bfloat16":
        return jax.tree.map(lambda a: jax.numpy.asarray(a, jax.numpy.bfloat16), params)
    return jax.tree.map(lambda a: np.ascontiguousarray(a, dtype=np.dtype(c.param_dtype)), params)


def export_dflash_hf(drafter, path: str) -> None:
    """Writes `drafter` (a DFlash `opd.Drafter`) as config.json + model.safetensors in `path`.

    Raises ValueError (before writing anything) when it taps the target's last layer."""
    c = drafter.spec.config
    why = _last_layer_error(c)
    if why:
        raise ValueError(f"cannot export this DFlash drafter to the z-lab layout: {why}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(_hf_config(c, drafter.spec.target_config.max_position_embeddings), f, indent=2)
    sd = state_dict_from_params(c, drafter.params["dflash"])
    if c.draft_vocab_size:  # as the EAGLE-3 exporter stores them
        sd["d2t"] = np.asarray(drafter.params["vocab"]["d2t"], np.int64)
        sd["t2d"] = np.asarray(drafter.params["vocab"]["t2d"], bool)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _dflash_value(hf: dict, name: str, default=None):
    """A DFlash config field: z-lab reads dflash_config first, then the top level."""
    dcfg = hf.get("dflash_config") or {}
    return (dcfg if isinstance(dcfg, dict) else {}).get(name, hf.get(name, default))


def declared_block_size(path: str) -> int:
    """The block size a DFlash HF dir declares (its config.json only; no weights read)."""
    _, hf = read_config_json(path, "DFlash checkpoint")
    return int(_dflash_value(hf, "block_size", dfm.DFlashConfig.block_size))


def _config_from_json(path: str, tconfig: TransformerConfig) -> dfm.DFlashConfig:
    cfg_path, hf = read_config_json(path, "DFlash checkpoint")
    archs = hf.get("architectures") or []
    if ARCHITECTURE not in archs:
        raise CheckpointError(f"{cfg_path}: architectures {archs} is not a DFlash v1 drafter ({ARCHITECTURE!r})")
    dcfg = hf.get("dflash_config") or {}
    if not isinstance(dcfg, dict):
        raise CheckpointError(f"{cfg_path}: dflash_config is not an object")

    value = lambda name, default=None: _dflash_value(hf, name, default)

    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
        raise CheckpointError(f"{cfg_path}: sliding-window draft layers are not supported")
    if hf.get("is_causal") or dcfg.get("causal"):
        raise CheckpointError(f"{cfg_path}: causal draft attention is not supported (DFlash v1 is non-causal)")
    for name, neutral in (("input_embedding_scale", 1.0), ("output_multiplier", 1.0), ("final_logit_softcapping", None)):
        v = value(name, neutral)
        if v is not None and v != neutral and not (neutral is None and float(v) <= 0):
            raise CheckpointError(f"{cfg_path}: {name}={v} is not supported")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{cfg_path}: unsupported hidden_act {hf.get('hidden_act')!r}")
    try:
        base = TransformerConfig.from_hf({k: v for k, v in hf.items() if k != "architectures"} | {"model_type": "qwen3"})
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: invalid value: {e}") from e
    ids, mask = value("target_layer_ids"), value("mask_token_id")
    if ids is None or mask is None:
        missing = "target_layer_ids" if ids is None else "mask_token_id"
        raise CheckpointError(f"{cfg_path}: dflash_config.{missing} is missing")
    # Fit to the target, before any tensor is read.
    if base.hidden_size != tconfig.hidden_size:
        raise CheckpointError(f"{cfg_path}: hidden_size {base.hidden_size} does not match the target's {tconfig.hidden_size}")
    if base.vocab_size != tconfig.vocab_size:
        raise CheckpointError(f"{cfg_path}: vocab_size {base.vocab_size} does not match the target's {tconfig.vocab_size}")
    n_target = int(hf.get("num_target_layers", tconfig.num_layers))
    if n_target != tconfig.num_layers:
        raise CheckpointError(f"{cfg_path}: num_target_layers {n_target} does not match the target's {tconfig.num_layers} layers")
    try:
        ids = tuple(int(i) for i in ids)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: target_layer_ids {ids!r} is not a list of integers") from e
    if not ids or any(not 0 <= i < tconfig.num_layers for i in ids):
        raise CheckpointError(f"{cfg_path}: target_layer_ids {list(ids)} out of range for the {tconfig.num_layers}-layer target")
    try:
        c = dfm.DFlashConfig(
            vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
            num_heads=base.num_heads, num_kv_heads=base.num_kv_heads, head_dim=base.head_dim,
            target_layer_ids=ids, num_target_layers=n_target, mask_token_id=int(mask),
            num_layers=base.num_layers, block_size=int(value("block_size", dfm.DFlashConfig.block_size)), rms_norm_eps=base.rms_norm_eps,
            rope_theta=base.rope_theta, rope_scaling=base.rope_scaling, attention_bias=bool(hf.get("attention_bias", False)),
            draft_vocab_size=int(value("draft_vocab_size", 0)), mask_embedding=str(value("mask_embedding", "token")),
            dtype=tconfig.dtype, param_dtype=tconfig.param_dtype,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    why = _last_layer_error(c)
    if why:
        raise CheckpointError(f"{cfg_path}: {why}")
    return c


VOCAB_TENSORS = ("d2t", "t2d")  # integer / bool: read as stored, not as float32


def read_dflash_hf(path: str, tconfig: TransformerConfig):
    """(DFlashConfig, trainable params, draft-vocabulary maps {"d2t", "t2d"} or None) from a
    z-lab layout directory, checked against `tconfig`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"DFlash checkpoint directory not found: {path}")
    c = _config_from_json(path, tconfig)
    sd = {}
    for fname, names in _shard_files(path).items():
        for name, arr in _read_file(os.path.join(path, fname), names, np.float32, maps=VOCAB_TENSORS).items():
            if name in sd:
                raise CheckpointError(f"tensor {name!r} appears in more than one safetensors file ({fname})")
            sd[name] = arr
    expected = _tensor_shapes(c)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} (expected shape {expected[missing[0]]})")
    vocab_names = VOCAB_TENSORS if c.draft_vocab_size else ()
    unexpected = sorted(k for k in sd if k not in expected and k not in vocab_names)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} with shape {tuple(sd[unexpected[0]].shape)} "
                              "for a DFlash drafter with this config")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {shape} from the config")
        if not np.isfinite(sd[k]).all():
            raise CheckpointError(f"{path}: tensor {k!r} contains NaN or infinite values")
    vocab = None
    if c.draft_vocab_size:
        d2t, t2d = _vocab_maps(sd, c.vocab_size, c.draft_vocab_size, path)
        vocab = {"d2t": d2t, "t2d": t2d}
    return c, params_from_state_dict(c, sd), vocab


def load_dflash_hf(path: str, target):
    """A DFlash `opd.Drafter` for `target` from a z-lab layout directory."""
    c, params, vocab = read_dflash_hf(path, target.config)
    return make_drafter(target, c, jax.tree.map(jax.numpy.asarray, params), vocab)
