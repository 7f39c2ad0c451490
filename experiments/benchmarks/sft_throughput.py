"""SFT throughput of the EAGLE-3 and DFlash drafters on SmolLM2-135M-Instruct, side by side in
one process: supervised predictions per second, the step's model GFLOP/s, and this CPU's own
float32 matmul GFLOP/s (the peak those are compared with).

  python experiments/benchmarks/sft_throughput.py          # -> experiments/results/sft_throughput/

A supervised prediction is one (position, draft offset) pair with a loss term (`LossOut.supervised`:
EAGLE-3's TTT steps, DFlash's anchored block offsets). Step variants (`VARIANTS`) are the SFT
steps being compared; "today" is the step of `experiments/sft_smollm2.py` before the packed rows
and the compact teacher (cached target features, rows padded to seq_len, one sequence per row).
"Answer tokens" are the loss-masked positions of a step (what the data supplies per step). Each variant is built by the run
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
    """The step of experiments/sft_smollm2.py before this benchmark's changes (the baseline):
    padded rows, EAGLE-3's teacher from all V columns of the target's logits."""
    config.sft.packing = False
    return config


def compact(config):
    """Today's rows; EAGLE-3's teacher from the draft vocabulary's LM-head columns and the
    cached argmax (`opd.drafters.eagle3.training.compact_teacher`)."""
    return config


def anchors(n: int, packed: bool = False):
    """Today's step with `n` DFlash anchors per row (the context K/V is shared by a row's
    blocks; SpecForge's example configs use 512), on packed rows with `packed`. Other kinds:
    unchanged."""

    def variant(config):
        if config.drafter.kind == "dflash":
            config.sft.loss.num_anchors = n
            config.sft.packing = packed
        return config

    return variant


def draft_vocab(learned_mask: bool = False):
    """`dflash_packed_anchors_32` with a DFlash draft vocabulary of 8192 tokens (the block logits
    over those LM-head columns only; the answers' random tokens are drawn from it), with
    `learned_mask` also the learned MASK embedding. Other kinds: unchanged."""

    def variant(config):
        config = anchors(32, True)(config)
        if config.drafter.kind == "dflash":
            config.drafter.overrides.draft_vocab_size = 8192
            if learned_mask:
                config.drafter.overrides.mask_embedding = "learned"
        return config

    return variant


def dflash_scale(n: int):
    """The step of `sft_smollm2.py:dflash,scale` with `n` anchors per row: packed rows of 640
    tokens, 4 per batch, the 8192-token draft vocabulary and the learned MASK. Other kinds:
    unchanged."""

    def variant(config):
        if config.drafter.kind == "dflash":
            config = draft_vocab(learned_mask=True)(packed_long(config))
            config.sft.loss.num_anchors = n
        return config

    return variant


def packed(config):
    """Several sequences per row with segment masks (`config.sft.packing`); EAGLE-3's teacher is
    then the compact one (the draft vocabulary's LM-head columns + the cached argmax), which
    every cached-feature step now uses."""
    config.sft.packing = True
    return config


def packed_long(config):
    """`packed` with rows of 640 tokens, 4 per batch (the same tokens per step): long rows leave
    less padding when answers are a large part of seq_len."""
    config.sft.packing = True
    config.sft.seq_len, config.sft.batch_size = 2 * int(config.sft.seq_len), int(config.sft.batch_size) // 2
    return config


def head_at_trained(config):
    """`packed_640` with EAGLE-3's draft head + loss only at the trained positions (at most 75 %
    of B*T per TTT step, else the full head: the same loss). Other kinds: `packed_640`."""
    config = packed_long(config)
    if config.drafter.kind == "eagle3":
        config.sft.loss.head_capacity = 0.75
    return config


# name -> (config -> the config of that variant's step); "today" is the baseline of every ratio
VARIANTS = {"today": today, "compact_teacher": compact, "packed": packed, "packed_640": packed_long, "packed_640_head": head_at_trained, "dflash_anchors_32": anchors(32), "dflash_anchors_128": anchors(128),
            "dflash_packed_anchors_32": anchors(32, True), "dflash_packed_anchors_64": anchors(64, True),
            "dflash_packed_anchors_128": anchors(128, True), "dflash_packed_anchors_32_vocab_8192": draft_vocab(),
            "dflash_packed_anchors_32_vocab_8192_learned_mask": draft_vocab(learned_mask=True),
            **{f"dflash_scale_640_anchors_{n}": dflash_scale(n) for n in (32, 64, 128)}}
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


def _sequences(target, n: int, seq_len: int, seed: int = 0, answer_vocab: int = 0) -> list:
    """n (tokens, loss_mask) sequences (module docstring), each at most `seq_len` long; answer
    tokens in [0, answer_vocab) when given (a draft vocabulary of the lowest ids), else [0, V)."""
    rs = np.random.RandomState(seed)
    prompts = batching.encode_prompts(target, [record_text(r) for r in training_prompts("alpacaeval", n)])
    out = []
    for p in prompts:
        p = np.asarray(p[: seq_len // 2], np.int32)
        a = min(seq_len - len(p), int(rs.randint(_MIN_ANSWER.value, _MAX_ANSWER.value + 1)))
        out.append((np.r_[p, rs.randint(0, answer_vocab or target.config.vocab_size, a)].astype(np.int32),
                    np.r_[np.zeros(len(p)), np.ones(a)].astype(np.int32)))
    return out


def _rows(target, batch_size: int, seq_len: int, packed: bool, answer_vocab: int = 0) -> tuple[dict, list]:
    """A batch {tokens, loss_mask (+ positions, segment_ids)} [B, T] and each row's sequences:
    one padded sequence per row, or sequences packed first-fit (in order) into the B rows."""
    seqs = _sequences(target, batch_size * (8 if packed else 1), seq_len, answer_vocab=answer_vocab)
    B, T = batch_size, seq_len
    batch = {k: np.zeros((B, T), np.int32) for k in ("tokens", "loss_mask", "positions", "segment_ids")}
    fill, layout = [0] * B, [[] for _ in range(B)]
    for tokens, mask in seqs:
        row = next((b for b in range(B) if fill[b] + len(tokens) <= T), None)
        if row is None:
            continue
        o, n = fill[row], len(tokens)
        batch["tokens"][row, o : o + n], batch["loss_mask"][row, o : o + n] = tokens, mask
        batch["positions"][row, o : o + n], batch["segment_ids"][row, o : o + n] = np.arange(n), len(layout[row]) + 1
        layout[row].append((o, tokens))
        fill[row] += n
        if not packed and row == B - 1:
            break
    if not packed:
        del batch["positions"], batch["segment_ids"]
    return batch, layout


def _cached_features(target, spec, layout, B: int, T: int) -> dict:
    """What the feature cache holds for these rows: each sequence's target features computed on
    the sequence alone, laid out where the row holds it."""
    D, n = target.config.hidden_size, len(spec.target_hidden_layers)
    aux, final, top = np.zeros((B, T, n, D), np.float32), np.zeros((B, T, D), np.float32), np.zeros((B, T), np.int32)
    for b, row in enumerate(layout):
        for o, tokens in row:
            L = len(tokens)
            padded = np.zeros(-(-L // 64) * 64, np.int32)  # few shapes; causal: padding after does not matter
            padded[:L] = tokens
            out = tfm.forward(target.params, target.config, jnp.asarray(padded)[None],
                              hidden_layers=spec.target_hidden_layers)
            aux[b, o : o + L] = np.asarray(jnp.stack(out.aux_hidden, axis=2))[0, :L]
            final[b, o : o + L] = np.asarray(out.hidden_BTD)[0, :L]
            top[b, o : o + L] = np.asarray(jnp.argmax(tfm.lm_head(target.params, target.config, out.hidden_BTD), -1))[0, :L]
    return {"aux": aux, "final": final, "top": top} if spec.needs_final_hidden else {"aux": aux}


def measure(target, kind: str, variant: str) -> dict:
    config = VARIANTS[variant](load_config(f"{CONFIG}:{kind}"))
    s = config.sft
    B, T = int(s.batch_size), int(s.seq_len)
    plugin = registry.get_kind(kind)
    # a DFlash draft vocabulary: the lowest W ids (as EAGLE-3's here, built without counts), the answers drawn from it
    W = int(config.drafter.overrides.get("draft_vocab_size", 0)) if kind == "dflash" else 0
    counts = {"token_counts": (np.arange(target.config.vocab_size) < W).astype(np.int64)} if W else {}
    drafter = plugin.init(target, seed=0, **counts, **dict(config.drafter.overrides))
    trainable, frozen = drafter.split()
    loss_cfg = plugin.loss_config(s.loss)
    cached, packing, top = s.target_features == "cache", bool(s.packing), variant != "today"
    run = run_mod.sft_run(drafter.spec, frozen, target.config, mesh=run_mod.make_mesh(-1, 1, 1, B),
                          optimizer=optim.make_optimizer(optim.OptimConfig.from_config({"total_steps": 1000,
                                                                                        **dict(s.optimizer)})),
                          loss_config=loss_cfg, batch_size=B, seq_len=T, cached_features=cached, packed=packing,
                          cached_argmax=top)
    batch, layout = _rows(target, B, T, packing, answer_vocab=W)
    if cached:  # the feature cache's arrays (float32 here; the cache may store float16)
        batch.update(_cached_features(target, drafter.spec, layout, B, T))
        if not top:
            batch.pop("top", None)
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
    if cached and not top and drafter.spec.needs_final_hidden and drafter.spec.teacher_columns:
        # no cached argmax: the teacher computes all V LM-head columns, not the draft vocabulary's
        step_flops += 2 * target.config.hidden_size * (target.config.vocab_size - drafter.spec.teacher_columns) * B * T
    answers = int(batch["loss_mask"].sum())
    return {"drafter": kind, "variant": variant, "batch_size": B, "seq_len": T, "packed": packing,
            "sequences_per_step": sum(len(r) for r in layout), "answer_tokens_per_step": answers,
            "supervised_per_step": float(np.mean(supervised)), "step_seconds": step_s,
            "answer_tokens_per_second": answers / step_s,
            "supervised_per_second": float(np.mean(supervised)) / step_s,
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
            if (variant.startswith("dflash_") and kind != "dflash") or (variant in ("compact_teacher", "packed_640_head") and kind != "eagle3"):
                continue
            r = measure(target, kind, variant)
            r["fraction_of_matmul_peak"] = r["model_gflops_per_second"] / best
            print(r, flush=True)
            rows.append(r)
    for r in rows:  # speed-up of each variant over today's step, per drafter
        base = next(x for x in rows if x["drafter"] == r["drafter"] and x["variant"] == "today")
        r["supervised_per_second_vs_today"] = r["supervised_per_second"] / base["supervised_per_second"]
        r["answer_tokens_per_second_vs_today"] = r["answer_tokens_per_second"] / base["answer_tokens_per_second"]
    cols = ("drafter", "variant", "batch_size", "seq_len", "sequences_per_step", "answer_tokens_per_step", "supervised_per_step",
            "step_seconds", "answer_tokens_per_second", "answer_tokens_per_second_vs_today", "supervised_per_second",
            "supervised_per_second_vs_today", "model_gflop_per_step",
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
