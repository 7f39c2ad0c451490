"""Tau per CPU-hour of each SFT data source (issue 15): the `src_<source>` runs of
`experiments/sft_smollm2.py` (one source alone, or the mix, same steps, one draft vocabulary),
priced in CPU time for training and for making the data.

  for s in answers chat code docs mix; do
    python -m opd.main --config=experiments/sft_smollm2.py:eagle3,scale,src_$s --workdir=workdirs/smollm2_scale
  done
  python experiments/benchmarks/sft_sources.py --workdir=workdirs/smollm2_scale --kind=eagle3
      # -> experiments/results/sft_sources_<kind>/

Training time is the run's `seconds` counter (wall time in steps on this 2-core CPU; the probes
are not counted). Making the data: a regenerated source costs its `regenerate` wall time (the
`<folder>.metrics.jsonl` of the stage), charged for the share of its records a run touched:
min(1, repeats x tokens read / tokens per epoch); the text sources are tokenised only (seconds
for all of them, not charged).
"""

import os
import shutil

from absl import app, flags
import matplotlib

from opd.configs import load_module
from opd.data import regenerate
from opd.data.builders import read_trajectory_shards
from opd.eval.report import markdown_table, write_results
from opd.paths import read_jsonl, resolve_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def folder_cost(folder: str) -> dict:
    """Answer tokens in a trajectory folder and the wall seconds its `regenerate` stage spent (0 for text)."""
    tokens = sum(len(r["response_ids"]) for r in read_trajectory_shards(folder))
    log = regenerate.metrics_path(folder)
    seconds = sum(float(r["seconds"]) for r in read_jsonl(log)) if os.path.isfile(log) else 0.0
    return {"folder": folder, "tokens": tokens, "seconds": seconds}


def data_seconds(costs: list, repeats: tuple, tokens_read: float) -> float:
    """The generation seconds a run that read `tokens_read` answer tokens of these folders is charged:
    each folder's cost times the share of its records touched, min(1, repeats x read / epoch)."""
    repeats = repeats or (1,) * len(costs)
    epoch = sum(r * c["tokens"] for r, c in zip(repeats, costs))
    return sum(c["seconds"] * min(1.0, r * tokens_read / epoch) for r, c in zip(repeats, costs))


def _train_and_probes(run_dir: str) -> tuple[list, list]:
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return [r for r in rows if "loss" in r], [r for r in rows if "probe_tau" in r]


def finished(run_dir: str) -> bool:
    """A run with training rows and its two probes (start and end)."""
    train, probes = _train_and_probes(run_dir)
    return bool(train) and len(probes) >= 2


def source_row(source: str, run_dir: str, costs: list, repeats: tuple) -> dict:
    if not finished(run_dir):
        raise FileNotFoundError(f"{run_dir}: the run has not finished (needs training rows and two probes)")
    train, probes = _train_and_probes(run_dir)
    last = train[-1]
    train_h = float(last["seconds"]) / 3600
    data_h = data_seconds(costs, repeats, float(last["tokens"])) / 3600
    gain = probes[-1]["probe_tau"] - probes[0]["probe_tau"]
    return {"source": source, "run_dir": run_dir, "steps": last["step"], "tokens_read": float(last["tokens"]),
            "unique_tokens": sum(c["tokens"] for c in costs), "tau_start": probes[0]["probe_tau"],
            "tau_end": probes[-1]["probe_tau"], "train_cpu_h": train_h, "data_cpu_h": data_h,
            "gain_per_train_h": gain / train_h, "gain_per_cpu_h": gain / (train_h + data_h),
            "probe_seconds": sum(float(p.get("hook_seconds", 0.0)) for p in probes)}


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    kind, workdir = FLAGS.kind, FLAGS.workdir
    mod = load_module(os.path.join(REPO, "experiments", "sft_smollm2.py"))  # the src_<source> runs' configs
    rows, missing = [], []  # missing: (source, why), named in the table's notes
    for source in mod.SOURCES:
        c = mod.get_config(f"{kind},scale,src_{source}")
        run_dir = os.path.join(workdir, c.sft.name, kind)
        if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            missing.append((source, "no run"))
            continue
        if not finished(run_dir):
            missing.append((source, "unfinished"))
            continue
        costs = [folder_cost(resolve_path(f, workdir)) for f in c.sft.data]
        rows.append(source_row(source, run_dir, costs, tuple(c.sft.data_repeats)))
    for source, why in missing:
        print(f"skipping {source}: {why}")
    if not rows:
        raise FileNotFoundError(f"no src_<source> runs of {kind} in {workdir}")
    name = FLAGS.name or f"sft_sources_{kind}"
    md = markdown_table(rows, ("source", "steps", "tokens_read", "unique_tokens", "tau_start", "tau_end",
                               "train_cpu_h", "data_cpu_h", "gain_per_train_h", "gain_per_cpu_h"), "{:.4g}")
    md += ("\n`gain_per_*`: probe tau gained (64 held-out AlpacaEval prompts x 128 tokens) per CPU-hour of "
           "training, and of training + making the data read. The probe prompts are chat instructions, so a "
           "source's gain is measured in that domain.\n")
    if missing:
        md += "\nNot measured yet: " + ", ".join(f"{s} ({why})" for s, why in missing) + ".\n"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["source"] for r in rows]
    axes[0].bar(names, [r["gain_per_train_h"] for r in rows], label="training only")
    axes[0].bar(names, [r["gain_per_cpu_h"] for r in rows], width=0.4, label="training + data")
    axes[0].set_ylabel("probe tau gained per CPU-hour")
    axes[0].legend(loc="lower left", fontsize=8)
    for r in rows:
        axes[1].plot([0, r["train_cpu_h"] + r["data_cpu_h"]], [r["tau_start"], r["tau_end"]], "o-", label=r["source"])
    axes[1].set_xlabel("CPU-hours (training + data)")
    axes[1].set_ylabel("held-out probe tau")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{name}: {kind}, {rows[0]['steps']} steps per source", fontsize=9)
    fig.tight_layout()
    out = write_results(name, {"workdir": os.path.abspath(workdir), "kind": kind, "rows": rows,
                               "not_measured": dict(missing)}, md,
                        out_dir=FLAGS.out_dir)
    fig.savefig(os.path.join(out, "sources.png"), dpi=110)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)  # the raw curves, kept with the numbers
    for r in rows:
        shutil.copyfile(os.path.join(r["run_dir"], "metrics.jsonl"), os.path.join(out, "runs", f"{r['source']}.metrics.jsonl"))
    print(md)


if __name__ == "__main__":  # flags defined here: tests import this module next to other scripts
    flags.DEFINE_string("workdir", None, "the DIR the src_<source> runs trained in")
    flags.DEFINE_string("kind", "eagle3", "drafter kind")
    flags.DEFINE_string("name", None, "experiments/results/<name>/ (default sft_sources_<kind>)")
    flags.DEFINE_string("out_dir", None, "default experiments/results/<name>/")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
