"""The launcher runs a config's stages into a workdir and resumes from what is there."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(workdir, config="experiments/quickstart.py:tiny"):
    return subprocess.run(
        [sys.executable, "-m", "opd.main", f"--config={config}", f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_quickstart_tiny_runs_and_resumes(tmp_path):
    """The README's main job at tiny scale: fetch -> chat -> regenerate -> SFT -> Draft-OPD ->
    eval -> report; a second launch finds everything done and retrains nothing."""
    first = _launch(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(tmp_path / "chat" / "responses.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2 and all(r["num_tokens"] > 0 and r["response"] for r in records)
    assert json.load(open(tmp_path / "fetch_assets" / "paths.json"))["smollm2_gguf"].endswith(".gguf")
    for run in ("ngram_mtbench", "eagle3_sft_mtbench", "eagle3_opd_mtbench", "eagle3_sft_cont_mtbench"):
        m = json.load(open(tmp_path / "eval" / run / "metrics.json"))
        assert m["num_prompts"] == 2 and m["greedy_matches_ar"] is True
        assert m["tau"] >= 1.0 and m["speedup"] > 0
    opd, sft, cont = (json.load(open(tmp_path / "eval" / f"eagle3_{r}_mtbench" / "metrics.json"))
                      for r in ("opd", "sft", "sft_cont"))
    assert opd["training"] == "opd (4 steps)" and opd["training_flops"] > sft["training_flops"] > 0
    report = json.load(open(tmp_path / "report" / "results.json"))
    assert {(r["drafter"], r["method"]) for r in report["rows"]} == {
        ("none", "-"), ("ngram", "-"), ("eagle3", "sft"), ("eagle3", "opd"), ("eagle3", "sft_scale"), ("eagle3", "sft_cont")}
    shipped = json.load(open(tmp_path / "eval" / "eagle3_shipped_mtbench" / "metrics.json"))
    assert shipped["greedy_matches_ar"] is True and shipped["tau"] > 1.0  # the drafter shipped in the repo
    # all five decoded side by side, against one autoregressive timing: the speed-ups compare
    assert shipped["side_by_side"] == ["ngram"] + ["eagle3"] * 4
    assert {opd["ar_seconds"], sft["ar_seconds"], cont["ar_seconds"]} == {shipped["ar_seconds"]}
    assert "Timed apart" not in open(tmp_path / "report" / "results.md").read()
    curves = report["curves"]["eagle3"]
    assert [p["step"] for p in curves["sft"]] == [0, 20, 40] and [p["step"] for p in curves["opd"]] == [0, 2, 4]
    # Draft-OPD (the reference preset) and continued SFT both start from the shipped drafter's
    # cumulative FLOPs, and continued SFT stops once it has spent what Draft-OPD did
    start = json.load(open(os.path.join(REPO, "experiments", "drafters", "smollm2_eagle3", "export.json")))["flops"]
    assert curves["opd"][0]["flops"] == curves["sft_cont"][0]["flops"] == start
    assert curves["opd"][-1]["flops"] <= curves["sft_cont"][-1]["flops"]
    assert cont["training"].startswith("sft_cont (") and cont["training_flops"] >= opd["training_flops"]
    opd_config = json.load(open(tmp_path / "opd" / "eagle3" / "opd_config.json"))
    assert opd_config["loss_preset"] == "reference_yaml" and opd_config["rollout_temperature"] == 0.0
    assert (tmp_path / "report" / "curves.png").exists()
    assert "| eagle3 | opd |" in first.stdout
    second = _launch(tmp_path)  # everything is there: nothing is generated or trained again
    assert second.returncode == 0, second.stderr[-3000:]
    for message in ("2 responses already in", "0 of this process's 2 shards to write", "sft: already at step 40",
                    "opd: already at step 4", "eval: run eagle3_opd_mtbench already done",
                    "eval: run eagle3_sft_cont_mtbench already done"):
        assert message in second.stderr, message
    assert records[0]["response"] in second.stdout and "| eagle3 | opd |" in second.stdout


def test_bad_config_values_are_clear_errors(tmp_path):
    bad = _launch(tmp_path, "experiments/quickstart.py:huge")
    assert bad.returncode != 0 and "unknown variant 'huge'" in bad.stderr


def test_validate_names_the_bad_field():
    from opd import configs

    mod = load_script("experiments/quickstart.py")
    for field, value, message in [
        ("stages", ["fetch_assets", "train_everything"], "unknown stage"),
        ("chat.max_new_tokens", 0, "chat.max_new_tokens must be >= 1"),
        ("chat.temperature", -0.5, "chat.temperature must be >= 0"),
        ("target.dtype", "float8", "target.dtype"),
        ("eval.runs", [], "config.eval.runs is empty"),
        ("eval.runs", [dict(name="a", drafter="eagle9", prompt_set="mtbench")], r"runs\[0\] \('a'\): drafter must be one of"),
        ("eval.runs", [dict(name="a", drafter="ngram", prompt_set="nope")], "prompt_set must be one of"),
        ("eval.runs", [dict(name="a", drafter="ngram", prompt_set="mtbench", topp=0.9)], r"unknown field\(s\) \['topp'\]"),
        ("eval.runs", [dict(name="a", drafter="ngram", prompt_set="mtbench")] * 2, "name must be unique"),
        ("eval.runs", [dict(name="a", drafter="ngram", prompt_set="mtbench", num_draft_tokens=0)], "num_draft_tokens must be >= 1"),
        ("eval.temperature", -1.0, "temperature must be >= 0"),
    ]:
        config = mod.get_config("tiny")
        node, _, leaf = field.rpartition(".")
        (config[node] if node else config)[leaf] = value
        with pytest.raises(ValueError, match=message):
            configs.validate(config)


@pytest.mark.slow
def test_regenerate_tiny_writes_trajectory_shards_and_resumes(tmp_path):
    from opd.data.builders import read_trajectory_shards

    first = _launch(tmp_path, "experiments/regenerate_smollm2.py:tiny")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = read_trajectory_shards(str(tmp_path / "regenerate" / "stdlib_code"))
    assert len(rows) == 2 and all(len(r["response_ids"]) > 0 for r in rows)
    second = _launch(tmp_path, "experiments/regenerate_smollm2.py:tiny")
    assert second.returncode == 0 and "0 of this process's 1 shards to write" in second.stderr


@pytest.mark.slow
def test_sft_scale_tiny_trains_on_packed_rows_of_both_sources(tmp_path):
    """sft_smollm2.py's `scale` leg at tiny sizes: the shipped answers + the offline-text corpus,
    packed rows with the target's segment-masked online features, probe, export."""
    out = _launch(tmp_path, "experiments/sft_smollm2.py:eagle3,scale,tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "sft_scale" / "eagle3" / "metrics.jsonl")]
    # the tiny batches of real answers, code and docs differ too much for the loss of one batch to
    # fall monotonically (15.7 -> 18.0 over 40 steps); the held-out probe shows the drafter learning
    probes = [(r["step"], r["probe_tau"]) for r in rows if "probe_tau" in r]
    assert probes[0] == (0, 1.0) and probes[-1][1] > 1.0  # 1.0 -> 1.15 at step 40
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert (tmp_path / "export" / "sft_scale_eagle3" / "config.json").exists()
    for source in ("stdlib_code", "pydocs", "alpacaeval_outputs"):
        assert list((tmp_path / "text_corpus" / source).glob("shard-*.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_sft_tiny_lowers_the_loss_and_raises_tau_on_heldout_prompts(tmp_path, kind):
    """regenerate -> sft -> export -> eval with SmolLM2: the trained drafter beats the untrained
    one (same draft vocabulary) on AlpacaEval held-out prompts, losslessly."""
    first = _launch(tmp_path, f"experiments/sft_smollm2.py:{kind},tiny")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "sft" / kind / "metrics.jsonl")]
    rows = [r for r in rows if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy/1"] > rows[0]["accuracy/1"]
    untrained = json.load(open(tmp_path / "eval" / f"{kind}_untrained_alpacaeval" / "metrics.json"))
    trained = json.load(open(tmp_path / "eval" / f"{kind}_sft_alpacaeval" / "metrics.json"))
    assert untrained["greedy_matches_ar"] is True and trained["greedy_matches_ar"] is True
    assert trained["training"].startswith("sft (") and trained["training_flops"] > 0
    assert trained["tau"] > untrained["tau"]
    assert (tmp_path / "export" / f"sft_{kind}" / "config.json").exists()
    second = _launch(tmp_path, f"experiments/sft_smollm2.py:{kind},tiny")  # all done: nothing retrained
    assert second.returncode == 0 and "sft: already at step" in second.stderr
