"""A resume keeps the run's meaning (`stage_common.check_settings`): a changed setting that
alters what the run computes is refused, named, with the override to use; num_steps may grow;
every launch's settings are kept (launches.jsonl); a workdir of an earlier version resumes."""

import json
import os

import pytest

from opd import configs
from opd.paths import read_jsonl, write_json
from opd.training import sft_stage
from opd.training.stage_common import ResumeRefused, check_settings
from tiny_run import save_target, sft_config, write_trajectories


def _settings(**changes):
    s = sft_config("t", "d").sft.to_dict()
    for key, value in changes.items():
        configs.set_path(s, key, value)
    return s


def test_meaning_changes_are_refused_and_named_with_the_override(tmp_path):
    d = str(tmp_path)
    check_settings(d, "sft", _settings(), seed=0, step=None)  # a new run
    check_settings(d, "sft", _settings(), seed=0, step=2)  # the same settings resume
    free = dict(num_steps=12, log_every=5, save_every=4, keep_checkpoints=1, mesh={"data": 1, "fsdp": 1, "tensor": 1})
    check_settings(d, "sft", _settings(**free), seed=0, step=2)  # these may change
    for key, value in [("optimizer.learning_rate", 1e-2), ("batch_size", 4), ("seq_len", 48), ("loss.ttt_steps", 3),
                       ("data", ["elsewhere"]), ("packing", True), ("probe.num_prompts", 4)]:
        with pytest.raises(ResumeRefused, match=rf"sft: {d} is at step 2 with sft\.{key} = .*; this launch sets "
                                                rf".*--config\.resume_override=sft\.{key}; to start a new run"):
            check_settings(d, "sft", _settings(**free, **{key: value}), seed=0, step=2)
    with pytest.raises(ResumeRefused, match="with seed = 0; this launch sets 1"):
        check_settings(d, "sft", _settings(**free), seed=1, step=2)
    # the override: by key, by block, or "*"
    lr = "optimizer.learning_rate"
    check_settings(d, "sft", _settings(**free, **{lr: 1e-2}), 0, 2, ("sft.optimizer.learning_rate",))
    check_settings(d, "sft", _settings(**free, batch_size=4, **{lr: 2e-2}), 0, 4, ("sft",))
    check_settings(d, "sft", _settings(**free, **{lr: 3e-2}), 1, 6, ("*",))
    with pytest.raises(ResumeRefused, match=r"with sft.optimizer.learning_rate = 0.03; this launch sets 0.003\."):
        check_settings(d, "sft", _settings(**free), seed=1, step=8)  # compared with the last accepted launch
    # every accepted launch is kept, the first one's settings included
    launches = read_jsonl(os.path.join(d, "launches.jsonl"))
    assert [r["step"] for r in launches] == [None, 2, 2, 2, 4, 6]
    assert launches[0]["settings"]["optimizer"]["learning_rate"] == 3e-3
    assert launches[3]["changed"] == {"sft.optimizer.learning_rate": [3e-3, 1e-2]}
    assert launches[3]["override"] == ["sft.optimizer.learning_rate"]
    with open(os.path.join(d, "sft_config.json")) as f:
        assert json.load(f)["optimizer"]["learning_rate"] == 3e-2  # what the run continues with


def test_a_workdir_of_an_earlier_version_resumes_with_its_settings(tmp_path):
    d = str(tmp_path)
    old = json.loads(json.dumps(_settings()))  # as read back from the file
    del old["packing"]  # a setting that version did not have is not compared
    write_json(os.path.join(d, "sft_config.json"), old)  # no launches.jsonl, no seed recorded
    check_settings(d, "sft", _settings(num_steps=40), seed=3, step=226)
    launches = read_jsonl(os.path.join(d, "launches.jsonl"))
    assert launches[0] == {"step": None, "settings": old, "note": "the settings of earlier launches"}
    assert launches[1]["step"] == 226 and launches[1]["changed"] == {"sft.num_steps": [6, 40]}
    with pytest.raises(ResumeRefused, match="sft.optimizer.warmup_steps = 1; this launch sets 2"):
        check_settings(d, "sft", _settings(num_steps=40, **{"optimizer.warmup_steps": 2}), seed=3, step=226)


@pytest.mark.slow
def test_the_sft_stage_refuses_a_changed_learning_rate_before_training(tmp_path):
    config = sft_config(save_target(tmp_path / "target"), write_trajectories(str(tmp_path / "data")), num_steps=2)
    workdir = str(tmp_path / "run")
    sft_stage.stage_sft(config, workdir)
    config.sft.num_steps = 4
    config.sft.optimizer.learning_rate = 1e-2
    with pytest.raises(ResumeRefused, match="sft.optimizer.learning_rate = 0.003; this launch sets 0.01"):
        sft_stage.stage_sft(config, workdir)
    assert read_jsonl(os.path.join(workdir, "sft", "eagle3", "metrics.jsonl"))[-1]["step"] == 2  # nothing trained
    config.resume_override = ("sft.optimizer.learning_rate",)
    sft_stage.stage_sft(config, workdir)
    launches = read_jsonl(os.path.join(workdir, "sft", "eagle3", "launches.jsonl"))
    assert [(r["step"], r["settings"]["optimizer"]["learning_rate"]) for r in launches] == [(None, 3e-3), (2, 1e-2)]
