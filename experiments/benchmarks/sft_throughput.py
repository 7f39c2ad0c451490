"""SFT throughput of the EAGLE-3 and DFlash drafters on SmolLM2-135M-Instruct, side by side in
one process: supervised predictions per second, the step's model GFLOP/s, and this CPU's own
float32 matmul GFLOP/s (the peak those are compared with).

  python experiments/benchmarks/sft_throughput.py          # -> experiments/results/sft_throughput/

A supervised prediction is one (position, draft offset) pair with a loss term (`LossOut.supervised`:
EAGLE-3's TTT steps, DFlash's anchored block offsets). Step variants (`VARIANTS`) are the SFT
steps being compared; "today" is the step of `experiments/sft_smollm2.py` (cached target
features, rows padded to seq_len, one sequence per row). Each variant is built by the run
builder the SFT stage uses (`opd.training.run.sft_run`); compile time is excluded, the step
time is the median over `--steps` timed steps.

Rows: prompts of AlpacaEval's train split through SmolLM2's chat template, each followed by an
answer of uniform random length in [--min_answer, --max_answer] (random tokens: throughput does
not depend on their identity), loss mask on the answer; the target's features are computed once,
outside the timing, as the feature cache would hold them.
"""

import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from opd.configs import load_config
from opd.data.assets import asset_path
from opd.data.regenerate import training_prompts
from opd.data.splits import record_text
from opd.decoding import batching
from opd.drafters import registry
from opd.eval.report import markdown_table, write_results
from opd.models import transformer as tfm
from opd.target import load_target
from opd.training import flops, optim
from opd.training import run as run_mod

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_KINDS = flags.DEFINE_list("drafters", ["eagle3", "dflash"], "drafter kinds")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per variant (after one compile step)")
_MIN_ANSWER = flags.DEFINE_integer("min_answer", 64, "shortest answer (tokens)")
_MAX_ANSWER = flags.DEFINE_integer("max_answer", 256, "longest answer (tokens)")
_OUT = flags.DEFINE_string("name", "sft_throughput", "results name (experiments/results/<name>/)")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "experiments", "sft_smollm2.py")


def today(config):
    """The step of experiments/sft_smollm2.py as it is (the baseline)."""
    return config


def anchors(n: int):
    """Today's step with `n` DFlash anchors per row (the context K/V is shared by a row's
    blocks; SpecForge's example configs use 512). Other kinds: unchanged."""

    def variant(config):
        if config.drafter.kind == "dflash":
            config.sft.loss.num_anchors = n
        return config

    return variant


# name -> (config -> the config of that variant's step); "today" is the baseline of every ratio
VARIANTS = {"today": today, "dflash_anchors_32": anchors(32), "dflash_anchors_128": anchors(128)}
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "step variants to measure")


def matmul_peak_gflops(repeats: int = 5) -> dict:
    """This CPU's float32 matmul GFLOP/s (best of `repeats`) at SFT-like and square shapes."""
    out = {}
    for m, k, n in ((2560, 576, 8192), (2048, 2048, 2048)):
        a = jnp.ones((m, k), jnp.float32)
        b = jnp.ones((k, n), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()
        best = min(_seconds(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    return out


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rows(target, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """tokens / loss_mask [B, T] (module docstring)."""
    rs = np.random.RandomState(seed)
    prompts = batching.encode_prompts(target, [record_text(r) for r in training_prompts("alpacaeval", batch_size)])
    tokens = np.zeros((batch_size, seq_len), np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    for b, p in enumerate(prompts):
        p = p[: seq_len // 2]
        n = min(seq_len - len(p), int(rs.randint(_MIN_ANSWER.value, _MAX_ANSWER.value + 1)))
        tokens[b, : len(p)] = p
        tokens[b, len(p): len(p) + n] = rs.randint(0, target.config.vocab_size, n)
        mask[b, len(p): len(p) + n] = 1
    return {"tokens": tokens, "loss_mask": mask}


def measure(target, kind: str, variant: str) -> dict:
    config = VARIANTS[variant](load_config(f"{CONFIG}:{kind}"))
    s = config.sft
    B, T = int(s.batch_size), int(s.seq_len)
    plugin = registry.get_kind(kind)
    drafter = plugin.init(target, seed=0, **dict(config.drafter.overrides))
    trainable, frozen = drafter.split()
    loss_cfg = plugin.loss_config(s.loss)
    cached = s.target_features == "cache"
    run = run_mod.sft_run(drafter.spec, frozen, target.config, mesh=run_mod.make_mesh(-1, 1, 1, B),
                          optimizer=optim.make_optimizer(optim.OptimConfig.from_config({"total_steps": 1000,
                                                                                        **dict(s.optimizer)})),
                          loss_config=loss_cfg, batch_size=B, seq_len=T, cached_features=cached)
    batch = _rows(target, B, T)
    if cached:  # the feature cache's arrays (float32 here; the cache may store float16)
        out = tfm.forward(target.params, target.config, jnp.asarray(batch["tokens"]),
                          hidden_layers=drafter.spec.target_hidden_layers)
        batch["aux"] = np.asarray(jnp.stack(out.aux_hidden, axis=2))
        if drafter.spec.needs_final_hidden:
            batch["final"] = np.asarray(out.hidden_BTD)
    assert set(batch) == set(run.batch), (set(batch), set(run.batch))  # the step's own batch keys
    placed = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, run.shardings.batch)
    tp, fr = run.place_frozen(target.params, frozen)
    state = run.init_state(trainable)
    t0 = time.perf_counter()
    state, m = run(state, tp, fr, placed)  # compile + one step
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    times, supervised = [], []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, m = run(state, tp, fr, placed)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
        supervised.append(float(m["supervised"]))
    step_s = float(np.median(times))
    step_flops = flops.sft_step_flops(drafter.spec, target.config, B, T, loss_cfg, cached_features=cached)
    return {"drafter": kind, "variant": variant, "batch_size": B, "seq_len": T,
            "answer_tokens_per_step": int(batch["loss_mask"].sum()), "supervised_per_step": float(np.mean(supervised)),
            "step_seconds": step_s, "supervised_per_second": float(np.mean(supervised)) / step_s,
            "model_gflop_per_step": step_flops / 1e9, "model_gflops_per_second": step_flops / step_s / 1e9,
            "compile_seconds": compile_s, "loss": float(m["loss"])}


def main(argv):
    del argv
    target = load_target(asset_path("smollm2_gguf"))
    peak = matmul_peak_gflops()
    best = max(peak.values())
    rows = []
    for kind in _KINDS.value:
        for variant in _VARIANTS.value:
            if variant.startswith("dflash_") and kind != "dflash":
                continue
            r = measure(target, kind, variant)
            r["fraction_of_matmul_peak"] = r["model_gflops_per_second"] / best
            print(r, flush=True)
            rows.append(r)
    for r in rows:  # speed-up of each variant over today's step, per drafter
        base = next(x for x in rows if x["drafter"] == r["drafter"] and x["variant"] == "today")
        r["supervised_per_second_vs_today"] = r["supervised_per_second"] / base["supervised_per_second"]
    cols = ("drafter", "variant", "batch_size", "seq_len", "answer_tokens_per_step", "supervised_per_step",
            "step_seconds", "supervised_per_second", "supervised_per_second_vs_today", "model_gflop_per_step",
            "model_gflops_per_second", "fraction_of_matmul_peak", "compile_seconds")
    md = (markdown_table(rows, cols, "{:.3g}") + "\nCPU float32 matmul peak (GFLOP/s): "
          + ", ".join(f"{k}: {v:.1f}" for k, v in peak.items()) + "\n")
    out = write_results(_OUT.value, {"rows": rows, "matmul_gflops": peak}, md)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r['drafter']}\n{r['variant']}" for r in rows]
    ax.bar(labels, [r["supervised_per_second"] for r in rows])
    ax.set_ylabel("supervised predictions / s")
    ax.set_title("SFT step throughput (SmolLM2-135M target, 2-core CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput.png"), dpi=110)
    print(md)


if __name__ == "__main__":
    app.run(main)
