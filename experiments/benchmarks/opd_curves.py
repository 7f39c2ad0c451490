"""The training-curve figure: held-out probe τ against cumulative training FLOPs for every
branch trained from one SFT warm-up (Draft-OPD, its variants, continued SFT, SFT on the OPD
rollouts), read from the runs' `metrics.jsonl` (`probe_tau` rows, logged at step 0 = the
warm-up and every `probe.every` steps, with the cumulative FLOPs at that step).

  python experiments/benchmarks/opd_curves.py --workdir=workdirs/smollm2 --runs=opd,opd_fkl,sft_cont
      # -> experiments/results/opd_curves/ (results.json, results.md, opd_curves.png)
  python experiments/benchmarks/opd_curves.py --name=opd_ablations --drafters=eagle3 \
      --runs=abl_k3,abl_rkl,abl_tvd,abl_fkl,abl_rej0,abl_decay1,abl_t0   # -> experiments/results/opd_ablations/
"""

import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/smollm2", "workdir holding DIR/<run>/<kind>/metrics.jsonl")
_RUNS = flags.DEFINE_list("runs", ["opd", "sft_cont", "sft_rollouts"], "run names (stage directories)")
_KINDS = flags.DEFINE_list("drafters", ["eagle3", "dflash"], "drafter kinds")
_NAME = flags.DEFINE_string("name", "opd_curves", "results name: experiments/results/<name>/ (e.g. opd_ablations)")


def main(argv):
    from opd.eval.report import CURVE_COLUMNS, RESULTS_ROOT, markdown_table, plot_curves, probe_curves, write_results

    data = probe_curves(_WORKDIR.value, _RUNS.value, _KINDS.value)
    if not data:
        raise SystemExit(f"no probe_tau rows under {_WORKDIR.value}/<run>/<kind>/metrics.jsonl for runs {_RUNS.value}")
    out_dir = os.path.join(RESULTS_ROOT, _NAME.value)
    os.makedirs(out_dir, exist_ok=True)
    table = plot_curves(data, os.path.join(out_dir, f"{_NAME.value}.png"))
    write_results(_NAME.value, {"curves": data, "rows": table}, markdown_table(table, CURVE_COLUMNS, "{:.3f}"), out_dir)
    print(markdown_table(table, CURVE_COLUMNS, "{:.3f}"))


if __name__ == "__main__":
    app.run(main)
