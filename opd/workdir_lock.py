"""One launch per workdir: a second launch on a workdir in use is refused with a clear message.

Two launches on one workdir overwrite each other's checkpoints, metrics and half-written
folders (`init.tmp`), so `pipeline.run` holds `workdir_lock` while its stages run. The lock is
an exclusive `flock` on `<dir>/.opd_lock`, held for the launch and released by the kernel when
the process dies, so a lock left by a crashed or killed launch is never in the way: the file
then still names its old holder (host, pid, start time, command), and the next launch logs
that it takes a stale lock over. A clean exit empties the file (it is never deleted: a
launch that opened it just before would lock a deleted file). Where the filesystem has no
`flock` (some network filesystems), the file's holder is checked instead: a live process on
this host, or any process on another host, keeps the workdir; a dead one on this host is stale.

Who locks (multi-host launches run one process per host, `opd.sharding`):
  * a local workdir (one disk every process shares): process 0 only, `<workdir>/.opd_lock`;
  * a URL workdir (gs://...): every process locks its own local copy (`opd.remote`),
    `.opd_lock.process-<i>` when there are several processes; and process 0 holds a lease in
    the bucket (`bucket_lease`), so a launch on another machine against the same bucket is
    refused too.

The bucket lease is `<url>/.opd_sync/lease.json` (holder, a launch id, the time it was last
renewed), renewed every `RENEW_S` by a background thread and removed on exit. A lease not
renewed for `LEASE_TTL_S` (its VM was deleted or preempted) is stale and taken over with a
warning. Object stores have no compare-and-swap through fsspec, so a launch writes the lease,
waits `SETTLE_S` and reads it back: of two launches starting together the later writer keeps
it and the other is refused. (Two launches whose check and write are more than `SETTLE_S`
apart on one side can both pass; hosts' clocks are assumed within minutes of each other.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid

from absl import logging
import jax

from opd import remote
from opd import sharding as shd
from opd.training.loop import Stopped

LOCK_NAME = ".opd_lock"
LEASE_NAME = f"{remote.MANIFEST_DIR}/lease.json"  # in the bucket, never mirrored
LEASE_TTL_S = 900.0  # a lease not renewed for this long is stale
RENEW_S = 60.0  # the holder renews its lease this often
SETTLE_S = 2.0  # written, then read back after this long: the later of two writers keeps it
# flock errors that mean "this filesystem has no flock", not "someone holds it"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLocked(Stopped):
    """Another live launch holds the workdir."""


def lock_path(workdir: str, local_workdir: str = "") -> str | None:
    """The lock file this process takes for a launch on `workdir` (None: it takes none). A URL
    workdir's is in its local copy, the one `remote.attach` picks (`config.local_workdir`)."""
    if not remote.is_url(workdir):
        return os.path.join(workdir, LOCK_NAME) if jax.process_index() == 0 else None
    local = local_workdir or remote.default_local_dir(str(workdir), jax.process_index(), jax.process_count())
    suffix = f".process-{jax.process_index()}" if jax.process_count() > 1 else ""
    return os.path.join(os.path.abspath(os.path.expanduser(local)), LOCK_NAME + suffix)


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}


def _describe(h: dict) -> str:
    return f"pid {h.get('pid')} on host {h.get('host')} (since {h.get('started')}: {h.get('command') or '?'})"


def _read_holder(f) -> dict:
    f.seek(0)
    text = f.read().strip()
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?", "command": f"unreadable lock file ({text[:40]!r})"}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # someone else's process, or no pid: assume alive
    return True


def _refuse(path: str, holder: dict, workdir: str) -> WorkdirLocked:
    return WorkdirLocked(
        f"workdir {workdir} is in use by {_describe(holder)}; two launches on one workdir would overwrite each other's "
        f"checkpoints. Wait for it to finish (or stop it: it saves and exits on SIGTERM / Ctrl-C), or use another "
        f"--workdir. Lock file: {path}")


@contextlib.contextmanager
def workdir_lock(workdir: str, local_workdir: str = ""):
    """Holds this process's lock of `workdir` for the `with` body, and for a URL workdir the
    bucket's lease (module docstring); raises `WorkdirLocked` naming the live holder."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_local_lock(workdir, local_workdir))
        if remote.is_url(workdir):
            stack.enter_context(_launch_lease(str(workdir)))
        yield


@contextlib.contextmanager
def _launch_lease(url: str):
    """Process 0 holds the bucket lease; every process of the launch stops if it is refused."""
    refused = None
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            try:
                stack.enter_context(bucket_lease(url))
            except WorkdirLocked as e:
                refused = e
        if shd.any_process(refused is not None):
            raise refused or WorkdirLocked(f"workdir {url} is in use by another launch (process 0's lease was refused)")
        yield


def _read_lease(fs, path: str) -> dict:
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        return {}
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return {"launch": "?", "renewed": 0.0, "command": f"unreadable lease ({text[:40]!r})"}


@contextlib.contextmanager
def bucket_lease(url: str, ttl_s: float | None = None, renew_s: float | None = None, settle_s: float | None = None):
    """Holds `<url>/.opd_sync/lease.json` for the `with` body (module docstring); raises
    `WorkdirLocked` naming the holder of a live lease. None: the module's LEASE_TTL_S, RENEW_S,
    SETTLE_S."""
    ttl_s = LEASE_TTL_S if ttl_s is None else ttl_s
    renew_s = RENEW_S if renew_s is None else renew_s
    settle_s = SETTLE_S if settle_s is None else settle_s
    fs, root = remote._filesystem(url)
    path = posixpath.join(root.rstrip("/"), LEASE_NAME)
    me = {**_holder(), "launch": uuid.uuid4().hex}

    def refuse(held: dict) -> WorkdirLocked:
        age = time.time() - float(held.get("renewed", 0.0))
        return WorkdirLocked(
            f"workdir {url} is in use by {_describe(held)}, whose lease in the bucket was renewed {age:.0f} s ago; "
            f"two launches on one bucket would overwrite each other's checkpoints. Wait for it to finish (or stop "
            f"it: it saves and exits on SIGTERM / Ctrl-C), or use another --workdir. If that machine is gone, the "
            f"lease expires {max(ttl_s - age, 0):.0f} s from now, or delete {url}/{LEASE_NAME}.")

    def write() -> None:
        fs.pipe_file(path, json.dumps({**me, "renewed": time.time()}).encode())

    held = _read_lease(fs, path)
    if held and time.time() - float(held.get("renewed", 0.0)) < ttl_s:
        raise refuse(held)
    if held:
        logging.warning("workdir %s: taking over the stale lease of %s (not renewed for %.0f s)", url,
                        _describe(held), time.time() - float(held.get("renewed", 0.0)))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write()
    time.sleep(settle_s)
    held = _read_lease(fs, path)
    if held.get("launch") != me["launch"]:  # another launch wrote it at the same moment and keeps it
        raise refuse(held)
    stop = threading.Event()

    def renew():
        while not stop.wait(renew_s):
            now = _read_lease(fs, path)
            if now.get("launch") != me["launch"]:
                logging.error("workdir %s: the bucket lease was taken over by %s: two launches may now write this "
                              "workdir", url, _describe(now))
                return
            write()

    thread = threading.Thread(target=renew, name="opd-bucket-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if _read_lease(fs, path).get("launch") == me["launch"]:
            fs.rm_file(path)


@contextlib.contextmanager
def _local_lock(workdir: str, local_workdir: str = ""):
    """This process's flock of its (local copy of the) workdir."""
    path = lock_path(workdir, local_workdir)
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _refuse(path, _read_holder(f), workdir) from None
            if e.errno not in _NO_FLOCK:
                raise
            flock = False
        old = _read_holder(f)
        if old and not flock:  # no flock here: judge the holder the file names
            if old.get("host") != socket.gethostname() or _alive(old.get("pid")):
                raise _refuse(path, old, workdir)
        if old:
            logging.warning("workdir %s: taking over a stale lock of %s, which did not exit cleanly (%s)", workdir,
                            _describe(old), path)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # released: an empty lock file is not stale
            f.flush()
    finally:
        f.close()  # closing releases the flock
