"""Draft-OPD step cost for SmolLM2-135M-Instruct on this machine: wall time per step (and the
rollout's share), committed rollout tokens/s, the compiled step's memory (XLA memory
analysis) and the process's peak RSS, for the EAGLE-3 and DFlash drafters the SFT warm-up
exported (`experiments/sft_smollm2.py`), at the `experiments/opd_smollm2.py` settings.

  python experiments/benchmarks/opd_step.py --workdir=workdirs/smollm2   # -> experiments/results/opd_step/
  # the decisive experiment's step (from the shipped drafter, the reference preset), in its DIR:
  python experiments/benchmarks/opd_step.py --workdir=workdirs/smollm2_scale --drafters=eagle3 \
      --config_variant=plateau,reference --variants=k3 --name=opd_step_reference
"""

import resource
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from opd.configs import load_config, opd_config
from opd.decoding import batching
from opd.decoding.sampling import SamplingParams
from opd.drafters import load_drafter
from opd.eval.report import markdown_table, write_results
from opd.paths import resolve_path
from opd.target import load_target_from_config
from opd.training import flops, opd_stage, rollout as ro, stage_common

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/smollm2", "workdir with export/sft_<kind> and regenerate/")
_KINDS = flags.DEFINE_list("drafters", ["eagle3", "dflash"], "drafter kinds")
_VARIANTS = flags.DEFINE_list("variants", ["k3", "reverse_kl", "k3+error_anchors"],
                              "loss variants: a divergence, optionally +error_anchors")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps (after one compile step)")
_CONFIG_VARIANT = flags.DEFINE_string("config_variant", "", "more parts of the opd_smollm2.py variant (after the kind)")
_NAME = flags.DEFINE_string("name", "opd_step", "experiments/results/<name>/")
_CONFIG = "experiments/opd_smollm2.py"


def _measure(kind: str, variant: str, workdir: str) -> dict:
    config = load_config(f"{_CONFIG}:{kind}" + (f",{_CONFIG_VARIANT.value}" if _CONFIG_VARIANT.value else ""))
    o = config.opd
    divergence, _, extra = variant.partition("+")
    o.loss.divergence = divergence
    o.loss.error_anchor_weight = 1.0 if extra == "error_anchors" else 0.0
    cfg = opd_config(o)
    target = load_target_from_config(config)
    drafter = load_drafter(resolve_path(o.init, workdir), target)
    trainable, frozen = drafter.split()
    eos = batching.eos_array(batching.resolve_eos(target, None))
    run = opd_stage.build_run(config, drafter.spec, frozen, target.config, num_eos=len(eos))  # the stage's step
    state = run.init_state(trainable, seed=0)
    folders = stage_common.trajectory_folders(o.data, workdir, "opd.data")
    batches = opd_stage.PromptBatches(opd_stage.prompt_records(folders), int(o.prompt_len),
                                       int(o.batch_size) * cfg.accumulate, 0)
    tp, fr = run.place_frozen(target.params, frozen)
    dev = lambda b: {k: jnp.asarray(b[k]) for k in ("tokens", "lengths", "valid")}
    first = dev(next(batches))
    t0 = time.perf_counter()
    compiled = run.step.lower(state, tp, fr, first, eos).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = compiled(state, tp, fr, first, eos)
    jax.block_until_ready(m["loss"])
    times, committed = [], []
    for _ in range(_STEPS.value):
        b = dev(next(batches))
        t0 = time.perf_counter()
        state, m = compiled(state, tp, fr, b, eos)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
        committed.append(float(m["committed_tokens"]))
    # the rollout alone (same shapes), for the step's breakdown
    dparams = jax.device_get(drafter.params)
    roll = jax.jit(lambda tp_, dp_, t, l, k: ro.rollout(
        tp_, dp_, t, l, k, eos, tconfig=target.config, dspec=drafter.spec,
        sp=SamplingParams(cfg.rollout_temperature, 0, 1.0), num_draft_tokens=cfg.num_draft_tokens, num_rounds=cfg.num_rounds,
        cache_len=cfg.cache_len(int(o.prompt_len))).num_accepted_BR)
    jax.block_until_ready(roll(target.params, dparams, b["tokens"], b["lengths"], jax.random.PRNGKey(0)))
    rt = []
    for i in range(_STEPS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(roll(target.params, dparams, b["tokens"], b["lengths"], jax.random.PRNGKey(i + 1)))
        rt.append(time.perf_counter() - t0)
    S = cfg.cache_len(int(o.prompt_len))
    return {
        "drafter": kind, "variant": variant, "batch_size": int(o.batch_size), "prompt_len": int(o.prompt_len),
        "num_rounds": cfg.num_rounds, "num_draft_tokens": cfg.num_draft_tokens, "seq_len": S,
        "step_seconds": float(np.median(times)), "rollout_seconds": float(np.median(rt)),
        "compile_seconds": compile_s, "rollout_tokens_per_s": float(np.sum(committed) / np.sum(times)),
        "rollout_tau": float(m["rollout_tau"]),
        "step_flops": flops.opd_step_flops(drafter.spec, target.config, int(o.batch_size), int(o.prompt_len),
                                           cfg.num_rounds, cfg.num_draft_tokens, S, cfg.loss.error_anchor_weight > 0,
                                           cfg.accumulate),
        "temp_mib": mem.temp_size_in_bytes / 2**20, "argument_mib": mem.argument_size_in_bytes / 2**20,
        "output_mib": mem.output_size_in_bytes / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv):
    rows = []
    for kind in _KINDS.value:
        for variant in _VARIANTS.value:
            r = _measure(kind, variant, _WORKDIR.value)
            print(r, flush=True)
            rows.append(r)
    cols = ("drafter", "variant", "batch_size", "prompt_len", "num_rounds", "num_draft_tokens", "seq_len", "step_seconds",
            "rollout_seconds", "rollout_tokens_per_s", "rollout_tau", "step_flops", "temp_mib", "argument_mib",
            "peak_rss_mib", "compile_seconds")
    write_results(_NAME.value, {"rows": rows}, markdown_table(rows, cols, "{:.3g}"))


if __name__ == "__main__":
    app.run(main)
