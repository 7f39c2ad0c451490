"""Gradient accumulation in the Draft-OPD step (`OPDConfig.accumulate`): A micro-batches of B
prompts give exactly the loss, metrics, committed text and update of one batch of A x B
prompts (greedy rollouts, so both see the same rollouts), for the per-token shared denominator
(over all micro-batches), the per-round one, and the two together (the expected-acceptance
term with "tokens"); the config, the FLOPs count and the `reference` variant follow A."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import opd
from conftest import make_target
from opd import configs
from opd import sharding as shd
from opd.decoding import batching
from opd.training import flops
from opd.training import run as run_mod
from opd.training.opd_loss import OPDLossConfig, preset
from opd.training.opd_step import OPDConfig

PROMPTS = [[5, 9, 2, 5, 9], [17, 3], [1, 2, 3, 4, 5, 6, 7], [40, 41]]


@pytest.fixture(scope="module")
def target():
    t = make_target("llama", seed=3)
    params = dict(t.params)
    params["lm_head"] = params["lm_head"] * 20.0  # peaked target distributions: some drafts accepted
    return opd.Target(t.config, params)


def _step(target, drafter, cfg, prompts, micro_batch, masked_last=False):
    """One step with SGD(1) (new params = params - grads) on `prompts` as micro-batches of
    `micro_batch` rows (the last row a padding row with `masked_last`); returns (metrics, grads)."""
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainable, frozen = drafter.split()
    chunk = next(batching.chunks(prompts, 0, None))
    valid = np.asarray(chunk.valid).copy()
    valid[-1] = valid[-1] and not masked_last
    batch = {"tokens": jnp.asarray(chunk.tokens), "lengths": jnp.asarray(chunk.lengths), "valid": jnp.asarray(valid)}
    run = run_mod.opd_run(drafter.spec, frozen, target.config, mesh=mesh, optimizer=optax.sgd(1.0), opd_config=cfg,
                          batch_size=micro_batch, prompt_len=chunk.tokens.shape[1], num_eos=1)
    state = run.init_state(trainable, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    state, m = run(state, target.params, frozen, batch, jnp.asarray([10_000], jnp.int32))
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, state.params)
    return jax.tree.map(np.asarray, m), grads


# (drafter, prompts, loss, mask the last row). With 4 prompts in micro-batches of 2 (rows {0, 2}
# and {1, 3}) and row 3 masked, the micro-batches have 2 and 1 active rows: a mean of the
# micro-batches' own normalised losses would differ from the big batch's.
CASES = {
    # the reference yaml: response + suffix streams, one per-token denominator over every micro-batch
    "tokens": ("eagle3", 2, lambda: preset("reference_yaml"), False),
    # an exact divergence, the post-rejection stream and the expected-acceptance objective, all
    # divided by the active rounds
    "rounds": ("dflash", 4, lambda: OPDLossConfig(divergence="reverse_kl", post_rejection_weight=0.5,
                                                  expected_acceptance_weight=0.5), True),
    # both denominators at once: the streams per token, the expected-acceptance term per round
    # (the error anchors, also per round, need accepted drafts: greedy random drafters have none)
    "tokens+acceptance": ("eagle3", 4, lambda: preset("reference_yaml", expected_acceptance_weight=1.0), True),
}


@pytest.mark.parametrize("case", ["tokens"] + [pytest.param(c, marks=pytest.mark.slow)  # ~1 min each on a busy CPU
                                                for c in CASES if c != "tokens"])
def test_accumulated_micro_batches_equal_one_big_batch(target, case):
    kind, n, loss, masked = CASES[case]
    prompts = PROMPTS[:n]
    if kind == "eagle3":
        drafter = opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=64)
    else:
        drafter = opd.init_drafter("dflash", target, seed=2, block_size=4)
    base = dict(num_rounds=3, num_draft_tokens=3, rollout_temperature=0.0, loss=loss())
    m1, g1 = _step(target, drafter, OPDConfig(**base), prompts, n, masked)  # A = 1, B = n
    m2, g2 = _step(target, drafter, OPDConfig(**base, accumulate=2), prompts, n // 2, masked)  # A = 2, B = n / 2
    np.testing.assert_array_equal(m2["_seq"], m1["_seq"])  # same rollouts, rows in the batch's order
    np.testing.assert_array_equal(m2["_seq_len"], m1["_seq_len"])
    for key in ("rollout_rounds", "committed_tokens", "rollout_tau", "acceptance"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-6, err_msg=key)
    for key in ("loss", "accepted_loss", "rejected_loss", "post_loss", "error_loss", "response_loss", "suffix_loss",
                "acceptance_loss", "expected_accepted", "divergence", "grad_norm"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert float(m1["loss"]) > 0 and float(m1["rollout_rounds"]) == 3 * (n - masked)  # every valid row's rounds
    if case != "tokens":
        assert float(m1["acceptance_loss"]) > 0
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g1))
    assert scale > 1e-4
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * scale)


def test_accumulate_is_validated_and_scales_the_step_flops(target):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"accumulate must be a positive integer"):
            OPDConfig(accumulate=bad)
    c = configs.default_config()
    c.opd.init = "/anything"
    c.opd.accumulate = 0
    with pytest.raises(ValueError, match=r"config\.opd: accumulate must be a positive integer, got 0"):
        configs._check_opd(c)
    c.opd.accumulate = 3
    assert configs.opd_config(c.opd).accumulate == 3
    spec = opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=64).spec
    one = flops.opd_step_flops(spec, target.config, 2, 16, 3, 3, 48)
    assert one > 0 and flops.opd_step_flops(spec, target.config, 2, 16, 3, 3, 48, accumulate=3) == 3 * one


@pytest.mark.parametrize("variant", ["eagle3,reference", "dflash,reference,tiny", "eagle3,sft_cont,reference",
                                     "dflash,sft_rollouts,reference,tiny"])
def test_the_reference_variant_of_opd_smollm2(variant):
    """`:<kind>,reference`: the reference preset, greedy rollouts from bare prompts, >= 64 rounds,
    >= 4096 supervised positions per update (B * A * R * (K + 1)); its runs named apart."""
    import os

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    c = configs.load_config(os.path.join(repo, "experiments", "opd_smollm2.py") + ":" + variant)
    configs.check_fields(c)
    configs.validate(c)
    o, kind = c.opd, c.drafter.kind
    cfg = configs.opd_config(o)
    assert (o.loss_preset, cfg.rollout_temperature, o.prefix, o.name) == ("reference_yaml", 0.0, "prompt", "opd_reference")
    assert cfg.loss == preset("reference_yaml") and cfg.accumulate >= 2
    if "tiny" not in variant:
        assert cfg.num_rounds >= 64
        assert o.batch_size * cfg.accumulate * cfg.num_rounds * (cfg.num_draft_tokens + 1) >= 4096
    if "sft_cont" in variant:
        assert c.sft.name == "sft_cont_reference" and c.sft.match_flops == f"workdir:opd_reference/{kind}"
    elif "sft_rollouts" in variant:
        assert c.sft.data == (f"workdir:opd_reference/{kind}/rollouts",)
        assert c.sft.seq_len == o.prompt_len + o.num_rounds * (o.num_draft_tokens + 1)
    else:
        assert "export:opd_reference" in c.stages
        assert {r["drafter_path"] for r in c.eval.runs} == {f"workdir:export/{r}_{kind}" for r in ("sft", "opd_reference")}
