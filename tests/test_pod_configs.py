"""The TPU pod launch configs (experiments/pod.py) and the launch checks that run before any
work: every variant is a valid config; paths, meshes, batch sizes and the DFlash block size are
checked against what the launch finds, with errors that name the field."""

import importlib
import itertools
import json
import os
import sys

import pytest

from opd import configs, pipeline
from opd.configs import load_config
from opd.models.config import ConfigError
from opd.models.presets import PRESETS, check_against, preset_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(REPO, "experiments", "pod.py")


def _pod(variant):
    return load_config(f"{POD}:{variant}")


@pytest.mark.parametrize("model,kind,slice_name", list(itertools.product(
    ("qwen3_4b", "qwen3_8b", "llama31_8b"), ("dflash", "eagle3"), ("v5p-8", "v6e-32"))))
def test_every_pod_variant_is_a_valid_config(model, kind, slice_name):
    for extra in ("", ",from_sft"):
        c = _pod(f"{model},{kind},{slice_name}{extra}")
        if not extra:
            with pytest.raises(ValueError, match="config.opd.init must name the drafter"):
                configs.validate(c)  # the public drafter is required
            c.drafter.init = "/drafters/public"
            assert c.opd.init == "/drafters/public"  # follows drafter.init (a command-line override)
        configs.validate(c)
        assert c.target.preset in PRESETS and c.target.dtype == c.target.param_dtype == "bfloat16" and c.target.scan_layers
        n_data = c.num_devices // c.opd.mesh.tensor
        assert c.opd.batch_size % n_data == 0 and c.sft.batch_size % n_data == 0
        assert c.eval.num_draft_tokens == c.opd.num_draft_tokens
        if kind == "dflash":
            assert c.opd.num_draft_tokens <= c.drafter.overrides.block_size - 1
        assert c.distributed == (c.num_devices > 4)  # v5p-8 is one host
        if extra:
            assert "sft" in c.stages and c.opd.init == f"workdir:export/sft_{kind}"


def test_bad_variants_are_refused():
    for bad in ("qwen3_8b,llama31_8b", "gpt2", "dflash,eagle3", "v5p-8,v6e-8"):
        with pytest.raises(ValueError, match="bad variant"):
            _pod(bad)


@pytest.fixture()
def drafter_dir(tmp_path):
    d = tmp_path / "drafter"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["DFlashDraftModel"],
                                               "dflash_config": {"block_size": 8}}))
    return str(d)


def _launch_config(tmp_path, drafter_dir, **changes):
    c = _pod("qwen3_8b,dflash,v5p-8")
    c.num_devices = 1  # the devices of this test process
    c.target.path = str(tmp_path)
    c.drafter.init = drafter_dir
    c.opd.num_draft_tokens = 7
    c.opd.batch_size = c.sft.batch_size = 4
    for key, value in changes.items():
        configs.set_path(c, key, value)
    return c


def test_a_good_launch_config_passes(tmp_path, drafter_dir):
    c = _launch_config(tmp_path, drafter_dir)
    configs.validate(c)
    configs.validate_launch(c)


@pytest.mark.parametrize("changes,message", [
    ({"target.path": ""}, "config.target.path is empty"),
    ({"target.path": "/no/such/model"}, "config.target.path: no checkpoint at"),
    ({"target.path": "memory://bucket/Qwen3-8B"}, "config.target.path: no checkpoint at 'memory://bucket/Qwen3-8B'"),
    ({"drafter.init": "/no/such/drafter"}, "config.opd.init: no drafter directory"),
    ({"opd.num_draft_tokens": 15}, "config.opd.num_draft_tokens = 15.*block_size 8 drafts at most 7"),
    ({"num_devices": 4}, "config.num_devices = 4 .*1 devices are present"),
    ({"opd.mesh.tensor": 2}, "config.opd.mesh .*does not divide"),
    ({"target.preset": "qwen9"}, "config.target.preset 'qwen9' is unknown"),
])
def test_launch_checks_name_the_problem(tmp_path, drafter_dir, changes, message):
    c = _launch_config(tmp_path, drafter_dir, **changes)
    with pytest.raises(ValueError, match=message):
        configs.validate(c)
        configs.validate_launch(c)


def test_gs_workdir_without_gcsfs_is_a_clear_error(tmp_path, drafter_dir, monkeypatch):
    # gcsfs made unimportable whether or not this machine has it (the `gcs` extra)
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    registry = importlib.import_module("fsspec.registry")._registry
    for scheme in ("gs", "gcs"):
        monkeypatch.delitem(registry, scheme, raising=False)
    with pytest.raises(ValueError, match="workdir gs://b/run: no filesystem for gs://.*pip install gcsfs"):
        pipeline.run(_launch_config(tmp_path, drafter_dir), "gs://b/run")


def test_presets_match_their_families_and_refuse_another_checkpoint():
    q8, q4, llama = preset_config("qwen3-8b"), preset_config("qwen3-4b"), preset_config("llama-3.1-8b")
    assert q8.qk_norm and not q8.tie_word_embeddings and q4.tie_word_embeddings and q4.hidden_size == 2560
    assert llama.rope_scaling is not None and llama.rope_scaling.factor == 8.0 and not llama.qk_norm
    check_against("qwen3-8b", q8.replace(dtype="bfloat16", scan_layers=True))  # execution fields are not compared
    with pytest.raises(ConfigError, match="not the 'qwen3-8b' preset.*hidden_size: preset 4096 vs checkpoint 2560"):
        check_against("qwen3-8b", q4)
    with pytest.raises(ConfigError, match="unknown target preset"):
        preset_config("qwen3-14b")


def test_load_config_reads_a_variant_and_names_a_missing_file():
    assert load_config(os.path.join(REPO, "experiments", "quickstart.py") + ":tiny").stages
    with pytest.raises(FileNotFoundError, match="no config file at"):
        load_config("experiments/nope.py:tiny")


@pytest.mark.slow
def test_pod_tiny_variant_runs_on_8_devices(tmp_path):
    """The pod config's stage list end to end (SmolLM2 for the target, mesh 4 x 1 x 2 over 8
    fake CPU devices): regenerate, SFT, export, Draft-OPD, export, eval."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "opd.main", "--config=experiments/pod.py:eagle3,tiny",
                           f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for run in ("eagle3_sft_alpacaeval", "eagle3_opd_alpacaeval"):
        m = json.load(open(tmp_path / "eval" / run / "metrics.json"))
        assert m["greedy_matches_ar"] is True and m["tau"] >= 1.0
    assert json.load(open(tmp_path / "export" / "opd_eagle3" / "export.json"))["step"] == 4
