"""`experiments/benchmarks/opd_decisive.py`: τ at matched FLOPs / steps over seeds with t
intervals, the seed-paired ratio to the baseline and the acceptance by offset, on hand-made
probe curves."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "experiments", "benchmarks", "opd_decisive.py")


@functools.cache
def _module():  # once per process: the script defines its absl flags at import
    return load_script("experiments/benchmarks/opd_decisive.py")


def _write(workdir, run, kind, rows, acc=None, finished=True):
    """Probe rows (step, flops, τ) and, with `acc`, offset k's acceptance acc(k, τ) as the stage logs it;
    a finished run has its export."""
    os.makedirs(workdir / run / kind)
    if finished:
        os.makedirs(workdir / "export" / f"{run}_{kind}", exist_ok=True)
    with open(workdir / run / kind / "metrics.jsonl", "w") as f:
        for step, flops, tau in rows:
            extra = {f"probe_acceptance/{k}": acc(k, tau) for k in (1, 2)} if acc else {}
            f.write(json.dumps({"step": step, "flops": flops, "probe_tau": tau, **extra}) + "\n")
            f.write(json.dumps({"step": step, "flops": flops, "loss": 1.0}) + "\n")  # not a probe row


def test_matched_flops_steps_and_the_paired_ratio(tmp_path):
    mod = _module()
    F0 = 8e14  # both start from the shipped drafter's FLOPs
    for i, s in enumerate(("s0", "s1", "s2")):
        # Draft-OPD: 10 steps of 2e12 FLOPs, tau 1.30 -> 1.40 + 0.01 i; continued SFT: 40 steps of
        # 1e12 FLOPs, tau 1.30 -> 1.34 + 0.01 i at 4e13 (so 1.32 + 0.005 i at OPD's 2e13)
        _write(tmp_path, f"opd_{s}", "eagle3", [(0, F0, 1.30), (10, F0 + 2e13, 1.40 + 0.01 * i)],
               acc=lambda k, tau: round(tau - 1 + 0.1 * k, 6))
        _write(tmp_path, f"sft_{s}", "eagle3", [(0, F0, 1.30), (40, F0 + 4e13, 1.34 + 0.01 * i)])
    runs = mod.load_runs(str(tmp_path), ["opd", "sft", "missing"], ["s0", "s1", "s2"], "eagle3")
    assert set(runs) == {"opd", "sft"} and runs["opd"]["s1"] == [(0, F0, 1.30, (0.4, 0.5)), (10, F0 + 2e13, 1.41, (0.51, 0.61))]
    assert runs["sft"]["s1"][0] == (0, F0, 1.30, ())  # a probe without acceptance
    rows, budget = mod.summarise(runs, "sft")
    assert budget == {"flops": F0 + 2e13, "step": 10}
    # a run still in progress (no export yet) is left out: it would pull the budget back to step 0
    _write(tmp_path, "sft_s2", "dflash", [(0, F0, 1.30)], finished=False)
    assert mod.load_runs(str(tmp_path), ["sft"], ["s2"], "dflash") == {}
    opd, sft = rows
    assert opd["tau_matched_flops"] == pytest.approx(1.41) and sft["tau_matched_flops"] == pytest.approx(1.325)
    t = 4.302652729749464  # t(0.975, 2 dof)
    assert opd["ci95_flops"] == pytest.approx(t * 0.01 / np.sqrt(3))
    assert sft["tau_matched_steps"] == pytest.approx(1.31 + 0.0025)  # step 10 of 40
    want = [(1.40 + 0.01 * i) / (1.32 + 0.005 * i) for i in range(3)]
    assert opd["ratio_vs_baseline"] == pytest.approx(np.mean(want))
    assert opd["ci95_ratio"] == pytest.approx(t * np.std(want, ddof=1) / np.sqrt(3))
    assert sft["ratio_vs_baseline"] == pytest.approx(1.0) and sft["ci95_ratio"] == pytest.approx(0.0, abs=1e-12)
    # at each run's own final FLOPs: OPD's end (the common budget here) and SFT's end against itself
    assert opd["ratio_own_budget"] == pytest.approx(np.mean(want)) and sft["ratio_own_budget"] == pytest.approx(1.0)
    # a run longer than the baseline: its own budget is past the baseline's curve (left out), the
    # shorter one is read at its own end, not at the common budget
    longer = {"a": {"s0": [(0, F0, 1.3, ()), (50, F0 + 5e13, 1.5, ())], "s1": [(0, F0, 1.3, ()), (5, F0 + 1e13, 1.35, ())]},
              "b": {"s0": [(0, F0, 1.3, ()), (40, F0 + 4e13, 1.4, ())], "s1": [(0, F0, 1.3, ()), (40, F0 + 4e13, 1.4, ())]}}
    a = mod.summarise(longer, "b")[0][0]
    assert a["ratio_own_budget"] == pytest.approx(1.35 / 1.325) and np.isnan(a["ci95_ratio_own"])
    assert a["ratio_vs_baseline"] == pytest.approx(np.mean([1.34 / 1.325, 1.35 / 1.325]))
    # acceptance at the matched FLOPs (OPD's last probe): offset k = τ - 1 + 0.1 k, mean over seeds
    assert opd["acceptance_by_offset_matched_flops"] == "0.510/0.610" and sft["acceptance_by_offset_matched_flops"] == "n/a"
    with pytest.raises(ValueError, match="outside the run's probes"):
        mod.at(runs["opd"]["s0"], F0 + 3e13, 1)

    out = subprocess.run([sys.executable, SCRIPT, f"--workdir={tmp_path}", "--methods=opd,sft", "--baseline=sft",
                          "--drafters=eagle3,dflash", f"--out_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert [r["method"] for r in saved["rows"]] == ["opd", "sft"] and (tmp_path / "out" / "opd_decisive.png").exists()

    # the curves are kept with the results: a machine whose workdir is gone summarises the same
    kept = tmp_path / "out" / "runs"
    assert mod.load_runs(str(tmp_path / "gone"), ["opd", "sft"], ["s0", "s1", "s2"], "eagle3", str(kept)) == runs
    # a kept curve that reaches a later step wins over a shorter one in the workdir (a restart elsewhere)
    os.rename(tmp_path / "opd_s0", tmp_path / "opd_s0_full")
    _write(tmp_path, "opd_s0", "eagle3", [(0, F0, 1.30)])
    assert mod.load_runs(str(tmp_path), ["opd"], ["s0"], "eagle3", str(kept))["opd"]["s0"] == runs["opd"]["s0"]
    assert mod.load_runs(str(tmp_path), ["opd"], ["s0"], "eagle3")["opd"]["s0"] == [(0, F0, 1.30, ())]
    # a curve kept before acceptance was kept (probe_tau only) still loads
    with open(kept / "eagle3" / "sft_s0.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "flops": F0, "probe_tau": 1.3}) + "\n")
        f.write(json.dumps({"step": 99, "flops": F0 + 9e13, "probe_tau": 1.4}) + "\n")
    assert mod.load_runs(str(tmp_path / "gone"), ["sft"], ["s0"], "eagle3", str(kept))["sft"]["s0"][-1] == (99, F0 + 9e13, 1.4, ())


def test_an_offset_no_probe_round_reached_loads_as_nan(tmp_path):
    """DFlash's probe can reach no round at its last offsets: the stage logs null there; a step
    logged twice is read once."""
    mod = _module()
    os.makedirs(tmp_path / "opd_s0" / "dflash")
    os.makedirs(tmp_path / "export" / "opd_s0_dflash")
    with open(tmp_path / "opd_s0" / "dflash" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "flops": 1e14, "probe_tau": 1.26, "probe_acceptance/1": 0.22,
                            "probe_acceptance/2": None}) + "\n")
        # a run restarted without a checkpoint probes step 0 again: one row a step, the last written
        f.write(json.dumps({"step": 0, "flops": 1e14, "probe_tau": 1.26, "probe_acceptance/1": 0.22,
                            "probe_acceptance/2": None}) + "\n")
    (row,) = mod.load_runs(str(tmp_path), ["opd"], ["s0"], "dflash")["opd"]["s0"]
    assert row[:3] == (0, 1e14, 1.26) and row[3][0] == 0.22 and np.isnan(row[3][1])


def test_the_tau_gap_splits_between_offset_1_and_the_later_offsets():
    """τ = 1 + a1 (1 + a2 + a2 a3 + ...): the Shapley shares of offset 1 and the later offsets sum to
    the gap; an offset no round reached (NaN) counts as accepting nothing."""
    mod = _module()
    # run: τ = 1 + 0.3 (1 + 0.5 + 0.5 * 0.4) = 1.51; base: 1 + 0.2 (1 + 0.4 + 0) = 1.28
    d1, later = mod.offset_attribution([0.3, 0.5, 0.4], [0.2, 0.4, float("nan")])
    assert d1 == pytest.approx(0.1 * (1 + (0.7 + 0.4) / 2)) and later == pytest.approx(0.25 * 0.3)
    assert d1 + later == pytest.approx(1.51 - 1.28)
    # in the summary, at each run's own final FLOPs: OPD's last probe (2e14) against SFT's acceptance
    # interpolated there (offset 1 alike, offset 2 0.3), so the gap is all later; a seed whose baseline
    # has no acceptance is left out
    runs = {"opd": {"s0": [(0, 1e14, 1.3, (0.3, 0.2)), (10, 2e14, 1.4, (0.3, 0.6))],
                    "s1": [(0, 1e14, 1.3, (0.3, 0.2)), (10, 2e14, 1.4, (0.3, 0.6))]},
            "sft": {"s0": [(0, 1e14, 1.3, (0.3, 0.2)), (20, 3e14, 1.3, (0.3, 0.4))],
                    "s1": [(0, 1e14, 1.3, ()), (20, 3e14, 1.3, ())]}}
    opd, sft = mod.summarise(runs, "sft")[0]
    assert opd["dtau_offset1_own"] == pytest.approx(0.0) and opd["dtau_later_own"] == pytest.approx(0.3 * 0.3)
    assert sft["dtau_offset1_own"] == sft["dtau_later_own"] == 0.0
