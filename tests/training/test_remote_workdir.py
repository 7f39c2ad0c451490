"""URL workdirs (opd.remote): the stages run in a local copy synced with the bucket.

fsspec's `memory://` filesystem stands in for an object store in the sync tests; the pipeline
test uses a `file://` URL (orbax needs a filesystem it can write; gs:// goes through gcsfs the
same way): preempted on one "VM", resumed on a fresh one whose local copy starts empty.
"""

import os
import signal

import fsspec
import jax
import numpy as np
import pytest

from opd import paths, pipeline, remote
from opd.target import load_target_from_config
from opd.training import loop
from opd.training.metrics import MetricsWriter, read_jsonl
from test_sft_stage import _config, _trained, data_dir, target_dir

__all__ = ["data_dir", "target_dir"]  # test_sft_stage's fixtures, used here by name


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _read(root, rel):
    with open(os.path.join(root, rel)) as f:
        return f.read()


def test_push_pull_round_trip_and_what_stays_local(tmp_path):
    url = f"memory://bucket-{os.getpid()}/roundtrip"
    a = remote.RemoteWorkdir(url, str(tmp_path / "a"))
    _write(a.local, "config.json", "{}")
    _write(a.local, "sft/eagle3/metrics.jsonl", '{"step": 1}\n')
    _write(a.local, "sft/eagle3/checkpoints/2/state", "orbax writes these to the bucket itself")
    _write(a.local, "sft/eagle3/features/aux.npy", "a large cache")
    _write(a.local, "export/sft_eagle3.tmp/model.safetensors", "an export being written")
    _write(a.local, "opd/rollouts/shard-000002.jsonl.tmp", "a shard being written")
    assert a.push() == 2 and a.push() == 0  # unchanged files are not uploaded again

    b = remote.RemoteWorkdir(url, str(tmp_path / "b"), process_index=1)  # another host of the launch
    assert b.pull() == 2
    got = sorted(os.path.relpath(os.path.join(d, f), b.local) for d, _, fs in os.walk(b.local) for f in fs)
    assert got == ["config.json", os.path.join("sft", "eagle3", "metrics.jsonl")]
    assert b.push() == 0  # what it pulled is not its own to push

    _write(a.local, "sft/eagle3/metrics.jsonl", '{"step": 1}\n{"step": 2}\n')  # appended
    os.remove(os.path.join(a.local, "config.json"))
    assert a.push() == 1
    fs, root = fsspec.core.url_to_fs(url)
    assert not fs.exists(root + "/config.json")  # deleted remotely too
    assert b.pull() == 1
    assert _read(b.local, "sft/eagle3/metrics.jsonl").count("step") == 2
    assert not os.path.exists(os.path.join(b.local, "config.json"))  # deleted on the other copy


def test_a_workdir_written_without_the_sync_is_adopted(tmp_path):
    url = f"memory://bucket-{os.getpid()}/mounted"  # e.g. written earlier through a gcsfuse mount
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(root + "/sft/eagle3/run.json", b"{}")
    fs.pipe_file(root + "/sft/eagle3/checkpoints/4/state", b"orbax reads these from the bucket")
    a = remote.RemoteWorkdir(url, str(tmp_path / "a"))
    assert a.pull() == 1 and _read(a.local, "sft/eagle3/run.json") == "{}"
    assert not os.path.exists(os.path.join(a.local, "sft", "eagle3", "checkpoints"))
    fs.pipe_file(root + "/stray.json", b"copied in by hand")  # after adoption: not a committed file
    b = remote.RemoteWorkdir(url, str(tmp_path / "b"))
    assert b.pull() == 1 and not os.path.exists(os.path.join(b.local, "stray.json"))
    empty = remote.RemoteWorkdir(f"memory://bucket-{os.getpid()}/new", str(tmp_path / "c"))
    assert empty.pull() == 0 and fs.exists(f"/bucket-{os.getpid()}/new/.opd_sync/process-0.json")


def test_an_interrupted_push_never_mixes_two_versions(tmp_path, monkeypatch):
    url = f"memory://bucket-{os.getpid()}/interrupted"
    a = remote.RemoteWorkdir(url, str(tmp_path / "a"))
    _write(a.local, "export/opd_eagle3/model.safetensors", "weights v1")
    _write(a.local, "export/opd_eagle3/export.json", '{"step": 2}')
    _write(a.local, "opd/eagle3/run.json", "{}")
    assert a.push() == 3

    _write(a.local, "export/opd_eagle3/model.safetensors", "weights v2, longer")
    _write(a.local, "export/opd_eagle3/export.json", '{"step": 4}')
    real_put, uploads = a.fs.put_file, []

    def put_then_preempted(lpath, rpath, **kw):
        if uploads:
            raise KeyboardInterrupt("preempted during the upload")
        uploads.append(rpath)
        return real_put(lpath, rpath, **kw)

    monkeypatch.setattr(a.fs, "put_file", put_then_preempted)
    with pytest.raises(KeyboardInterrupt):
        a.push()
    assert len(uploads) == 1  # one of the two new files reached the bucket

    fresh = remote.RemoteWorkdir(url, str(tmp_path / "fresh"))
    fresh.pull()
    # The untouched file is there; neither half of the new export is (the export stage redoes it).
    assert _read(fresh.local, "opd/eagle3/run.json") == "{}"
    assert not os.path.exists(os.path.join(fresh.local, "export", "opd_eagle3"))


def test_inputs_on_a_url_are_fetched_once(tmp_path):
    src = tmp_path / "bucket" / "drafter"
    _write(str(src), "config.json", '{"a": 1}')
    _write(str(src), "sub/model.safetensors", "w")
    url = "file://" + str(src)
    assert paths.path_exists(url) and not paths.path_exists(url + "-missing")
    cache = str(tmp_path / "cache" / "drafter")
    local = remote.fetch(url, cache)
    assert _read(local, "config.json") == '{"a": 1}' and _read(local, "sub/model.safetensors") == "w"
    assert remote.fetch(url, cache) == local  # unchanged remote files: the same copy
    _write(str(src), "config.json", '{"a": 2}')  # the remote copy changed: fetched again
    newer = remote.fetch(url, cache)
    assert newer != local and _read(newer, "config.json") == '{"a": 2}' and _read(newer, "sub/model.safetensors") == "w"
    assert _read(local, "config.json") == '{"a": 1}'  # a process still reading the old copy keeps it
    single = remote.fetch(url + "/config.json", str(tmp_path / "cache" / "config"))  # one file
    assert open(single).read() == '{"a": 2}'
    with pytest.raises(FileNotFoundError, match="drafter-missing"):
        remote.fetch(url + "-missing", str(tmp_path / "cache" / "missing"))


@pytest.mark.slow  # ~1 min: two SFT launches
def test_preempted_on_one_vm_resumed_on_another(target_dir, data_dir, tmp_path, monkeypatch):
    config = _config(target_dir, data_dir, "eagle3")  # sft (6 steps, a checkpoint every 2) + export
    pipeline.run(config, str(tmp_path / "straight"))
    want, _ = _trained(config, tmp_path / "straight")

    bucket = tmp_path / "bucket" / "run"
    url = "file://" + str(bucket)
    real_write = MetricsWriter.write

    def write_then_sigterm(self, step, metrics):
        row = real_write(self, step, metrics)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(MetricsWriter, "write", write_then_sigterm)
    with config.unlocked():
        config.local_workdir = str(tmp_path / "vm1")
    with pytest.raises(loop.Preempted):
        pipeline.run(config, url)
    monkeypatch.setattr(MetricsWriter, "write", real_write)
    assert remote.current() is None
    # orbax wrote the checkpoints straight to the bucket; the rest was pushed on the way out
    assert sorted(os.listdir(bucket / "sft" / "eagle3" / "checkpoints")) == ["2", "3"]
    assert not os.path.exists(tmp_path / "vm1" / "sft" / "eagle3" / "checkpoints")
    assert [r["step"] for r in read_jsonl(str(bucket / "sft" / "eagle3" / "metrics.jsonl")) if "loss" in r] == [1, 2, 3]

    with config.unlocked():
        config.local_workdir = str(tmp_path / "vm2")  # a fresh VM: an empty local copy
    pipeline.run(config, url)
    rows = [r for r in read_jsonl(str(bucket / "sft" / "eagle3" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # resumed at step 3, each step logged once
    straight = [r for r in read_jsonl(str(tmp_path / "straight" / "sft" / "eagle3" / "metrics.jsonl")) if "loss" in r]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in straight], rtol=1e-6)
    assert os.path.isfile(bucket / "export" / "sft_eagle3" / "export.json")  # the export reached the bucket

    # The exported drafter, read back from the bucket, is the uninterrupted run's.
    from opd.drafters import load_drafter

    got = load_drafter(remote.fetch(url + "/export/sft_eagle3", str(tmp_path / "fetched")),
                       load_target_from_config(config))
    for a, b in zip(jax.tree.leaves(want.params["eagle"]), jax.tree.leaves(got.params["eagle"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
