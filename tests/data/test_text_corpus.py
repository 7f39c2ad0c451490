"""Text corpus: offline text as chat records, tokenised into regenerate-format trajectory shards."""

import inspect
import json
import os
import shutil
import textwrap

import numpy as np
import pytest

from opd import configs, pipeline
from opd.data import assets, builders, splits, text_corpus as tc, text_sources
from opd.data.pipeline import chat_tokens_and_mask, tokenize_trajectory
from opd.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path):
    return load_tokenizer(smollm2_gguf_path)


@pytest.fixture(scope="module")
def stdlib_copy(tmp_path_factory):
    """A small stdlib folder: textwrap.py and json/ of the running interpreter."""
    root = tmp_path_factory.mktemp("stdlib")
    shutil.copy(textwrap.__file__, root / "textwrap.py")
    shutil.copytree(os.path.dirname(json.__file__), root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    return str(root)


def _row(record, tok, max_tokens=256):
    return tc.trajectory_row(record, tok, max_tokens=max_tokens, prompt_set="text_x", target_name="smollm2")


def test_records_are_deterministic_and_hold_the_real_source(tok, stdlib_copy):
    a = tc.corpus_records("stdlib_code", tok, root=stdlib_copy)
    assert a == tc.corpus_records("stdlib_code", tok, root=stdlib_copy) and len(a) > 30
    assert len({r["id"] for r in a}) == len(a) and not any("<locals>" in r["id"] for r in a)
    assert tc.corpus_records("stdlib_code", tok, root=stdlib_copy, num_records=5) == a[:5]
    (dedent,) = [r for r in a if r["id"] == "stdlib:textwrap.py:dedent"]
    assert dedent["turns"] == ["Show the source of `dedent` from `textwrap.py` in the Python standard library."]
    assert dedent["response"] == f"```python\n{inspect.getsource(textwrap.dedent).rstrip()}\n```"


def test_loss_mask_covers_exactly_the_answer_and_its_end_token(tok, stdlib_copy):
    (record,) = [r for r in tc.corpus_records("stdlib_code", tok, root=stdlib_copy) if r["id"].endswith(":dedent")]
    row = _row(record, tok, max_tokens=4096)  # dedent's ~450 tokens whole
    out = tokenize_trajectory(row)
    mask = out["loss_mask"].astype(bool)
    assert tok.decode(out["tokens"][~mask], skip_special_tokens=False) == tok.apply_chat_template(
        [{"role": "user", "content": record["turns"][0]}])
    assert tok.decode(out["tokens"][mask], skip_special_tokens=False) == record["response"] + "<|im_end|>"
    # the same tokens and mask as the conversation rendered whole by the target's chat template
    messages = [{"role": "user", "content": record["turns"][0]}, {"role": "assistant", "content": record["response"]}]
    tokens, want = chat_tokens_and_mask(tok, messages)
    n = len(out["tokens"])
    assert np.array_equal(tokens[:n], out["tokens"]) and np.array_equal(want[:n], out["loss_mask"])
    assert not want[n:].any()  # only the newline after the end token is left
    cut = _row(record, tok)["response_ids"]  # the default 256 tokens
    assert cut == row["response_ids"][:256] and tok.eos_token_ids[0] not in cut  # truncated: no end token


def test_pydocs_passages_join_paragraphs_of_one_file_within_the_budget(tok, tmp_path):
    para = lambda i: f"Paragraph {i} of prose " + "word " * 30 + "end."
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "spam.rst.txt").write_text(
        "Spam module\n===========\n\n" + "\n\n".join(para(i) for i in range(3)) + "\n\nEggs\n----\n\n" + para(3) + "\n")
    (tmp_path / "a.rst.txt").write_text(para(9) + "\n")
    recs = tc.corpus_records("pydocs", tok, root=str(tmp_path), max_tokens=80)
    assert [r["id"] for r in recs] == ["pydocs:a.rst.txt:p0", "pydocs:library/spam.rst.txt:p0",
                                       "pydocs:library/spam.rst.txt:p2"]
    assert recs[1]["response"] == para(0) + "\n\n" + para(1)  # a third one would pass 79 tokens
    assert recs[1]["turns"] == ['Write a passage of the Python documentation page `library/spam`, from its section '
                                '"Spam module".']
    assert recs[2]["response"] == para(2) + "\n\n" + para(3)
    assert all(len(_row(r, tok, 80)["response_ids"]) <= 80 for r in recs)


def test_a_corpus_source_without_records_is_an_error_naming_the_fix(tok, tmp_path, monkeypatch):
    """Without the Python docs installed the pydocs corpus would be empty and every run training on
    it would read another data mix: the build refuses and says what to install."""
    monkeypatch.setattr(text_sources, "DEFAULT_PYDOCS_ROOT", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"text corpus pydocs: no records.*apt-get install python3\.11-doc"):
        tc.build("pydocs", tok, str(tmp_path / "pydocs"), target_name="t")
    assert not (tmp_path / "pydocs").exists()


def test_no_evaluation_prompt_text_reaches_the_corpus(tok, tmp_path):
    heldout = splits.alpaca_split(assets.load_prompt_set("alpacaeval"), "heldout")
    plain = lambda t: t.isprintable() and "'" not in t and "\\" not in t  # repr() writes it as it is
    mtbench = next(t for r in assets.load_prompt_set("mtbench") for t in r["turns"] if plain(t))
    alpaca_heldout = next(r["instruction"] for r in heldout if plain(r["instruction"]))
    (tmp_path / "m.py").write_text(f"def leaky():\n    return {mtbench.upper()!r}\n\n\n"
                                   f"def leaky2():\n    x = 1\n    return {alpaca_heldout!r}\n\n\n"
                                   "def clean():\n    return 1\n")
    assert [r["id"] for r in tc.corpus_records("stdlib_code", tok, root=str(tmp_path))] == ["stdlib:m.py:clean"]
    alpaca = tc.corpus_records("alpacaeval_outputs", tok)
    train = splits.training_records("alpacaeval")
    assert [r["id"] for r in alpaca] == [f"alpacaeval:{r['id']}" for r in train]  # the train split only
    evaluation = assets.load_prompt_set("mtbench") + assets.load_prompt_set("humaneval") + heldout
    builders.check_no_eval_leak(alpaca, evaluation)
    banned = splits.all_eval_prompt_texts()
    assert not [r["id"] for r in alpaca if any(t in splits.normalise(r["response"]) for t in banned)]
    assert alpaca[0]["response"] == assets.alpacaeval_outputs()[train[0]["id"]]


def test_stage_writes_readable_shards_and_resumes_without_rewriting(smollm2_gguf_path, stdlib_copy, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(tc.text_sources, "stdlib_root", lambda: stdlib_copy)
    c = configs.default_config()
    c.stages = ("text_corpus",)
    c.target.path = smollm2_gguf_path
    c.text_corpus.sources = ("stdlib_code", "alpacaeval_outputs")
    c.text_corpus.num_records = 5
    c.text_corpus.shard_size = 2
    configs.validate(c)
    summary = pipeline.stage_text_corpus(c, str(tmp_path))
    folder = tmp_path / "text_corpus" / "stdlib_code"
    shards = sorted(folder.glob("shard-*.jsonl"))
    assert [p.name for p in shards] == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    rows = builders.read_trajectory_shards(str(folder))
    want = tc.corpus_records("stdlib_code", load_tokenizer(smollm2_gguf_path), num_records=5)
    assert [r["prompt_id"] for r in rows] == [r["id"] for r in want]
    assert {r["prompt_set"] for r in rows} == {"text_stdlib_code"}
    assert summary["sources"]["stdlib_code"]["records"] == 5
    assert summary["sources"]["stdlib_code"]["response_tokens"] == sum(len(r["response_ids"]) for r in rows)
    assert json.loads((tmp_path / "text_corpus" / "summary.json").read_text())["sources"] == summary["sources"]
    assert len(builders.read_trajectory_shards(str(tmp_path / "text_corpus" / "alpacaeval_outputs"))) == 5

    before = {p: p.stat().st_mtime_ns for p in shards}
    content = shards[1].read_text()
    shards[1].unlink()
    assert pipeline.stage_text_corpus(c, str(tmp_path))["sources"] == summary["sources"]
    assert shards[1].read_text() == content  # the missing shard again, the others untouched
    assert all(p.stat().st_mtime_ns == before[p] for p in (shards[0], shards[2]))
    c.text_corpus.max_tokens = 64
    with pytest.raises(ValueError, match="was written with"):
        pipeline.stage_text_corpus(c, str(tmp_path))


def test_bad_config_values_are_named():
    c = configs.default_config()
    c.stages = ("text_corpus",)
    c.text_corpus.sources = ("wikipedia",)
    with pytest.raises(ValueError, match=r"config\.text_corpus\.sources"):
        configs.validate(c)
    c.text_corpus.sources = ("pydocs",)
    c.text_corpus.max_tokens = 1
    with pytest.raises(ValueError, match=r"config\.text_corpus\.max_tokens must be >= 2"):
        configs.validate(c)
