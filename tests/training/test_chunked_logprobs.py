"""Vocabulary-chunked log-probs (`opd.training.chunked_logprobs`): the logsumexp, the sums over
the support and every divergence equal the full-logits computation in value and in gradient
(w.r.t. the hidden states and the head's weight, both weight layouts, V not a multiple of the
chunk); the Draft-OPD replay loss of both drafter kinds equals its full-logits path; and the
compiled loss needs a fraction of the full path's temporary memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_target
from opd.drafters.dflash import training as dflash_training
from opd.training import chunked_logprobs as cl
from opd.training import rollout as ro
from opd.training.opd_loss import DIVERGENCES, EXACT_TERMS, OPDLossConfig, divergence, head_divergence
from opd.training.opd_step import OPDConfig, replay_loss

N, D, V = 6, 5, 11  # V = 11: chunks of 4 end with a partial one (it overlaps the previous chunk)
B, R, K = 2, 1, 3  # N = B * R * K rows for the divergences


def _close(got, want):
    """Equal to float32 rounding: sums over V in another order (relative to the array's scale)."""
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def _inputs(axis, seed=0, v=V):
    rs = np.random.RandomState(seed)
    h = jnp.asarray(rs.randn(N, D), jnp.float32)
    w = jnp.asarray(rs.randn(*((v, D) if axis == 0 else (D, v))), jnp.float32)
    # a teacher with mass outside the support (tvd's constant)
    teacher = jax.nn.log_softmax(jnp.asarray(3.0 * rs.randn(N, v + 2), jnp.float32))[:, :v]
    return h, w, teacher


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("v,chunk", [
    (11, 4),  # one group (11 is odd): chunks 0-3, 4-7, 7-10 (the last overlaps)
    (24, 16),  # 8 groups of 3 columns, 2 per step: columns 0-1, then 1-2 of each group
    (40, 7)])  # 8 groups of 5 columns, 1 per step (a chunk below the group count)
def test_logsumexp_and_support_sums_equal_the_full_computation(axis, v, chunk):
    h, w, teacher = _inputs(axis, v=v)
    head = lambda w: cl.LinearHead(w, axis, "float32")
    # a non-linear read-out, so that every row's cotangent differs
    lse = lambda h, w, c: jnp.sum(jnp.sin(cl.logsumexp(head(w), h, c)))
    want = jax.nn.logsumexp(head(w).logits(h), axis=-1)
    _close(cl.logsumexp(head(w), h, chunk), want)
    _close(cl.logsumexp(head(w), h, 0), want)
    for got, ref in zip(jax.grad(lse, (0, 1))(h, w, chunk), jax.grad(lse, (0, 1))(h, w, 0)):
        _close(got, ref)
    for name, (terms, _) in EXACT_TERMS.items():
        f = lambda h, w, c: jnp.sum(jnp.sin(cl.sum_over_support(head(w), h, teacher, terms, c)))
        _close(f(h, w, chunk), f(h, w, 0))
        for got, ref in zip(jax.grad(f, (0, 1))(h, w, chunk), jax.grad(f, (0, 1))(h, w, 0)):
            _close(got, ref)


def test_gathered_logits_are_the_full_logits_columns():
    for axis in (0, 1):
        h, w, _ = _inputs(axis, seed=1)
        head = cl.LinearHead(w, axis, "float32")
        ids = jnp.asarray([0, 10, 3, 3, 7, 1], jnp.int32)
        _close(cl.gathered_logits(head, h, ids), jnp.take_along_axis(head.logits(h), ids[:, None], -1)[:, 0])


@pytest.mark.parametrize("name", DIVERGENCES)
def test_head_divergence_equals_the_divergence_of_the_full_log_softmax(name):
    """Value and gradient w.r.t. the hidden states and the head's weight, chunk 4 of V = 11."""
    h, w, teacher = _inputs(1, seed=2)
    h_BRKD = h.reshape(B, R, K, D)
    drafted = jnp.asarray(np.random.RandomState(3).randint(0, V, (B, R, K)), jnp.int32)
    tok = jnp.take_along_axis(teacher, drafted.reshape(N, 1), -1).reshape(B, R, K)
    kw = dict(drafted_BRK=drafted, teacher_logp_tok_BRK=tok, teacher_logp_BRKW=teacher.reshape(B, R, K, V))
    cfg = OPDLossConfig(divergence=name)
    weights = jnp.linspace(0.5, 1.5, N).reshape(B, R, K)

    def full(h, w):
        logq = jax.nn.log_softmax(cl.LinearHead(w, 1, "float32").logits(h), -1)
        return jnp.sum(weights * divergence(logq, cfg, **kw))

    def chunked(h, w):
        return jnp.sum(weights * head_divergence(cl.LinearHead(w, 1, "float32"), h, cfg, 4, **kw))

    _close(chunked(h_BRKD, w), full(h_BRKD, w))
    assert float(full(h_BRKD, w)) > 1e-3  # away from the teacher: a non-trivial value and gradient
    for got, ref in zip(jax.grad(chunked, (0, 1))(h_BRKD, w), jax.grad(full, (0, 1))(h_BRKD, w)):
        assert float(jnp.max(jnp.abs(ref))) > 1e-4
        _close(got, ref)


def test_chunk_size_is_validated():
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="vocab_chunk must be an integer >= 0"):
            OPDConfig(vocab_chunk=bad)
    assert OPDConfig().vocab_chunk > 0  # chunked by default
    OPDConfig(vocab_chunk=0)  # the full-logits path


# ----------------------------------------------------------------------------- the Draft-OPD replay loss

RK, RR, TV, TS = 3, 2, 40, 24  # K, R, the target vocabulary and the text length of the replay test


@pytest.fixture(scope="module")
def targets():
    return {"untied": make_target("llama", seed=5, vocab_size=TV),
            "tied": make_target("llama_mha_tied", seed=6, vocab_size=TV)}


def make_record(drafter, exact: bool, seed: int = 0, error: bool = True, commit: bool = False) -> ro.RolloutRecord:
    """A rollout record of 3 rows x RR rounds of RK drafts (one round inactive) with random text,
    drafts from the drafter's support and teacher log-probs (on the support if `exact`, at the
    error positions if `error`, of the committed tokens if `commit`): the replay reads nothing
    else (a real rollout would only cost compile time here)."""
    rs = np.random.RandomState(seed)
    Bt = 3
    sup = np.asarray(drafter.spec.support_ids(drafter.params))
    n_acc = np.array([[1, 3], [0, 2], [2, 1]])  # 0..K accepted; 1 <= n < K: error anchors
    anchor = 4 + np.concatenate([np.zeros((Bt, 1), int), np.cumsum(n_acc[:, :-1] + 1, axis=1)], axis=1)
    logp = lambda *shape: jax.nn.log_softmax(jnp.asarray(2.0 * rs.randn(*shape), jnp.float32))
    W = len(sup)
    return ro.RolloutRecord(
        seq_BS=jnp.asarray(rs.randint(0, TV, (Bt, TS)), jnp.int32), seq_len_B=jnp.full((Bt,), TS, jnp.int32),
        anchor_BR=jnp.asarray(anchor, jnp.int32),
        drafts_BRK=jnp.asarray(sup[rs.randint(0, W, (Bt, RR, RK))], jnp.int32),
        num_accepted_BR=jnp.asarray(n_acc, jnp.int32),
        active_BR=jnp.asarray([[True, True], [True, True], [True, False]]),
        logq_tok_BRK=jnp.zeros((Bt, RR, RK), jnp.float32), teacher_tok_BRK=logp(Bt, RR, RK, 3)[..., 0],
        teacher_support_BRKW=logp(Bt, RR, RK, W) if exact else None,
        teacher_error_BRW=logp(Bt, RR, W) if error else None,
        teacher_commit_BR=logp(Bt, RR, 3)[..., 0] if commit else None)


def replay_loss_and_grad(target, drafter, rec, loss_cfg: OPDLossConfig, vocab_chunk: int):
    """((loss, `OPDLossOut`), gradients) of `replay_loss` for the record `rec` (R = RR, K = RK)."""
    trainable, frozen = drafter.split()
    aux = ro.target_features(target.params, target.config, drafter.spec, rec.seq_BS)
    cfg = OPDConfig(num_rounds=RR, num_draft_tokens=RK, loss=loss_cfg, vocab_chunk=vocab_chunk)
    f = functools.partial(replay_loss, drafter_frozen=frozen, tparams=target.params, rec=rec, aux=aux,
                          active_BR=rec.active_BR, spec=drafter.spec, target_config=target.config, cfg=cfg)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(trainable)


@pytest.mark.parametrize("kind,tied,name,err", [
    pytest.param("dflash", "untied", "k3", 0.0, marks=pytest.mark.slow), ("dflash", "tied", "forward_kl", 1.0),
    pytest.param("eagle3", "untied", "k3", 1.0, marks=pytest.mark.slow), ("eagle3", "untied", "jsd", 0.0)])
def test_replay_loss_chunked_equals_the_full_logits_path(targets, kind, tied, name, err):
    """`replay_loss` with vocab_chunk 7 (DFlash: V = 40; EAGLE-3: W = 20 draft tokens) against
    vocab_chunk 0 (the replay logits and their log-softmax): the loss, its streams and the
    gradient of every trainable parameter (EAGLE-3's include its head's weight)."""
    target = targets[tied]
    if kind == "eagle3":
        drafter = opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=20)
    else:
        drafter = opd.init_drafter("dflash", target, seed=2, block_size=RK + 1)
    loss_cfg = OPDLossConfig(divergence=name, error_anchor_weight=err, post_rejection_weight=0.5)
    rec = make_record(drafter, exact=name != "k3")
    trainable, _ = drafter.split()
    aux = ro.target_features(target.params, target.config, drafter.spec, rec.seq_BS)
    (loss0, out0), grads0 = replay_loss_and_grad(target, drafter, rec, loss_cfg, 0)
    (loss1, out1), grads1 = replay_loss_and_grad(target, drafter, rec, loss_cfg, 7)
    assert float(loss0) > 1e-3
    if err:
        assert float(out0.error_loss) > 1e-3
    for got, want in zip(out1, out0):
        _close(got, want)
    for got, want in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
        _close(got, want)
    if kind == "eagle3":
        assert float(jnp.max(jnp.abs(grads0["lm_head"]))) > 0  # the head's weight is trained through the chunks
    else:  # the LinearHead of the target's (tied or untied) LM head gives the replay's own logits
        anchors = jnp.maximum(rec.anchor_BR - 1, 0)
        h = dflash_training.block_outputs(trainable, drafter.params["target"], drafter.spec.config, target.config, aux,
                                          rec.seq_BS, anchors)
        want = dflash_training.block_logits(trainable, drafter.params["target"], drafter.spec.config, target.config,
                                            aux, rec.seq_BS, anchors)
        _close(dflash_training.lm_head(drafter.params["target"], target.config).logits(h), want)


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("name", ["k3", "reverse_kl"])
def test_chunked_loss_compiles_to_a_fraction_of_the_full_paths_temp_memory(name):
    """Compile only (abstract inputs): N = 256 rows, D = 256, V = 32768, chunks of 1024. The
    full path stores [N, V] float32 logits / log-probs / gradients (32 MiB each); the chunked
    one [N, 1024] at a time. With the head frozen (DFlash: the target's LM head; gradient
    w.r.t. the hidden states only) no [V, D] weight gradient (32 MiB in float32) is built."""
    n, d, v = 256, 256, 32768
    cfg = OPDLossConfig(divergence=name)

    def loss(h, w, ids, tok, sup, chunk):
        head = cl.LinearHead(w, 1, "float32")
        h4, r = h.reshape(4, 4, 16, d), lambda x: x.reshape((4, 4, 16) + x.shape[1:])
        sup = None if name == "k3" else r(sup)
        if chunk:
            D_ = head_divergence(head, h4, cfg, chunk, r(ids), r(tok), sup)
        else:
            D_ = divergence(jax.nn.log_softmax(head.logits(h4), -1), cfg, r(ids), r(tok), sup)
        return jnp.sum(D_)

    S = jax.ShapeDtypeStruct
    args = (S((n, d), jnp.float32), S((d, v), jnp.float32), S((n,), jnp.int32), S((n,), jnp.float32),
            S((n, v), jnp.float32))

    def temp(chunk, argnums):
        f = jax.jit(jax.value_and_grad(functools.partial(loss, chunk=chunk), argnums))
        return f.lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = n * v * 4
    for argnums in (0, (0, 1)):
        full, chunked = temp(0, argnums), temp(1024, argnums)
        assert full >= logits_bytes, (argnums, full)
        assert chunked < full / 4 and chunked < logits_bytes / 4, (argnums, chunked, full)
    assert temp(1024, 0) < d * v * 4 / 4  # the frozen head's weight gradient is never built
