"""The `sft` / `export` launcher stages on a tiny random target: exact resume after SIGTERM,
NaN stop keeping the last good checkpoint, refusal of corrupt / mismatched checkpoints, the
draft vocabulary never rebuilt when fine-tuning, metrics (JSONL + TensorBoard) and export."""

import glob
import json
import os
import signal

import jax
import numpy as np
import pytest

import opd
from opd import configs, pipeline
from opd.target import load_target_from_config
from conftest import make_hf_model, run_as_hosts, load_script
from opd.checkpoints.errors import CheckpointError
from opd.training import loop, sft_stage
from opd.training import stage_common
from opd.training.metrics import MetricsWriter, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = 128


def _save_target(path, seed=7, **overrides):
    import torch

    model, _ = make_hf_model("llama", seed=seed, **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked target distributions: the soft CE can fall far
    model.config.eos_token_id = 1
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return _save_target(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_pattern_trajectories(tmp_path_factory.mktemp("trajectories"))


def write_pattern_trajectories(d, rs=None):
    """Trajectory shards in `d`: prompts of random ids, answers that follow a fixed pattern."""
    rs = rs if rs is not None else np.random.RandomState(0)
    with open(d / "shard-00000.jsonl", "w") as f:
        for i in range(12):
            prompt = rs.randint(2, V, 4 + i % 3).tolist()
            start = int(rs.randint(2, V))
            answer = [(start + 5 * j) % (V - 2) + 2 for j in range(10 + i % 4)] + [1]
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt_set": "test", "target": "tiny",
                                "prompt_ids": prompt, "response_ids": answer}) + "\n")
    return str(d)


def _config(target_dir, data_dir, kind="eagle3", **sft):
    c = load_script("experiments/sft_smollm2.py").get_config(f"{kind},tiny")
    c.stages = ("sft", "export")
    c.target.path = target_dir
    c.target.scan_layers = False
    c.sft.data = (data_dir,)
    c.sft.seq_len = 24
    c.sft.batch_size = 2
    c.sft.num_steps = 6
    c.sft.log_every = 1
    c.sft.save_every = 2
    c.sft.keep_checkpoints = 10
    c.sft.optimizer.learning_rate = 3e-3
    c.sft.optimizer.warmup_steps = 1
    if kind == "eagle3":
        c.drafter.overrides.draft_vocab_size = 32
        c.sft.loss.ttt_steps = 3
    else:
        c.drafter.overrides = dict(block_size=4, num_layers=1, num_target_features=1)
        c.sft.loss.num_anchors = 2
    for k, v in sft.items():
        c.sft[k] = v
    return c


def _trained(config, workdir):
    drafter, info = stage_common.trained_drafter(str(workdir), load_target_from_config(config), config.drafter.kind)
    return drafter, info["step"]


@pytest.mark.parametrize("kind,features", [("eagle3", "online"), pytest.param("dflash", "online", marks=pytest.mark.slow),
                                           pytest.param("eagle3", "cache", marks=pytest.mark.slow)])
def test_sigterm_then_resume_ends_where_an_uninterrupted_run_ends(target_dir, data_dir, tmp_path, monkeypatch, kind,
                                                                    features):
    config = _config(target_dir, data_dir, kind, target_features=features)
    straight = tmp_path / "straight"
    sft_stage.stage_sft(config, str(straight))
    want, step = _trained(config, straight)
    assert step == 6

    interrupted = tmp_path / "interrupted"
    real_write = MetricsWriter.write

    def write_then_sigterm(self, step, metrics):  # the scheduler's SIGTERM arrives during step 3
        row = real_write(self, step, metrics)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(MetricsWriter, "write", write_then_sigterm)
    with pytest.raises(loop.Preempted, match="SIGTERM at step 3"):
        sft_stage.stage_sft(config, str(interrupted))
    monkeypatch.setattr(MetricsWriter, "write", real_write)
    assert sorted(int(os.path.basename(p)) for p in glob.glob(str(interrupted / "sft" / kind / "checkpoints" / "[0-9]*"))) == [2, 3]

    sft_stage.stage_sft(config, str(interrupted))  # same command again: resumes at step 3
    got, step = _trained(config, interrupted)
    assert step == 6
    key = "eagle" if kind == "eagle3" else "dflash"
    for a, b in zip(jax.tree.leaves(want.params[key]), jax.tree.leaves(got.params[key])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Each step is logged once, and the cumulative counters continued across the restart.
    rows = [r for r in read_jsonl(str(interrupted / "sft" / kind / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    straight_rows = [r for r in read_jsonl(str(straight / "sft" / kind / "metrics.jsonl")) if "loss" in r]
    assert [r["flops"] for r in rows] == [r["flops"] for r in straight_rows]
    assert all(b["seconds"] > a["seconds"] > 0 for a, b in zip(rows, rows[1:]))  # training time, across the restart
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in straight_rows], rtol=1e-6)


def test_a_leg_continued_with_skip_batches_reads_on_where_the_first_stopped(target_dir, data_dir, tmp_path,
                                                                              monkeypatch):
    # A leg fine-tuned from an exported drafter whose checkpoints are gone (`drafter.init`) skips
    # the batches the first leg trained on, so it sees new data: the straight run's steps 3-5.
    real_loop, seen = sft_stage.train_loop, []

    def recording_loop(run, state, frozen, batches, **kw):
        def spy():
            for batch in batches:
                seen[-1].append(np.asarray(batch["tokens"]).copy())
                yield batch
        seen.append([])
        return real_loop(run, state, frozen, spy(), **kw)

    monkeypatch.setattr(sft_stage, "train_loop", recording_loop)
    sft_stage.stage_sft(_config(target_dir, data_dir, num_steps=5), str(tmp_path / "straight"))
    sft_stage.stage_sft(_config(target_dir, data_dir, num_steps=3, skip_batches=2), str(tmp_path / "leg"))
    straight, leg = seen
    assert len(straight) == 5 and len(leg) == 3
    for a, b in zip(straight[2:], leg):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(straight[0], leg[0])
    with pytest.raises(ValueError, match="skip_batches must be >= 0"):
        configs.validate(_config(target_dir, data_dir, skip_batches=-1))


def test_metrics_loss_falls_and_export_round_trips(target_dir, data_dir, tmp_path):
    config = _config(target_dir, data_dir, num_steps=30, save_every=10, log_every=5)
    pipeline.run(config, str(tmp_path))
    rows = [r for r in read_jsonl(str(tmp_path / "sft" / "eagle3" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert rows[-1]["accuracy/1"] > rows[0]["accuracy/1"]
    for key in ("accuracy/1", "accuracy/3", "per_step_loss/2", "grad_norm", "tokens_per_s", "learning_rate"):
        assert all(r[key] is not None for r in rows), key
    assert all(b["flops"] > a["flops"] > 0 for a, b in zip(rows, rows[1:]))
    assert glob.glob(str(tmp_path / "sft" / "eagle3" / "tb" / "events.out.tfevents.*"))
    # The exported HF-layout drafter is the latest checkpoint's.
    from opd.drafters import load_drafter
    target = load_target_from_config(config)
    exported = load_drafter(str(tmp_path / "export" / "sft_eagle3"), target)
    trained, step = _trained(config, tmp_path)
    assert step == 30 and json.load(open(tmp_path / "export" / "sft_eagle3" / "export.json"))["step"] == 30
    for a, b in zip(jax.tree.leaves(trained.params["eagle"]), jax.tree.leaves(exported.params["eagle"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A second launch finds everything done.
    pipeline.run(config, str(tmp_path))
    assert len([r for r in read_jsonl(str(tmp_path / "sft" / "eagle3" / "metrics.jsonl")) if "loss" in r]) == 6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(target_dir, data_dir, tmp_path):
    config = _config(target_dir, data_dir, save_every=1)
    config.sft.optimizer.learning_rate = 1e30  # the first update sends the parameters to ~1e30
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step (\d+).*last good checkpoint is step") as e:
        sft_stage.stage_sft(config, str(tmp_path))
    bad = int(str(e.value).split("at step ")[1].split(";")[0])
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "sft" / "eagle3" / "checkpoints" / "[0-9]*")))
    assert steps and steps[-1] == bad - 1  # nothing of the bad step was saved
    assert f"last good checkpoint is step {bad - 1}" in str(e.value)


def test_corrupt_or_mismatched_checkpoints_are_refused(target_dir, data_dir, tmp_path):
    config = _config(target_dir, data_dir, num_steps=2, save_every=2)
    sft_stage.stage_sft(config, str(tmp_path))
    # Another drafter configuration in the same workdir.
    other = _config(target_dir, data_dir, num_steps=4)
    other.drafter.overrides.draft_vocab_size = 48
    with pytest.raises(CheckpointError, match="belong to another target or drafter"):
        sft_stage.stage_sft(other, str(tmp_path))
    # Another target (other vocabulary) in the same workdir.
    other_target = _save_target(tmp_path / "other_target", vocab_size=160)
    other = _config(other_target, data_dir, num_steps=4)
    with pytest.raises(CheckpointError, match="another target"):
        sft_stage.stage_sft(other, str(tmp_path))
    # A corrupt checkpoint: its array data truncated.
    for p in glob.glob(str(tmp_path / "sft" / "eagle3" / "checkpoints" / "2" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(p) and "d" in os.path.basename(p) and os.path.getsize(p) > 64:
            with open(p, "r+b") as f:
                f.truncate(16)
    more = _config(target_dir, data_dir, num_steps=4)
    with pytest.raises(CheckpointError, match="cannot restore step 2"):
        sft_stage.stage_sft(more, str(tmp_path))


def test_data_repeats_weight_the_mix_and_the_token_counts(data_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    other = write_pattern_trajectories(other, np.random.RandomState(1))
    once = sft_stage.training_source([data_dir, other], str(tmp_path))
    mixed = sft_stage.training_source([data_dir, other], str(tmp_path), (3, 1))
    assert len(mixed) == len(once) + 2 * 12  # 12 trajectories per folder
    assert [mixed[i]["prompt_id"] for i in (0, 12, 24)] == [b"p0"] * 3
    np.testing.assert_array_equal(mixed[36]["prompt_ids"], once[12]["prompt_ids"])
    a, b = (stage_common.response_token_counts([f], V) for f in (data_dir, other))
    np.testing.assert_array_equal(stage_common.response_token_counts([data_dir, other], V, (3, 1)), 3 * a + b)
    c = _config(str(tmp_path), data_dir, target_features="cache")
    c.sft.data, c.sft.data_repeats = (data_dir, other), (3, 1)
    with pytest.raises(ValueError, match="data_repeats needs config.sft.target_features = 'online'"):
        configs.validate(c)


def test_fine_tuning_keeps_the_draft_vocabulary(target_dir, data_dir, tmp_path):
    from opd.drafters import export_drafter, load_drafter
    config = _config(target_dir, data_dir, num_steps=2)
    target = load_target_from_config(config)
    # A pretrained drafter whose draft vocabulary came from other data than ours.
    counts = np.random.RandomState(5).randint(0, 1000, V)
    pretrained = opd.init_drafter("eagle3", target, seed=3, token_counts=counts, draft_vocab_size=32)
    export_drafter(pretrained, str(tmp_path / "pretrained"))
    ours = stage_common.response_token_counts([data_dir], V)
    from opd.drafters.eagle3 import model as e3
    from opd.drafters.eagle3.drafter import special_token_ids

    rebuilt, _ = e3.build_draft_vocab(ours, 32, special_token_ids(target))
    assert not np.array_equal(rebuilt, np.asarray(pretrained.params["vocab"]["d2t"]))  # a rebuild would show

    config.drafter.init = str(tmp_path / "pretrained")
    pipeline.run(config, str(tmp_path / "run"))
    out = load_drafter(str(tmp_path / "run" / "export" / "sft_eagle3"), target)
    for k in ("d2t", "t2d"):
        np.testing.assert_array_equal(np.asarray(out.params["vocab"][k]), np.asarray(pretrained.params["vocab"][k]))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(out.params["eagle"]), jax.tree.leaves(pretrained.params["eagle"]))]
    assert any(moved)  # it was trained, from the pretrained weights


def test_vocab_data_chooses_a_fresh_drafters_vocabulary(target_dir, data_dir, tmp_path):
    """`drafter.vocab_data`: the draft vocabulary counts those folders' answers, not the SFT data."""
    from opd.drafters.eagle3 import model as e3
    from opd.drafters.eagle3.drafter import special_token_ids

    other = write_pattern_trajectories(_mkdir(tmp_path / "other"), np.random.RandomState(9))
    config = _config(target_dir, data_dir, num_steps=1, save_every=1)
    config.drafter.vocab_data = (other,)
    configs.validate(config)
    sft_stage.stage_sft(config, str(tmp_path / "run"))
    target = load_target_from_config(config)
    init = opd.load_drafter(str(tmp_path / "run" / "sft" / "eagle3" / "init"), target)
    want = {f: e3.build_draft_vocab(stage_common.response_token_counts([f], V), 32, special_token_ids(target))[0]
            for f in (other, data_dir)}
    assert not np.array_equal(want[other], want[data_dir])  # the two choices differ
    np.testing.assert_array_equal(np.asarray(init.params["vocab"]["d2t"]), want[other])

    config.drafter.init = str(tmp_path / "run" / "sft" / "eagle3" / "init")
    with pytest.raises(ValueError, match="vocab_data chooses a fresh drafter's vocabulary, but config.drafter.init"):
        configs.validate(config)


def _mkdir(path):
    path.mkdir()
    return path


def test_sft_config_errors_name_the_field(target_dir, data_dir, tmp_path):
    for field, value, message in [
        ("drafter.kind", "medusa", "config.drafter.kind must be a trainable drafter kind"),
        ("drafter.init", str(tmp_path / "nope"), "config.drafter.init: no drafter directory"),
        ("sft.num_steps", 0, "config.sft.num_steps must be >= 1"),
        ("sft.target_features", "disk", "config.sft.target_features"),
        ("sft.optimizer.learning_rate", -1.0, "learning_rate must be > 0"),
        ("sft.loss.ttt_steps", 0, "ttt_steps must be a positive integer"),
        ("drafter.param_dtype", "float16", "config.drafter.param_dtype must be"),
        ("sft.data_repeats", (2, 1), "one count per config.sft.data folder"),
        ("sft.data_repeats", (0,), "integers >= 1"),
    ]:
        c = _config(target_dir, data_dir)
        section, key = field.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        node[key] = value
        with pytest.raises(ValueError, match=message):
            configs.validate(c)
    c = _config(target_dir, data_dir, batch_size=3)
    c.sft.mesh.data = -1
    with pytest.raises(FileNotFoundError, match="run the `regenerate` stage first"):
        c.sft.data = ()
        sft_stage.stage_sft(c, str(tmp_path / "empty"))


@pytest.mark.parametrize("kind", [pytest.param("eagle3", marks=pytest.mark.slow), "dflash"])
def test_float32_master_weights_next_to_a_bf16_target(data_dir, tmp_path, kind):
    """drafter.param_dtype = float32 with a bf16 target: the drafter trains (and is checkpointed)
    in float32 while the target stays bf16; the updates keep more than bf16's 8 bits."""
    import jax.numpy as jnp

    config = _config(_save_target(tmp_path / "target"), data_dir, kind, num_steps=2, save_every=2)
    config.target.dtype = config.target.param_dtype = "bfloat16"
    config.drafter.param_dtype = "float32"
    sft_stage.stage_sft(config, str(tmp_path / "run"))
    target = load_target_from_config(config)
    assert {a.dtype for a in jax.tree.leaves(target.params)} == {jnp.dtype(jnp.bfloat16)}
    drafter, info = stage_common.trained_drafter(str(tmp_path / "run"), target, kind, param_dtype="float32")
    assert info["step"] == 2 and drafter.spec.config.param_dtype == "float32"
    trained = jax.tree.leaves(drafter.params["eagle" if kind == "eagle3" else "dflash"])
    assert all(a.dtype == np.float32 for a in trained if np.issubdtype(a.dtype, np.floating))
    # the checkpoint holds float32 values: not all of them survive a round trip through bf16
    assert any(np.any(np.asarray(a) != np.asarray(a).astype(jnp.bfloat16).astype(np.float32)) for a in trained)
    bf16, _ = stage_common.trained_drafter(str(tmp_path / "run"), target, kind)  # "" = as the init was stored
    assert bf16.spec.config.param_dtype == "bfloat16"


@pytest.mark.parametrize("kind", ["eagle3", pytest.param("dflash", marks=pytest.mark.slow)])
def test_cached_target_features_train_like_online_ones(target_dir, data_dir, tmp_path, kind):
    online = _config(target_dir, data_dir, kind, num_steps=4)
    sft_stage.stage_sft(online, str(tmp_path / "online"))
    cached = _config(target_dir, data_dir, kind, num_steps=4, target_features="cache", feature_cache_dtype="float32")
    sft_stage.stage_sft(cached, str(tmp_path / "cached"))
    features = tmp_path / "cached" / "sft" / kind / "features"
    aux = np.load(features / "aux.npy", mmap_mode="r")
    offsets = np.load(features / "offsets.npy")  # ragged: each record's own tokens (15 to 20 here)
    assert np.diff(offsets).tolist() == [15 + i % 3 + i % 4 for i in range(12)]
    assert aux.shape[0] == offsets[-1] and aux.dtype == np.float32
    assert (features / "final.npy").exists() == (kind == "eagle3")
    rows = {name: [r for r in read_jsonl(str(tmp_path / name / "sft" / kind / "metrics.jsonl")) if "loss" in r]
            for name in ("online", "cached")}
    np.testing.assert_allclose([r["loss"] for r in rows["cached"]], [r["loss"] for r in rows["online"]], rtol=2e-4)
    # Fair accounting: a cached step is charged the target forward over its rows as an online
    # step computes it (the cache saves wall-clock, not FLOPs), and the build is not charged again.
    np.testing.assert_array_equal([r["flops"] for r in rows["cached"]], [r["flops"] for r in rows["online"]])
    # A cache built from other settings is refused, not silently reused.
    other = _config(target_dir, data_dir, kind, num_steps=6, target_features="cache", feature_cache_dtype="float16")
    with pytest.raises(ValueError, match="feature cache .* was built from"):
        sft_stage.stage_sft(other, str(tmp_path / "cached"))


def test_matched_steps_start_from_the_runs_own_flops(tmp_path):
    """A matched-FLOPs baseline stops at the other run's FLOPs, counting from where it starts."""
    from opd.training.sft_stage import matched_steps

    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "flops": 1000.0}\n')
    assert matched_steps(str(tmp_path), 0, 100) == 10
    assert matched_steps(str(tmp_path), 300, 100) == 7  # e.g. a warm-up's FLOPs it continues
    # or a metrics file: a run's probe curve kept with the results after its workdir is gone
    kept = tmp_path / "kept.jsonl"
    kept.write_text('{"step": 0, "flops": 0.0, "probe_tau": 1.4}\n{"step": 5, "flops": 2000.0, "probe_tau": 1.5}\n')
    assert matched_steps(str(kept), 0, 100) == 20
    with pytest.raises(FileNotFoundError, match="no finished run at"):
        matched_steps(str(tmp_path / "gone"), 0, 100)


def test_hosts_agree_on_building_the_initial_drafter(target_dir, data_dir, tmp_path, monkeypatch):
    """Multi-host: every process takes the same branch of `initial_drafter` (build or resume),
    so every process calls the same barriers, even when process 0 has already written the
    init folder by the time another process looks. Two threads stand in for two hosts; the
    second one is held after the first barrier until the first has written the folder (CI
    once hung on this: process 1 resumed from process 0's fresh folder and skipped a barrier)."""
    import threading

    from opd import sharding
    config = _config(target_dir, data_dir, "dflash")
    target = load_target_from_config(config)
    stage_dir = str(tmp_path / "sft" / "dflash")
    host = threading.local()
    meet = threading.Barrier(2, timeout=60)
    written = threading.Event()
    calls = {0: [], 1: []}

    def barrier(name):
        calls[host.pid].append(name)
        if host.pid == 0 and name == "initial_drafter":
            written.set()  # process 0 has replaced init/ and waits for the others
        meet.wait()
        if host.pid == 1 and name == "check_run":
            written.wait(timeout=60)

    monkeypatch.setattr(sharding, "barrier", barrier)
    monkeypatch.setattr(sharding, "is_main_process", lambda: host.pid == 0)

    def run(pid):
        host.pid = pid
        try:
            d = config.drafter
            fp = stage_common.fingerprint(config.target.path, target, d.to_dict())
            return stage_common.initial_drafter(stage_dir, fp, target, kind=d.kind, init=d.init,
                                                overrides=dict(d.overrides), seed=0, param_dtype="",
                                                workdir=str(tmp_path))
        finally:  # a host that is done waits for nobody: the other one's next barrier fails at once
            meet.abort()

    results, errors = run_as_hosts(run)
    assert not errors, errors
    assert calls[0] == calls[1] == ["check_run", "initial_drafter"]
    for a, b in zip(jax.tree.leaves(results[0].params), jax.tree.leaves(results[1].params)):
        np.testing.assert_array_equal(a, b)


def _probe_every_2_steps(config, tmp_path):
    """A held-out probe of 2 token-id prompts (written to `tmp_path`) at steps 0, 2, ..."""
    probes = tmp_path / "probe.jsonl"
    probes.write_text("".join(json.dumps({"id": f"q{i}", "prompt_ids": [3 + i, 9, 17, 40]}) + "\n" for i in range(2)))
    config.sft.probe.update(prompt_set=str(probes), num_prompts=2, max_new_tokens=4, every=2, num_draft_tokens=3)


def test_a_run_killed_before_its_first_checkpoint_starts_its_metrics_anew(target_dir, data_dir, tmp_path, monkeypatch):
    """Killed hard at step 1 (no SIGTERM checkpoint; the first is at 2), the same command starts a
    new run: its metrics hold the step-0 probe and every step once, not the killed run's as well."""
    config = _config(target_dir, data_dir, num_steps=2)
    _probe_every_2_steps(config, tmp_path)
    real_write = MetricsWriter.write

    def write_then_die(self, step, metrics):  # as if SIGKILLed right after step 1's row
        row = real_write(self, step, metrics)
        if step == 1:
            raise SystemExit("killed")
        return row

    monkeypatch.setattr(MetricsWriter, "write", write_then_die)
    with pytest.raises(SystemExit, match="killed"):
        sft_stage.stage_sft(config, str(tmp_path))
    monkeypatch.setattr(MetricsWriter, "write", real_write)
    assert not glob.glob(str(tmp_path / "sft" / "eagle3" / "checkpoints" / "[0-9]*"))
    sft_stage.stage_sft(config, str(tmp_path))
    rows = read_jsonl(str(tmp_path / "sft" / "eagle3" / "metrics.jsonl"))
    assert [r["step"] for r in rows if "probe_tau" in r] == [0, 2]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def assert_a_failing_probe_closes_the_writer(run_stage, metrics_path, monkeypatch):
    """`run_stage()` with a step-0 probe that raises: the stage ends with that error and its
    metrics writer (the TensorBoard thread) closed."""
    closed = []
    real_close = MetricsWriter.close
    monkeypatch.setattr(MetricsWriter, "close", lambda self: (closed.append(self.path), real_close(self)))

    def broken_probe(*args, **kwargs):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(stage_common, "probe_tau", broken_probe)
    with pytest.raises(RuntimeError, match="probe failed"):
        run_stage()
    assert closed == [str(metrics_path)]


def test_a_failing_step0_probe_still_closes_the_metrics_writer(target_dir, data_dir, tmp_path, monkeypatch):
    config = _config(target_dir, data_dir, num_steps=2)
    _probe_every_2_steps(config, tmp_path)
    assert_a_failing_probe_closes_the_writer(lambda: sft_stage.stage_sft(config, str(tmp_path)),
                                             tmp_path / "sft" / "eagle3" / "metrics.jsonl", monkeypatch)
