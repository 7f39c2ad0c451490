"""EAGLE-3 drafters in the public HF layout that SGLang / vLLM / SpecForge / EAGLE load.

A directory with
  config.json        `architectures: ["LlamaForCausalLMEagle3"]`, llama fields (hidden_size,
                     num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
                     rms_norm_eps, rope_theta, rope_scaling, max_position_embeddings,
                     vocab_size = the target's V), `draft_vocab_size`, and the aux layer ids:
                     `eagle_config.eagle_aux_hidden_state_layer_ids` as SGLang/SpecForge
                     read them (output of decoder layer i, 0-based: our convention) and the
                     top-level `eagle_aux_hidden_state_layer_ids` as vLLM reads them (vLLM
                     captures the *input* of layer i, so its ids are ours + 1);
  model.safetensors  fc.weight, midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}
                     .weight, midlayer.self_attn.{q,k,v,o}_proj.weight, midlayer.mlp.{gate,up,
                     down}_proj.weight, norm.weight, lm_head.weight (Linear layout [out, in]),
                     d2t (int64 [W]) and t2d (bool [V]).
The token embedding is not written (EAGLE's public checkpoints omit it; the consumers use the
target's). `target_hidden_size` is written only when it differs from `hidden_size`: EAGLE's
loader (`eagle/model/cnets.py`) takes the key's mere presence to mean "own embedding", skips
loading the target's and then loads our weights with strict=False, leaving a random embedding.

Layer L-1 (the target's last decoder layer) is refused on import: in these layouts its id means
transformers' `hidden_states[L]`, the *final-normed* output (our aux id L-1 is pre-norm), and
SGLang / vLLM, which capture layer inputs, cannot provide it at all.

Import also takes EAGLE's own training configs (`eagle/traineagle3/config.json`):
`architectures: ["LlamaForCausalLM"]` with the EAGLE-3 fields (`draft_vocab_size`); no
eagle_config there, so the aux layers are EAGLE's fixed ones (`default_target_layers`).
On import a `embed_tokens.weight` (SpecForge and EAGLE training write one) is checked against
the target's vocabulary and dropped; a `model.` prefix on tensor names is accepted.

Only safetensors is read (nothing is unpickled); every problem is a `CheckpointError`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from opd.checkpoints.errors import CheckpointError
from opd.checkpoints.hf import read_config_json
from opd.drafters.base import Drafter
from opd.drafters.eagle3 import model as e3
from opd.drafters.eagle3.drafter import Eagle3Spec
from opd.models.config import RopeScaling

ARCHITECTURE = "LlamaForCausalLMEagle3"
# EAGLE's training scripts save the drafter under a plain llama architecture; the EAGLE-3
# fields (`EAGLE3_KEYS`) tell it from a target model's config.
EAGLE_TRAINING_ARCHITECTURE = "LlamaForCausalLM"
EAGLE3_KEYS = ("draft_vocab_size", "eagle_config")
_WEIGHTS = "model.safetensors"


def is_eagle3_config(hf: dict) -> bool:
    """Whether a parsed config.json describes an EAGLE-3 drafter (ours / SGLang's / SpecForge's
    `LlamaForCausalLMEagle3`, or EAGLE's training config: `LlamaForCausalLM` + EAGLE-3 fields)."""
    archs = hf.get("architectures") or []
    return ARCHITECTURE in archs or (EAGLE_TRAINING_ARCHITECTURE in archs and any(k in hf for k in EAGLE3_KEYS))


def _rope_scaling_json(rs):
    if rs is None:
        return None
    return {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor, "original_max_position_embeddings": rs.original_max_position_embeddings}


def export_eagle3_hf(drafter: Drafter, path: str) -> None:
    """Writes `drafter` (an EAGLE-3 `opd.Drafter`) as an HF EAGLE-3 directory at `path`."""
    if drafter.kind != "eagle3":
        raise ValueError(f"export_eagle3_hf needs an eagle3 drafter, got {drafter.kind!r}")
    c: e3.Eagle3Config = drafter.spec.config
    os.makedirs(path, exist_ok=True)
    layers = [int(i) for i in c.target_layers]
    hf = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": _rope_scaling_json(c.rope_scaling),
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        # only when it differs: its presence alone makes EAGLE skip the target's embedding
        **({"target_hidden_size": c.target_hidden_size} if c.target_hidden_size != c.hidden_size else {}),
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": layers, "use_aux_hidden_state": True},
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in layers],
    }
    sd = {k: np.ascontiguousarray(v, np.float32) for k, v in e3.params_to_hf(c, drafter.params["eagle"]).items()}
    sd["d2t"] = np.asarray(drafter.params["vocab"]["d2t"], np.int64)
    sd["t2d"] = np.asarray(drafter.params["vocab"]["t2d"], bool)
    save_file(sd, os.path.join(path, _WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)


def _read_config(path: str) -> dict[str, Any]:
    cfg_path, hf = read_config_json(path, "EAGLE-3 checkpoint")
    if not is_eagle3_config(hf):
        raise CheckpointError(
            f"{cfg_path}: architectures {hf.get('architectures')!r} is not an EAGLE-3 drafter: expected "
            f"[{ARCHITECTURE!r}], or [{EAGLE_TRAINING_ARCHITECTURE!r}] with one of {list(EAGLE3_KEYS)}")
    return hf


def _aux_layers(hf: dict, num_layers: int) -> tuple:
    ec = hf.get("eagle_config") or {}
    if isinstance(ec, dict) and ec.get("eagle_aux_hidden_state_layer_ids"):
        return tuple(int(i) for i in ec["eagle_aux_hidden_state_layer_ids"])  # SGLang: output of layer i
    if hf.get("eagle_aux_hidden_state_layer_ids"):
        return tuple(int(i) - 1 for i in hf["eagle_aux_hidden_state_layer_ids"])  # vLLM: input of layer i
    return e3.default_target_layers(num_layers)


def _rope(hf: dict, where: str):
    rs = dict(hf.get("rope_parameters") or {})
    rs.update(hf.get("rope_scaling") or {})
    theta = float(rs.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rtype = rs.get("rope_type", rs.get("type", "default"))
    if rtype in ("default", None):
        return theta, None
    if rtype != "llama3":
        raise CheckpointError(f"{where}: unsupported rope scaling type {rtype!r} (supported: default, llama3)")
    return theta, RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                              int(rs["original_max_position_embeddings"]))


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    fpath = os.path.join(path, _WEIGHTS)
    if not os.path.isfile(fpath):
        pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
        extra = f" (found {', '.join(pickles)}: pickled files are never loaded)" if pickles else ""
        raise CheckpointError(f"no {_WEIGHTS} in EAGLE-3 checkpoint directory {path}{extra}")
    out = {}
    try:
        with safe_open(fpath, framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    except Exception as e:  # SafetensorError / OSError / unsupported dtype
        raise CheckpointError(f"cannot read safetensors file {fpath}: {type(e).__name__}: {e}") from e
    return out


def load_eagle3_hf(path: str, target) -> Drafter:
    """Reads an HF EAGLE-3 directory into a Drafter for `target` (an `opd.Target`).

    The drafter shares the target's embedding; d2t/t2d come from the checkpoint. Raises
    CheckpointError when the checkpoint does not fit the target (vocabulary or width), or is
    missing, malformed or inconsistent.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"EAGLE-3 checkpoint directory not found: {path}")
    hf = _read_config(path)
    tc = target.config
    try:
        V, D = int(hf["vocab_size"]), int(hf["hidden_size"])
        TD = int(hf.get("target_hidden_size") or D)
        heads = int(hf["num_attention_heads"])
        W = int(hf.get("draft_vocab_size") or V)
        inter = int(hf["intermediate_size"])
        kv = int(hf.get("num_key_value_heads") or heads)
        hd = int(hf.get("head_dim") or D // heads)
    except KeyError as e:
        raise CheckpointError(f"{path}/config.json is missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: invalid value: {e}") from e
    if V != tc.vocab_size:
        raise CheckpointError(f"{path}: EAGLE-3 vocab_size {V} does not match the target's vocab_size {tc.vocab_size}")
    for name, size in (("hidden_size", D), ("target_hidden_size", TD)):
        if size != tc.hidden_size:
            raise CheckpointError(f"{path}: EAGLE-3 {name} {size} does not match the target's hidden_size {tc.hidden_size}")
    if int(hf.get("num_hidden_layers", 1)) != 1:
        raise CheckpointError(f"{path}: only single-layer EAGLE-3 drafters are supported, got num_hidden_layers={hf['num_hidden_layers']}")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{path}: unsupported hidden_act {hf['hidden_act']!r} (only silu)")
    theta, scaling = _rope(hf, path)
    try:
        config = e3.Eagle3Config(
            vocab_size=V, hidden_size=D, num_heads=heads, num_kv_heads=kv, head_dim=hd, intermediate_size=inter,
            target_layers=_aux_layers(hf, tc.num_layers), draft_vocab_size=W, target_hidden_size=TD,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", tc.max_position_embeddings)),
            dtype=tc.dtype, param_dtype=tc.param_dtype,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from e
    for i in config.target_layers:
        if not 0 <= i < tc.num_layers:
            raise CheckpointError(f"{path}: aux hidden layer {i} is out of range for a target with {tc.num_layers} layers")
        if i == tc.num_layers - 1:
            raise CheckpointError(
                f"{path}: aux hidden layer {i} is the target's last layer (L-1 for L={tc.num_layers}); in this layout it "
                f"means the final-normed output hidden_states[{tc.num_layers}], which SGLang / vLLM cannot capture and "
                f"this target does not provide. Use layers 0..{tc.num_layers - 2}")

    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in _read_tensors(path).items()}
    emb = sd.pop("embed_tokens.weight", None)
    if emb is not None and tuple(emb.shape) != (tc.vocab_size, tc.hidden_size):
        raise CheckpointError(
            f"{path}: embed_tokens.weight has shape {tuple(emb.shape)}, the target's embedding is "
            f"({tc.vocab_size}, {tc.hidden_size})"
        )
    expected = e3.hf_tensor_shapes(config)
    for k, shape in expected.items():
        if k not in sd:
            raise CheckpointError(f"{path}: missing tensor {k!r} (expected shape {shape})")
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {shape} from the config")
        if not np.isfinite(np.asarray(sd[k], np.float32)).all():
            raise CheckpointError(f"{path}: tensor {k!r} contains NaN or infinite values")
    d2t, t2d = _vocab_maps(sd, V, W, path)
    unexpected = sorted(set(sd) - set(expected) - {"d2t", "t2d"})
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} in an EAGLE-3 checkpoint")
    params = {
        "eagle": jax.tree.map(jnp.asarray, e3.params_from_hf(config, sd)),
        "vocab": {"d2t": jnp.asarray(d2t), "t2d": jnp.asarray(t2d)},
        "embedding": target.params["embedding"],
    }
    return Drafter(Eagle3Spec(vocab_size=V, config=config), params)


def _vocab_maps(sd: dict, V: int, W: int, path: str):
    """d2t [W] / t2d [V] from the checkpoint, checked for consistency (identity when W == V and
    the checkpoint has neither)."""
    d2t, t2d = sd.get("d2t"), sd.get("t2d")
    if d2t is None:
        if W != V:
            raise CheckpointError(f"{path}: draft_vocab_size {W} < vocab_size {V} but the checkpoint has no 'd2t' map")
        d2t = np.zeros(W, np.int64)
    d2t = np.asarray(d2t)
    if d2t.shape != (W,) or not np.issubdtype(d2t.dtype, np.integer):
        raise CheckpointError(f"{path}: 'd2t' must be an integer [{W}] vector, got {d2t.dtype} {d2t.shape}")
    tid = np.arange(W) + d2t
    if tid.min() < 0 or tid.max() >= V or len(np.unique(tid)) != W:
        raise CheckpointError(f"{path}: 'd2t' does not map draft ids to distinct target ids in [0, {V})")
    derived = np.zeros(V, bool)
    derived[tid] = True
    if t2d is not None:
        t2d = np.asarray(t2d)
        if t2d.shape != (V,):
            raise CheckpointError(f"{path}: 't2d' has shape {t2d.shape}, expected ({V},) (the target vocabulary)")
        if not np.array_equal(t2d.astype(bool), derived):
            raise CheckpointError(f"{path}: 't2d' and 'd2t' disagree on the draft vocabulary")
    return d2t.astype(np.int32), derived
