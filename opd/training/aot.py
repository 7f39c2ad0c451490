"""Ahead-of-time compile of a launch's train steps without weights or accelerators.

maxtext's `train_compile.py` idea for this project: lower and compile the Draft-OPD step
(`opd_step.make_opd_step`) and the SFT step (`sft.make_train_step`) of a launch config for its
device count (in practice a fake CPU mesh, `--xla_force_host_platform_device_count=N`), with
every input a `jax.ShapeDtypeStruct` carrying its sharding, so that a sharding error or an
out-of-memory plan shows up before a pod is booked. The steps, mesh, optimizer and shardings
are built by the functions the stages call (`sft_stage.mesh_from_config`,
`opd_stage.opd_config`, `optim.make_optimizer`, `sft.make_shardings`,
`checkpoint.abstract_state`, `opd.drafters.init_drafter`), so the check compiles the code a
launch runs. Shapes come from `jax.eval_shape`; nothing is allocated.

Inputs compiled (per step): target params (`transformer.abstract_params` of the config's
`target.preset`), the train state (drafter trainable params + AdamW state + step + PRNG key),
the frozen drafter parts (EAGLE-3's d2t / t2d), the batch and, for OPD, the EOS ids. The
drafter is a fresh one built from `config.drafter.overrides` (a launch that loads a public
drafter must have the same shapes). SFT is compiled with `target_features = "online"`.

Memory per device (`Compiled.memory_analysis()`, bytes):
  argument  inputs (all of the above, each at its shard's size);
  output    outputs (the new train state + metrics);
  alias     output bytes that reuse donated input buffers (the train state is donated);
  temp      XLA's scratch: activations, KV caches, rollout records, gradients;
  generated code  the executable itself (reported, not counted: CPU machine code);
  total = argument + output + temp - alias   (maxtext's convention).
The verdict compares `total` with `config.hbm_gib` (GiB = 2**30 bytes). The numbers come from
XLA:CPU: fusion, scheduling and layouts (TPU pads to (8, 128) tiles) differ on TPU, so they
estimate TPU memory; they are not TPU's own count. In particular XLA:CPU has no bfloat16
matmul: it converts bf16 operands to f32 and can hoist that conversion of a scanned weight
stack out of the layer loop (f32 copies of whole [L, D, F] stacks appear in the HLO with
`param_dtype = "bfloat16"`), so the temp bytes of a plan with bf16 weights are an upper bound
(measured, qwen3-8b DFlash v5p-8: temp 25 GiB with f32 weights, 39 GiB with bf16 ones). A
closer estimate: compile with float32 weights and subtract the weights' bf16 savings.
FLOPs: XLA's `cost_analysis()` of the per-device program counts each loop body (scanned
layers, rollout rounds) once, so it is far below the real count; this project's 2N / 6N
model (`opd.training.flops`, whole step, all devices) is reported beside it.

A reduced target (`num_layers`) keeps the drafter's shapes: its target-layer ids are the
full-size ones mapped into the shorter target (same number of feature layers).
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from opd import sharding as shd
from opd.models.config import TransformerConfig
from opd.target import Target

STEPS = ("opd", "sft")
GIB = 2**30
_MEMORY_FIELDS = ("argument", "output", "temp", "alias", "generated_code")


# ----------------------------------------------------------------------------- abstract inputs


def target_config(config: ml_collections.ConfigDict, num_layers: Optional[int] = None, **overrides) -> TransformerConfig:
    """The launch's target architecture from `config.target.preset` (no weights).

    Args:
      config: a launch config (experiments/pod.py).
      num_layers: a reduced layer count (None: the preset's).
      **overrides: other `TransformerConfig` fields (e.g. smaller widths for tests).
    Raises:
      ValueError: the config names no `target.preset`.
    """
    from opd.models.presets import preset_config

    t = config.target
    if not t.get("preset", ""):
        raise ValueError("config.target.preset is empty: the AOT check needs the target's architecture "
                         "(a key of opd.models.presets.PRESETS, e.g. 'qwen3-8b')")
    kw = dict(dtype=t.dtype, param_dtype=t.get("param_dtype", "float32"), scan_layers=bool(t.scan_layers),
              remat=bool(t.get("remat", False)))
    if num_layers is not None:
        kw["num_layers"] = int(num_layers)
    return preset_config(t.preset, **{**kw, **overrides})


def _layer_overrides(kind: str, overrides: dict, tconfig: TransformerConfig, full: TransformerConfig) -> dict:
    """`overrides` with the drafter's target-layer ids of the full-size target mapped into a
    reduced one (id * L // L_full), so the drafter keeps its number of feature layers."""
    if tconfig.num_layers == full.num_layers:
        return overrides
    if kind == "dflash":
        from opd.drafters.dflash import config_for_target

        ids = config_for_target(Target(full, None), **overrides).target_layer_ids
        key = "target_layer_ids"
        overrides = {k: v for k, v in overrides.items() if k != "num_target_features"}
    else:
        from opd.models.eagle3 import Eagle3Config

        ids, key = Eagle3Config.for_target(full, **overrides).target_layers, "target_layers"
    L, L_full = tconfig.num_layers, full.num_layers
    return {**overrides, key: tuple(min(L - 1, i * L // L_full) for i in ids)}


def abstract_drafter(config: ml_collections.ConfigDict, tconfig: TransformerConfig, full: Optional[TransformerConfig] = None):
    """(spec, trainable, frozen) of a fresh drafter for the target, as the stages build it
    (`init_drafter(kind, target, **config.drafter.overrides)`), under `jax.eval_shape`.

    Args:
      config: the launch config (`drafter.kind`, `drafter.overrides`).
      tconfig: the target's config (possibly reduced).
      full: the full-size target's config (target-layer ids are mapped from it when reduced).
    Returns:
      the `DrafterSpec` and ShapeDtypeStruct trees of `sft.split_drafter_params`.
    """
    from opd.drafters import init_drafter
    from opd.models import transformer as tfm
    from opd.training import sft
    from opd.training.sft_stage import with_param_dtype

    kind = str(config.drafter.kind)
    overrides = dict(config.drafter.overrides) if "overrides" in config.drafter else {}
    overrides = _layer_overrides(kind, overrides, tconfig, full or tconfig)
    target = Target(tconfig, nn.unbox(tfm.abstract_params(tconfig)))
    built = {}

    def init():
        drafter = with_param_dtype(init_drafter(kind, target, seed=0, **overrides),
                                   config.drafter.get("param_dtype", ""))
        built["spec"] = drafter.spec  # static: read back after tracing
        return sft.split_drafter_params(drafter)

    trainable, frozen = jax.eval_shape(init)
    return built["spec"], trainable, frozen


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of each leaf)."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def _count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- compile + measure


def _compile(jitted, args) -> tuple[Any, float, float]:
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def memory(compiled) -> dict:
    """Per-device bytes of `compiled.memory_analysis()` (module docstring) and their total."""
    m = compiled.memory_analysis()
    out = {f: int(getattr(m, f"{f}_size_in_bytes")) for f in _MEMORY_FIELDS}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def xla_flops(compiled) -> Optional[float]:
    """FLOPs of `compiled.cost_analysis()` (per device), None when the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _report(name, mesh, compiled, lower_s, compile_s, args, hbm_gib, **extra) -> dict:
    """One step's report; `args` = (state, target params, frozen drafter parts, batch, ...)."""
    mem = memory(compiled)
    hbm = float(hbm_gib) * GIB
    state, target, _, batch = args[:4]
    return {
        "step": name, "mesh": dict(mesh.shape), "batch": {k: list(v.shape) for k, v in batch.items()},
        "memory_bytes": mem, "total_gib": mem["total"] / GIB, "hbm_gib": float(hbm_gib),
        "hbm_fraction": mem["total"] / hbm, "fits": mem["total"] <= hbm,
        # what the inputs alone hold per device (the argument bytes XLA:CPU reports, unpadded)
        "target_bytes_per_device": bytes_per_device(target),
        "state_bytes_per_device": bytes_per_device(state),  # trainable params + AdamW state (donated)
        "inputs_bytes_per_device": bytes_per_device(args),
        "xla_flops": xla_flops(compiled), "lower_seconds": lower_s, "compile_seconds": compile_s, **extra,
    }


def _abstract_inputs(spec, tconfig, optimizer, sh, frozen):
    """(train state, target params, frozen drafter parts) as sharded ShapeDtypeStructs."""
    from opd.models import transformer as tfm
    from opd.training import checkpoint as ckpt

    state = ckpt.abstract_state(spec, optimizer, sh)
    target = _with_shardings(nn.unbox(tfm.abstract_params(tconfig)), sh.target)
    return state, target, _with_shardings(frozen, sh.drafter_frozen)


def compile_opd(config, tconfig: TransformerConfig, spec, frozen) -> dict:
    """Compiles the Draft-OPD step of `config.opd` (as `opd_stage.stage_opd` builds it)."""
    from opd.training import flops, optim, opd_stage, sft, sft_stage
    from opd.training.opd_step import batch_shardings, make_opd_step

    o = config.opd
    B, P = int(o.batch_size), int(o.prompt_len)
    cfg = opd_stage.opd_config(o)
    if hasattr(spec, "check_num_draft"):
        spec.check_num_draft(cfg.num_draft)
    mesh = sft_stage.stage_mesh(o, "opd")
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config({"total_steps": int(o.num_steps), **dict(o.optimizer)}))
    sh = sft.make_shardings(mesh, spec, tconfig, optimizer)
    state, target, frozen_sds = _abstract_inputs(spec, tconfig, optimizer, sh, frozen)
    bsh = batch_shardings(mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=bsh["tokens"]),
             "lengths": jax.ShapeDtypeStruct((B,), jnp.int32, sharding=bsh["lengths"]),
             "valid": jax.ShapeDtypeStruct((B,), jnp.bool_, sharding=bsh["valid"])}
    eos = jax.ShapeDtypeStruct((max(1, len(tconfig.eos_token_ids)),), jnp.int32, sharding=shd.replicated(mesh))
    args = (state, target, frozen_sds, batch, eos)
    step = make_opd_step(spec, tconfig, optimizer, sh, cfg, P, mesh)
    compiled, lower_s, compile_s = _compile(step, args)
    S = cfg.cache_len(P)
    model_flops = flops.opd_step_flops(spec, tconfig, B, P, cfg.num_rounds, cfg.num_draft, S,
                                       cfg.loss.error_anchor_weight > 0)
    return _report("opd", mesh, compiled, lower_s, compile_s, args, config.hbm_gib, num_rounds=cfg.num_rounds,
                   num_draft=cfg.num_draft, cache_len=S, model_flops=model_flops)


def compile_sft(config, tconfig: TransformerConfig, spec, frozen) -> dict:
    """Compiles the SFT step of `config.sft` with online target features (as `sft_stage.stage_sft`)."""
    from opd.training import flops, optim, sft, sft_stage

    s = config.sft
    B, T = int(s.batch_size), int(s.seq_len)
    mesh = sft_stage.stage_mesh(s, "sft")
    loss_cfg = sft.SFTLossConfig(**dict(s.loss))
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config({"total_steps": int(s.num_steps), **dict(s.optimizer)}))
    sh = sft.make_shardings(mesh, spec, tconfig, optimizer, cached_features=False)
    state, target, frozen_sds = _abstract_inputs(spec, tconfig, optimizer, sh, frozen)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh.batch[k]) for k in ("tokens", "loss_mask")}
    args = (state, target, frozen_sds, batch)
    step = sft.make_train_step(spec, tconfig, optimizer, sh, loss_cfg)
    compiled, lower_s, compile_s = _compile(step, args)
    return _report("sft", mesh, compiled, lower_s, compile_s, args, config.hbm_gib, target_features="online",
                   model_flops=flops.sft_step_flops(spec, tconfig, B, T, loss_cfg.ttt_steps, loss_cfg.num_anchors))


def check(config: ml_collections.ConfigDict, num_layers: Optional[int] = None, steps: Sequence[str] = STEPS,
          **target_overrides) -> dict:
    """AOT-compiles `steps` of a launch config on the devices present; returns the report.

    Args:
      config: a launch config (experiments/pod.py) with `target.preset`, `drafter`, `opd`, `sft`,
        `hbm_gib` (and `slice`, `num_devices`, informational).
      num_layers: compile a reduced target of this many layers (None: the preset's).
      steps: a subset of ("opd", "sft").
      **target_overrides: other `TransformerConfig` fields of the target (tests: smaller widths).
    Returns:
      {"slice", "num_devices", "platform", "target", "drafter", "steps": {name: report}}; a step's
      report holds its mesh, batch shapes, `memory_bytes` (module docstring), `total_gib`,
      `fits`, the per-device bytes of its inputs, FLOPs and lower / compile seconds.
    Raises:
      ValueError: no target.preset, an unknown step, a mesh that does not fit the devices, a
        batch size not divisible by data x fsdp, a num_draft above a DFlash drafter's
        block_size - 1 (all before anything is compiled).
    """
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"steps must be a non-empty subset of {STEPS}, got {list(steps)}")
    from opd.training import sft_stage

    tconfig = target_config(config, num_layers, **target_overrides)
    full = target_config(config, None, **target_overrides)
    for name in steps:  # every check before the first (slow) compile
        sft_stage.stage_mesh(config[name], name)
    spec, trainable, frozen = abstract_drafter(config, tconfig, full)
    if "opd" in steps and hasattr(spec, "check_num_draft"):
        spec.check_num_draft(int(config.opd.num_draft))
    from opd.models import transformer as tfm

    report = {
        "slice": config.get("slice", ""), "num_devices": jax.device_count(),
        "config_num_devices": config.get("num_devices", None), "platform": jax.devices()[0].platform,
        "target": {"preset": config.target.preset, "num_layers": tconfig.num_layers,
                   "full_num_layers": full.num_layers, "dtype": tconfig.dtype, "param_dtype": tconfig.param_dtype,
                   "scan_layers": tconfig.scan_layers, "params": _count(nn.unbox(tfm.abstract_params(tconfig))),
                   **({"overrides": {k: str(v) for k, v in target_overrides.items()}} if target_overrides else {})},
        "drafter": {"kind": spec.kind, "overrides": dict(config.drafter.get("overrides", {})),
                    "target_layers": list(spec.target_hidden_layers), "trainable_params": _count(trainable)},
        "steps": {},
    }
    compilers = {"opd": compile_opd, "sft": compile_sft}
    for name in steps:
        report["steps"][name] = compilers[name](config, tconfig, spec, frozen)
    return report


# ----------------------------------------------------------------------------- tables

TABLE_COLUMNS = ("step", "layers", "mesh", "batch", "argument GiB", "output GiB", "temp GiB", "alias GiB",
                 "total GiB", "HBM GiB", "fits", "compile s")


def table_rows(report: dict, name: str = "") -> list[dict]:
    """One markdown row per compiled step of a `check` report."""
    rows = []
    t = report["target"]
    for step, r in report["steps"].items():
        m, g = r["memory_bytes"], lambda b: b / GIB
        rows.append({
            "config": name, "step": step, "layers": f"{t['num_layers']}/{t['full_num_layers']}",
            "mesh": "x".join(str(v) for v in r["mesh"].values()),
            "batch": "x".join(str(v) for v in r["batch"]["tokens"]),
            "argument GiB": g(m["argument"]), "output GiB": g(m["output"]), "temp GiB": g(m["temp"]),
            "alias GiB": g(m["alias"]), "total GiB": g(m["total"]), "HBM GiB": r["hbm_gib"],
            "fits": f"{'yes' if r['fits'] else 'NO'} ({100 * r['hbm_fraction']:.0f}%)",
            "compile s": r["lower_seconds"] + r["compile_seconds"],
        })
    return rows
