"""Damaged checkpoints are caught on restore (`opd.training.checkpoint`): a checksum of the
state's exact values is saved with every step; flipped bytes or a truncated file make the
newest step fall back to the one before (moved aside, with a warning); with no good step the
error is one short line; exports refuse non-finite values; older checkpoints without a
checksum still restore."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from opd.checkpoints.errors import CheckpointError
from opd.target import load_target_from_config
from opd.training import checkpoint as ckpt
from opd.training import sft, sft_stage, stage_common
from tiny_run import save_target, sft_config, write_trajectories


def _state(seed=0):
    rs = np.random.RandomState(seed)
    return sft.TrainState(step=jnp.int32(2),
                          params={"w": jnp.asarray(rs.randn(4, 3), jnp.float32),
                                  "b": jnp.asarray(rs.randn(3), jnp.bfloat16)},
                          opt_state=(jnp.asarray(rs.randn(4, 3), jnp.float32), jnp.int32(5), jnp.bool_(True)),
                          rng=jnp.asarray([1, 2], jnp.uint32))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _array_files(step_dir):
    """The files holding the state's array bytes (largest first)."""
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(p) and "/d/" in p]
    return sorted(files, key=os.path.getsize, reverse=True)


def test_checksum_sees_any_changed_value_and_only_values():
    state = _state()
    base = ckpt.state_checksum(state)
    assert ckpt.state_checksum(_state()) == base  # equal values, new arrays
    assert ckpt.state_checksum(jax.tree.map(lambda x: x, state)) == base
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        flat = np.asarray(leaf).reshape(-1).copy()
        bits = flat.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[flat.dtype.itemsize])
        bits[-1] ^= 1  # one bit of the last value
        changed = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.asarray(flat.reshape(np.shape(leaf))) if p == path else x, state)
        assert ckpt.state_checksum(changed) != base, jax.tree_util.keystr(path)
    swapped = state._replace(params={**state.params, "w": state.params["w"][::-1]})  # same values, other places
    assert ckpt.state_checksum(swapped) != base


def test_an_old_checkpoint_without_a_checksum_restores_with_a_warning(tmp_path, caplog):
    state = _state()
    manager = ckpt.make_manager(str(tmp_path / "checkpoints"), async_save=False)
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave({"iterator": {"position": 4}})))  # as before
    got, data = ckpt.restore(manager, _abstract(state))
    assert data == {"iterator": {"position": 4}}
    np.testing.assert_array_equal(got.params["w"], state.params["w"])
    assert any("has no checksum" in r.getMessage() for r in caplog.records)


def test_a_truncated_only_checkpoint_is_one_short_line(tmp_path):
    state = _state()
    manager = ckpt.make_manager(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(manager, state, {"iterator": {}})
    for p in _array_files(os.path.join(manager.directory, "2")):
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(manager, _abstract(state))
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 500, msg  # orbax's own error runs to many lines
    assert msg.startswith(f"cannot restore step 2 from {manager.directory}: ")
    assert msg.endswith(f"It is the only step: move {manager.directory}/2 away to start over, or use another --workdir.")
    assert os.path.isdir(os.path.join(manager.directory, "2"))  # nothing moved when no step restores
    import warnings  # the failed restore silenced its leftovers' never-awaited-coroutine warnings

    assert any(f[0] == "ignore" and f[1] is not None and f[1].search("coroutine 'x' was never awaited")
               for f in warnings.filters)


def test_flipped_bytes_are_caught_and_the_previous_step_is_used(tmp_path, caplog):
    """Orbax alone restores three flipped bytes silently (values of ~1e23 here); the checksum
    sees them, and the newest good step is used instead."""
    manager = ckpt.make_manager(str(tmp_path / "checkpoints"), async_save=False)
    rs = np.random.RandomState(0)
    states = {s: _state()._replace(step=jnp.int32(s), params={"w": jnp.asarray(rs.randn(64, 64), jnp.float32),
                                                              "b": jnp.zeros((3,), jnp.bfloat16)}) for s in (2, 4)}
    for s in (2, 4):
        ckpt.save(manager, states[s], {"position": s})
    with open(_array_files(os.path.join(manager.directory, "4"))[0], "r+b") as f:  # three bytes in the middle
        f.seek(os.path.getsize(f.name) // 2)
        b = bytearray(f.read(3))
        f.seek(-3, 1)
        f.write(bytes(x ^ 0x5A for x in b))
    abstract = _abstract(states[4])
    raw = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      data=ocp.args.JsonRestore()))
    assert not np.array_equal(np.asarray(raw["state"][1]["w"]), np.asarray(states[4].params["w"]))  # silently wrong

    state, data = ckpt.restore_latest(manager, abstract)
    assert int(state.step) == 2 and data == {"position": 2}
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(states[2].params["w"]))
    warning = next(r.getMessage() for r in caplog.records if "cannot restore step 4" in r.getMessage())
    assert "fails its checksum" in warning and "moved it to" in warning and "using step 2 instead" in warning
    assert manager.all_steps() == [2] and len(os.listdir(str(manager.directory) + ".corrupt")) == 1
    ckpt.save(manager, states[4], {"position": 4})  # training redoes step 4: no collision with the bad one
    assert manager.latest_step() == 4


def test_a_restore_into_other_dtypes_is_verified_in_the_saved_ones(tmp_path):
    """A float32 step restored for a bf16 run (master weights next to a bf16 target) is read as
    float32, checked, then cast: flipped bytes are still caught."""
    manager = ckpt.make_manager(str(tmp_path / "checkpoints"), async_save=False)
    rs = np.random.RandomState(1)
    state = _state()._replace(params={"w": jnp.asarray(rs.randn(64, 64), jnp.float32), "b": jnp.zeros((3,), jnp.bfloat16)})
    ckpt.save(manager, state, {"position": 2})
    as_bf16 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if a.dtype == jnp.float32 else a.dtype,
                                                          sharding=a.sharding), _abstract(state))
    got, data = ckpt.restore(manager, as_bf16)
    assert data == {"position": 2} and got.params["w"].dtype == jnp.bfloat16 and got.opt_state[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.params["w"]), np.asarray(state.params["w"].astype(jnp.bfloat16)))
    with open(_array_files(os.path.join(manager.directory, "2"))[0], "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        b = bytearray(f.read(3))
        f.seek(-3, 1)
        f.write(bytes(x ^ 0x5A for x in b))
    with pytest.raises(ckpt.CorruptCheckpoint, match="fails its checksum"):
        ckpt.restore(manager, as_bf16)


class _Drafter:
    """What `export_run` reads of a drafter before writing it: its trainable parameters."""

    def __init__(self, trainable):
        self.trainable = trainable

    def split(self):
        return self.trainable, {}


def test_an_export_with_non_finite_values_is_refused(tmp_path, monkeypatch):
    """E.g. a float16 export of values above 65504: refused before anything is written."""
    finite = {"fc": {"kernel": jnp.ones((4, 4), jnp.bfloat16)}, "norm": jnp.ones((4,), jnp.float16)}
    stage_common.check_finite(_Drafter(finite), "export")  # finite values of every float dtype pass
    bad = {**finite, "norm": jnp.asarray([1.0, jnp.inf, 2.0, jnp.nan], jnp.float16)}
    info = {"source": "sft", "step": 4, "flops": 0}
    monkeypatch.setattr(stage_common, "trained_drafter", lambda *a, **k: (_Drafter(bad), info))
    with pytest.raises(CheckpointError, match=r"export: sft eagle3 step 4: parameter \['norm'\] holds 2 non-finite "
                                              r"values \(1 arrays affected"):
        stage_common.export_run(str(tmp_path), None, "eagle3", "sft")
    assert not os.path.exists(tmp_path / "export")  # nothing written


@pytest.mark.slow
def test_a_damaged_last_step_of_a_run_falls_back_in_export_and_resume(tmp_path, caplog):
    """The same through a real `sft` run: its export uses the step before, and the rerun trains
    the lost steps again."""
    config = sft_config(save_target(tmp_path / "target"), write_trajectories(str(tmp_path / "data")), num_steps=4)
    workdir = str(tmp_path / "workdir")
    sft_stage.stage_sft(config, workdir)
    checkpoints = os.path.join(workdir, "sft", "eagle3", "checkpoints")
    target = load_target_from_config(config)
    with open(_array_files(os.path.join(checkpoints, "4"))[0], "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        b = bytearray(f.read(3))
        f.seek(-3, 1)
        f.write(bytes(x ^ 0x5A for x in b))
    out = stage_common.export_run(workdir, target, "eagle3", "sft")
    assert json.load(open(os.path.join(out, "export.json")))["step"] == 2  # not step 4's damaged values
    assert any("cannot restore step 4" in r.getMessage() and "using step 2 instead" in r.getMessage()
               for r in caplog.records)
    assert sorted(os.listdir(checkpoints)) == ["2"]
    sft_stage.stage_sft(config, workdir)  # the rerun trains steps 3 and 4 again; nothing collides
    _, info = stage_common.trained_drafter(workdir, target, "eagle3")
    assert info["step"] == 4 and sorted(os.listdir(checkpoints)) == ["2", "4"]


def test_a_failed_restore_silences_later_unawaited_coroutine_warnings():
    """The leftovers of a failed restore can be collected as never-awaited coroutines; their
    warning (ending "Enable tracemalloc ...") must not print after the run's last line. Only
    a failed restore installs the filter (a fresh process shows the warning without it)."""
    import subprocess
    import sys

    code = ("import gc, sys\n"
            "from opd.training import checkpoint as ckpt\n"
            "if sys.argv[1] == 'failed': ckpt._quiet_unawaited_coroutines()\n"
            "async def read(): pass\n"
            "c = read(); del c; gc.collect()\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
    plain = subprocess.run([sys.executable, "-c", code, "plain"], capture_output=True, text=True, env=env, timeout=300)
    quiet = subprocess.run([sys.executable, "-c", code, "failed"], capture_output=True, text=True, env=env, timeout=300)
    assert "was never awaited" in plain.stderr and "Enable tracemalloc" in plain.stderr
    assert "never awaited" not in quiet.stderr and "tracemalloc" not in quiet.stderr, quiet.stderr[-2000:]
