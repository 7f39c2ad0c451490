"""The training-curve figure: held-out probe τ against cumulative training FLOPs for every
branch trained from one SFT warm-up (Draft-OPD, its variants, continued SFT, SFT on the OPD
rollouts), read from the runs' `metrics.jsonl` (`probe_tau` rows, logged at step 0 = the
warm-up and every `probe.every` steps, with the cumulative FLOPs at that step).

  python experiments/benchmarks/opd_curves.py --workdir=workdirs/smollm2 --runs=opd,opd_fkl,sft_cont
      # -> experiments/results/opd_curves/ (results.json, results.md, opd_curves.png)
"""

import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/smollm2", "workdir holding DIR/<run>/<kind>/metrics.jsonl")
_RUNS = flags.DEFINE_list("runs", ["opd", "sft_cont", "sft_rollouts"], "run names (stage directories)")
_KINDS = flags.DEFINE_list("drafters", ["eagle3", "dflash"], "drafter kinds")
_OUT = flags.DEFINE_string("out_dir", None, "default: experiments/results/opd_curves")


def curves(workdir: str, runs, kinds) -> dict:
    """{kind: {run: [{"step", "flops", "probe_tau"}, ...]}} for the runs that exist."""
    from opd.training.metrics import read_jsonl

    out = {}
    for kind in kinds:
        for run in runs:
            path = os.path.join(workdir, run, kind, "metrics.jsonl")
            if not os.path.isfile(path):
                continue
            rows = [{"step": r["step"], "flops": r["flops"], "probe_tau": r["probe_tau"]}
                    for r in read_jsonl(path) if r.get("probe_tau") is not None]
            if rows:
                out.setdefault(kind, {})[run] = rows
    return out


def main(argv):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from opd.eval.report import RESULTS_ROOT, markdown_table, write_results

    data = curves(_WORKDIR.value, _RUNS.value, _KINDS.value)
    if not data:
        raise SystemExit(f"no probe_tau rows under {_WORKDIR.value}/<run>/<kind>/metrics.jsonl for runs {_RUNS.value}")
    out_dir = _OUT.value or os.path.join(RESULTS_ROOT, "opd_curves")
    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4.2), squeeze=False)
    table = []
    for ax, (kind, runs) in zip(axes[0], data.items()):
        for run, rows in runs.items():
            ax.plot([r["flops"] / 1e15 for r in rows], [r["probe_tau"] for r in rows], marker="o", label=run)
            table.append({"drafter": kind, "run": run, "start_tau": rows[0]["probe_tau"], "end_tau": rows[-1]["probe_tau"],
                          "end_step": rows[-1]["step"], "start_pflops": rows[0]["flops"] / 1e15,
                          "end_pflops": rows[-1]["flops"] / 1e15})
        ax.set(title=f"{kind}: held-out probe τ", xlabel="cumulative training PFLOPs (warm-up included)", ylabel="τ")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "opd_curves.png"), dpi=120)
    cols = ("drafter", "run", "start_tau", "end_tau", "end_step", "start_pflops", "end_pflops")
    write_results("opd_curves", {"curves": data, "rows": table}, markdown_table(table, cols, "{:.3f}"), out_dir)
    print(markdown_table(table, cols, "{:.3f}"))


if __name__ == "__main__":
    app.run(main)
