"""The `report` stage: the experiment's summary rows, τ / speed-up tables and training curve
from finished eval runs and the training stages' probe rows."""

import json
import os

import pytest

from opd import configs, pipeline
from opd.eval import report


def _eval_metrics(drafter, training, prompt_set, temperature, batch, tau, speedup, ar_tps, flops=0.0):
    return {"drafter": drafter, "training": training, "training_flops": flops, "prompt_set": prompt_set,
            "temperature": temperature, "batch_size": batch, "num_draft_tokens": 4, "num_prompts": 4,
            "max_new_tokens": 64, "seed": 0, "tau": tau, "speedup": speedup, "tokens_per_second": ar_tps * speedup,
            "ar_tokens_per_second": ar_tps, "greedy_matches_ar": True if temperature == 0 else None,
            "tau_per_batch": [tau - 0.1, tau + 0.1], "acceptance_by_offset": [0.25, 0.5, None, 1.0]}


def _config(runs, curve_runs=("sft", "opd")):
    c = configs.default_config()
    c.stages = ("report",)
    c.target.path = "unused"
    c.eval.num_prompts = 4
    c.eval.runs = runs
    c.report.update(curve_runs=curve_runs, curve_drafters=("eagle3",))
    return c


def _write(workdir, name, metrics):
    os.makedirs(workdir / "eval" / name)
    (workdir / "eval" / name / "metrics.json").write_text(json.dumps(metrics))


def test_report_rows_tables_and_curve(tmp_path):
    runs = [dict(name="ng", drafter="ngram", prompt_set="mtbench"),
            dict(name="e3_sft", drafter="eagle3", drafter_path="x", prompt_set="mtbench"),
            dict(name="e3_opd", drafter="eagle3", drafter_path="y", prompt_set="mtbench"),
            dict(name="e3_opd_he", drafter="eagle3", drafter_path="y", prompt_set="humaneval")]
    _write(tmp_path, "ng", _eval_metrics("ngram", "none", "mtbench", 0.0, 1, 1.5, 1.2, 20.0))
    _write(tmp_path, "e3_sft", _eval_metrics("eagle3", "sft (60 steps)", "mtbench", 0.0, 1, 1.3, 0.7, 22.0, 1e14))
    _write(tmp_path, "e3_opd", _eval_metrics("eagle3", "opd (20 steps)", "mtbench", 0.0, 1, 1.4, 0.8, 24.0, 2e14))
    _write(tmp_path, "e3_opd_he", _eval_metrics("eagle3", "opd (20 steps)", "humaneval", 0.0, 1, 1.6, 0.9, 30.0, 2e14))
    for run, taus in (("sft", [1.0, 1.2]), ("opd", [1.2, 1.3])):
        os.makedirs(tmp_path / run / "eagle3")
        with open(tmp_path / run / "eagle3" / "metrics.jsonl", "w") as f:
            for i, tau in enumerate(taus):
                f.write(json.dumps({"step": 20 * i, "flops": 1e14 * (i + (run == "opd")), "probe_tau": tau}) + "\n")
                f.write(json.dumps({"step": 20 * i + 5, "flops": 0.0, "loss": 3.0}) + "\n")  # no probe: not a point

    out = pipeline.stage_report(_config(runs), str(tmp_path))

    by_run = {r["run"]: r for r in out["rows"]}
    assert by_run["ng"]["method"] == "-" and by_run["e3_sft"]["method"] == "sft" and by_run["e3_opd"]["method"] == "opd"
    assert by_run["e3_opd"]["training_flops"] == 2e14 and by_run["e3_opd"]["tau"] == 1.4
    assert by_run["e3_opd"]["tau_sem"] == pytest.approx(0.1)  # stdev(1.3, 1.5) / sqrt(2)
    ar = [r for r in out["rows"] if r["drafter"] == "none"]  # one per (set, T, batch): the mean measured AR tok/s
    assert {r["prompt_set"]: r["tokens_per_second"] for r in ar} == {"mtbench": pytest.approx(22.0), "humaneval": 30.0}
    assert {r["prompt_set"]: r["ar_timings"] for r in ar} == {"mtbench": [20.0, 22.0, 24.0], "humaneval": [30.0]}
    assert [p["probe_tau"] for p in out["curves"]["eagle3"]["opd"]] == [1.2, 1.3]
    assert {(r["run"], r["end_tau"]) for r in out["curve_rows"]} == {("sft", 1.2), ("opd", 1.3)}
    md = (tmp_path / "report" / "results.md").read_text()
    # mtbench's three rows were timed in three runs (one each): their speed-ups are not side by side
    assert "| none | - | 0.000 | 22.0 tok/s (3 timings, 20.0–24.0) | 30.0 tok/s |" in md
    assert "Timed apart: mtbench hold rows timed in separate runs" in md
    assert by_run["e3_opd"]["tau_ci95"] == pytest.approx([1.4 - 0.196, 1.4 + 0.196])
    assert "**T = 0, batch 1**" in md and "| eagle3 | opd | 0.200 | 1.40 (1.20–1.60) / 0.80× | 1.60 (1.40–1.80) / 0.90× |" in md
    assert "| eagle3 | opd | humaneval | 0.250 | 0.500 | - | 1.000 |" in md  # acceptance by offset
    assert "Greedy output identical to autoregressive output: yes (4 of 4 runs, 16 prompts decoded)" in md
    assert (tmp_path / "report" / "curves.png").stat().st_size > 0
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["provenance"]["command"] and len(saved["rows"]) == len(out["rows"])


def test_curve_panels_group_the_runs_that_start_from_one_drafter():
    def run(*flops):
        return [{"step": i, "flops": f, "probe_tau": 1.0} for i, f in enumerate(flops)]

    # a small SFT run from scratch and its Draft-OPD continuation; two branches from a shipped
    # drafter 1000x further along the FLOPs axis; an unrelated run
    runs = {"sft": run(0.0, 1e12), "opd_warm": run(1e12, 2e12), "opd": run(8e14, 8.1e14),
            "sft_cont": run(8e14, 8.2e14), "other": run(5e13, 6e13)}
    assert report._curve_groups(runs) == [["sft", "opd_warm"], ["opd", "sft_cont"], ["other"]]


def test_report_names_the_missing_eval_run(tmp_path):
    runs = [dict(name="ng", drafter="ngram", prompt_set="mtbench")]
    with pytest.raises(FileNotFoundError, match="eval run 'ng' has no .*run the `eval` stage first"):
        pipeline.stage_report(_config(runs), str(tmp_path))


def test_a_partial_report_names_the_runs_not_decoded_yet(tmp_path):
    runs = [dict(name="e3_sft", drafter="eagle3", drafter_path="x", prompt_set="mtbench"),
            dict(name="e3_opd", drafter="eagle3", drafter_path="y", prompt_set="mtbench")]
    c = _config(runs, curve_runs=())
    c.report.partial = True
    with pytest.raises(FileNotFoundError, match="none of the 2 eval runs has a metrics.json"):
        pipeline.stage_report(c, str(tmp_path))
    _write(tmp_path, "e3_sft", _eval_metrics("eagle3", "sft (60 steps)", "mtbench", 0.0, 1, 1.3, 0.7, 22.0, 1e14))
    with pytest.raises(FileNotFoundError, match="eval run 'e3_opd' has no"):  # a full report needs every run
        pipeline.stage_report(_config(runs, curve_runs=()), str(tmp_path))
    out = pipeline.stage_report(c, str(tmp_path))
    assert out["missing"] == ["e3_opd"] and [r["run"] for r in out["rows"] if r["drafter"] != "none"] == ["e3_sft"]
    md = (tmp_path / "report" / "results.md").read_text()
    assert "**Partial:** 1 of 2 eval runs are not decoded yet: e3_opd." in md
    assert "| eagle3 | sft | 0.100 | 1.30 (1.10–1.50) / 0.70× |" in md
    assert json.loads((tmp_path / "report" / "results.json").read_text())["missing"] == ["e3_opd"]


def test_report_config_is_validated():
    with pytest.raises(TypeError, match="curve_runs"):  # the schema's field is a tuple: refused when set
        _config([dict(name="ng", drafter="ngram", prompt_set="mtbench")], curve_runs="opd")
    c = _config([dict(name="ng", drafter="ngram", prompt_set="mtbench")])
    c.report.results_name = "../x"
    with pytest.raises(ValueError, match="results_name must be a plain directory name"):
        configs.validate(c)
    del c.report
    with pytest.raises(ValueError, match="no `report` block"):
        configs.validate(c)
    c = _config([dict(name="ng", drafter="ngram", prompt_set="mtbench")])
    c.report.results_nmae = "x"  # a typo: named, with the field it was meant to be
    with pytest.raises(ValueError, match=r"unknown config field config\.report\.results_nmae; did you mean config\.report\.results_name\?"):
        configs.validate(c)


def test_tau_interval_weights_each_batch_by_its_rounds():
    """τ = Σ committed / Σ rounds; its standard error treats batches as clusters (ratio estimator),
    checked against the formula written out for three batches."""
    m = _eval_metrics("eagle3", "sft", "mtbench", 0.0, 1, 0.0, 0.7, 20.0)
    m["tau_per_batch"], m["per_batch"] = [1.0, 2.0, None, 1.5], [{"verify_rounds": r} for r in (10, 30, 0, 20)]
    c, r = [10.0, 60.0, 30.0], [10, 30, 20]
    tau = sum(c) / sum(r)  # 5/3
    m["tau"] = tau
    var = sum((ci - tau * ri) ** 2 for ci, ri in zip(c, r)) / (3 * 2) / 20.0 ** 2
    row = report.summary_row("r", m)
    assert row["tau_sem"] == pytest.approx(var ** 0.5)
    assert row["tau_ci95"] == pytest.approx([tau - 1.96 * var ** 0.5, tau + 1.96 * var ** 0.5])
    m["tau_per_batch"] = [1.2]
    assert report.summary_row("r", m)["tau_ci95"] is None  # one batch: no interval


def test_summary_row_method_of_an_untrained_drafter():
    m = _eval_metrics("dflash", "none", "humaneval", 1.0, 4, 1.1, 0.5, 10.0)
    assert report.summary_row("r", m)["method"] == "untrained"
