"""Paths and small files shared by every stage: config path specs and atomic JSON / JSONL.

Path specs in configs:
  `asset:<name>`    a cached offline asset (`opd.data.assets`), fetched on first use;
  `workdir:<rel>`   `<workdir>/<rel>`, written by an earlier stage;
  `shipped:<name>`  a drafter shipped in the repo, `experiments/drafters/<name>/`;
  `data:<name>`     training data shipped in the repo, `experiments/data/<name>/` (JSONL shards);
  a URL (gs://...)  a local copy, downloaded once per version (`opd.remote`);
  anything else     a local path (`~` expanded).
"""

from __future__ import annotations

import json
import os

from absl import logging

from opd import remote
from opd.data.assets import asset_path


_EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
SHIPPED_DIR = os.path.join(_EXPERIMENTS, "drafters")
DATA_DIR = os.path.join(_EXPERIMENTS, "data")
# spec prefix -> (folder, the file that marks a complete entry, what it holds)
_IN_REPO = {"shipped:": (SHIPPED_DIR, "config.json", "shipped drafter"),
            "data:": (DATA_DIR, "SHA256SUMS", "shipped data")}


def _in_repo(spec: str) -> tuple[str, bool]:
    """The folder a `shipped:` / `data:` spec names in this checkout, and whether it is complete
    (holds its marker file)."""
    prefix, name = spec.split(":", 1)
    root, marker, _ = _IN_REPO[prefix + ":"]
    path = os.path.join(root, name)
    return path, os.path.isfile(os.path.join(path, marker))


def _require_in_repo(spec: str) -> str:
    """`_in_repo(spec)`'s folder, or a FileNotFoundError naming what this checkout ships."""
    path, complete = _in_repo(spec)
    if not complete:
        prefix, name = spec.split(":", 1)
        root, _, what = _IN_REPO[prefix + ":"]
        have = sorted(d for d in os.listdir(root) if not d.startswith(".")) if os.path.isdir(root) else []
        raise FileNotFoundError(f"no {what} {name!r} in {root} (there: {have or 'none'}; "
                                f"it comes with a git checkout of the repo, not a wheel)")
    return path


def resolve_path(spec: str, workdir: str = "") -> str:
    """The local path a config path spec names (module docstring)."""
    spec = str(spec)
    if spec.startswith("workdir:"):
        if not workdir:
            raise ValueError(f"{spec!r} names a workdir path, but no workdir was given")
        return os.path.join(workdir, spec[len("workdir:"):])
    if spec.startswith("asset:"):
        return asset_path(spec[len("asset:"):])
    if spec.startswith(tuple(_IN_REPO)):
        return _require_in_repo(spec)
    if remote.is_url(spec):
        return remote.fetch(spec)
    return os.path.expanduser(spec)


def path_exists(spec: str) -> bool:
    """Whether a config path spec names something that exists (`asset:` and `workdir:` specs
    are fetched / written by an earlier stage, so they count as existing)."""
    spec = str(spec)
    if spec.startswith(("asset:", "workdir:")):
        return True
    if spec.startswith(tuple(_IN_REPO)):
        return _in_repo(spec)[1]
    return remote.exists(spec) if remote.is_url(spec) else os.path.exists(os.path.expanduser(spec))


def sha256(path: str) -> str:
    return remote.file_digest(path, "sha256")


def write_sha256sums(folder: str) -> None:
    """`folder/SHA256SUMS` (`sha256sum` format) over every other file in `folder`: how a shipped
    drafter or shipped data is checked intact."""
    names = sorted(n for n in os.listdir(folder) if n != "SHA256SUMS")
    with open(os.path.join(folder, "SHA256SUMS"), "w") as f:
        f.writelines(f"{sha256(os.path.join(folder, n))}  {n}\n" for n in names)


def verify_sha256sums(folder: str) -> None:
    """Raises ValueError naming the first file of `folder` that is missing, unlisted or whose
    digest differs from `folder/SHA256SUMS`."""
    with open(os.path.join(folder, "SHA256SUMS")) as f:
        listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in f.read().splitlines() if line}
    present = set(os.listdir(folder)) - {"SHA256SUMS"}
    for name in sorted(present ^ set(listed)):
        raise ValueError(f"{folder}: {name} is {'not listed in' if name in present else 'missing but listed in'} SHA256SUMS")
    for name, digest in sorted(listed.items()):
        if sha256(os.path.join(folder, name)) != digest:
            raise ValueError(f"{folder}: {name} does not match its SHA256SUMS digest (damaged or edited)")


def write_json(path: str, obj) -> None:
    """Writes `obj` to `path` atomically (tmp + rename): a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list:
    """The records of a JSONL file ([] when it does not exist). A torn last line (a write cut
    short by a crash, a kill or a full disk) is skipped with a warning naming the file and
    line; an unreadable line before the last is an error (the file is damaged, not torn)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i != last:
                raise ValueError(f"{path}, line {i + 1}: not JSON ({e}); the file is damaged: fix or remove that "
                                 "line") from None
            logging.warning("%s, line %d: skipped a torn last line (%d characters; a write cut short)", path, i + 1,
                            len(line))
    return rows


def drop_torn_tail(path: str) -> None:
    """Ends a JSONL file on a newline before an append: a torn last line (`read_jsonl`) is cut
    off with a warning; a whole record that only lacks its newline gets one."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()  # only when the file does not end on a newline
        keep = data.rfind(b"\n") + 1
        try:
            json.loads(data[keep:])
            f.write(b"\n")
            return
        except ValueError:
            pass
        logging.warning("%s, line %d: dropped a torn last line (%d bytes) before appending", path,
                        data.count(b"\n") + 1, size - keep)
        f.truncate(keep)


def append_jsonl(path: str, records) -> None:
    """Appends records as JSON lines, flushed to disk (after dropping a torn last line)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    drop_torn_tail(path)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
