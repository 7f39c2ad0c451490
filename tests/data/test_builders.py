"""Tests for opd.data.text_sources and opd.data.builders (tfds array_record, no TensorFlow)."""

import ast
import errno
import gzip
import json
import logging
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import run_as_hosts
from opd.data import assets, builders, splits, text_sources

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


# ----------------------------------------------------------------------------- text sources


def test_stdlib_prompts_are_deterministic_and_well_formed():
    a = text_sources.stdlib_code_prompts(max_files=30)
    b = text_sources.stdlib_code_prompts(max_files=30)
    assert a == b and len(a) > 50
    assert len({r["id"] for r in a}) == len(a)
    assert [r["path"] for r in a] == sorted(r["path"] for r in a)  # files in sorted order
    assert {r["kind"] for r in a} == set(text_sources.CODE_TEMPLATES)
    for r in a:
        assert r["id"].startswith(f"stdlib:{r['path']}:{r['qualname']}")
        (prompt,) = r["turns"]
        assert prompt.endswith("\n```") and "```python\n" in prompt
        code = prompt.split("```python\n", 1)[1][:-4]
        ast.parse(code)  # a whole, dedented function
        assert 4 <= code.count("\n") + 1 <= 60
    assert text_sources.stdlib_code_prompts(max_files=30, max_prompts=7) == a[:7]


def test_docstring_prompts_hide_the_docstring(tmp_path):
    body = '        """Secret docstring."""\n        y = x + 1\n        y *= 2\n        return y\n'
    (tmp_path / "m.py").write_text("class C:\n" + "".join(f"    def f{i}(self, x):\n" + body for i in range(12)))
    recs = text_sources.stdlib_code_prompts(str(tmp_path))
    assert [r["id"] for r in recs] == [f"stdlib:m.py:C.f{i}" for i in range(12)]
    assert {r["kind"] for r in recs} == set(text_sources.CODE_TEMPLATES)
    for i, r in enumerate(recs):
        code = r["turns"][0].split("```python\n", 1)[1]
        if r["kind"] == "docstring":
            assert code.startswith(f"def f{i}(self, x):\n    y = x + 1") and "Secret" not in code
        else:
            assert code.startswith(f'def f{i}(self, x):\n    """Secret docstring."""\n    y = x + 1')


RST = """\
Heading
=======

.. module:: spam
   :synopsis: A module.

This paragraph of prose about the :mod:`spam` module is long enough to be kept as a prompt, and its
roles such as :func:`~spam.eggs` and ``literal code`` and *emphasis* are reduced to their text.

Short one.

Example::

    >>> spam.eggs()
    'this introduction and this code block are dropped'

* a bullet list item that is long enough to be kept if bullets were prose, but they are not kept at all
  by the paragraph filter because bullets are lists and not prose paragraphs of the documentation.

   An indented block quote that is long enough to be kept if it were prose, but it is indented so it
   is treated like a directive body or a definition and is not kept by the paragraph filter at all.

A second prose paragraph, with a `link <https://example.com>`_ in it, long enough to pass the length
filter that keeps only paragraphs between the configured minimum and maximum number of characters.
"""


def test_pydocs_prompts_from_rest(tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "spam.rst.txt").write_text(RST)
    (tmp_path / "a.rst.txt").write_text("Title\n-----\n\n" + "Word " * 60 + "\n")
    recs = text_sources.pydocs_prompts(str(tmp_path), min_chars=100)
    assert [r["id"] for r in recs] == ["pydocs:a.rst.txt:0", "pydocs:library/spam.rst.txt:0",
                                       "pydocs:library/spam.rst.txt:1"]
    text = recs[1]["turns"][0].split("\n\n", 1)[1]
    assert text.startswith("This paragraph of prose about the spam module")
    assert "spam.eggs and `literal code` and emphasis are" in text
    assert recs[2]["turns"][0].split("\n\n", 1)[1].startswith("A second prose paragraph, with a link in it")
    assert all(r["kind"] in text_sources.DOC_TEMPLATES for r in recs)
    assert recs == text_sources.pydocs_prompts(str(tmp_path), min_chars=100)
    assert [r["id"] for r in text_sources.pydocs_prompts(str(tmp_path))] == ["pydocs:a.rst.txt:0"]  # min 200


def test_pydocs_absent_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert text_sources.pydocs_prompts(str(tmp_path / "missing")) == []
    assert "pydocs prompts skipped" in caplog.text


@pytest.mark.skipif(not os.path.isdir(text_sources.DEFAULT_PYDOCS_ROOT), reason="python3.11-doc not installed")
def test_real_pydocs():
    recs = text_sources.pydocs_prompts(max_prompts=300)
    assert len(recs) == 300 and len({r["id"] for r in recs}) == 300
    assert all(200 <= len(r["turns"][0].split("\n\n", 1)[1]) <= 1500 for r in recs)
    assert not any(":func:`" in r["turns"][0] or ".. " in r["turns"][0][:80] for r in recs)


# ----------------------------------------------------------------------------- prompt builders


@pytest.mark.parametrize("name", ["mtbench", "humaneval"])
def test_builder_equals_assets(name, data_dir):
    assert builders.load_prompts(name, data_dir) == assets.load_prompt_set(name)
    src = builders.load_source(name, data_dir)
    assert builders.builder_for(name, data_dir).info.splits.keys() == {"test"}  # evaluation split
    assert len(src) == {"mtbench": 80, "humaneval": 164}[name]


def test_alpacaeval_split_builders(data_dir):
    records = assets.load_prompt_set("alpacaeval")
    train = builders.load_prompts("alpacaeval_train", data_dir)
    heldout = builders.load_prompts("alpacaeval_heldout", data_dir)
    # AlpacaEval holds some MT-Bench questions verbatim; the train builder drops those (2 of them).
    mtbench = {" ".join(t.split()).lower() for r in assets.load_prompt_set("mtbench") for t in r["turns"]}
    hash_train = splits.alpaca_split(records, "train")
    assert train == [r for r in hash_train if " ".join(r["instruction"].split()).lower() not in mtbench]
    assert {r["id"] for r in hash_train} - {r["id"] for r in train} == {"791", "801"}
    assert heldout == splits.alpaca_split(records, "heldout")
    assert len(train) + len(heldout) == 805 - 2 and 100 < len(heldout) < 250
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}


def test_text_source_builders(data_dir):
    cfg = builders.PromptSetConfig(name="stdlib_code_test30", source="stdlib_code", training=True,
                                   loader_kwargs={"max_files": 30})
    b = builders.prepare(builders.PromptSetBuilder(config=cfg, data_dir=data_dir, file_format="array_record"))
    src = b.as_data_source()["train"]
    assert [builders.decode_prompt(src[i]) for i in range(len(src))] == text_sources.stdlib_code_prompts(max_files=30)


def test_eval_sets_never_reach_training(data_dir):
    assert not set(builders.EVAL_SETS) & set(builders.TRAINING_SETS)
    evaluation = [r for n in builders.EVAL_SETS for r in builders.load_prompts(n, data_dir)]
    training = [r for n in builders.TRAINING_SETS for r in builders.load_prompts(n, data_dir)]
    assert len(training) > 5000  # full stdlib code set (+ Python docs when installed)
    builders.check_no_eval_leak(training, evaluation)
    splits.check_disjoint(training, evaluation)
    for name in builders.EVAL_SETS:
        with pytest.raises(ValueError, match="has no split 'train'"):
            builders.load_source(name, data_dir, split="train")
    with pytest.raises(ValueError, match="occur in the training data"):  # the check itself works
        builders.check_no_eval_leak(training + [dict(evaluation[3], id="x")], evaluation)


def test_jsonl_builder(tmp_path, data_dir):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "a", "prompt": "Write a haiku."}, {"turns": ["Hi", "More?"], "tag": [1, 2]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert builders.load_prompts(str(path), data_dir) == assets.load_prompt_set(str(path))
    name1 = builders.jsonl_builder(str(path), data_dir).builder_config.name
    path.write_text(json.dumps(rows[0]) + "\n")
    assert builders.jsonl_builder(str(path), data_dir).builder_config.name != name1
    assert builders.load_prompts(str(path), data_dir) == assets.load_prompt_set(str(path))


def test_hosts_building_the_same_set_at_once(tmp_path, monkeypatch):
    """Multi-host launches share the workdir: two builds of one set that run at once (both
    threads wait for each other inside example generation, i.e. after tfds found no finished
    set) both succeed; the later rename loses to the first and reads the finished copy."""
    import threading

    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "prompt": f"prompt {i}"}) for i in range(20)) + "\n")
    data_dir = str(tmp_path / "tfds")
    together = threading.Barrier(2)
    prepare = builders.prepare
    calls, lost = [], []

    def racing_prepare(builder):
        calls.append(1)
        if len(calls) <= 2:  # the two first builds: neither finishes before the other has started
            generate = builder._generate_examples

            def generate_together():
                together.wait(timeout=60)
                yield from generate()

            builder._generate_examples = generate_together
        try:
            return prepare(builder)
        except OSError as e:
            lost.append(e)
            raise

    monkeypatch.setattr(builders, "prepare", racing_prepare)
    got, errors = run_as_hosts(lambda i: builders.load_prompts(str(path), data_dir))
    assert not errors, errors
    assert len(lost) == 1, lost  # the race happened: one host's rename lost
    assert got[0] == got[1] == assets.load_prompt_set(str(path))


@pytest.mark.parametrize("code", [errno.EEXIST, errno.ENOTEMPTY])
def test_a_lost_rename_reads_the_finished_set(tmp_path, monkeypatch, code):
    """A rename that loses between etils' exists check and os.rename gets ENOTEMPTY or EEXIST (CI
    got ENOTEMPTY and a multi-host test failed): another host finished the set, which is read.
    Any other OSError is raised."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "prompt": f"prompt {i}"}) for i in range(3)) + "\n")
    data_dir = str(tmp_path / "tfds")
    prepare, calls = builders.prepare, []

    def losing_prepare(builder, err=code):
        calls.append(1)
        if len(calls) == 1:
            prepare(builder)  # the other host's finished copy
            raise OSError(err, os.strerror(err))
        return prepare(builder)

    monkeypatch.setattr(builders, "prepare", losing_prepare)
    assert builders.load_prompts(str(path), data_dir) == assets.load_prompt_set(str(path))
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(builders, "prepare", lambda b: losing_prepare(b, errno.EACCES))
    with pytest.raises(PermissionError):
        builders.load_prompts(str(path), str(tmp_path / "other"))


# ----------------------------------------------------------------------------- trajectories


def _traj(i, **kw):
    row = {"prompt_id": str(i), "prompt_set": "alpacaeval_train", "target": "tiny/target",
           "prompt_ids": list(range(1, 3 + i % 4)), "response_ids": [7] * (1 + i % 3) + [2]}
    row.update(kw)
    return row


def test_trajectory_builder(tmp_path, data_dir):
    shards = tmp_path / "regen"
    shards.mkdir()
    rows = [_traj(i) for i in range(5)] + [_traj(1)]  # a second sample of prompt 1
    rows.append({"prompt_id": "t", "prompt_set": "stdlib_code", "target": "tiny/target", "id": "custom",
                 "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    (shards / "shard-00000.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n\n")
    with gzip.open(shards / "shard-00001.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows[4:]))
    src = builders.load_source(f"trajectories:{shards}", data_dir)
    got = [builders.decode_trajectory(src[i]) for i in range(len(src))]
    assert [g["id"] for g in got] == [f"alpacaeval_train/{i}/0" for i in range(5)] + ["alpacaeval_train/1/1", "custom"]
    for g, r in zip(got, rows):
        assert g["prompt_id"] == r["prompt_id"] and g["prompt_set"] == r["prompt_set"] and g["target"] == r["target"]
        assert g["prompt_ids"].dtype == np.int32 and g["prompt_ids"].tolist() == r.get("prompt_ids", [])
        assert g["response_ids"].tolist() == r.get("response_ids", [])
        assert g["messages"] == r.get("messages", [])


@pytest.mark.parametrize(
    "row, match",
    [
        (_traj(0, prompt_set="mtbench"), "evaluation set"),
        (_traj(0, prompt_set="alpacaeval_heldout"), "evaluation set"),
        (_traj(0, prompt_set="alpacaeval"), "evaluation set"),
        (_traj(0, target=""), "'target' is required"),
        (_traj(0, response_ids=[]), "needs non-empty 'response_ids'"),
        (_traj(0, response_ids=[1, -3]), "outside"),
        (_traj(0, prompt_ids="1 2"), "list of ints"),
        (_traj(0, messages=[{"role": "user"}]), "'messages' must be"),
    ],
)
def test_trajectory_records_are_checked(tmp_path, row, match):
    (tmp_path / "s.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        builders.read_trajectory_shards(str(tmp_path))


def test_trajectory_duplicate_ids_and_missing_folder(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps(_traj(0, id="x")) + "\n" + json.dumps(_traj(1, id="x")) + "\n")
    with pytest.raises(ValueError, match="duplicate trajectory id 'x'"):
        builders.read_trajectory_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        builders.trajectory_shards(str(tmp_path / "nope"))


def test_unknown_source(data_dir):
    with pytest.raises(ValueError, match="unknown source"):
        builders.builder_for("gsm8k", data_dir)


def test_no_tensorflow_imported():
    assert "tensorflow" not in sys.modules


def test_pydocs_source_absent_is_empty(data_dir, monkeypatch, caplog):
    monkeypatch.setattr(text_sources, "DEFAULT_PYDOCS_ROOT", "/nonexistent/_sources")
    with caplog.at_level(logging.WARNING):
        assert builders.load_source("pydocs", data_dir) == []
    assert "pydocs prompts skipped" in caplog.text
