"""Multi-host launches, run for real: two JAX processes (2 CPU devices each, gloo collectives,
`jax.distributed.initialize` with a local coordinator) share one workdir, as the hosts of a pod
slice share a bucket mount.

* Draft-OPD from the same warm-up ends with the same drafter, metrics and rollout text as one
  process with the same 4 devices (every process builds the same global batch; each places
  its own shards; process 0 writes).
* SFT with per-process rows (grain shards the data by process) trains to the end with one
  metrics line per logged step (not one per process).
* On a URL workdir (one local copy per process), a SIGTERM that reaches one host only stops
  both at the same step with the same checkpoint; the relaunch ends like one process.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS_DIR)

_SCRIPT = r"""
import os, sys
pid, nproc, port, workdir, target_dir, data_dir, stages, opd_init = sys.argv[1:9]
pid, nproc = int(pid), int(nproc)
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=%d" % (4 // nproc)
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
    jax.distributed.initialize("127.0.0.1:" + port, num_processes=nproc, process_id=pid)
from test_opd_stage import _config
from opd import pipeline
c = _config(target_dir, data_dir, "eagle3", save_rollouts=True)
c.distributed = nproc > 1  # already initialised: run() must leave it as it is
c.stages = tuple(stages.split(","))
c.sft.name = "sft_mh" if nproc > 1 else "sft"
for block in (c.sft, c.opd):
    block.mesh.data, block.mesh.fsdp, block.mesh.tensor = 2, 1, 2
c.opd.batch_size = 2
if opd_init:
    c.opd.init = opd_init
if "://" in workdir:  # each process's local copy of the URL workdir, as on its own host
    c.local_workdir = os.path.join(os.path.dirname(data_dir), "host-%d" % pid)
sigterm = os.environ.get("TEST_SIGTERM", "")  # "PID:STEP": only that process gets SIGTERM, during STEP
if sigterm and int(sigterm.split(":")[0]) == pid:
    import signal
    from opd.training.metrics import MetricsWriter
    write = MetricsWriter.write
    def write_then_sigterm(self, step, metrics):
        write(self, step, metrics)
        if step == int(sigterm.split(":")[1]):
            os.kill(os.getpid(), signal.SIGTERM)
    MetricsWriter.write = write_then_sigterm
from opd.training.loop import Preempted
try:
    pipeline.run(c, workdir)
except Preempted as e:
    print("PREEMPTED", e)
    sys.exit(0)
print("DONE", pid, jax.process_count(), jax.device_count())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc, workdir, target_dir, data_dir, stages, opd_init="", sigterm="", expect="DONE"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR, os.path.join(TESTS_DIR, "training"),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    env["OPD_REMOTE_CACHE"] = os.path.join(os.path.dirname(data_dir), "cache")  # fetched inputs, per test
    env["TEST_SIGTERM"] = sigterm
    port = str(_free_port())
    log = os.path.join(os.path.dirname(data_dir), os.path.basename(str(workdir)))
    logs = [(open(f"{log}.{i}.out", "w+"), open(f"{log}.{i}.err", "w+"))
            for i in range(nproc)]  # files, not pipes: a process blocked on a full pipe would stall the others
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, str(i), str(nproc), port, str(workdir), target_dir,
                               data_dir, ",".join(stages), opd_init], env=env, cwd=REPO, stdout=out, stderr=err,
                              text=True)
             for i, (out, err) in enumerate(logs)]
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:  # a hung process (e.g. waiting in a collective the others never join) fails the test
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    report = []
    for i, (p, (out, err)) in enumerate(zip(procs, logs)):
        out.seek(0), err.seek(0)
        o, e = out.read(), err.read()
        if p.returncode != 0 or expect not in o:  # every failed process's log: the first to fail shows the cause
            report.append(f"--- process {i} of {nproc}: exit {p.returncode}\n{e[-3000:]}")
    assert not report, "\n".join(report)


def _params(export_dir):
    from safetensors.numpy import load_file

    files = sorted(f for f in os.listdir(export_dir) if f.endswith(".safetensors"))
    out = {}
    for f in files:
        out.update(load_file(os.path.join(export_dir, f)))
    return out


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    from test_sft_stage import V, _save_target, write_pattern_trajectories

    target_dir = _save_target(tmp_path / "target")
    data = tmp_path / "data"
    data.mkdir()
    rs = np.random.RandomState(0)
    write_pattern_trajectories(data, rs)
    with open(str(data) + ".probe.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"q{i}", "prompt_ids": rs.randint(2, V, 5).tolist()}) + "\n")

    one, two = tmp_path / "one", tmp_path / "two"
    _launch(1, one, str(target_dir), str(data), ["sft", "export:sft", "opd", "export:opd"])
    shutil.copytree(one / "export" / "sft_eagle3", two / "export" / "sft_eagle3")  # the same warm-up
    _launch(2, two, str(target_dir), str(data), ["sft", "opd", "export:opd"])

    # Draft-OPD: the same drafter, losses and rollout text
    a, b = _params(one / "export" / "opd_eagle3"), _params(two / "export" / "opd_eagle3")
    assert sorted(a) == sorted(b)
    changed = 0
    w0 = _params(one / "export" / "sft_eagle3")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
        changed += int(not np.array_equal(a[k], w0[k]))
    assert changed > 0  # OPD moved the drafter
    rows = lambda d: [r for r in map(json.loads, open(d / "opd" / "eagle3" / "metrics.jsonl")) if "loss" in r]
    ra, rb = rows(one), rows(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in rb], [r["loss"] for r in ra], rtol=1e-4)
    roll = lambda d: sorted(open(p).read() for p in (d / "opd" / "eagle3" / "rollouts").glob("*.jsonl"))
    assert roll(one) == roll(two) and roll(one)

    # SFT with per-process rows: trained to the end, each logged step written once
    srows = [r for r in map(json.loads, open(two / "sft_mh" / "eagle3" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in srows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in srows)
    assert sorted(os.listdir(two / "sft_mh" / "eagle3" / "checkpoints")) == ["2", "4"]

    # A gs://-style URL workdir (file:// here): each process runs in its own local copy and
    # syncs with the bucket at every barrier; orbax writes the checkpoints to the bucket.
    # SIGTERM reaches process 1 only, during step 3: both hosts save step 3 and stop; the
    # relaunch resumes there and ends like the uninterrupted single-process run.
    bucket = tmp_path / "bucket" / "run"
    for sigterm, expect in (("1:3", "PREEMPTED"), ("", "DONE")):
        _launch(2, "file://" + str(bucket), str(target_dir), str(data), ["opd", "export:opd"],
                opd_init="file://" + str(one / "export" / "sft_eagle3"), sigterm=sigterm, expect=expect)
        if sigterm:
            assert sorted(os.listdir(bucket / "opd" / "eagle3" / "checkpoints")) == ["2", "3"]
    c = _params(bucket / "export" / "opd_eagle3")
    for k in a:
        np.testing.assert_allclose(c[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert roll(bucket) == roll(one)
    assert sorted(os.listdir(bucket / "opd" / "eagle3" / "checkpoints")) == ["2", "3", "4"]
    assert [r["step"] for r in map(json.loads, open(bucket / "opd" / "eagle3" / "metrics.jsonl")) if "loss" in r] \
        == [1, 2, 3, 4]
    for i in range(2):  # no host kept checkpoints locally
        assert not os.path.exists(tmp_path / f"host-{i}" / "opd" / "eagle3" / "checkpoints")
