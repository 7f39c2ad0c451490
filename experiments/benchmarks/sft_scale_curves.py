"""Curves of a data-scale SFT run (`experiments/sft_smollm2.py:<kind>,scale`), possibly in legs
(each later leg fine-tuned from the previous leg's exported drafter): held-out probe tau against
answer tokens trained on and against cumulative training FLOPs, plus loss and offset-1 accuracy,
and the plateau test (tau's relative change over the last quarter of the training tokens).
With `--goal_tau`, a fit of tau against log(tokens) over the later half of the probes says where
the curve would cross the goal at its current slope (the evidence for a missed goal).

  python experiments/benchmarks/sft_scale_curves.py --runs=workdirs/smollm2_scale/sft_scale/eagle3 \\
      --name=sft_scale_eagle3          # -> experiments/results/<name>/

Legs are given in order; each leg's token count continues from the previous leg's last one
(FLOPs are already cumulative: a leg starts from its init drafter's count).
"""

import math
import os

from absl import app, flags
import matplotlib

from opd.eval.report import markdown_table, write_results
from opd.paths import read_jsonl

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_legs(runs) -> tuple[list, list]:
    """(training rows, probe rows) of every leg, tokens made cumulative over the legs."""
    legs = []
    for run in runs:
        rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
        if not rows:
            raise FileNotFoundError(f"no metrics in {run}/metrics.jsonl")
        # a shipped drafter's metrics.jsonl holds every earlier leg, tagged (ship_drafter.py)
        tags = sorted({r["leg"] for r in rows if "leg" in r})
        legs += [[r for r in rows if r.get("leg") == t] for t in tags] if tags else [rows]
    train, probe, offset = [], [], 0.0
    for leg, rows in enumerate(legs):
        mine = [{"leg": leg, "step": r["step"], "tokens": offset + float(r.get("tokens", 0.0)), "flops": r["flops"],
                 "loss": r["loss"], "accuracy_1": r.get("accuracy/1")} for r in rows if "loss" in r]
        for r in rows:
            if "probe_tau" in r:  # at the tokens of the last training row up to its step
                seen = [t["tokens"] for t in mine if t["step"] <= r["step"]]
                probe.append({"leg": leg, "step": r["step"], "tokens": seen[-1] if seen else offset,
                              "flops": r["flops"], "probe_tau": r["probe_tau"]})
        train += mine
        offset = mine[-1]["tokens"] if mine else offset
    return train, probe


def plateau(probe: list) -> dict:
    """Relative change of probe tau over the last quarter of the training tokens (< 2 %: flat)."""
    if len(probe) < 2:
        return {"flat": False, "why": "fewer than two probes"}
    end = probe[-1]["tokens"]
    start = [p for p in probe if p["tokens"] <= 0.75 * end]
    if not start:
        return {"flat": False, "why": "no probe before the last quarter"}
    a, b = start[-1]["probe_tau"], probe[-1]["probe_tau"]
    change = (b - a) / a
    return {"from_tokens": start[-1]["tokens"], "to_tokens": end, "tau_from": a, "tau_to": b,
            "relative_change": change, "flat": abs(change) < 0.02}


def crossing(probe: list, goal: float) -> dict:
    """Least-squares fit tau = a + b * log2(tokens) over the later half of the probes (tokens > 0), and
    the tokens at which that trend reaches `goal` (inf when the slope is not positive)."""
    pts = [(p["tokens"], p["probe_tau"]) for p in probe if p["tokens"] > 0]
    pts = pts[len(pts) // 2:]
    if len(pts) < 2:
        return {"goal_tau": goal, "why": "fewer than two probes in the later half"}
    xs = [math.log2(t) for t, _ in pts]
    ys = [y for _, y in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    at = 2.0 ** ((goal - intercept) / slope) if slope > 0 else math.inf
    return {"goal_tau": goal, "fit_from_tokens": pts[0][0], "fit_to_tokens": pts[-1][0],
            "tau_per_doubling": slope, "intercept_log2": intercept, "tokens_at_goal": at,
            "doublings_to_goal": math.log2(at / pts[-1][0]) if math.isfinite(at) else math.inf}


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    train, probe = load_legs(FLAGS.runs)
    flat = plateau(probe)
    trend = crossing(probe, FLAGS.goal_tau) if FLAGS.goal_tau is not None else None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, x, label in ((axes[0], "tokens", "answer tokens trained on"), (axes[1], "flops", "cumulative training FLOPs")):
        ax.plot([p[x] for p in probe], [p["probe_tau"] for p in probe], "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out probe tau")
        ax.grid(alpha=0.3)
    if trend and "tau_per_doubling" in trend:  # the fitted trend over the fitted range
        xs = [trend["fit_from_tokens"], trend["fit_to_tokens"]]
        axes[0].plot(xs, [trend["intercept_log2"] + trend["tau_per_doubling"] * math.log2(x) for x in xs], "--",
                     label=f"fit: {trend['tau_per_doubling']:+.3f} tau per doubling")
        axes[0].legend(fontsize=8)
    ax = axes[2]
    ax.plot([t["tokens"] for t in train], [t["loss"] for t in train], label="loss")
    ax.set_xlabel("answer tokens trained on")
    ax.set_ylabel("TTT loss")
    if train and train[0]["accuracy_1"] is not None:
        ax2 = ax.twinx()
        ax2.plot([t["tokens"] for t in train], [t["accuracy_1"] for t in train], color="C1", label="accuracy/1")
        ax2.set_ylabel("offset-1 accuracy", color="C1")
    fig.suptitle(f"{FLAGS.name}: plateau test {'flat' if flat['flat'] else 'not flat'} "
                 f"({flat.get('relative_change', float('nan')):+.1%} over the last quarter)", fontsize=9)
    fig.tight_layout()
    md = markdown_table(probe, ("leg", "step", "tokens", "flops", "probe_tau"), "{:.4g}")
    md += f"\nPlateau test (last quarter of the tokens): {flat}\n"
    if trend is not None:
        md += f"\nTrend against log(tokens) (later half of the probes) and where it would reach tau {FLAGS.goal_tau}: {trend}\n"
    last = train[-1] if train else {}
    md += f"\nLast training row: {last}\n"
    out = write_results(FLAGS.name, {"runs": [os.path.abspath(r) for r in FLAGS.runs], "probe": probe,
                                      "train": train, "plateau": flat, "trend": trend}, md, out_dir=FLAGS.out_dir)
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    print(md)


if __name__ == "__main__":  # flags defined here: tests import this module next to other scripts
    flags.DEFINE_list("runs", None, "run dirs (legs, in order) holding metrics.jsonl, or a shipped drafter "
                                    "(experiments/drafters/<name>: its earlier legs)")
    flags.DEFINE_string("name", None, "experiments/results/<name>/")
    flags.DEFINE_string("out_dir", None, "default experiments/results/<name>/")
    flags.DEFINE_float("goal_tau", None, "the issue's tau goal: where the curve's log-linear trend would cross it")
    flags.mark_flags_as_required(["runs", "name"])
    app.run(main)
