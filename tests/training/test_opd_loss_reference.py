"""Draft-OPD's reference-style loss options (`opd.training.opd_loss`, module docstring): the
response stream (correction token included) and the suffix stream against hand-computed values
of the reference's formulas (verl's k3 with its clamps, the Bernoulli forward KL, loss_max_clamp,
the shared per-token denominator), the expected-acceptance TV objective against a NumPy loop,
the presets' values, the rollout's correction-token log p, and the replay loss's chunked path
against its full-logits path for the new terms."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_target
from opd import configs
from opd.training import rollout as ro
from opd.training.opd_loss import (PRESETS, OPDLossConfig, TokenLogProbs, committed_teacher_logp,
                                   loss_from_divergences, opd_loss, preset)
from test_chunked_logprobs import RK, TV, make_record, replay_loss_and_grad  # the replay test's K and vocabulary

K = 3
L = math.log


# ----------------------------------------------------------------------------- the reference's formulas (NumPy)


def k3_ref(lq, lp):
    """verl kl_penalty(logprob=lq, ref_logprob=lp, "k3"): kl = lp - lq clipped to +-20,
    exp(kl) - kl - 1 clipped to +-10."""
    kl = np.clip(lp - lq, -20.0, 20.0)
    return np.clip(np.exp(kl) - kl - 1.0, -10.0, 10.0)


def bfkl_ref(lq, lp, lo):
    """The reference's _local_bernoulli_forward_kl (log-probs clipped to [lo, log1p(-eps)])."""
    hi = math.log1p(-float(np.finfo(np.float32).eps))
    lq, lp = np.clip(lq, lo, hi), np.clip(lp, lo, hi)
    p, q = np.exp(lp), np.exp(lq)
    return p * (lp - lq) + (1 - p) * (np.log1p(-p) - np.log1p(-q))


# ----------------------------------------------------------------------------- a 2-row example, K = 3
# Row 0: n = 1 (d1 accepted, d2 rejected, the target committed its correction c2 at offset 2).
# Row 1: n = 3 (all accepted; the bonus token at offset 4 has no slot: not trained, as the reference).
N_ACC = np.array([[1], [3]])
ACTIVE = np.array([[True], [True]])
NAN = float("nan")  # entries no stream may read: a NaN there would poison the loss
# log q / log p of the committed token at each offset (row 0: d1, c2, -; row 1: d1, d2, d3)
LQ_COMMIT = np.array([[[L(0.5), L(0.1), NAN]], [[L(0.9), L(0.4), -1e-9]]])
LP_COMMIT = np.array([[[L(0.25), L(0.8), NAN]], [[L(0.9), L(0.2), L(0.01)]]])
# log q / log p of the drafted token (row 0's d2, d3 form the suffix; d3: log p - log q = 29.9)
LQ_DRAFT = np.array([[[L(0.5), L(0.6), -30.0]], [[L(0.9), L(0.4), -1e-9]]])
LP_DRAFT = np.array([[[L(0.25), L(0.05), -0.1]], [[L(0.9), L(0.2), L(0.01)]]])


def _tokens(valid=None):
    f = lambda x: jnp.asarray(x, jnp.float32)
    valid = np.ones((2, 1, K), bool) if valid is None else valid
    return TokenLogProbs(f(LQ_DRAFT), f(LQ_COMMIT), f(LP_DRAFT), f(LP_COMMIT), jnp.asarray(valid))


def _loss(cfg, tokens=None):
    return loss_from_divergences(jnp.zeros((2, 1, K)), jnp.asarray(N_ACC), jnp.asarray(ACTIVE), cfg,
                                 tokens=_tokens() if tokens is None else tokens)


def test_hand_computed_k3_values_with_verl_clamps():
    # the per-token values the presets below add up (by hand: (p/q - 1) - log(p/q))
    np.testing.assert_allclose(k3_ref(L(0.5), L(0.25)), 0.5 - 1 + L(2), rtol=1e-12)  # 0.193147
    np.testing.assert_allclose(k3_ref(L(0.1), L(0.8)), 8 - 1 - L(8), rtol=1e-12)  # 4.920558
    np.testing.assert_allclose(k3_ref(L(0.6), L(0.05)), 1 / 12 - 1 + L(12), rtol=1e-12)  # 1.568240
    assert k3_ref(-30.0, -0.1) == 10.0  # log-ratio 29.9 -> 20, k3 e^20 - 21 -> 10
    assert bfkl_ref(-1e-9, L(0.01), -10.0) > 15  # q ~ 1 - eps, p = 0.01: loss_max_clamp engages


def test_reference_yaml_preset_on_the_example():
    """k3 on both streams, decay 0.9, no loss clamp, one shared denominator:
    response tokens (row 0: d1, c2; row 1: d1, d2, d3) and suffix (row 0: d2 x 0.9, d3 x 0.81)."""
    resp = [k3_ref(LQ_COMMIT[0, 0, i], LP_COMMIT[0, 0, i]) for i in (0, 1)]
    resp += [k3_ref(LQ_COMMIT[1, 0, i], LP_COMMIT[1, 0, i]) for i in (0, 1, 2)]
    suffix = [0.9 * k3_ref(L(0.6), L(0.05)), 0.81 * 10.0]
    want = (sum(resp) + sum(suffix)) / (5 + 0.9 + 0.81)
    out = _loss(preset("reference_yaml"))
    np.testing.assert_allclose(float(out.loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(out.response_loss), sum(resp) / 6.71, rtol=1e-5)
    np.testing.assert_allclose(float(out.suffix_loss), sum(suffix) / 6.71, rtol=1e-5)
    assert float(out.accepted_loss) == float(out.rejected_loss) == float(out.post_loss) == 0.0
    # without verl's clamps the d3 token's k3 is e^29.9 - 30.9
    raw = _loss(preset("reference_yaml", k3_clamps=False))
    assert float(raw.suffix_loss) > 1e11


def test_reference_script_preset_on_the_example():
    """Response: Bernoulli forward KL alone (log-probs floored at -10); suffix: k3 alone
    (rejected_draft_use_reverse_kl), decay 0.8; every per-token loss clipped to +-10."""
    resp = [bfkl_ref(LQ_COMMIT[0, 0, i], LP_COMMIT[0, 0, i], -10.0) for i in (0, 1)]
    resp += [bfkl_ref(LQ_COMMIT[1, 0, i], LP_COMMIT[1, 0, i], -10.0) for i in (0, 1, 2)]
    assert resp[-1] > 10  # the clamp engages on row 1's d3
    resp = np.minimum(resp, 10.0)
    suffix = [0.8 * k3_ref(L(0.6), L(0.05)), 0.64 * 10.0]
    want = (sum(resp) + sum(suffix)) / (5 + 0.8 + 0.64)
    out = _loss(preset("reference_script"))
    np.testing.assert_allclose(float(out.loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(out.response_loss), sum(resp) / 6.44, rtol=1e-5)
    unclamped = _loss(preset("reference_script", loss_max_clamp=0.0))
    assert float(unclamped.response_loss) > float(out.response_loss) + 5 / 6.44


def test_combined_per_token_loss_and_round_normalisation():
    """w_rev * k3 + w_fwd * BFKL per token, each stream's weighted sum / active rounds."""
    cfg = OPDLossConfig(response_weight=2.0, suffix_weight=0.5, decay=0.5, reverse_kl_weight=0.3,
                        forward_kl_weight=0.7, k3_clamps=True, normalization="rounds")
    tok = lambda lq, lp: 0.3 * k3_ref(lq, lp) + 0.7 * bfkl_ref(lq, lp, -80.0)
    resp = sum(tok(LQ_COMMIT[b, 0, i], LP_COMMIT[b, 0, i]) for b, i in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2)))
    suffix = 0.5 * tok(L(0.6), L(0.05)) + 0.25 * tok(-30.0, -0.1)
    out = _loss(cfg)
    np.testing.assert_allclose(float(out.response_loss), 2.0 * resp / 2, rtol=1e-5)  # 2 active rounds
    np.testing.assert_allclose(float(out.suffix_loss), 0.5 * suffix / 2, rtol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(out.response_loss) + float(out.suffix_loss), rtol=1e-6)


def test_shared_denominator_is_the_per_token_mean():
    """Weights 1 and decay 1: the loss is the plain mean of the 7 supervised tokens' losses; a
    committed token outside the support (EAGLE-3's correction) leaves numerator and count."""
    cfg = OPDLossConfig(accepted_weight=0.0, rejected_weight=0.0, response_weight=1.0, suffix_weight=1.0, decay=1.0,
                        normalization="tokens")
    k3 = lambda lq, lp: math.expm1(lp - lq) - (lp - lq)  # no clamps here
    resp = [k3(LQ_COMMIT[b, 0, i], LP_COMMIT[b, 0, i]) for b, i in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2))]
    toks = _tokens()
    toks = toks._replace(logq_draft=toks.logq_draft.at[0, 0, 2].set(-3.0))  # a moderate d3 (no overflow)
    suffix = [k3(L(0.6), L(0.05)), k3(-3.0, -0.1)]
    out = _loss(cfg, toks)
    np.testing.assert_allclose(float(out.loss), (sum(resp) + sum(suffix)) / 7, rtol=1e-5)
    valid = np.ones((2, 1, K), bool)
    valid[0, 0, 1] = False  # row 0's correction token c2
    out = _loss(cfg, toks._replace(commit_valid=jnp.asarray(valid)))
    np.testing.assert_allclose(float(out.loss), (sum(resp) - resp[1] + sum(suffix)) / 6, rtol=1e-5)
    # our own streams share the denominator too: the accepted stream's 4 tokens (D = 0 here)
    out = _loss(dataclasses.replace(cfg, accepted_weight=1.0), toks)
    np.testing.assert_allclose(float(out.loss), (sum(resp) + sum(suffix)) / 11, rtol=1e-5)


def test_clamped_tokens_have_finite_zero_gradients():
    """log q = -200 at a suffix token: verl's log-ratio clamp keeps exp finite, so the clamped
    token's gradient is exactly 0 (without the clamps: an overflow)."""
    cfg = preset("reference_yaml")

    def f(lq_draft, c):
        t = _tokens()._replace(logq_draft=lq_draft)
        return _loss(c, t).loss

    lq = jnp.asarray(LQ_DRAFT, jnp.float32).at[0, 0, 2].set(-200.0)
    g = jax.grad(f)(lq, cfg)
    assert np.isfinite(np.asarray(g)).all() and float(g[0, 0, 2]) == 0.0
    assert float(g[0, 0, 1]) != 0.0  # row 0's d2 is trained
    assert not np.isfinite(float(f(lq, dataclasses.replace(cfg, k3_clamps=False))))


def test_expected_acceptance_objective_against_a_numpy_loop():
    """a_i = 1 - TV(q_i, p_i) (exact, the teacher's mass outside the support counted),
    E = sum_i prod_{j<=i} a_j; the term is w_tv * sum over active rounds of (K - E) / rounds."""
    rs = np.random.RandomState(0)
    W, V = 5, 7
    q = rs.dirichlet(np.ones(W), size=(2, 2, K))
    p_full = rs.dirichlet(np.ones(V), size=(2, 2, K))
    active = np.array([[True, True], [True, False]])
    n = np.array([[0, 2], [3, 1]])
    E = np.zeros((2, 2))
    for b in range(2):
        for r in range(2):
            prod = 1.0
            for i in range(K):
                tv = 0.5 * (np.abs(p_full[b, r, i, :W] - q[b, r, i]).sum() + p_full[b, r, i, W:].sum())
                prod *= 1.0 - tv
                E[b, r] += prod
    want = 1.5 * ((K - E) * active).sum() / active.sum()
    logq = jnp.log(jnp.asarray(q, jnp.float32))
    logp = jnp.log(jnp.asarray(p_full[..., :W], jnp.float32))
    for name in ("tvd", "reverse_kl"):  # D reused as the TV, or the TV computed on the side
        cfg = OPDLossConfig(divergence=name, accepted_weight=0.0, rejected_weight=0.0, expected_acceptance_weight=1.5)
        out = opd_loss(logq, jnp.asarray(n), jnp.asarray(active), cfg, teacher_logp_BRKW=logp)
        np.testing.assert_allclose(float(out.acceptance_loss), want, rtol=1e-5)
        np.testing.assert_allclose(float(out.loss), want, rtol=1e-5)
        np.testing.assert_allclose(float(out.expected_accepted), (E * active).sum() / 3, rtol=1e-5)
    g = jax.grad(lambda lq: opd_loss(jax.nn.log_softmax(lq), jnp.asarray(n), jnp.asarray(active), cfg,
                                     teacher_logp_BRKW=logp).loss)(logq)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.max(jnp.abs(g))) > 1e-4
    assert OPDLossConfig(expected_acceptance_weight=1.0).needs_teacher_support
    assert not OPDLossConfig(response_weight=1.0).needs_teacher_support


def test_opd_loss_reads_the_committed_tokens_from_the_log_probs():
    """`opd_loss` (full log q) gathers the committed and drafted tokens and equals the
    hand-built `TokenLogProbs` path; the teacher's committed log p is the draft's for i <= n,
    the correction token's at n + 1."""
    rs = np.random.RandomState(1)
    W = 6
    logq = jax.nn.log_softmax(jnp.asarray(rs.randn(2, 1, K, W), jnp.float32))
    drafted = jnp.asarray([[[1, 2, 3]], [[4, 5, 0]]], jnp.int32)
    committed = jnp.asarray([[[1, 5, 0]], [[4, 5, 0]]], jnp.int32)  # row 0: d1, then the correction 5
    tok = jnp.asarray(LP_DRAFT, jnp.float32)
    t_commit = committed_teacher_logp(tok, jnp.asarray([[L(0.8)], [L(0.3)]], jnp.float32), jnp.asarray(N_ACC))
    np.testing.assert_allclose(t_commit, [[[L(0.25), L(0.8), 0.0]], [[L(0.9), L(0.2), L(0.01)]]], rtol=1e-6)
    cfg = preset("reference_script")
    out = opd_loss(logq, jnp.asarray(N_ACC), jnp.asarray(ACTIVE), cfg, drafted_BRK=drafted, teacher_logp_tok_BRK=tok,
                   committed_BRK=committed, teacher_commit_BRK=t_commit)
    at = lambda ids: jnp.take_along_axis(logq, ids[..., None], -1)[..., 0]
    want = _loss(cfg, TokenLogProbs(at(drafted), at(committed), tok, t_commit, jnp.ones((2, 1, K), bool)))
    np.testing.assert_allclose(float(out.loss), float(want.loss), rtol=1e-6)
    with pytest.raises(ValueError, match="committed_BRK"):
        opd_loss(logq, jnp.asarray(N_ACC), jnp.asarray(ACTIVE), cfg, drafted_BRK=drafted, teacher_logp_tok_BRK=tok)


def test_presets_are_the_reference_values():
    """The values read in the reference (bingyang-lei/Draft-OPD):
    reference_yaml: verl/verl/trainer/config/distillation/distillation.yaml @ a73781096436
      (loss_mode k3, reverse_kl_weight 1.0, forward_kl_weight 0.0, response_stream_weight 1.0,
      rejected_draft_stream_weight 1.0, rejected_draft_use_reverse_kl false,
      rejected_draft_position_decay 0.9, loss_max_clamp null, log_prob_min_clamp null);
    reference_script: verl/examples/on_policy_distillation_trainer/run_qwen_gsm8k_forward-ins.sh
      @ 69b03dab8697 (REVERSE_KL_WEIGHT 0.0, FORWARD_KL_WEIGHT 1.0, REJECTED_DRAFT_USE_REVERSE_KL
      True, stream_weight 1.0, rejected_draft_stream_weight 1.0, REJECTED_DRAFT_POSITION_DECAY 0.8)
      on run_qwen_gsm8k.sh @ 190017f68450 (DISTILLATION_LOSS_MAX_CLAMP 10.0,
      DISTILLATION_LOG_PROB_MIN_CLAMP -10.0). Both: verl's k3 clamps, the shared denominator,
      none of our own streams."""
    common = dict(divergence="k3", accepted_weight=0.0, rejected_weight=0.0, post_rejection_weight=0.0,
                  first_rejected_only=False, error_anchor_weight=0.0, response_weight=1.0, suffix_weight=1.0,
                  k3_clamps=True, normalization="tokens", expected_acceptance_weight=0.0)
    want = {
        "reference_yaml": dict(common, decay=0.9, reverse_kl_weight=1.0, forward_kl_weight=0.0,
                               suffix_reverse_kl=False, loss_max_clamp=0.0, log_prob_min_clamp=-80.0),
        "reference_script": dict(common, decay=0.8, reverse_kl_weight=0.0, forward_kl_weight=1.0,
                                 suffix_reverse_kl=True, loss_max_clamp=10.0, log_prob_min_clamp=-10.0),
    }
    assert set(PRESETS) == set(want)
    for name, fields in want.items():
        assert dataclasses.asdict(preset(name)) == fields, name
    assert preset("reference_script", decay=0.5).decay == 0.5
    with pytest.raises(ValueError, match="unknown Draft-OPD loss preset"):
        preset("paper")
    # from the config: c.opd.loss_preset, with c.opd.loss fields changed from their defaults on top
    c = configs.default_config()
    c.opd.loss_preset = "reference_script"
    c.opd.loss.decay = 0.7
    assert configs.opd_config(c.opd).loss == preset("reference_script", decay=0.7)
    c.opd.loss_preset = ""
    assert configs.opd_config(c.opd).loss == OPDLossConfig(decay=0.7)


def test_defaults_are_unchanged_and_bad_options_are_named():
    cfg = OPDLossConfig()
    assert (cfg.response_weight, cfg.suffix_weight, cfg.expected_acceptance_weight, cfg.loss_max_clamp) == (0, 0, 0, 0)
    assert cfg.normalization == "rounds" and not cfg.k3_clamps and not cfg.token_streams
    for field, bad, msg in [("normalization", "mean", "normalization must be one of"),
                            ("loss_max_clamp", -1.0, "loss_max_clamp must be"),
                            ("response_weight", float("inf"), "response_weight must be"),
                            ("forward_kl_weight", -0.5, "forward_kl_weight must be"),
                            ("log_prob_min_clamp", 0.0, "log_prob_min_clamp must be"),
                            ("k3_clamps", 1, "k3_clamps must be True or False"),
                            ("expected_acceptance_weight", -1.0, "expected_acceptance_weight must be")]:
        with pytest.raises(ValueError, match=msg):
            OPDLossConfig(**{field: bad})
    with pytest.raises(ValueError, match="reverse_kl_weight and forward_kl_weight are both 0"):
        OPDLossConfig(response_weight=1.0, reverse_kl_weight=0.0)
    OPDLossConfig(suffix_weight=1.0, reverse_kl_weight=0.0, suffix_reverse_kl=True)  # k3 alone: fine
    with pytest.raises(ValueError, match="TokenLogProbs"):
        loss_from_divergences(jnp.zeros((2, 1, K)), jnp.asarray(N_ACC), jnp.asarray(ACTIVE),
                              OPDLossConfig(response_weight=1.0))
    with pytest.raises(ValueError, match="exact TV"):
        loss_from_divergences(jnp.zeros((2, 1, K)), jnp.asarray(N_ACC), jnp.asarray(ACTIVE),
                              OPDLossConfig(expected_acceptance_weight=1.0))


# ----------------------------------------------------------------------------- rollout and replay

@pytest.mark.slow  # two compiles of the replay's value and gradient
@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_replay_loss_chunked_equals_the_full_logits_path_for_the_new_terms(kind):
    """DFlash (V = 40) / EAGLE-3 (W = 20 draft tokens: some correction tokens fall outside its
    support), chunks of 7, with the response and suffix streams (k3 + forward KL, the clamps),
    the shared denominator and the expected-acceptance objective: loss, every part and the
    gradient equal the full-logits path; the committed tokens are read from the text."""
    target = make_target("llama", seed=5, vocab_size=TV)
    if kind == "eagle3":
        drafter = opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=20)
    else:
        drafter = opd.init_drafter("dflash", target, seed=2, block_size=RK + 1)
    rec = make_record(drafter, exact=True, error=False, commit=True)
    if kind == "eagle3":  # the committed tokens are drawn from all TV ids: some outside the draft vocabulary
        _, ok = ro.support_index(drafter.params, drafter.spec, ro.committed_tokens(rec))
        assert not bool(np.all(np.asarray(ok))) and bool(np.any(np.asarray(ok)))
    # committed token at offset i: seq[anchor + i - 1]
    c = np.asarray(ro.committed_tokens(rec))
    seq, anchor = np.asarray(rec.seq_BS), np.asarray(rec.anchor_BR)
    assert c[1, 1, 2] == seq[1, anchor[1, 1] + 2] and c[0, 0, 0] == seq[0, anchor[0, 0]]
    loss_cfg = OPDLossConfig(divergence="k3", response_weight=1.0, suffix_weight=2.0, reverse_kl_weight=1.0,
                             forward_kl_weight=0.5, k3_clamps=True, loss_max_clamp=10.0, normalization="tokens",
                             expected_acceptance_weight=0.5)
    (loss0, out0), grads0 = replay_loss_and_grad(target, drafter, rec, loss_cfg, 0)
    (loss1, out1), grads1 = replay_loss_and_grad(target, drafter, rec, loss_cfg, 7)
    assert float(out0.response_loss) > 1e-3 and float(out0.suffix_loss) > 1e-3 and float(out0.acceptance_loss) > 1e-3
    for got, want in zip(out1, out0):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(np.abs(np.asarray(want)).max())))


@pytest.mark.slow
def test_rollout_records_the_correction_tokens_log_p():
    """teacher_commit_BR[b, r] = log p (T = 1) of seq[anchor + n] given seq[:anchor + n] (a
    fresh target forward), for greedy and sampled rollouts."""
    from opd.decoding import batching
    from opd.decoding.sampling import SamplingParams
    V = 8
    target = make_target("llama", seed=5, vocab_size=V)
    drafter = opd.init_drafter("dflash", target, seed=2, block_size=K + 1)
    prompts = [[1, 2, 3, 4, 5], [6, 2]]
    chunk = next(batching.chunks(prompts, 0, None))
    R = 3
    cache_len = batching.round_up(chunk.tokens.shape[1] + (R + 2) * (K + 1) + 2, 32)
    for temperature in (0.0, 1.0):
        rec = jax.jit(functools.partial(ro.rollout, tconfig=target.config, dspec=drafter.spec,
                                        sp=SamplingParams(temperature, 0, 1.0), num_draft_tokens=K, num_rounds=R,
                                        cache_len=cache_len))(
            target.params, drafter.params, chunk.tokens, chunk.lengths, jax.random.PRNGKey(0),
            jnp.asarray([V + 5], jnp.int32))
        seq = np.asarray(rec.seq_BS)
        for b in range(len(prompts)):
            for r in range(R):
                end = int(rec.anchor_BR[b, r]) + int(rec.num_accepted_BR[b, r])
                logits = np.asarray(target.logits(jnp.asarray(seq[b, :end][None], jnp.int32)))[0, -1]
                want = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))[seq[b, end]]
                np.testing.assert_allclose(float(rec.teacher_commit_BR[b, r]), want, atol=1e-4)
