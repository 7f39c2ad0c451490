"""Draft-OPD step cost for SmolLM2-135M-Instruct on this machine: wall time per step (and the
rollout's share), committed rollout tokens/s, the compiled step's memory (XLA memory
analysis) and the process's peak RSS, for the EAGLE-3 and DFlash drafters the SFT warm-up
exported (`experiments/sft_smollm2.py`), at the `experiments/opd_smollm2.py` settings.

  python experiments/benchmarks/opd_step.py --workdir=workdirs/smollm2   # -> experiments/results/opd_step/
"""

import resource
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/smollm2", "workdir with export/sft_<kind> and regenerate/")
_KINDS = flags.DEFINE_list("drafters", ["eagle3", "dflash"], "drafter kinds")
_VARIANTS = flags.DEFINE_list("variants", ["k3", "reverse_kl", "k3+error_anchors"],
                              "loss variants: a divergence, optionally +error_anchors")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps (after one compile step)")


def _opd_config(kind: str):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "opd_smollm2.py")
    spec = importlib.util.spec_from_file_location("opd_smollm2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(kind)


def _measure(kind: str, variant: str, workdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from opd.checkpoints.drafters import load_drafter
    from opd.decoding import batching
    from opd.decoding.sampling import SamplingParams
    from opd.pipeline import load_target_from_config
    from opd.training import flops, optim, opd_stage, rollout as ro, sft, sft_stage
    from opd.training.opd_step import make_opd_step

    config = _opd_config(kind)
    o = config.opd
    divergence, _, extra = variant.partition("+")
    with o.unlocked():
        o.loss.divergence = divergence
        o.loss.error_anchor_weight = 1.0 if extra == "error_anchors" else 0.0
    cfg = opd_stage.opd_config(o)
    target = load_target_from_config(config)
    drafter = load_drafter(sft_stage.resolve(o.init, workdir), target)
    mesh = sft_stage.mesh_from_config(o.mesh)
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config({"total_steps": 100, **dict(o.optimizer)}))
    sh = sft.make_shardings(mesh, drafter.spec, target.config, optimizer)
    trainable, frozen = sft.split_drafter_params(drafter)
    state = sft.init_train_state(trainable, optimizer, sh, seed=0)
    folders = sft_stage.trajectory_folders(config, workdir)
    batches = opd_stage.PromptBatches(opd_stage.prompt_records(folders), int(o.prompt_len), int(o.batch_size), 0)
    eos = batching.eos_array(batching.resolve_eos(target, None))
    step = make_opd_step(drafter.spec, target.config, optimizer, sh, cfg, int(o.prompt_len), mesh)
    tp = jax.device_put(target.params, sh.target)
    fr = jax.device_put(frozen, sh.drafter_frozen)
    dev = lambda b: {k: jnp.asarray(b[k]) for k in ("tokens", "lengths", "valid")}
    first = dev(next(batches))
    t0 = time.perf_counter()
    compiled = step.lower(state, tp, fr, first, eos).compile()
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
        sp=SamplingParams(cfg.rollout_temperature, 0, 1.0), num_draft=cfg.num_draft, num_rounds=cfg.num_rounds,
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
        "num_rounds": cfg.num_rounds, "num_draft": cfg.num_draft, "seq_len": S,
        "step_seconds": float(np.median(times)), "rollout_seconds": float(np.median(rt)),
        "compile_seconds": compile_s, "rollout_tokens_per_s": float(np.sum(committed) / np.sum(times)),
        "rollout_tau": float(m["rollout_tau"]),
        "step_flops": flops.opd_step_flops(drafter.spec, target.config, int(o.batch_size), int(o.prompt_len),
                                           cfg.num_rounds, cfg.num_draft, S, cfg.loss.error_anchor_weight > 0),
        "temp_mib": mem.temp_size_in_bytes / 2**20, "argument_mib": mem.argument_size_in_bytes / 2**20,
        "output_mib": mem.output_size_in_bytes / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv):
    from opd.eval.report import markdown_table, write_results

    rows = []
    for kind in _KINDS.value:
        for variant in _VARIANTS.value:
            r = _measure(kind, variant, _WORKDIR.value)
            print(r, flush=True)
            rows.append(r)
    cols = ("drafter", "variant", "batch_size", "prompt_len", "num_rounds", "num_draft", "seq_len", "step_seconds",
            "rollout_seconds", "rollout_tokens_per_s", "rollout_tau", "step_flops", "temp_mib", "argument_mib",
            "peak_rss_mib", "compile_seconds")
    write_results("opd_step", {"rows": rows}, markdown_table(rows, cols, "{:.3g}"))


if __name__ == "__main__":
    app.run(main)
