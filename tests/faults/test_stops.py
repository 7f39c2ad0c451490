"""Stops that lose nothing: a checkpoint write that fails (disk full) stops training at that
save with one line naming ENOSPC and the path, the previous checkpoint intact and the rerun
resuming; SIGINT (Ctrl-C) saves and stops like SIGTERM."""

import errno
import glob
import os
import signal

import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from opd.training import loop, sft_stage
from opd.training.metrics import MetricsWriter, read_jsonl
from tiny_run import bare_run, save_target, sft_config, write_trajectories

_Handler = json_checkpoint_handler.JsonCheckpointHandler


def _disk_full_at(monkeypatch, step: int):
    """Orbax's background write of step `step`'s data item fails with ENOSPC."""
    real = _Handler._save_fn

    async def save_fn(self, x, directory):
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
        return await real(self, x, directory)

    monkeypatch.setattr(_Handler, "_save_fn", save_fn)
    return real


def _steps(directory):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(directory, "*"))
                  if os.path.basename(p).isdigit())


def _logged(directory):
    return [r["step"] for r in read_jsonl(os.path.join(directory, "metrics.jsonl")) if "loss" in r]


def _check_disk_full_message(msg, checkpoints):
    assert "\n" not in msg and len(msg) < 600, msg  # one line
    assert "saving the checkpoint of step 4 failed: No space left on device (ENOSPC) writing " in msg, msg
    assert os.path.join(checkpoints, "4.") in msg  # the path
    assert "step 2 is the last complete checkpoint" in msg and "Free disk space, then run the same command" in msg


def test_disk_full_during_an_async_save_stops_there_and_the_rerun_resumes(tmp_path, monkeypatch):
    checkpoints = str(tmp_path / "checkpoints")
    real = _disk_full_at(monkeypatch, 4)
    with pytest.raises(loop.SaveFailed) as e:
        bare_run(checkpoints, 10, writer=MetricsWriter(str(tmp_path), tensorboard=False))
    _check_disk_full_message(str(e.value), checkpoints)
    assert _steps(checkpoints) == [2]  # step 4 never committed; step 2 intact
    assert max(_logged(str(tmp_path))) <= 6  # stopped at the failed save, at the latest when the next one is due

    monkeypatch.setattr(_Handler, "_save_fn", real)  # space freed: the same command resumes from step 2
    state = bare_run(checkpoints, 10, writer=MetricsWriter(str(tmp_path), tensorboard=False))
    assert _steps(checkpoints)[-1] == 10 and _logged(str(tmp_path)) == list(range(1, 11))  # each step once
    straight = bare_run(str(tmp_path / "straight"), 10)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(straight.params["w"]))


def test_sigint_saves_and_stops_like_sigterm(tmp_path):
    checkpoints = str(tmp_path / "checkpoints")

    def ctrl_c_at_3(done, batch, private):
        if done == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a shell's background job
    with pytest.raises(loop.Preempted, match="SIGINT at step 3 .*saved to .*Run the same command again to resume"):
        bare_run(checkpoints, 6, on_step=ctrl_c_at_3)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert _steps(checkpoints) == [2, 3]
    state = bare_run(checkpoints, 6)
    assert int(state.step) == 6 and _steps(checkpoints)[-1] == 6


def test_a_second_sigint_does_not_wait(tmp_path):
    def ctrl_c_twice_at_3(done, batch, private):
        if done == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        bare_run(str(tmp_path / "checkpoints"), 6, on_step=ctrl_c_twice_at_3)


@pytest.mark.slow
def test_disk_full_in_the_sft_stage(tmp_path, monkeypatch):
    """The same through the `sft` stage (its async orbax saves, metrics and resume)."""
    config = sft_config(save_target(tmp_path / "target"), write_trajectories(str(tmp_path / "data")), num_steps=8)
    workdir = str(tmp_path / "run")
    checkpoints = os.path.join(workdir, "sft", "eagle3", "checkpoints")
    real = _disk_full_at(monkeypatch, 4)
    with pytest.raises(loop.SaveFailed) as e:
        sft_stage.stage_sft(config, workdir)
    _check_disk_full_message(str(e.value), checkpoints)
    assert _steps(checkpoints) == [2] and max(_logged(os.path.dirname(checkpoints))) <= 6
    monkeypatch.setattr(_Handler, "_save_fn", real)
    sft_stage.stage_sft(config, workdir)
    assert _steps(checkpoints)[-1] == 8 and _logged(os.path.dirname(checkpoints)) == list(range(1, 9))


def test_an_orbax_writer_that_reraises_in_join_does_not_replace_the_one_line_message():
    """Orbax's writer threads re-raise their own failure from join() (a real full disk, timing-
    dependent): `save_failed` waits for them and must still return its one-line error."""
    import threading

    class Writer(threading.Thread):  # as orbax's _SignalingThread: join() raises the thread's error
        def join(self, timeout=None):
            super().join(timeout)
            raise ValueError("RESOURCE_EXHAUSTED: No space left on device [os_error_code='28']")

    Writer.__module__ = "orbax.checkpoint._src.futures.future"
    release = threading.Event()
    w = Writer(target=release.wait)
    w.start()  # still running when save_failed looks for orbax's writers
    threading.Timer(0.2, release.set).start()
    loop._join_orbax_writers()  # no exception
    assert not w.is_alive()
