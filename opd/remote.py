"""Workdirs on object storage (`gs://BUCKET/run`, or any fsspec URL): a local working copy
kept in sync with the bucket.

The stages read and write the workdir through local file APIs (JSON, JSONL, safetensors,
TensorBoard event files, memory-mapped caches, ArrayRecord shards), which object stores do not
offer. For a URL workdir `pipeline.run` runs the stages in a local copy (`config.local_workdir`,
default $OPD_REMOTE_CACHE (~/.cache/opd)/workdirs/<scheme>/<path>, one per process on a shared
machine) and
  * pulls the bucket's files into it when the run starts, so a fresh VM resumes where a
    preempted one stopped;
  * pushes what changed at every `opd.sharding.barrier` (each stage's end, the init and
    export hand-overs) and after every checkpoint;
  * multi-host: each process pushes what it wrote, waits at the barrier, then pulls what the
    others wrote, so a read after a barrier sees their files as on a shared disk.
Orbax checkpoints are not mirrored: `checkpoint_location` points orbax straight at the bucket,
where it commits each step atomically and every host writes its own shards. Feature caches
(`features/`) stay local: they are large and rebuilt when missing.

A push is committed by this process's manifest, `.opd_sync/process-<i>.json` ({path: [size,
md5]}), rewritten without the files about to be overwritten before they are uploaded and with
them afterwards; remote deletions come last. A pull takes only files some manifest lists with
matching size, so a push cut short by preemption leaves the last committed state (it may lose
that push's new files, never mix two versions of a file). Once a workdir has manifests, only
files some process pushed are pulled: a file copied into the bucket by another tool is not (name
it as an input instead: URL targets and drafters are fetched by `fetch`). A bucket workdir
without manifests (written through a gcsfuse mount, say) is adopted whole by process 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
from typing import Optional

MANIFEST_DIR = ".opd_sync"
LOCAL_ONLY = ("checkpoints", "features")  # directory names never mirrored (see the module docstring)

_current: Optional["RemoteWorkdir"] = None


def is_url(path) -> bool:
    """True for `scheme://...` paths (gs://, s3://, file://, memory://), False for local paths."""
    return "://" in str(path)


def file_digest(path: str, algorithm: str = "md5") -> str:
    """The hex digest of a file's bytes (md5: what object stores report; sha256: shipped files)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError as e:  # a dependency of the package; kept as a clear error for stripped installs
        raise ImportError(f"workdir {url}: URL workdirs need fsspec (pip install fsspec)") from e
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        hint = " (pip install gcsfs, or pip install -e '.[gcs]')" if scheme in ("gs", "gcs") else ""
        raise ValueError(f"workdir {url}: no filesystem for {scheme}://{hint}: {e}") from e


def _cache_path(url: str, kind: str) -> str:
    """$OPD_REMOTE_CACHE (default ~/.cache/opd)/<kind>/<scheme>/<path of the URL>."""
    scheme, rest = url.split("://", 1)
    parts = [p for p in rest.strip("/").split("/") if p not in ("", ".", "..")]
    root = os.environ.get("OPD_REMOTE_CACHE") or os.path.expanduser("~/.cache/opd")
    return os.path.join(root, kind, scheme, *parts)


def default_local_dir(url: str, process_index: int = 0, process_count: int = 1) -> str:
    """The local copy of workdir `url` (one per process when several share a machine)."""
    d = _cache_path(url, "workdirs")
    return os.path.join(d, f"process-{process_index}") if process_count > 1 else d


class RemoteWorkdir:
    """The local copy of one URL workdir and its sync state (see the module docstring)."""

    def __init__(self, url: str, local_dir: str, process_index: int = 0):
        self.url = url.rstrip("/")
        self.fs, self.root = _filesystem(self.url)
        self.root = self.root.rstrip("/")
        self.local = os.path.abspath(os.path.expanduser(local_dir))
        self.process = process_index
        self._synced: dict[str, str] = {}  # rel -> md5 of the content last in sync with the bucket
        self._hashes: dict[str, tuple] = {}  # rel -> (size, mtime_ns, md5): a cache of local files' md5
        self._owned: dict[str, list] = {}  # this process's manifest: rel -> [size, md5]
        self._pulled: set[str] = set()  # files other processes wrote, as last pulled
        os.makedirs(self.local, exist_ok=True)

    # ------------------------------------------------------------------ paths
    def _remote(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def _manifest_path(self, process: int) -> str:
        return self._remote(f"{MANIFEST_DIR}/process-{process}.json")

    @staticmethod
    def mirrored(rel: str) -> bool:
        """Whether workdir-relative path `rel` is synced (not in-progress `.tmp` output, orbax's
        temporary dirs, checkpoints or feature caches)."""
        parts = rel.split("/")
        if parts[0] == MANIFEST_DIR or parts[-1].endswith(".tmp") or parts[0].startswith(".opd_lock"):
            return False  # (.opd_lock*: this machine's workdir lock, opd.workdir_lock)
        return not any(p in LOCAL_ONLY or p.endswith(".tmp") or "orbax-checkpoint-tmp" in p for p in parts[:-1])

    def checkpoint_location(self, local_path: str) -> str:
        """Where orbax should write the checkpoints of local `local_path` (inside the copy):
        the same place in the bucket (a plain path for file:// URLs)."""
        rel = os.path.relpath(os.path.abspath(local_path), self.local)
        if rel.startswith(".."):
            return local_path
        rel = rel.replace(os.sep, "/")
        if self.url.startswith("file://"):
            return os.path.join(self.root, rel)
        return f"{self.url}/{rel}"

    # ------------------------------------------------------------------ sync
    def _write_manifest(self) -> None:
        data = json.dumps(self._owned, sort_keys=True).encode()
        self.fs.makedirs(self._remote(MANIFEST_DIR), exist_ok=True)
        self.fs.pipe_file(self._manifest_path(self.process), data)

    def _manifests(self) -> dict[int, dict]:
        out = {}
        for m in self.fs.glob(self._remote(f"{MANIFEST_DIR}/process-*.json")):
            name = posixpath.basename(m)
            out[int(name[len("process-"):-len(".json")])] = json.loads(self.fs.cat_file(m))
        return out

    def pull(self) -> int:
        """Downloads committed files that differ from the local copy; returns how many."""
        manifests = self._manifests()
        if self.process in manifests:  # resuming: this process's earlier pushes are its own again
            self._owned = {**manifests[self.process], **self._owned}
        listed = {}
        for p in sorted(manifests, key=lambda p: p == self.process):  # own entries win
            listed.update(manifests[p])
        adopt = not manifests and self.process == 0
        if adopt:
            # a new workdir, or one written without this sync (e.g. through a gcsfuse mount):
            # process 0 adopts its files and commits them in its manifest at once (so a later
            # start never adopts the files of an interrupted push)
            listed = {rel: [info["size"], None] for rel, info in
                      ((posixpath.relpath(p, self.root), info) for p, info in self.fs.find(self.root, detail=True).items())
                      if self.mirrored(rel)}
        for rel in sorted(self._pulled - set(listed)):  # deleted by the process that wrote it
            if os.path.isfile(os.path.join(self.local, rel)) and self._local_md5(rel) == self._synced.get(rel):
                os.remove(os.path.join(self.local, rel))
            self._pulled.discard(rel)
            self._synced.pop(rel, None)
        if not listed:
            if adopt:
                self._write_manifest()
            return 0
        sizes = {posixpath.relpath(p, self.root): info["size"]
                 for p, info in self.fs.find(self.root, detail=True).items()}
        n = 0
        for rel, (size, md5) in sorted(listed.items()):
            if md5 is None:  # adopted (above): its content is whatever the bucket holds
                md5 = self._adopt(rel)
                n += 1
                continue
            if sizes.get(rel) != size:
                logging.warning("remote workdir: %s/%s is not as its manifest lists it (an interrupted push); "
                                "skipped", self.url, rel)
                continue
            local = os.path.join(self.local, rel)
            if not (os.path.isfile(local) and self._local_md5(rel) == md5):
                os.makedirs(os.path.dirname(local), exist_ok=True)
                self.fs.get_file(self._remote(rel), local + ".tmp")
                os.replace(local + ".tmp", local)
                n += 1
            self._synced[rel] = md5
            if rel not in self._owned:
                self._pulled.add(rel)
        if adopt:
            self._write_manifest()
        return n

    def _adopt(self, rel: str) -> str:
        local = os.path.join(self.local, rel)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        self.fs.get_file(self._remote(rel), local + ".tmp")
        os.replace(local + ".tmp", local)
        md5 = self._local_md5(rel)
        self._synced[rel] = md5
        self._owned[rel] = [os.path.getsize(local), md5]
        return md5

    def _local_md5(self, rel: str) -> str:
        st = os.stat(os.path.join(self.local, rel))
        known = self._hashes.get(rel)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        md5 = file_digest(os.path.join(self.local, rel))
        self._hashes[rel] = (st.st_size, st.st_mtime_ns, md5)
        return md5

    def _local_files(self) -> list[str]:
        out = []
        for d, _, files in os.walk(self.local):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), self.local).replace(os.sep, "/")
                if self.mirrored(rel):
                    out.append(rel)
        return sorted(out)

    def push(self) -> int:
        """Uploads the files this process changed or created since the last sync, commits its
        manifest, then deletes the remote copies of its files that are gone locally; returns
        how many files were uploaded."""
        changed = []
        present = set()
        for rel in self._local_files():
            present.add(rel)
            if self._synced.get(rel) != self._local_md5(rel):  # new, or changed since it was pulled or pushed
                changed.append(rel)
        gone = [rel for rel in self._owned if rel not in present]
        if not changed and not gone:
            return 0
        overwritten = [rel for rel in changed if rel in self._owned]
        if overwritten:  # uncommit them before their remote copies change
            for rel in overwritten:
                del self._owned[rel]
            self._write_manifest()
        for rel in changed:
            self._pulled.discard(rel)
            self.fs.makedirs(posixpath.dirname(self._remote(rel)), exist_ok=True)
            for _ in range(3):  # a file still being written (TensorBoard's flush thread) is uploaded again
                md5 = self._local_md5(rel)
                self.fs.put_file(os.path.join(self.local, rel), self._remote(rel))
                st = os.stat(os.path.join(self.local, rel))
                if (st.st_size, st.st_mtime_ns) == self._hashes[rel][:2]:
                    break
            self._synced[rel] = md5
            self._owned[rel] = [self._hashes[rel][0], md5]
        for rel in gone:
            del self._owned[rel]
        self._write_manifest()
        for rel in gone:
            try:
                self.fs.rm_file(self._remote(rel))
            except FileNotFoundError:
                pass
        logging.info("remote workdir: pushed %d file(s), deleted %d, to %s", len(changed), len(gone), self.url)
        return len(changed)


# ------------------------------------------------------------------ read-only inputs
def exists(url: str) -> bool:
    fs, path = _filesystem(url)
    return fs.exists(path)


def _listing(fs, path: str) -> list:
    """(relative path, size, version) of every file under `path` (or of the file itself): what
    a fetched copy was made from. The version is the store's own (GCS md5 / generation, an
    ETag, a local mtime)."""
    found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    out = []
    for p, info in sorted(found.items()):
        version = next((info[k] for k in ("md5Hash", "generation", "ETag", "etag", "mtime", "created") if k in info), "")
        out.append([posixpath.relpath(p, path) if p != path else "", info.get("size"), str(version)])
    return out


def fetch(url: str, cache_dir: str = "") -> str:
    """A local copy of the file or directory at `url` (a target checkpoint or a drafter on
    gs://), kept under `cache_dir` (default $OPD_REMOTE_CACHE/remote/<scheme>/<path>) in a
    folder named by a digest of the remote listing: downloaded again only when the remote files
    change. Downloads go to a temporary name renamed into place when complete, so a copy in
    place is whole, and processes sharing a machine never overwrite one another's."""
    fs, path = _filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such file or directory")
    listing = _listing(fs, path)
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    local = os.path.join(cache_dir or _cache_path(url, "remote"), digest, posixpath.basename(path.rstrip("/")))
    if os.path.exists(local):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    for rel, _, _ in listing:
        dst = os.path.join(tmp, rel) if rel else tmp
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(posixpath.join(path, rel) if rel else path, dst)
    try:
        os.replace(tmp, local)
    except OSError:  # another process's copy was renamed into place first
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("fetched %s -> %s", url, local)
    return local


# ------------------------------------------------------------------ the run's workdir
def attach(url: str, local_dir: str = "") -> RemoteWorkdir:
    """Makes `url` the current run's workdir (its local copy pulled); returns it."""
    import jax

    global _current
    local_dir = local_dir or default_local_dir(url, jax.process_index(), jax.process_count())
    rw = RemoteWorkdir(url, local_dir, jax.process_index())
    n = rw.pull()
    logging.info("remote workdir %s: local copy %s (%d file(s) pulled)", url, rw.local, n)
    _current = rw
    return rw


def detach() -> None:
    global _current
    _current = None


def current() -> Optional[RemoteWorkdir]:
    return _current


def checkpoint_location(local_path: str) -> str:
    """Orbax's directory for local `local_path`: in the bucket when the workdir is a URL."""
    return local_path if _current is None else _current.checkpoint_location(local_path)
