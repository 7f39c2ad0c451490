"""The `eval` stage's side-by-side mode: runs that differ only in their drafter decode in one run
against one autoregressive timing; finished runs are skipped on a rerun."""

import json

import pytest

from conftest import make_hf_model
from opd import configs, pipeline


def _run(name, drafter="ngram", **kw):
    return dict(name=name, drafter=drafter, prompt_set="mtbench", **kw)


def test_groups_by_everything_but_the_drafter():
    c = configs.default_config()
    c.eval.runs = [_run("a"), _run("b", num_draft_tokens=2), _run("none", drafter="none"), _run("c", temperature=1.0),
                   _run("d", num_draft_tokens=3, temperature=1.0), _run("e", batch_size=2)]
    runs = configs.eval_runs(c)
    names = [[r["name"] for r in g] for g in pipeline.eval_groups(runs, True)]
    assert names == [["a", "b"], ["none"], ["c", "d"], ["e"]]
    assert [[r["name"] for r in g] for g in pipeline.eval_groups(runs, False)] == [[n] for n in "a b none c d e".split()]
    c.eval.runs = [_run("a", side_by_side=True)]  # a block setting, not a run field
    with pytest.raises(ValueError, match="unknown field"):
        configs.eval_runs(c)


def test_side_by_side_runs_share_the_autoregressive_timing(tmp_path):
    model, _ = make_hf_model("llama", seed=3)
    model.config.eos_token_id = 1
    model.save_pretrained(tmp_path / "target", safe_serialization=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt_ids": p}) + "\n"
                               for i, p in enumerate([[5, 9, 2, 5, 9, 2], [17, 3] * 4, [1, 2, 3, 1, 2, 3]])))
    c = configs.default_config()
    c.stages = ("eval",)
    c.target.path = str(tmp_path / "target")
    c.eval.update(num_prompts=3, max_new_tokens=6, side_by_side=True)
    c.eval.runs = [dict(name=n, drafter=d, prompt_set=str(prompts), num_draft_tokens=k)
                   for n, d, k in (("k3", "ngram", 3), ("ar", "none", 1), ("k2", "ngram", 2))]
    workdir = tmp_path / "w"
    pipeline.stage_eval(c, str(workdir))
    m = {n: json.load(open(workdir / "eval" / n / "metrics.json")) for n in ("k3", "ar", "k2")}
    assert m["k3"]["ar_seconds"] == m["k2"]["ar_seconds"] and m["k3"]["side_by_side"] == ["ngram", "ngram"]
    assert m["ar"]["side_by_side"] == ["none"] and m["ar"]["ar_seconds"] != m["k3"]["ar_seconds"]
    assert (m["k3"]["num_draft_tokens"], m["k2"]["num_draft_tokens"]) == (3, 2)
    assert m["k3"]["greedy_matches_ar"] and m["k2"]["greedy_matches_ar"]
    # a rerun with one run's results gone decodes only that run (against a fresh AR timing)
    (workdir / "eval" / "k2" / "metrics.json").unlink()
    pipeline.stage_eval(c, str(workdir))
    again = json.load(open(workdir / "eval" / "k2" / "metrics.json"))
    assert again["side_by_side"] == ["ngram"] and again["tau"] == m["k2"]["tau"]
    assert json.load(open(workdir / "eval" / "k3" / "metrics.json"))["provenance"] == m["k3"]["provenance"]
