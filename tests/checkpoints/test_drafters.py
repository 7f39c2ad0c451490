"""`opd.load_drafter` / `opd.export_drafter`: one entry point over the public HF layouts."""

import json
import os

import jax
import numpy as np
import pytest

import opd
from conftest import make_target

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]


@pytest.mark.parametrize("kind,overrides", [("eagle3", {"draft_vocab_size": 64}), ("dflash", {"block_size": 4})])
def test_export_then_load_proposes_the_same_tokens(tmp_path, kind, overrides):
    target = make_target("llama", seed=1, num_hidden_layers=5)
    drafter = opd.init_drafter(kind, target, seed=2, **overrides)
    opd.export_drafter(drafter, str(tmp_path))
    loaded = opd.load_drafter(str(tmp_path), target)
    assert loaded.kind == kind
    a, b = (opd.speculative_generate(target, d, PROMPTS, max_new_tokens=6, num_draft_tokens=3, temperature=1.0, seed=5)
            for d in (drafter, loaded))
    assert a.tokens == b.tokens and a.stats["accept_hist"] == b.stats["accept_hist"]


@pytest.mark.parametrize("kind,overrides", [("eagle3", {"draft_vocab_size": 64}), ("dflash", {"block_size": 4})])
def test_float16_export_loads_the_rounded_weights(tmp_path, kind, overrides):
    """Shipping exports: float16 tensors (half the bytes), loaded back as the float32 values of
    the float16-rounded weights; integer maps (EAGLE-3's d2t / t2d) unchanged."""
    target = make_target("llama", seed=1, num_hidden_layers=5)
    drafter = opd.init_drafter(kind, target, seed=2, **overrides)
    opd.export_drafter(drafter, str(tmp_path / "f32"))
    opd.export_drafter(drafter, str(tmp_path / "f16"), dtype="float16")
    size = lambda d: os.path.getsize(tmp_path / d / "model.safetensors")
    assert size("f16") < 0.55 * size("f32")
    assert json.load(open(tmp_path / "f16" / "config.json"))["torch_dtype"] == "float16"
    loaded = opd.load_drafter(str(tmp_path / "f16"), target)
    trainable, frozen = drafter.split()
    got_trainable, got_frozen = loaded.split()
    for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(got_trainable)):
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(np.float16).astype(a.dtype))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(got_frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="export dtype"):
        opd.export_drafter(drafter, str(tmp_path / "x"), dtype="int8")


def test_errors_name_the_problem(tmp_path):
    target = make_target("llama", seed=1)
    with pytest.raises(opd.CheckpointError, match="does not exist"):
        opd.load_drafter(str(tmp_path / "missing"), target)
    with pytest.raises(opd.CheckpointError, match="no config.json"):
        opd.load_drafter(str(tmp_path), target)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump({"architectures": ["MedusaModel"]}, f)
    with pytest.raises(opd.CheckpointError, match="not a supported drafter"):
        opd.load_drafter(str(tmp_path), target)
    with pytest.raises(ValueError, match="no HF layout"):
        opd.export_drafter(opd.init_drafter("ngram", target), str(tmp_path / "x"))
