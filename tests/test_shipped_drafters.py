"""Drafters shipped in the repo (`experiments/drafters/<name>/`, `shipped:<name>` in configs):
intact (SHA256SUMS), small (<= 64 MB together), with their provenance, loadable for SmolLM2 and
lossless; `experiments/ship_drafter.py`, which writes them (legs of a run chained), and
`experiments/benchmarks/sft_scale_curves.py`, which reads their legs."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import opd
from opd.paths import SHIPPED_DIR, resolve_path, verify_sha256sums
from conftest import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(SHIPPED_DIR, "*", "config.json")))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_drafter_is_intact_and_says_where_it_came_from(name):
    folder = resolve_path(f"shipped:{name}")
    verify_sha256sums(folder)
    prov = json.load(open(os.path.join(folder, "provenance.json")))
    assert prov["flops"] > 0 and prov["answer_tokens"] > 0 and prov["last_probe"]["probe_tau"] >= 1.0
    assert json.load(open(os.path.join(folder, "export.json")))["flops"] == prov["export"]["flops"]


def test_shipped_drafters_fit_in_64_mb():
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(SHIPPED_DIR, "*", "*")))
    assert total <= 64 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_drafter_is_lossless_on_smollm2(name, smollm2_target):
    drafter = opd.load_drafter(resolve_path(f"shipped:{name}"), smollm2_target)
    prompts = ["Name three prime numbers."]
    ar = opd.generate(smollm2_target, prompts, max_new_tokens=24, temperature=0.0)
    spec = opd.speculative_generate(smollm2_target, drafter, prompts, max_new_tokens=24, temperature=0.0,
                                    num_draft_tokens=4)
    np.testing.assert_array_equal(np.asarray(spec.tokens[0]), np.asarray(ar.tokens[0]))
    assert spec.stats["tau"] > 1.0  # a trained drafter: some drafts accepted


@pytest.mark.slow  # four script launches (~1 min)
def test_ship_drafter_writes_a_float16_checksummed_copy(tmp_path):
    model, _ = make_hf_model("llama", seed=3)
    model.save_pretrained(tmp_path / "target", safe_serialization=True)
    target = opd.load_target(str(tmp_path / "target"))
    drafter = opd.init_drafter("eagle3", target, seed=0, token_counts=np.arange(128), draft_vocab_size=32)
    export = tmp_path / "export"
    opd.export_drafter(drafter, str(export))
    json.dump({"source": "sft_scale", "step": 7, "flops": 123}, open(export / "export.json", "w"))
    run = tmp_path / "run"
    run.mkdir()
    json.dump({"num_steps": 7}, open(run / "sft_config.json", "w"))
    with open(run / "metrics.jsonl", "w") as f:
        for step, tau in ((0, 1.0), (7, 1.5)):
            f.write(json.dumps({"step": step, "probe_tau": tau, "flops": 123 * step / 7, "tokens": 10 * step,
                                "loss": 2.0}) + "\n")
    out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "ship_drafter.py"), f"--export={export}",
                          f"--run={run}", "--name=tiny", f"--target={tmp_path / 'target'}", f"--out_dir={tmp_path / 'ship'}"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = tmp_path / "ship" / "tiny"
    verify_sha256sums(str(folder))
    prov = json.load(open(folder / "provenance.json"))
    assert (prov["flops"], prov["answer_tokens"], prov["last_probe"]["probe_tau"]) == (123, 70, 1.5)
    assert json.load(open(folder / "export.json"))["flops"] == 123
    # a second leg, continued from the shipped drafter: its metrics follow the first leg's
    json.dump({"source": "sft_scale", "step": 5, "flops": 200}, open(export / "export.json", "w"))
    with open(run / "metrics.jsonl", "w") as f:
        for step, tau in ((0, 1.5), (5, 1.8)):
            f.write(json.dumps({"step": step, "probe_tau": tau, "flops": 123 + 77 * step / 5, "tokens": 10 * step,
                                "loss": 1.0}) + "\n")
    out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "ship_drafter.py"), f"--export={export}",
                          f"--run={run}", "--name=tiny2", f"--target={tmp_path / 'target'}", f"--previous={folder}",
                          f"--out_dir={tmp_path / 'ship'}"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    legs = [json.loads(line)["leg"] for line in open(tmp_path / "ship" / "tiny2" / "metrics.jsonl")]
    assert legs == [0, 0, 1, 1]
    out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "benchmarks", "sft_scale_curves.py"),
                          f"--runs={tmp_path / 'ship' / 'tiny2'}", "--name=tiny", f"--out_dir={tmp_path / 'curves'}"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.load(open(tmp_path / "curves" / "results.json"))["probe"]
    assert [(p["leg"], p["probe_tau"]) for p in probe] == [(0, 1.0), (0, 1.5), (1, 1.5), (1, 1.8)]
    assert (tmp_path / "curves" / "curves.png").exists()
    shipped = opd.load_drafter(str(folder), target)
    for a, b in zip(jax.tree.leaves(drafter.split()[0]), jax.tree.leaves(shipped.split()[0])):  # the trained weights
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(np.float16).astype(a.dtype))
