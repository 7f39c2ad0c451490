"""What a user sees from `python -m opd.main` when a launch stops: a preemption (here Ctrl-C)
is one line and a non-zero exit, no traceback; a checkpoint that cannot be restored ends the
output with one short line that names the step and what to do, again without a traceback."""

import glob
import os
import subprocess
import sys

import pytest

from tiny_run import save_target, write_trajectories

FAULTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(FAULTS))

_CONFIG = r'''
import os, signal, sys
sys.path[:0] = [{faults!r}, {tests!r}]
from tiny_run import sft_config
from opd.training.metrics import MetricsWriter


def get_config():
    if os.environ.get("TEST_SIGINT_AT"):  # Ctrl-C during that step
        write = MetricsWriter.write

        def write_then_sigint(self, step, metrics):
            row = write(self, step, metrics)
            if step == int(os.environ["TEST_SIGINT_AT"]):
                os.kill(os.getpid(), signal.SIGINT)
            return row

        MetricsWriter.write = write_then_sigint
    c = sft_config({target!r}, {data!r}, num_steps=4)
    c.stages = ("sft",)
    return c
'''


def _launch(config, workdir, **env):
    return subprocess.run([sys.executable, "-m", "opd.main", f"--config={config}", f"--workdir={workdir}"], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_preemption_is_one_line_and_a_bad_checkpoint_ends_the_output(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(_CONFIG.format(faults=FAULTS, tests=os.path.dirname(FAULTS),
                                     target=save_target(tmp_path / "target"),
                                     data=write_trajectories(str(tmp_path / "data"))))
    workdir = tmp_path / "run"
    out = _launch(config, workdir, TEST_SIGINT_AT="3")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("opd: sft eagle3: SIGINT at step 3 ") and "Run the same command again" in last, last

    checkpoints = workdir / "sft" / "eagle3" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["2", "3"]
    for p in glob.glob(str(checkpoints / "*" / "state" / "**" / "d" / "*"), recursive=True):  # every step damaged
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
    out = _launch(config, workdir)
    assert out.returncode != 0
    # nothing after it either: tensorstore's leftover reads of the failed restore are dropped
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert len(last) < 600, last
    assert f"cannot restore step 3 from {checkpoints}: " in last and "or use another --workdir." in last, last
