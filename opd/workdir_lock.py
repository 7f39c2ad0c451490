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
    `.opd_lock.process-<i>` when there are several processes. The bucket itself is not
    locked: two launches on different machines against one bucket are not detected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

from absl import logging
import jax

from opd import remote
from opd.training.loop import Stopped

LOCK_NAME = ".opd_lock"
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
    """Holds this process's lock of `workdir` for the `with` body (module docstring); raises
    `WorkdirLocked` naming the live holder."""
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
