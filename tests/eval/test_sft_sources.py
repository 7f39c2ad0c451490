"""`experiments/benchmarks/sft_sources.py`: tau gained per CPU-hour of each data source, with a
regenerated source's generation time charged for the share of it a run read; hand-made runs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "experiments", "benchmarks", "sft_sources.py")


def _module():
    return load_script("experiments/benchmarks/sft_sources.py")


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _folder(path, answer_lengths, regen_seconds=None):
    _jsonl(os.path.join(path, "shard-00000.jsonl"),
           [{"prompt_id": f"p{i}", "prompt_set": "test", "target": "tiny", "prompt_ids": [3], "response_ids": [5] * n}
            for i, n in enumerate(answer_lengths)])
    if regen_seconds is not None:
        _jsonl(path + ".metrics.jsonl", [{"shard": i, "seconds": s} for i, s in enumerate(regen_seconds)])


def _run(path, tau_end, seconds, tokens):
    _jsonl(os.path.join(path, "metrics.jsonl"), [
        {"step": 0, "probe_tau": 1.0, "flops": 0.0, "hook_seconds": 60.0},
        {"step": 40, "loss": 2.0, "seconds": seconds / 2, "tokens": tokens / 2, "flops": 1.0},
        {"step": 80, "loss": 1.0, "seconds": seconds, "tokens": tokens, "flops": 2.0},
        {"step": 80, "probe_tau": tau_end, "flops": 2.0, "hook_seconds": 60.0}])


def test_charges_generation_by_the_share_read_and_reports_gain_per_cpu_hour(tmp_path):
    mod = _module()
    w = str(tmp_path)
    _folder(os.path.join(w, "regenerate", "alpacaeval"), [100] * 40, regen_seconds=[600.0, 600.0])  # 4000 tok, 20 min
    _folder(os.path.join(w, "text_corpus", "stdlib_code"), [200] * 50)  # 10000 tokens, tokenised only
    # answers alone: read 2000 of 4000 tokens in 1 h -> half the generation cost (10 min)
    _run(os.path.join(w, "sft_src_answers", "eagle3"), 1.3, 3600.0, 2000.0)
    row = mod.source_row("answers", os.path.join(w, "sft_src_answers", "eagle3"),
                         [mod.folder_cost(os.path.join(w, "regenerate", "alpacaeval"))], ())
    assert row["data_cpu_h"] == pytest.approx(600.0 / 3600)
    assert row["gain_per_train_h"] == pytest.approx(0.3)
    assert row["gain_per_cpu_h"] == pytest.approx(0.3 / (1 + 1 / 6))
    assert row["probe_seconds"] == 120.0 and row["unique_tokens"] == 4000
    # a mix read 4x / 1x per epoch (epoch 4 * 4000 + 10000 = 26000 tokens): reading 13000 tokens
    # touches min(1, 4 * 13000 / 26000) = all the answers, half the code (free)
    costs = [mod.folder_cost(os.path.join(w, f)) for f in ("regenerate/alpacaeval", "text_corpus/stdlib_code")]
    assert costs[1]["seconds"] == 0.0
    assert mod.data_seconds(costs, (4, 1), 13000.0) == pytest.approx(1200.0)
    assert mod.data_seconds(costs, (4, 1), 1300.0) == pytest.approx(1200.0 * 0.2)


def test_an_unfinished_run_is_named(tmp_path):
    mod = _module()
    run = tmp_path / "sft_src_code" / "eagle3"
    _jsonl(str(run / "metrics.jsonl"), [{"step": 0, "probe_tau": 1.0, "flops": 0.0}])
    with pytest.raises(FileNotFoundError, match="has not finished"):
        mod.source_row("code", str(run), [], ())


def test_the_script_writes_its_results(tmp_path):
    w = tmp_path / "dir"
    _folder(str(w / "regenerate" / "alpacaeval"), [100] * 40, regen_seconds=[1200.0])
    _folder(str(w / "text_corpus" / "stdlib_code"), [200] * 50)
    _run(str(w / "sft_src_answers" / "eagle3"), 1.3, 3600.0, 2000.0)
    _run(str(w / "sft_src_code" / "eagle3"), 1.1, 1800.0, 5000.0)
    _jsonl(str(w / "sft_src_mix" / "eagle3" / "metrics.jsonl"), [{"step": 0, "probe_tau": 1.0, "flops": 0.0}])
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, SCRIPT, f"--workdir={w}", f"--out_dir={out}"], capture_output=True,
                       text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.load(open(out / "results.json"))["rows"]
    assert [r["source"] for r in rows] == ["answers", "code"]
    assert rows[1]["gain_per_cpu_h"] == pytest.approx(0.2) and rows[1]["data_cpu_h"] == 0.0
    assert (out / "sources.png").exists() and "skipping chat: no run" in p.stdout
    # a run still training is left out and named, next to the sources never run
    assert json.load(open(out / "results.json"))["not_measured"] == {"chat": "no run", "docs": "no run", "mix": "unfinished"}
    assert "Not measured yet: chat (no run), docs (no run), mix (unfinished)." in (out / "results.md").read_text()
    assert (out / "runs" / "code.metrics.jsonl").read_text() == (w / "sft_src_code" / "eagle3" / "metrics.jsonl").read_text()
