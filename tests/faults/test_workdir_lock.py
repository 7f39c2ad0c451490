"""One launch per workdir (`opd.workdir_lock`): a second launch is refused naming the first;
a lock left by a dead process is taken over; who locks in multi-process and URL workdirs."""

import errno
import json
import os
import subprocess
import sys

import jax
import pytest

from opd import pipeline, remote, workdir_lock as wl
from opd.workdir_lock import WorkdirLocked, workdir_lock
from tiny_run import sft_config


def test_a_second_launch_is_refused_naming_the_first(tmp_path):
    workdir = str(tmp_path / "run")
    config = sft_config(str(tmp_path / "no_target"), str(tmp_path / "no_data"))
    config.target.path = str(tmp_path)  # exists: validation passes, the lock refuses before any stage
    with workdir_lock(workdir):
        holder = json.load(open(os.path.join(workdir, wl.LOCK_NAME)))
        assert holder["pid"] == os.getpid()
        with pytest.raises(WorkdirLocked, match=rf"workdir {workdir} is in use by pid {os.getpid()} on host "
                                                rf".*Wait for it to finish .* or use another --workdir"):
            pipeline.run(config, workdir)
        assert not os.path.exists(os.path.join(workdir, "config.json"))  # refused before writing anything
    with workdir_lock(workdir):  # released on exit: the next launch goes ahead
        pass
    assert open(os.path.join(workdir, wl.LOCK_NAME)).read() == ""  # a clean exit leaves an empty (free) lock


# A stand-in for a launch holding the lock as `workdir_lock` does (flock + its holder record),
# in a plain interpreter: importing opd (JAX, orbax) would take seconds.
_HOLDER = """import fcntl, json, os, socket, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "command": "a launch"}))
f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_launch_is_taken_over(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, os.path.join(workdir, wl.LOCK_NAME)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLocked, match=f"in use by pid {p.pid} .*a launch"):  # alive: refused
            with workdir_lock(workdir):
                pass
    finally:
        p.kill()  # SIGKILL: no clean exit, its record stays in the lock file
        p.wait()
    with workdir_lock(workdir):  # dead: its stale lock is taken over, with a warning naming it
        assert json.load(open(os.path.join(workdir, wl.LOCK_NAME)))["pid"] == os.getpid()
    assert any(f"taking over a stale lock of pid {p.pid}" in r.getMessage() for r in caplog.records)


def test_without_flock_the_holders_pid_decides(tmp_path, monkeypatch):
    """Filesystems without flock (ENOLCK): a live holder on this host keeps the workdir, a dead
    one's lock is stale."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / wl.LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": wl.socket.gethostname(), "pid": int(dead.stdout), "started": "then"}))
    with workdir_lock(str(workdir)):
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):  # now we hold it, alive
            with workdir_lock(str(workdir)):
                pass
    lock.write_text(json.dumps({"host": "another-host", "pid": 1, "started": "then"}))
    with pytest.raises(WorkdirLocked, match="on host another-host"):  # cannot tell if alive: refused
        with workdir_lock(str(workdir)):
            pass


def test_who_locks_in_multi_process_and_url_launches(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_REMOTE_CACHE", str(tmp_path / "cache"))
    local = str(tmp_path / "run")
    assert wl.lock_path(local) == os.path.join(local, ".opd_lock")
    url = "file://" + str(tmp_path / "bucket" / "run")
    copy = remote.default_local_dir(url)
    assert wl.lock_path(url) == os.path.join(copy, ".opd_lock")  # a URL workdir: its local copy
    assert wl.lock_path(url, str(tmp_path / "vm1")) == str(tmp_path / "vm1" / ".opd_lock")
    assert not remote.RemoteWorkdir.mirrored(".opd_lock")  # never pushed to the bucket
    # multi-process: process 0 locks a shared local workdir; each process locks its own copy of a URL one
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert wl.lock_path(local) is None
    assert wl.lock_path(url, str(tmp_path / "vm1")) == str(tmp_path / "vm1" / ".opd_lock.process-1")
    assert not remote.RemoteWorkdir.mirrored(".opd_lock.process-1")


# ----------------------------------------------------------------------------- the bucket lease
def _other_machine(url, renewed_ago=0.0):
    """The lease another machine's launch holds in the bucket (as `bucket_lease` writes it)."""
    import time

    fs, root = remote._filesystem(url)
    path = f"{root.rstrip('/')}/{wl.LEASE_NAME}"
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps({"host": "vm-other", "pid": 4242, "started": "earlier", "command": "a launch",
                                   "launch": "theirs", "renewed": time.time() - renewed_ago}).encode())
    return fs, path


def test_a_launch_on_another_machine_against_the_same_bucket_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(wl, "SETTLE_S", 0.0)
    url = "file://" + str(tmp_path / "bucket" / "run")
    config = sft_config(str(tmp_path / "no_target"), str(tmp_path / "no_data"))
    config.target.path = str(tmp_path)  # exists: validation passes, the lease refuses before any stage
    config.local_workdir = str(tmp_path / "vm2")  # this machine's copy: its own local lock is free
    fs, path = _other_machine(url)
    with pytest.raises(WorkdirLocked, match=r"workdir file://.* is in use by pid 4242 on host vm-other .*lease in the "
                                            r"bucket was renewed \d+ s ago.*delete file://.*/\.opd_sync/lease\.json"):
        pipeline.run(config, url)
    assert not os.path.exists(tmp_path / "vm2" / "config.json")  # refused before anything was pulled or written
    assert json.loads(fs.cat_file(path))["launch"] == "theirs"  # and their lease is left alone
    fs.rm_file(path)  # that launch exits: the bucket is free
    with workdir_lock(url, str(tmp_path / "vm2")):
        mine = json.loads(fs.cat_file(path))
        assert mine["pid"] == os.getpid() and mine["launch"] != "theirs"
        assert not remote.RemoteWorkdir.mirrored(wl.LEASE_NAME)  # never synced as a workdir file
    assert not fs.exists(path)  # released on exit


def test_a_stale_bucket_lease_is_taken_over_and_a_live_one_renewed(tmp_path, monkeypatch, caplog):
    import time

    url = f"memory://bucket-{os.getpid()}/lease"
    fs, path = _other_machine(url, renewed_ago=1000.0)  # its VM was deleted 1000 s ago
    with wl.bucket_lease(url, ttl_s=900.0, renew_s=0.05, settle_s=0.0):
        first = json.loads(fs.cat_file(path))
        assert first["launch"] != "theirs"
        time.sleep(0.3)
        assert json.loads(fs.cat_file(path))["renewed"] > first["renewed"]  # the holder renews it
        with pytest.raises(WorkdirLocked, match=r"in use by pid"):  # live: refused
            with wl.bucket_lease(url, settle_s=0.0):
                pass
    assert "taking over the stale lease of pid 4242 on host vm-other" in caplog.text
    assert not fs.exists(path)


def test_of_two_launches_writing_the_lease_at_once_one_goes_ahead(tmp_path):
    import threading

    url = f"memory://bucket-{os.getpid()}/race"
    barrier, results = threading.Barrier(2), []

    def launch():
        barrier.wait()
        try:
            with wl.bucket_lease(url, settle_s=0.5):
                results.append("ran")
                barrier.wait()  # both have decided before the winner releases it
        except WorkdirLocked:
            results.append("refused")
            barrier.wait()

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ran", "refused"]
