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


def main(argv):
    from opd.eval.report import CURVE_COLUMNS, RESULTS_ROOT, markdown_table, plot_curves, probe_curves, write_results

    data = probe_curves(_WORKDIR.value, _RUNS.value, _KINDS.value)
    if not data:
        raise SystemExit(f"no probe_tau rows under {_WORKDIR.value}/<run>/<kind>/metrics.jsonl for runs {_RUNS.value}")
    out_dir = _OUT.value or os.path.join(RESULTS_ROOT, "opd_curves")
    os.makedirs(out_dir, exist_ok=True)
    table = plot_curves(data, os.path.join(out_dir, "opd_curves.png"))
    write_results("opd_curves", {"curves": data, "rows": table}, markdown_table(table, CURVE_COLUMNS, "{:.3f}"), out_dir)
    print(markdown_table(table, CURVE_COLUMNS, "{:.3f}"))


if __name__ == "__main__":
    app.run(main)
