"""A torn last line in an appended JSONL file (a crash, a kill or a full disk mid-write) does not
block a resume: it is skipped with a warning naming the file and line, and cut off before the
next append; a damaged line before the last is an error naming it."""

import json
import os

import pytest

from opd import paths
from opd.training import sft_stage
from opd.training.metrics import MetricsWriter
from tiny_run import save_target, sft_config, write_trajectories


def test_read_skips_a_torn_last_line_and_append_cuts_it(tmp_path, caplog):
    path = str(tmp_path / "responses.jsonl")
    paths.append_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "a") as f:
        f.write('{"a": 3, "respo')  # the process died mid-line
    assert paths.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert any(f"{path}, line 3: skipped a torn last line" in r.getMessage() for r in caplog.records)
    paths.append_jsonl(path, [{"a": 3}])
    assert open(path).read() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'
    with open(path, "a") as f:
        f.write('{"a": 4}')  # a whole record that only lacks its newline is kept
    paths.append_jsonl(path, [{"a": 5}])
    assert [r["a"] for r in paths.read_jsonl(path)] == [1, 2, 3, 4, 5]
    with open(path, "w") as f:
        f.write('{"a": 1}\n{"a": 2, "b\n{"a": 3}\n')  # not torn: damaged in the middle
    with pytest.raises(ValueError, match=f"{path}, line 2: not JSON .*fix or remove that line"):
        paths.read_jsonl(path)


@pytest.mark.slow
def test_metrics_with_a_torn_last_line_resume(tmp_path):
    config = sft_config(save_target(tmp_path / "target"), write_trajectories(str(tmp_path / "data")), num_steps=2)
    workdir = str(tmp_path / "run")
    sft_stage.stage_sft(config, workdir)
    metrics = os.path.join(workdir, "sft", "eagle3", "metrics.jsonl")
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.5, "accur')  # killed while writing step 3's row
    config.sft.num_steps = 4
    sft_stage.stage_sft(config, workdir)
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]  # every line whole again
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_metrics_writer_appends_after_a_torn_line(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    w.write(1, {"loss": 1.0})
    with open(w.path, "a") as f:
        f.write('{"step": 2, "lo')
    w.truncate_after(1)
    w.write(2, {"loss": 0.5})
    assert [r["step"] for r in paths.read_jsonl(w.path)] == [1, 2]
