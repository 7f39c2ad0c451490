"""Regenerate: the target's answers to training prompts in resumable, per-process JSONL shards."""

import json
import os

import pytest
import tokenizers

import opd
from conftest import make_hf_model
from opd.data import regenerate as regen
from opd.data.builders import read_trajectory_shards

WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(100)]
RECORDS = [{"id": f"p{i}", "turns": [" ".join(f"w{(i * 7 + j) % 100}" for j in range(3 + i % 4))]} for i in range(5)]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_target")
    model, _ = make_hf_model("llama", seed=7)
    model.save_pretrained(path, safe_serialization=True)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<eos>", "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}, f)
    return opd.load_target(str(path))


def _run(target, out_dir, **kw):
    args = dict(prompt_set="alpacaeval_train", target_name="tiny", max_new_tokens=6, batch_size=2, shard_size=2)
    args.update(kw)
    return regen.regenerate(target, RECORDS, str(out_dir), **args)


def test_shards_hold_the_targets_greedy_answers(target, tmp_path):
    paths = _run(target, tmp_path, drafter=opd.init_drafter("ngram", target))
    assert [os.path.basename(p) for p in paths] == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    rows = read_trajectory_shards(str(tmp_path))  # the trajectory builder's own reader accepts them
    assert [r["prompt_id"] for r in rows] == [r["id"] for r in RECORDS]
    tok = target.tokenizer
    for r, row in zip(RECORDS, rows):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}]))
        want = opd.generate(target, [ids], max_new_tokens=6).tokens[0]
        assert list(row["prompt_ids"]) == ids
        resp = list(row["response_ids"])
        assert resp == want or resp == want + [target.eos_token_ids[0]]
    metrics = [json.loads(line) for line in open(regen.metrics_path(str(tmp_path)))]  # one line per shard written
    assert [m["shard"] for m in metrics] == [0, 1, 2] and all(m["tokens_per_s"] > 0 for m in metrics)
    assert sum(m["generated_tokens"] for m in metrics) == sum(
        len(r["response_ids"]) - (r["response_ids"][-1:] == [target.eos_token_ids[0]]) for r in rows)


def test_resume_writes_only_missing_shards_and_processes_split_the_work(target, tmp_path):
    paths = _run(target, tmp_path)
    before = {p: os.path.getmtime(p) for p in paths}
    content = open(paths[1]).read()
    os.remove(paths[1])
    _run(target, tmp_path)
    assert open(paths[1]).read() == content  # same answers again (greedy)
    assert all(os.path.getmtime(p) == before[p] for p in (paths[0], paths[2]))
    a = _run(target, tmp_path / "split", process_index=0, process_count=2)
    b = _run(target, tmp_path / "split", process_index=1, process_count=2)
    assert [os.path.basename(p) for p in a] == ["shard-00000.jsonl", "shard-00002.jsonl"]
    assert [os.path.basename(p) for p in b] == ["shard-00001.jsonl"]


def test_training_prompts_never_include_eval_prompts_and_bad_values_are_clear(target, tmp_path):
    from opd.data.splits import eval_prompt_texts

    banned = eval_prompt_texts()
    records = regen.training_prompts("stdlib_code", num_prompts=20)
    assert len(records) == 20 and not any(" ".join(r["turns"][0].split()).lower() in banned for r in records)
    with pytest.raises(ValueError, match="evaluation-only"):
        regen.training_prompts("mtbench")
    with pytest.raises(ValueError, match="unknown training prompt source"):
        regen.training_prompts("wikipedia")
    with pytest.raises(ValueError, match="process_index"):
        _run(target, tmp_path, process_index=2, process_count=2)
