"""Draft-OPD's acceptance-aware loss: stream weights on hand-built rounds, every divergence
against a NumPy definition, the k3 estimator's expectation, 1 - TVD = acceptance probability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd.training.opd_loss import DIVERGENCES, OPDLossConfig, divergence, opd_loss, stream_weights

K = 4


def _rounds():
    # Rows x rounds: accepted counts; row 1's last round did not run (the row had finished).
    n = jnp.array([[0, 2], [4, 1]], jnp.int32)
    active = jnp.array([[True, True], [True, False]])
    return n, active


def test_default_stream_weights_on_hand_built_rounds():
    n, active = _rounds()
    acc, rej, post = stream_weights(n, active, K, OPDLossConfig())
    np.testing.assert_array_equal(acc, [[[0, 0, 0, 0], [1, 1, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]])
    # first rejected offset n + 1, weighted decay^(i-1); none when all K were accepted
    np.testing.assert_allclose(rej, [[[1, 0, 0, 0], [0, 0, 0.81, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], rtol=1e-6)
    np.testing.assert_array_equal(post, np.zeros((2, 2, K)))  # off by default


def test_stream_options():
    n, active = _rounds()
    cfg = OPDLossConfig(accepted_weight=0.5, rejected_weight=2.0, decay=0.5, post_rejection_weight=3.0)
    acc, rej, post = stream_weights(n, active, K, cfg)
    np.testing.assert_allclose(acc[0, 1], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(rej[0, 1], [0, 0, 2.0 * 0.25, 0])
    np.testing.assert_allclose(post[0, 1], [0, 0, 0, 3.0 * 0.125])
    np.testing.assert_allclose(post[0, 0], [0, 3.0 * 0.5, 3.0 * 0.25, 3.0 * 0.125])
    assert float(jnp.sum(post[1])) == 0.0  # row 1: all accepted, then inactive
    acc, rej, post = stream_weights(n, active, K, OPDLossConfig(first_rejected_only=True))
    assert float(jnp.sum(acc)) == 0.0 and float(jnp.sum(post)) == 0.0
    np.testing.assert_allclose(rej[0, 1], [0, 0, 0.81, 0], rtol=1e-6)


def _dists(seed, W=6, V=10, outside=True):
    rs = np.random.RandomState(seed)
    q = rs.dirichlet(np.ones(W), size=(2, 2, K))
    p_full = rs.dirichlet(np.ones(V), size=(2, 2, K))
    if not outside:
        p_full[..., W:] = 0
        p_full /= p_full.sum(-1, keepdims=True)
    return q, p_full


@pytest.mark.parametrize("name", [d for d in DIVERGENCES if d != "k3"])
def test_exact_divergences_match_their_definitions(name):
    W = 6
    q, p_full = _dists(0, W)
    p = p_full[..., :W]  # the teacher's probabilities on the drafter's support (not renormalised)
    pn = p / p.sum(-1, keepdims=True)
    q_full = np.concatenate([q, np.zeros_like(p_full[..., W:])], axis=-1)
    want = {
        "reverse_kl": (q * (np.log(q) - np.log(p))).sum(-1),
        "tvd": 0.5 * np.abs(p_full - q_full).sum(-1),
        "forward_kl": (pn * (np.log(pn) - np.log(q))).sum(-1),
        "jsd": 0.5 * (pn * np.log(pn / (0.5 * (pn + q)))).sum(-1) + 0.5 * (q * np.log(q / (0.5 * (pn + q)))).sum(-1),
    }[name]
    got = divergence(jnp.log(jnp.asarray(q, jnp.float32)), OPDLossConfig(divergence=name),
                     teacher_logp_BRKW=jnp.log(jnp.asarray(p, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_one_minus_tvd_is_the_acceptance_probability():
    q, p_full = _dists(1)
    got = divergence(jnp.log(jnp.asarray(q, jnp.float32)), OPDLossConfig(divergence="tvd"),
                     teacher_logp_BRKW=jnp.log(jnp.asarray(p_full[..., :6], jnp.float32)))
    np.testing.assert_allclose(1 - np.asarray(got), np.minimum(q, p_full[..., :6]).sum(-1), rtol=1e-5)


def test_k3_is_an_unbiased_estimate_of_reverse_kl_under_q():
    """E_{x~q}[k3(x)] = KL(q || p) when p lives on the drafter's support (exact expectation)."""
    W = 6
    q, p_full = _dists(2, W, outside=False)
    p = p_full[..., :W]
    cfg = OPDLossConfig(divergence="k3")
    expect = np.zeros(q.shape[:-1])
    for x in range(W):
        drafted = jnp.full(q.shape[:-1], x, jnp.int32)
        k3 = divergence(jnp.log(jnp.asarray(q, jnp.float32)), cfg, drafted, jnp.log(jnp.asarray(p[..., x], jnp.float32)))
        expect += q[..., x] * np.asarray(k3)
    np.testing.assert_allclose(expect, (q * np.log(q / p)).sum(-1), rtol=1e-4)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_loss_is_zero_with_zero_gradient_when_the_drafter_equals_the_target(name):
    W = 6
    rs = np.random.RandomState(3)
    logits = jnp.asarray(rs.randn(2, 2, K, W), jnp.float32)
    logp = jax.nn.log_softmax(logits)  # p lives on the support
    drafted = jnp.asarray(rs.randint(0, W, (2, 2, K)), jnp.int32)
    tok = jnp.take_along_axis(logp, drafted[..., None], -1)[..., 0]
    n, active = _rounds()
    cfg = OPDLossConfig(divergence=name, post_rejection_weight=1.0)

    def f(lg):
        return opd_loss(jax.nn.log_softmax(lg), n, active, cfg, drafted_BRK=drafted, teacher_logp_tok_BRK=tok,
                        teacher_logp_BRKW=logp).loss

    loss, grad = jax.value_and_grad(f)(logits)
    assert abs(float(loss)) < 1e-5
    assert float(jnp.max(jnp.abs(grad))) < 1e-4
    # away from the target the loss is positive and its gradient finite and non-zero
    loss, grad = jax.value_and_grad(f)(logits + jnp.asarray(rs.randn(2, 2, K, W), jnp.float32))
    assert float(loss) > 1e-3 and np.isfinite(np.asarray(grad)).all() and float(jnp.max(jnp.abs(grad))) > 1e-4


def test_loss_sums_the_streams_per_active_round():
    W = 6
    q, p_full = _dists(4, W)
    n, active = _rounds()
    cfg = OPDLossConfig(divergence="reverse_kl", post_rejection_weight=0.5)
    logq, logp = jnp.log(jnp.asarray(q, jnp.float32)), jnp.log(jnp.asarray(p_full[..., :W], jnp.float32))
    out = opd_loss(logq, n, active, cfg, teacher_logp_BRKW=logp)
    D = np.asarray(divergence(logq, cfg, teacher_logp_BRKW=logp))
    acc, rej, post = (np.asarray(w) for w in stream_weights(n, active, K, cfg))
    rounds = 3  # active rounds
    np.testing.assert_allclose(out.accepted_loss, (acc * D).sum() / rounds, rtol=1e-5)
    np.testing.assert_allclose(out.rejected_loss, (rej * D).sum() / rounds, rtol=1e-5)
    np.testing.assert_allclose(out.post_loss, (post * D).sum() / rounds, rtol=1e-5)
    np.testing.assert_allclose(out.loss, ((acc + rej + post) * D).sum() / rounds, rtol=1e-5)
    mask = np.asarray(active)[..., None] * np.ones(K)
    np.testing.assert_allclose(out.divergence_by_offset, (mask * D).sum((0, 1)) / mask.sum((0, 1)), rtol=1e-5)


def test_bad_options_and_missing_teacher_data_are_clear_errors():
    with pytest.raises(ValueError, match="divergence must be one of"):
        OPDLossConfig(divergence="kl")
    with pytest.raises(ValueError, match="decay must be in"):
        OPDLossConfig(decay=0.0)
    with pytest.raises(ValueError, match="rejected_weight must be"):
        OPDLossConfig(rejected_weight=-1.0)
    logq = jnp.zeros((1, 1, K, 3))
    with pytest.raises(ValueError, match="k3 divergence needs"):
        divergence(logq, OPDLossConfig())
    with pytest.raises(ValueError, match="needs the teacher's log-probs"):
        divergence(logq, OPDLossConfig(divergence="tvd"))


@pytest.mark.parametrize("name", ["k3", "forward_kl", "tvd"])
def test_error_anchor_term_on_hand_built_rounds(name):
    """The error anchors add w_err * D*(q_err || p_err) for active rounds with 1 <= n < K only
    (D* = reverse KL for k3, else the divergence itself), per active round; off by default."""
    W = 6
    q, p_full = _dists(5, W)
    n, active = _rounds()  # n = [[0, 2], [4, 1]]; row 1's second round inactive
    logq, logp = jnp.log(jnp.asarray(q, jnp.float32)), jnp.log(jnp.asarray(p_full[..., :W], jnp.float32))
    drafted = jnp.zeros((2, 2, K), jnp.int32)
    tok = logp[..., 0]
    err_q, err_p = logq[:, :, 0], logp[:, :, 1]  # any [B, R, W] distributions
    mask = (n >= 1) & (n < K)
    base = OPDLossConfig(divergence=name)
    kw = dict(drafted_BRK=drafted, teacher_logp_tok_BRK=tok, teacher_logp_BRKW=logp)
    off = opd_loss(logq, n, active, base, **kw)
    assert float(off.error_loss) == 0.0
    cfg = OPDLossConfig(divergence=name, error_anchor_weight=2.0)
    on = opd_loss(logq, n, active, cfg, error_logq_BRW=err_q, teacher_error_BRW=err_p, error_mask_BR=mask, **kw)
    exact = OPDLossConfig(divergence="reverse_kl" if name == "k3" else name)
    D = np.asarray(divergence(err_q[:, :, None], exact, teacher_logp_BRKW=err_p[:, :, None]))[..., 0]
    # only round (0, 1) counts: (0, 0) has n = 0, (1, 0) n = K, (1, 1) is inactive
    np.testing.assert_allclose(float(on.error_loss), 2.0 * D[0, 1] / 3, rtol=1e-5)
    np.testing.assert_allclose(float(on.loss), float(off.loss) + float(on.error_loss), rtol=1e-5)
    with pytest.raises(ValueError, match="error_anchor_weight > 0 needs"):
        opd_loss(logq, n, active, cfg, **kw)
    with pytest.raises(ValueError, match="error_anchor_weight must be"):
        OPDLossConfig(error_anchor_weight=-1.0)
