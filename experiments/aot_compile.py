"""Ahead-of-time compile of a pod launch's Draft-OPD and SFT steps: per-device memory and a fit
verdict before booking the slice (no TPU, no weights; `opd.training.aot`).

  python experiments/aot_compile.py --config=experiments/pod.py:qwen3_8b,dflash,v5p-8 --tpu
  python experiments/aot_compile.py --config=experiments/pod.py:qwen3_8b,dflash,v5p-32
  python experiments/aot_compile.py --config=experiments/pod.py:llama31_8b,eagle3,v5p-8 --num_layers=4 --steps=opd

--tpu compiles with the TPU compiler for the slice's topology (`config.tpu_topology`, from
libtpu: `pip install "jax[tpu]"`; no TPU needed): TPU's own memory plan. Without it the steps
compile for fake CPU devices: XLA:CPU's memory analysis of the partitioned per-device program,
an estimate of TPU memory, not TPU's own count.

Writes experiments/results/aot/<name>.json (the report + command, commit, machine) and
<name>.md (the table), prints the table, and rewrites experiments/results/aot/summary.md from
every report in that folder.

JAX_PLATFORMS=cpu and (without --tpu) XLA_FLAGS=--xla_force_host_platform_device_count=N are set at the top of
this file, before jax is imported, when --num_devices is on the command line; without it N is
the config's `num_devices`, set in main() once the config is read (loading the config imports
jax but starts no backend; the device count is checked).
"""

import os
import re
import sys


def _set_devices(n: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags_ = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags_} --xla_force_host_platform_device_count={n}".strip()


os.environ["JAX_PLATFORMS"] = "cpu"
_N = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--num_devices=")]
if _N:
    _set_devices(int(_N[-1]))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "launch config, e.g. experiments/pod.py:qwen3_8b,dflash,v5p-8",
                                          lock_config=True)
_TPU = flags.DEFINE_bool("tpu", False, "compile with the TPU compiler for config.tpu_topology (libtpu, no TPU "
                          "attached) instead of for fake CPU devices")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "fake CPU devices (default: config.num_devices)")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", None, "compile a reduced target of this many layers")
_STEPS = flags.DEFINE_list("steps", ["opd", "sft"], "steps to compile: opd, sft")
_NAME = flags.DEFINE_string("name", None, "results name (default: from the variant and --num_layers)")
_HOIST = flags.DEFINE_bool("hoist_invariants", True, "let XLA:CPU hoist loop invariants out of the layer loop; "
                            "--nohoist_invariants keeps its f32 copies of bf16 weight stacks out of the estimate "
                            "(see opd/training/aot.py)")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "default experiments/results/aot/")
_SET = flags.DEFINE_multi_string("set", [], "what-if: set or add a config field, KEY=VALUE (a Python literal, else a "
                                 "string), e.g. --set=target.param_dtype=bfloat16; --config.KEY=VALUE only sets existing ones")

NO_HOIST_FLAG = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "aot")


def _default_name(config_arg: str, num_layers, tpu: bool = False) -> str:
    variant = config_arg.split(":", 1)[1] if ":" in config_arg else os.path.basename(config_arg)
    return variant.replace(",", "_") + (f"_L{num_layers}" if num_layers else "") + ("_tpu" if tpu else "")


def _write_summary(results: str) -> str:
    """summary.md: one table of every report in `results`."""
    import json

    from opd.eval.report import markdown_table
    from opd.training import aot

    rows = []
    for f in sorted(os.listdir(results)):
        if f.endswith(".json"):
            with open(os.path.join(results, f)) as fh:
                rows += aot.table_rows(json.load(fh)["report"], f[:-5])
    path = os.path.join(results, "summary.md")
    with open(path, "w") as fh:
        fh.write("# AOT compile plans (per-device memory)\n\n"
                 "total = argument + output + temp - alias (opd.training.aot); `layers` = compiled / full; "
                 "`compiler`: tpu = libtpu's TPU compiler for the slice's topology (TPU's own plan), cpu = "
                 "fake CPU devices (XLA:CPU's estimate); one row per <name>.json here (`whatif_*`: the launch "
                 "config with the changes in its title / command).\n\n")
        fh.write(markdown_table(rows, ("config",) + aot.TABLE_COLUMNS))
    return path


def _apply_sets(config, sets):
    """A copy of `config` with each KEY=VALUE of --set applied (missing fields are added)."""
    import ast
    import copy

    from opd import configs

    config = copy.deepcopy(config)
    with config.unlocked():
        for item in sets:
            key, _, value = item.partition("=")
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            configs.set_path(config, key, value)
    return config


def main(argv):
    del argv
    import json

    config = _apply_sets(_CONFIG.value, _SET.value)
    n = _NUM_DEVICES.value or int(config.num_devices)
    if _TPU.value and (_N or not _HOIST.value):
        raise ValueError("--tpu compiles for the slice's TPU topology: --num_devices and --nohoist_invariants "
                         "are for the fake CPU devices")
    if not _N and not _TPU.value:
        _set_devices(n)  # before the first backend call
    if not _HOIST.value:  # also read when the backend starts
        os.environ["XLA_FLAGS"] += " " + NO_HOIST_FLAG
    import jax

    from opd.eval.report import markdown_table, provenance
    from opd.training import aot

    devices = aot.tpu_devices(str(config.tpu_topology)) if _TPU.value else jax.devices()
    if len(devices) != n:
        raise RuntimeError(f"{len(devices)} devices, wanted {n}: " + (
            f"config.tpu_topology {config.tpu_topology!r} has another chip count than config.num_devices" if _TPU.value
            else "the JAX backend started before XLA_FLAGS was set"))
    config_arg = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config="))
    name = _NAME.value or _default_name(config_arg, _NUM_LAYERS.value, _TPU.value)
    report = aot.check(config, num_layers=_NUM_LAYERS.value, steps=_STEPS.value, devices=devices)
    rows = aot.table_rows(report, name)
    table = markdown_table(rows, aot.TABLE_COLUMNS)
    print(table)
    results = _OUT_DIR.value or RESULTS
    os.makedirs(results, exist_ok=True)
    prov = provenance()
    with open(os.path.join(results, f"{name}.json"), "w") as f:
        json.dump({"config": config_arg, "set": _SET.value, "hoist_invariants": None if _TPU.value else _HOIST.value, "report": report, "provenance": prov,
                   "launch_config": json.loads(config.to_json_best_effort())}, f, indent=2)
    t, d = report["target"], report["drafter"]
    with open(os.path.join(results, f"{name}.md"), "w") as f:
        f.write(f"# AOT compile: {config_arg}{''.join(' --set=' + x for x in _SET.value)}\n\n")
        where = (f"{report['num_devices']} {report['device_kind']} devices of topology {config.tpu_topology} "
                 "(libtpu's compiler, no TPU attached)" if _TPU.value else f"{report['num_devices']} fake {report['platform']} devices")
        f.write(f"Target {t['preset']} ({t['num_layers']} of {t['full_num_layers']} layers, {t['params'] / 1e9:.2f} B "
                f"params, dtype {t['dtype']}, param_dtype {t['param_dtype']}); drafter {d['kind']} "
                f"({d['trainable_params'] / 1e6:.0f} M trainable, target layers {d['target_layers']}); {where}"
                f"{'' if _HOIST.value else '; XLA:CPU loop-invariant code motion off (' + NO_HOIST_FLAG + ')'}.\n\n{table}\n")
        f.write("Per device; total = argument + output + temp - alias; GiB = 2^30 bytes. " + (
            "The TPU compiler's own memory plan for these devices.\n\n" if _TPU.value else
            "XLA:CPU's memory analysis estimates TPU memory (fusion, scheduling and tiling differ; bf16 weights are "
            "upcast to f32 on CPU, so their temp is an upper bound: see opd/training/aot.py).\n\n"))
        for step, r in report["steps"].items():
            xf = f"{r['xla_flops']:.3g}" if r["xla_flops"] is not None else "n/a"
            f.write(f"- {step}: batch {r['batch']}; XLA FLOPs per device {xf} (loop bodies may count once), "
                    f"model FLOPs per step (global) {r['model_flops']:.3g}; inputs {r['inputs_bytes_per_device'] / 2**30:.2f} GiB "
                    f"per device (target {r['target_bytes_per_device'] / 2**30:.2f}, train state "
                    f"{r['state_bytes_per_device'] / 2**30:.2f}); lower {r['lower_seconds']:.1f} s, compile "
                    f"{r['compile_seconds']:.1f} s\n")
        f.write(f"\nCommand: `{prov['command']}`  \nCommit: `{prov['git_commit']}`{' (dirty)' if prov['git_dirty'] else ''}  \n"
                f"Machine: {prov['machine']['platform']}, {prov['machine']['cpu_count']} CPUs, jax {prov['machine']['jax']}  \n"
                f"Date: {prov['date_utc']}\n")
    print(f"wrote {os.path.join(results, name)}.{{json,md}}; {_write_summary(results)}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
