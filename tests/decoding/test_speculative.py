"""Speculative decoding is lossless: greedy output equals autoregressive output, and sampled
output follows the target's exact distribution (chi-square tests with fixed seeds)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaincc

import opd
from conftest import make_hf_model
from opd.decoding.sampling import SamplingParams, process_logits
from opd.drafters.base import Drafter, DrafterSpec
from opd.models import transformer as tfm


def _target(family="llama", seed=3, logit_scale=1.0, **overrides):
    model, d = make_hf_model(family, seed=seed, **overrides)
    config = opd.TransformerConfig.from_hf(d)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if logit_scale != 1.0:  # peaked, context-dependent distributions for the statistical tests
        sd["lm_head.weight"] = sd["lm_head.weight"] * logit_scale
    return opd.Target(config, jax.tree.map(jnp.asarray, tfm.params_from_hf(config, sd)))


@dataclasses.dataclass(frozen=True)
class FixedQSpec(DrafterSpec):
    """Test drafter: proposes K i.i.d. samples from one fixed distribution q (context-free).
    `logits` may contain -inf (q = 0 where p > 0) or be one-hot."""

    logits: tuple = ()
    kind = "fixed_q"

    def prefill(self, params, ctx, target_aux, cache_len):
        return ()

    def commit(self, params, state, ctx, n_accepted_B, target_aux):
        return ()

    def propose(self, params, state, ctx, key, num_draft_tokens, sp):
        B = ctx.seq_BS.shape[0]
        logits = jnp.broadcast_to(jnp.asarray(self.logits, jnp.float32), (B, num_draft_tokens, self.vocab_size))
        if sp.greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32), None, state
        logq = process_logits(logits, sp)
        return jax.random.categorical(key, logq, axis=-1).astype(jnp.int32), logq, state


def _fixed_q(target, logits):
    return Drafter(FixedQSpec(vocab_size=target.config.vocab_size, logits=tuple(float(x) for x in logits)))


@pytest.fixture(scope="module")
def target():
    return _target()


PROMPTS = [[5, 9, 2, 5, 9], [17] * 11, [1], list(range(40, 70)) + list(range(40, 50))]


@pytest.mark.parametrize("num_draft_tokens", [1, 3, pytest.param(8, marks=pytest.mark.slow)])
def test_greedy_equals_autoregressive(target, num_draft_tokens):
    weak = _target(seed=11, num_hidden_layers=1)
    rng = np.random.RandomState(num_draft_tokens)
    drafters = {
        "ngram": opd.init_drafter("ngram", target),
        "weak_lm": opd.init_drafter("lm", target, model=weak),
        "random": _fixed_q(target, rng.randn(target.config.vocab_size)),
    }
    want = opd.generate(target, PROMPTS, max_new_tokens=24).tokens
    for name, drafter in drafters.items():
        out = opd.speculative_generate(target, drafter, PROMPTS, max_new_tokens=24, num_draft_tokens=num_draft_tokens)
        assert out.tokens == want, name
        one = opd.speculative_generate(target, drafter, PROMPTS[3:], max_new_tokens=24, num_draft_tokens=num_draft_tokens)
        assert one.tokens == want[3:], name  # batch 1
        assert 1.0 <= out.stats["tau"] <= num_draft_tokens + 1


def test_eos_mid_round_matches_autoregressive(target):
    free = opd.generate(target, PROMPTS, max_new_tokens=20).tokens
    eos = [free[0][6], free[3][2]]
    want = opd.generate(target, PROMPTS, max_new_tokens=20, eos_token_ids=eos).tokens
    self_drafter = opd.init_drafter("lm", target, model=target)  # accepts everything: EOS lands mid-round
    got = opd.speculative_generate(target, self_drafter, PROMPTS, max_new_tokens=20, num_draft_tokens=4, eos_token_ids=eos)
    assert got.tokens == want
    # tau's numerator counts each row's verified tokens up to and including its EOS, no further
    # (the first token comes from the prefill, not from a verify round).
    assert got.stats["committed_tokens"] == sum(len(t) + (len(t) < 20) - 1 for t in want)
    assert got.stats["prompt_committed"] == [len(t) + (len(t) < 20) - 1 for t in want]  # per prompt, in order
    assert sum(got.stats["prompt_rounds"]) == got.stats["verify_rounds"]


def test_self_drafting_accepts_everything_and_counts_tau(target):
    K, rounds = 3, 5
    drafter = opd.init_drafter("lm", target, model=target)
    out = opd.speculative_generate(target, drafter, PROMPTS, max_new_tokens=1 + rounds * (K + 1), num_draft_tokens=K,
                                   eos_token_ids=(), batch_size=3)  # chunks of 3 and 1, padded to 4 and 1 rows
    assert out.stats["tau"] == K + 1
    assert out.stats["prompt_rounds"] == [rounds] * 4  # the padding rows are not prompts
    assert out.stats["prompt_committed"] == [rounds * (K + 1)] * 4
    assert out.stats["acceptance_by_offset"] == [1.0] * K
    assert out.stats["verify_rounds"] == rounds * len(PROMPTS)
    assert out.stats["target_forwards"] == 2 * (rounds + 1)  # per chunk: a prefill + one forward per round


def test_pallas_and_reference_verification_give_identical_tokens(target):
    drafter = opd.init_drafter("lm", target, model=_target(seed=11, num_hidden_layers=1))
    for temperature in (0.0, 1.0):
        a, b = (opd.speculative_generate(target, drafter, PROMPTS, max_new_tokens=12, num_draft_tokens=3,
                                         temperature=temperature, seed=4, verify_impl=impl) for impl in ("reference", "pallas"))
        assert a.tokens == b.tokens and a.stats["tau"] == b.stats["tau"]


# ----------------------------------------------------------------------------- T > 0


def _exact_distribution(target, prompt, n, sp):
    """P(t_1..t_n | prompt) under the processed target distribution, for every sequence."""
    V = target.config.vocab_size
    seqs = np.array(list(itertools.product(range(V), repeat=n)), np.int32)
    full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    logp = np.asarray(process_logits(target.logits(full), sp))
    L = len(prompt)
    lp = sum(logp[np.arange(len(seqs)), L - 1 + i, seqs[:, i]] for i in range(n))
    return {tuple(s): float(np.exp(v)) for s, v in zip(seqs, lp)}


def _chi_square_pvalue(counts: dict, probs: dict, total: int) -> float:
    """Pearson chi-square; cells with expected count < 5 are pooled into one."""
    obs, exp, pooled_o, pooled_e = [], [], 0.0, 0.0
    for cell, p in probs.items():
        e, o = p * total, counts.get(cell, 0)
        if e < 5:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
        else:
            obs.append(o), exp.append(e)
    if pooled_e > 0:
        obs.append(pooled_o), exp.append(pooled_e)
    obs, exp = np.array(obs), np.array(exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(gammaincc((len(obs) - 1) / 2.0, stat / 2.0))


STAT_TARGET = dict(vocab_size=5, num_hidden_layers=1, seed=21, logit_scale=40.0)
ADVERSARIAL = {
    "weak_lm": None,  # a different random LM
    "uniform": [0.0] * 5,
    "far_from_p": [8.0, -8.0, -8.0, -8.0, 0.0],
    "zero_where_p_positive": [0.0, 0.0, -np.inf, -np.inf, -np.inf],
    "one_hot": [0.0, -np.inf, -np.inf, -np.inf, -np.inf],
}


@pytest.mark.parametrize("drafter_name", sorted(ADVERSARIAL))
def test_sampled_output_has_the_target_distribution(drafter_name):
    target = _target(**STAT_TARGET)
    sp = SamplingParams(temperature=1.0)
    if ADVERSARIAL[drafter_name] is None:
        drafter = opd.init_drafter("lm", target, model=_target(vocab_size=5, num_hidden_layers=1, seed=22, logit_scale=20.0))
    else:
        drafter = _fixed_q(target, ADVERSARIAL[drafter_name])
    prompt, n, rows, calls = [1, 3, 0], 3, 64, 64
    probs = _exact_distribution(target, prompt, n, sp)
    counts, total = {}, 0
    for seed in range(calls):  # fixed seeds: deterministic; H0 rejected only below p = 1e-3
        out = opd.speculative_generate(target, drafter, [prompt] * rows, max_new_tokens=n, num_draft_tokens=2,
                                       temperature=1.0, seed=seed, eos_token_ids=())
        for toks in out.tokens:
            counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
            total += 1
    assert all(probs[c] > 0 for c in counts), "a sequence with target probability 0 was generated"
    assert _chi_square_pvalue(counts, probs, total) > 1e-3


def test_sampled_with_temperature_and_top_k():
    target = _target(**STAT_TARGET)
    sp = SamplingParams(temperature=0.7, top_k=3)
    drafter = _fixed_q(target, [0.0, 1.0, 2.0, -1.0, 0.5])
    prompt, n = [4, 4], 2
    probs = _exact_distribution(target, prompt, n, sp)
    counts, total = {}, 0
    for seed in range(48):
        out = opd.speculative_generate(target, drafter, [prompt] * 64, max_new_tokens=n, num_draft_tokens=3,
                                       temperature=0.7, top_k=3, seed=seed, eos_token_ids=())
        for toks in out.tokens:
            counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
            total += 1
    assert all(probs[c] > 0 for c in counts)
    assert _chi_square_pvalue(counts, probs, total) > 1e-3


def test_chi_square_detects_a_wrong_distribution():
    """The statistical test has power: autoregressive samples at T=1 fail against T=0.7 probs."""
    target = _target(**STAT_TARGET)
    prompt, n = [1, 3, 0], 2
    probs = _exact_distribution(target, prompt, n, SamplingParams(temperature=0.7))
    counts, total = {}, 0
    for seed in range(32):
        for toks in opd.generate(target, [prompt] * 64, max_new_tokens=n, temperature=1.0, seed=seed, eos_token_ids=()).tokens:
            counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
            total += 1
    assert _chi_square_pvalue(counts, probs, total) < 1e-3


# ----------------------------------------------------------------------------- errors


def test_bad_input_is_a_clear_error(target):
    ngram = opd.init_drafter("ngram", target)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        opd.speculative_generate(target, ngram, PROMPTS, num_draft_tokens=0)
    other = _target(vocab_size=64)
    with pytest.raises(ValueError, match="vocab mismatch"):
        opd.speculative_generate(target, opd.init_drafter("lm", target, model=other), PROMPTS)
    with pytest.raises(opd.PromptError, match="prompt 0 is too long"):
        opd.speculative_generate(target, ngram, [list(range(100)) * 2 + [1] * 50], max_new_tokens=4, num_draft_tokens=4)
    with pytest.raises(ValueError, match="verify_impl"):
        opd.speculative_generate(target, ngram, PROMPTS, verify_impl="cuda")
    with pytest.raises(ValueError, match="unknown drafter kind"):
        opd.init_drafter("medusa", target)
