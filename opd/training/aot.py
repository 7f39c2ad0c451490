"""Ahead-of-time compile of a launch's train steps without weights or accelerators.

maxtext's `train_compile.py` idea for this project: lower and compile the Draft-OPD step and
the SFT step of a launch config for its device count, with every input a `jax.ShapeDtypeStruct`
carrying its sharding, so that a sharding error or an out-of-memory plan shows up before a pod
is booked. The steps are built by the stages' own `build_run` (`opd.training.run`), so the
check compiles exactly the program a launch runs (tests/training/test_aot.py compares the two
lowered programs). Shapes come from `jax.eval_shape`; nothing is allocated.

Two compilers, the same program:
  TPU  `tpu_devices(config.tpu_topology)`: the slice's devices as libtpu describes them (e.g.
       "v5p:2x2x1"), no TPU attached (`pip install "jax[tpu]"`, JAX_PLATFORMS=cpu is fine). The
       TPU compiler itself plans the memory: TPU's own count, Pallas kernels compiled by Mosaic.
  CPU  a fake CPU mesh (`--xla_force_host_platform_device_count=N`): no libtpu needed, but an
       estimate (below).

Inputs compiled (per step): target params (`transformer.abstract_params` of the config's
`target.preset`), the train state (drafter trainable params + AdamW state + step + PRNG key),
the frozen drafter parts (EAGLE-3's d2t / t2d), the batch and, for OPD, the EOS ids. The
drafter is a fresh one built from `config.drafter.overrides` (a launch that loads a public
drafter must have the same shapes).

Memory per device (`Compiled.memory_analysis()`, bytes):
  argument  inputs (all of the above, each at its shard's size);
  output    outputs (the new train state + metrics);
  alias     output bytes that reuse donated input buffers (the train state is donated);
  temp      XLA's scratch: activations, KV caches, rollout records, gradients;
  generated code  the executable itself (reported, not counted: CPU machine code);
  total = argument + output + temp - alias   (maxtext's convention).
The verdict compares `total` with `config.hbm_gib` (GiB = 2**30 bytes). On the CPU mesh the
numbers come from XLA:CPU: fusion, scheduling and layouts (TPU pads to (8, 128) tiles) differ on TPU, so they
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
import os
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from opd.configs import opd_config, stage_mesh
from opd.drafters import registry
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig
from opd.models.presets import preset_config
from opd.target import Target
from opd.training import flops, opd_stage, sft_stage

STEPS = ("opd", "sft")
GIB = 2**30
_MEMORY_FIELDS = ("argument", "output", "temp", "alias", "generated_code")


# ----------------------------------------------------------------------------- abstract inputs


def tpu_devices(topology: str) -> list:
    """The devices of a TPU slice as libtpu describes them (`topology`, e.g. "v5p:2x2x1" for a
    v5p-8, "v6e:2x4" for a v6e-8): compile targets, no TPU attached.

    Raises:
      ValueError: an empty topology; RuntimeError: libtpu is not installed or rejects the name.
    """
    if not topology:
        raise ValueError("config.tpu_topology is empty: set it to libtpu's name of the slice, e.g. 'v5p:2x2x1' "
                         "(experiments/pod.py sets it per slice)")
    from jax.experimental import topologies

    # several processes may hold libtpu to compile (tests, plans side by side): no chip is opened
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # read when libtpu loads
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:
        raise RuntimeError(f"no TPU topology {topology!r} from libtpu ({type(e).__name__}: {e}); compiling for a TPU "
                           "on this host needs libtpu: pip install 'jax[tpu]' (libtpu matching jax "
                           f"{jax.__version__})") from e


def target_config(config: ml_collections.ConfigDict, num_layers: Optional[int] = None, **overrides) -> TransformerConfig:
    """The launch's target architecture from `config.target.preset` (no weights).

    Args:
      config: a launch config (experiments/pod.py).
      num_layers: a reduced layer count (None: the preset's).
      **overrides: other `TransformerConfig` fields (e.g. smaller widths for tests).
    Raises:
      ValueError: the config names no `target.preset`.
    """
    t = config.target
    if not t.preset:
        raise ValueError("config.target.preset is empty: the AOT check needs the target's architecture "
                         "(a key of opd.models.presets.PRESETS, e.g. 'qwen3-8b')")
    kw = dict(dtype=t.dtype, param_dtype=t.param_dtype, scan_layers=bool(t.scan_layers), remat=bool(t.remat))
    if num_layers is not None:
        kw["num_layers"] = int(num_layers)
    return preset_config(t.preset, **{**kw, **overrides})


def abstract_drafter(config: ml_collections.ConfigDict, tconfig: TransformerConfig, full: Optional[TransformerConfig] = None):
    """(spec, trainable, frozen) of a fresh drafter for the target, as the stages build it
    (`init_drafter(kind, target, **config.drafter.overrides)`), under `jax.eval_shape`.

    Args:
      config: the launch config (`drafter.kind`, `drafter.overrides`).
      tconfig: the target's config (possibly reduced).
      full: the full-size target's config (the kind maps its overrides into a reduced target).
    Returns:
      the `DrafterSpec` and ShapeDtypeStruct trees of `DrafterSpec.split_params`.
    """
    kind = registry.get_kind(str(config.drafter.kind))
    overrides = kind.scaled_overrides(dict(config.drafter.overrides), full or tconfig, tconfig)
    target = Target(tconfig, nn.unbox(tfm.abstract_params(tconfig)))
    built = {}

    # a kind that picks a draft vocabulary from the data gets placeholder counts (same shapes)
    counts = {"token_counts": np.zeros(tconfig.vocab_size)} if kind.uses_token_counts else {}

    def init():
        drafter = kind.init(target, seed=0, **counts, **overrides).with_param_dtype(config.drafter.param_dtype)
        built["spec"] = drafter.spec  # static: read back after tracing
        return drafter.split()

    trainable, frozen = jax.eval_shape(init)
    return built["spec"], trainable, frozen


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of each leaf)."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- compile + measure


def _compile(run) -> tuple[Any, float, float]:
    t0 = time.perf_counter()
    lowered = run.lower()
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


def _report(name, run, compiled, lower_s, compile_s, hbm_gib, **extra) -> dict:
    """One step's report from its `TrainRun` and compiled program."""
    mem = memory(compiled)
    hbm = float(hbm_gib) * GIB
    state, target = run.abstract_args()[:2]
    return {
        "step": name, "mesh": dict(run.mesh.shape), "batch": {k: list(v.shape) for k, v in run.batch.items()},
        "memory_bytes": mem, "total_gib": mem["total"] / GIB, "hbm_gib": float(hbm_gib),
        "hbm_fraction": mem["total"] / hbm if hbm else float("nan"), "fits": mem["total"] <= hbm,
        # what the inputs alone hold per device (the argument bytes XLA:CPU reports, unpadded)
        "target_bytes_per_device": bytes_per_device(target),
        "state_bytes_per_device": bytes_per_device(state),  # trainable params + AdamW state (donated)
        "inputs_bytes_per_device": bytes_per_device(run.abstract_args()),
        "xla_flops": xla_flops(compiled), "lower_seconds": lower_s, "compile_seconds": compile_s, **extra,
    }


def build(step: str, config, tconfig: TransformerConfig, spec, frozen, devices=None):
    """The `TrainRun` of one step on `devices` (default: those present), built by the stage's own
    `build_run` (module docstring)."""
    if step == "sft":
        return sft_stage.build_run(config, spec, frozen, tconfig, devices=devices)
    return opd_stage.build_run(config, spec, frozen, tconfig, num_eos=len(tconfig.eos_token_ids), devices=devices)


def compile_opd(config, tconfig: TransformerConfig, spec, frozen, devices=None) -> dict:
    """Compiles the Draft-OPD step of `config.opd` (`opd_stage.build_run`, as the stage)."""
    run = build("opd", config, tconfig, spec, frozen, devices)
    compiled, lower_s, compile_s = _compile(run)
    o, cfg = config.opd, opd_config(config.opd)
    B, P = int(o.batch_size), int(o.prompt_len)
    S = cfg.cache_len(P)
    model_flops = flops.opd_step_flops(spec, tconfig, B, P, cfg.num_rounds, cfg.num_draft_tokens, S,
                                       cfg.loss.error_anchor_weight > 0, cfg.accumulate)
    return _report("opd", run, compiled, lower_s, compile_s, config.hbm_gib, num_rounds=cfg.num_rounds,
                   num_draft_tokens=cfg.num_draft_tokens, cache_len=S, model_flops=model_flops)


def compile_sft(config, tconfig: TransformerConfig, spec, frozen, devices=None) -> dict:
    """Compiles the SFT step of `config.sft` (`sft_stage.build_run`, as the stage)."""
    run = build("sft", config, tconfig, spec, frozen, devices)
    compiled, lower_s, compile_s = _compile(run)
    s = config.sft
    loss_cfg = registry.get_kind(spec.kind).loss_config(s.loss)
    cached = s.target_features == "cache"
    return _report("sft", run, compiled, lower_s, compile_s, config.hbm_gib, target_features=str(s.target_features),
                   model_flops=flops.sft_step_flops(spec, tconfig, int(s.batch_size), int(s.seq_len), loss_cfg, cached))


def check(config: ml_collections.ConfigDict, num_layers: Optional[int] = None, steps: Sequence[str] = STEPS,
          devices: Optional[Sequence[Any]] = None, **target_overrides) -> dict:
    """AOT-compiles `steps` of a launch config for `devices`; returns the report.

    Args:
      config: a launch config (experiments/pod.py) with `target.preset`, `drafter`, `opd`, `sft`,
        `hbm_gib` (and `slice`, `num_devices`, informational).
      num_layers: compile a reduced target of this many layers (None: the preset's).
      steps: a subset of ("opd", "sft").
      devices: the devices to compile for (default: those present; `tpu_devices(config.tpu_topology)`
        for the TPU compiler).
      **target_overrides: other `TransformerConfig` fields of the target (tests: smaller widths).
    Returns:
      {"slice", "num_devices", "platform", "target", "drafter", "steps": {name: report}}; a step's
      report holds its mesh, batch shapes, `memory_bytes` (module docstring), `total_gib`,
      `fits`, the per-device bytes of its inputs, FLOPs and lower / compile seconds.
    Raises:
      ValueError: no target.preset, an unknown step, a mesh that does not fit the devices, a
        batch size not divisible by data x fsdp, a num_draft_tokens above the drafter's
        limit (e.g. a DFlash block_size - 1), all before anything is compiled.
    """
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"steps must be a non-empty subset of {STEPS}, got {list(steps)}")
    tconfig = target_config(config, num_layers, **target_overrides)
    full = target_config(config, None, **target_overrides)
    devices = list(jax.devices() if devices is None else devices)
    for name in steps:  # every check before the first (slow) compile
        stage_mesh(config[name], name, devices)
    spec, trainable, frozen = abstract_drafter(config, tconfig, full)
    if "opd" in steps:
        spec.check_num_draft_tokens(int(config.opd.num_draft_tokens))
    report = {
        "slice": config.slice, "num_devices": len(devices), "config_num_devices": config.num_devices,
        "platform": devices[0].platform, "device_kind": devices[0].device_kind,
        "target": {"preset": config.target.preset, "num_layers": tconfig.num_layers,
                   "full_num_layers": full.num_layers, "dtype": tconfig.dtype, "param_dtype": tconfig.param_dtype,
                   "scan_layers": tconfig.scan_layers, "params": flops.count_params(nn.unbox(tfm.abstract_params(tconfig))),
                   **({"overrides": {k: str(v) for k, v in target_overrides.items()}} if target_overrides else {})},
        "drafter": {"kind": spec.kind, "overrides": dict(config.drafter.overrides),
                    "target_layers": list(spec.target_hidden_layers), "trainable_params": flops.count_params(trainable)},
        "steps": {},
    }
    compilers = {"opd": compile_opd, "sft": compile_sft}
    for name in steps:
        report["steps"][name] = compilers[name](config, tconfig, spec, frozen, devices)
    return report


# ----------------------------------------------------------------------------- tables

TABLE_COLUMNS = ("step", "compiler", "layers", "mesh", "batch", "argument GiB", "output GiB", "temp GiB", "alias GiB",
                 "total GiB", "HBM GiB", "fits", "compile s")


def table_rows(report: dict, name: str = "") -> list[dict]:
    """One markdown row per compiled step of a `check` report."""
    rows = []
    t = report["target"]
    for step, r in report["steps"].items():
        m, g = r["memory_bytes"], lambda b: b / GIB
        rows.append({
            "config": name, "step": step, "compiler": report.get("platform", "cpu"), "layers": f"{t['num_layers']}/{t['full_num_layers']}",
            "mesh": "x".join(str(v) for v in r["mesh"].values()),
            "batch": "x".join(str(v) for v in r["batch"]["tokens"]),
            "argument GiB": g(m["argument"]), "output GiB": g(m["output"]), "temp GiB": g(m["temp"]),
            "alias GiB": g(m["alias"]), "total GiB": g(m["total"]), "HBM GiB": r["hbm_gib"],
            "fits": f"{'yes' if r['fits'] else 'NO'} ({100 * r['hbm_fraction']:.0f}%)",
            "compile s": r["lower_seconds"] + r["compile_seconds"],
        })
    return rows
