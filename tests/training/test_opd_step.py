"""The jitted Draft-OPD step on a tiny target: it runs for both drafters and several
divergences, updates only the trainable drafter parameters, reports rollout statistics that
match the rollout, and repeated steps on fixed prompts lower the loss."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_target
from opd import sharding as shd
from opd.decoding import batching
from opd.training import optim
from opd.training import run as run_mod
from opd.training.opd_loss import OPDLossConfig
from opd.training.opd_step import OPDConfig

PROMPTS = [[5, 9, 2, 5, 9], [17, 3], [1, 2, 3, 4, 5, 6, 7], [40, 41]]
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS_DIR)


@pytest.fixture(scope="module")
def target():
    t = make_target("llama", seed=3)
    params = dict(t.params)
    params["lm_head"] = params["lm_head"] * 20.0  # peaked target distributions
    return opd.Target(t.config, params)


def _drafter(target, kind):
    if kind == "eagle3":
        return opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=64)
    return opd.init_drafter("dflash", target, seed=2, block_size=4)


def _setup(target, drafter, cfg, lr=3e-3):
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=lr, warmup_steps=1, total_steps=100))
    trainable, frozen = drafter.split()
    chunk = next(batching.chunks(PROMPTS, 0, None))
    batch = {"tokens": jnp.asarray(chunk.tokens), "lengths": jnp.asarray(chunk.lengths), "valid": jnp.asarray(chunk.valid)}
    run = run_mod.opd_run(drafter.spec, frozen, target.config, mesh=mesh, optimizer=optimizer, opd_config=cfg,
                          batch_size=len(PROMPTS), prompt_len=chunk.tokens.shape[1], num_eos=1)
    return run.init_state(trainable, seed=0), frozen, batch, run


@pytest.mark.parametrize("kind,divergence,temperature,err", [
    ("eagle3", "k3", 1.0, 0.0), ("eagle3", "reverse_kl", 0.0, 0.0), ("dflash", "jsd", 1.0, 0.0),
    ("eagle3", "k3", 1.0, 1.0), ("dflash", "forward_kl", 1.0, 1.0)])
def test_opd_steps_update_the_drafter_and_lower_the_loss(target, kind, divergence, temperature, err):
    drafter = _drafter(target, kind)
    cfg = OPDConfig(num_rounds=3, num_draft_tokens=3, rollout_temperature=temperature,
                    loss=OPDLossConfig(divergence=divergence, error_anchor_weight=err))
    state, frozen, batch, step = _setup(target, drafter, cfg)
    before = jax.tree.map(np.asarray, state.params)
    frozen_before = jax.tree.map(np.asarray, frozen)
    eos = jnp.asarray([10_000], jnp.int32)  # no EOS: every row runs every round
    losses = []
    for _ in range(6):
        state, m = step(state, target.params, frozen, batch, eos)
        losses.append(float(m["loss"]))
        assert np.isfinite(losses[-1])
        assert float(m["rollout_rounds"]) == 4 * 3  # 4 prompts x 3 rounds
        assert 1.0 <= float(m["rollout_tau"]) <= 4.0
        assert m["acceptance"].shape == (3,) and m["divergence"].shape == (3,)
    assert int(state.step) == 6
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
    assert all(moved)
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert losses[-1] < losses[0]


_SHARDED_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
sys.path[:0] = [TESTS_DIR]
import test_sft as t
from opd import sharding as shd
from opd.decoding import batching
from opd.training import run as run_mod
from opd.training.opd_loss import OPDLossConfig, preset
from opd.training.opd_step import OPDConfig
assert len(jax.devices()) == 8, jax.devices()
target = t._target(logit_scale=8.0)
prompts = [[5, 9, 2, 5, 9], [17, 3], [1, 2, 3, 4, 5, 6, 7], [40, 41]]
eos = np.asarray([10_000], np.int32)
optimizer = optax.sgd(1.0)  # params after one step = params - grad: compares the gradients
result = {}
for name, kind, T, loss, A in (
        ("eagle3", "eagle3", 1.0, OPDLossConfig(divergence="k3", post_rejection_weight=0.5, error_anchor_weight=1.0), 1),
        ("dflash", "dflash", 1.0, OPDLossConfig(divergence="reverse_kl", post_rejection_weight=0.5,
                                                error_anchor_weight=1.0), 1),
        # 2 micro-batches of 4 rows, per-token and per-round denominators summed over both
        ("eagle3_accumulate2", "eagle3", 1.0, preset("reference_yaml", error_anchor_weight=1.0), 2)):
    chunk = next(batching.chunks(prompts * A, 0, None))
    batch = {"tokens": chunk.tokens, "lengths": chunk.lengths, "valid": chunk.valid}
    drafter = t._drafter(target, kind)
    cfg = OPDConfig(num_rounds=3, num_draft_tokens=3, rollout_temperature=T, loss=loss, accumulate=A)
    runs = {}
    for name, mesh in (("one", shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])), ("mesh", shd.make_mesh(2, 2, 2))):
        trainable, frozen = drafter.split()
        run = run_mod.opd_run(drafter.spec, frozen, target.config, mesh=mesh, optimizer=optimizer, opd_config=cfg,
                              batch_size=4, prompt_len=chunk.tokens.shape[1], num_eos=1)
        state = run.init_state(trainable, seed=0)
        before = jax.tree.map(np.asarray, state.params)
        state, m = run(state, *run.place_frozen(target.params, frozen), batch, eos)
        grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, state.params)
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
        runs[name] = (float(m["loss"]), float(m["rollout_tau"]), float(m["error_loss"]), grads, specs,
                      np.asarray(m["_seq"]).tolist())
    one, mesh_ = runs["one"], runs["mesh"]
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(one[3]))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one[3]), jax.tree.leaves(mesh_[3])))
    result[name] = {"one": one[:3], "mesh": mesh_[:3], "grad_scale": scale, "max_grad_diff": diff, "specs": mesh_[4],
                    "same_rollout": one[5] == mesh_[5]}
print("RESULT" + json.dumps(result))
""".replace("TESTS_DIR", repr(os.path.join(TESTS_DIR, "training")))


@pytest.mark.slow  # ~3-4 min: two subprocesses, 1 and 8 devices
def test_opd_step_on_8_fake_devices_matches_one_device():
    """data=2, fsdp=2, tensor=2 vs one device: the same rollout, loss and gradients (also with
    gradient accumulation over 2 micro-batches)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
    for kind, r in result.items():
        assert r["same_rollout"], kind
        np.testing.assert_allclose(r["mesh"], r["one"], rtol=1e-4, atol=1e-6, err_msg=kind)
        assert r["grad_scale"] > 1e-3 and r["max_grad_diff"] < 1e-4 * max(1.0, r["grad_scale"]), (kind, r)
        assert r["one"][2] > 0, kind  # the error-anchor term was exercised
        assert any("tensor" in s for s in r["specs"]) and any("fsdp" in s for s in r["specs"]), r["specs"]
