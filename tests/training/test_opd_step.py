"""The jitted Draft-OPD step on a tiny target: it runs for both drafters and several
divergences, updates only the trainable drafter parameters, reports rollout statistics that
match the rollout, and repeated steps on fixed prompts lower the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_target
from opd import sharding as shd
from opd.decoding import batching
from opd.training import optim, sft
from opd.training.opd_loss import OPDLossConfig
from opd.training.opd_step import OPDConfig, make_opd_step

PROMPTS = [[5, 9, 2, 5, 9], [17, 3], [1, 2, 3, 4, 5, 6, 7], [40, 41]]


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
    sh = sft.make_shardings(mesh, drafter.spec, target.config, optimizer)
    trainable, frozen = sft.split_drafter_params(drafter)
    state = sft.init_train_state(trainable, optimizer, sh, seed=0)
    chunk = next(batching.chunks(PROMPTS, 0, None))
    batch = {"tokens": jnp.asarray(chunk.tokens), "lengths": jnp.asarray(chunk.lengths), "valid": jnp.asarray(chunk.valid)}
    step = make_opd_step(drafter.spec, target.config, optimizer, sh, cfg, chunk.tokens.shape[1], mesh)
    return state, frozen, batch, step


@pytest.mark.parametrize("kind,divergence,temperature", [("eagle3", "k3", 1.0), ("eagle3", "reverse_kl", 0.0),
                                                         ("dflash", "jsd", 1.0)])
def test_opd_steps_update_the_drafter_and_lower_the_loss(target, kind, divergence, temperature):
    drafter = _drafter(target, kind)
    cfg = OPDConfig(num_rounds=3, num_draft=3, rollout_temperature=temperature, loss=OPDLossConfig(divergence=divergence))
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
