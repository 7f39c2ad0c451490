"""Draft-OPD rollout and replay on tiny models: the replay reproduces the drafter's inference
q at every offset of every round (EAGLE-3 and DFlash), recorded accepted counts and teacher
log-probs match an independent recomputation, and EOS mid-rollout masks the finished row."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_target
from opd.decoding import batching
from opd.decoding.sampling import SamplingParams
from opd.training import rollout as ro

V, K, R = 8, 3, 4  # a tiny vocabulary so that random drafters get drafts accepted
PROMPTS = [[1, 2, 3, 4, 5], [6, 2], [3, 3, 3, 1, 0, 7, 2]]


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=5, vocab_size=V)


def _drafter(target, kind):
    if kind == "eagle3":
        return opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=6)
    return opd.init_drafter("dflash", target, seed=2, block_size=K + 1)


def _rollout(target, drafter, temperature, eos=(V + 5,), key=0, prompts=PROMPTS):
    chunk = next(batching.chunks(prompts, 0, None))
    cache_len = batching.round_up(chunk.tokens.shape[1] + (R + 2) * (K + 1) + 2, 32)
    fn = jax.jit(functools.partial(ro.rollout, tconfig=target.config, dspec=drafter.spec,
                                   sp=SamplingParams(temperature, 0, 1.0), num_draft_tokens=K, num_rounds=R,
                                   cache_len=cache_len, teacher_support="draft", error_support=True))
    return fn(target.params, drafter.params, chunk.tokens, chunk.lengths, jax.random.PRNGKey(key),
              jnp.asarray(eos, jnp.int32)), chunk


@pytest.mark.parametrize("kind", [pytest.param("eagle3", marks=pytest.mark.slow), "dflash"])
def test_replay_reproduces_the_drafters_q_at_every_offset(target, kind):
    drafter = _drafter(target, kind)
    rec, _ = _rollout(target, drafter, temperature=1.0)
    trainable, _ = drafter.split()
    aux = ro.target_features(target.params, target.config, drafter.spec, rec.seq_BS)
    logits = drafter.spec.replay_logits(trainable, drafter.params, target.config, rec, aux)
    idx = ro.drafted_support_index(drafter.params, drafter.spec, rec.drafts_BRK)
    replayed = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), idx[..., None], -1)[..., 0]
    active = np.asarray(rec.active_BR)
    assert active.all()  # no EOS here: every row runs every round
    np.testing.assert_allclose(np.asarray(replayed), np.asarray(rec.logq_tok_BRK), atol=2e-4)
    # ... and the drafts are in the support with a finite q
    assert np.isfinite(np.asarray(replayed)).all()


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_recorded_features_are_a_fresh_forwards_at_committed_positions(target, kind):
    """The rollout keeps the target features its own forwards computed (no third target pass):
    at every committed position they equal one fresh forward over the committed text, also
    for a row that stops at EOS mid-rollout, and the replay from them reproduces q."""
    drafter = _drafter(target, kind)
    free, _ = _rollout(target, drafter, temperature=1.0)
    eos = int(free.seq_BS[1, int(free.anchor_BR[1, 1])])  # row 1 ends in its second round
    rec, _ = _rollout(target, drafter, temperature=1.0, eos=(eos,))
    fresh = ro.target_features(target.params, target.config, drafter.spec, rec.seq_BS)
    seq_len = np.asarray(rec.seq_len_B)
    assert seq_len[1] < seq_len.max()  # the EOS row stopped early
    assert len(rec.features) == len(fresh) == len(drafter.spec.target_hidden_layers)
    for kept, want in zip(rec.features, fresh):
        assert kept.shape == want.shape
        for b, n in enumerate(seq_len):
            np.testing.assert_allclose(np.asarray(kept[b, :n]), np.asarray(want[b, :n]), rtol=1e-5, atol=1e-5)
    trainable, _ = drafter.split()
    logits = drafter.spec.replay_logits(trainable, drafter.params, target.config, rec, rec.features)
    idx = ro.drafted_support_index(drafter.params, drafter.spec, rec.drafts_BRK)
    replayed = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), idx[..., None], -1)[..., 0])
    active = np.asarray(rec.active_BR)
    np.testing.assert_allclose(replayed[active], np.asarray(rec.logq_tok_BRK)[active], atol=2e-4)


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_recorded_acceptance_and_teacher_logprobs_match_a_recomputation(target, kind):
    if kind == "eagle3":  # the logit lens at the target's last layer: a drafter that gets drafts accepted
        drafter = opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=V, target_layers=(0, 1, 1),
                                   warm_start=True)
    else:
        drafter = _drafter(target, kind)
    rec, chunk = _rollout(target, drafter, temperature=0.0)
    seq = np.asarray(rec.seq_BS)
    n_acc = np.asarray(rec.num_accepted_BR)
    if kind == "eagle3":
        assert n_acc.max() >= 1  # the check below covers accepted drafts, not only rejections
    for b in range(len(PROMPTS)):
        for r in range(R):
            n = int(rec.anchor_BR[b, r])
            d = np.asarray(rec.drafts_BRK[b, r])
            toks = np.concatenate([seq[b, :n], d])[None]
            logits = np.asarray(target.logits(jnp.asarray(toks, jnp.int32)))[0]  # a fresh full forward
            logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[n - 1 : n - 1 + K]), -1))
            greedy = logits[n - 1 : n - 1 + K].argmax(-1)
            want = int(np.argmin(np.append(greedy == d, False)))  # leading matches
            assert n_acc[b, r] == want, (b, r)
            np.testing.assert_allclose(np.asarray(rec.teacher_tok_BRK[b, r]), logp[np.arange(K), d], atol=1e-4)
            if rec.teacher_support_BRKW is not None:
                ids = np.asarray(drafter.spec.support_ids(drafter.params))
                np.testing.assert_allclose(np.asarray(rec.teacher_support_BRKW[b, r]), logp[:, ids], atol=1e-4)
                # the error offset n + 1 (clamped to K when all were accepted)
                np.testing.assert_allclose(np.asarray(rec.teacher_error_BRW[b, r]), logp[min(want, K - 1), ids],
                                           atol=1e-4)
            # the committed text continues with the accepted drafts
            np.testing.assert_array_equal(seq[b, n : n + want], d[:want])
        np.testing.assert_array_equal(np.diff(np.asarray(rec.anchor_BR[b])), n_acc[b, :-1] + 1)


@pytest.mark.parametrize("kind", ["eagle3", pytest.param("dflash", marks=pytest.mark.slow)])
def test_error_anchor_replay_is_a_fresh_chain_from_the_error_position(kind):
    """The extra anchors' first-draft q equals the q of the first draft of a new rollout that
    resumes from the committed text up to the error position, and the mask picks 1 <= n < K.

    A new rollout from a prefix first commits one target token (the prefill's), so it starts
    from the prefix ending one token early; the target is peaked so that this token (and every
    accepted draft) is the target's argmax, i.e. the same committed text."""
    t = make_target("llama", seed=5, vocab_size=V)
    target = opd.Target(t.config, {**t.params, "lm_head": t.params["lm_head"] * 300.0})
    drafter = _drafter(target, kind)
    # each prompt 3x (rows sample independently): enough rounds with 1 <= n < K to compare
    rec, _ = _rollout(target, drafter, temperature=1.0, key=3, prompts=PROMPTS * 3)
    trainable, _ = drafter.split()
    aux = ro.target_features(target.params, target.config, drafter.spec, rec.seq_BS)
    main, err = drafter.spec.replay_logits(trainable, drafter.params, target.config, rec, aux, error_anchors=True)
    plain = np.asarray(drafter.spec.replay_logits(trainable, drafter.params, target.config, rec, aux))
    # the same logits from a differently shaped batch (float32 sums in another order): compared
    # to 1e-6 of their scale (|logit| reaches ~70 here), not to an absolute 1e-5
    np.testing.assert_allclose(np.asarray(main), plain, rtol=1e-5, atol=1e-6 * np.abs(plain).max())
    mask = np.asarray(ro.error_anchor_mask(rec))
    n_acc = np.asarray(rec.num_accepted_BR)
    np.testing.assert_array_equal(mask, np.asarray(rec.active_BR) & (n_acc >= 1) & (n_acc < K))
    cases = list(zip(*np.nonzero(mask)))
    assert cases, "no round with 1 <= n < K: the test would check nothing"
    seq = np.asarray(rec.seq_BS)
    err_pos = [int(rec.anchor_BR[b, r] + n_acc[b, r]) for b, r in cases]
    chunk = next(batching.chunks([seq[b, :e - 1].tolist() for (b, _), e in zip(cases, err_pos)], 0, None))
    cache_len = batching.round_up(chunk.tokens.shape[1] + 2 * (K + 1) + 2, 32)
    fresh = ro.rollout(target.params, drafter.params, chunk.tokens, chunk.lengths, jax.random.PRNGKey(9),
                       jnp.asarray([V + 5], jnp.int32), tconfig=target.config, dspec=drafter.spec,
                       sp=SamplingParams(1.0, 0, 1.0), num_draft_tokens=K, num_rounds=1, cache_len=cache_len)
    fseq = np.asarray(fresh.seq_BS)
    same = [i for i, ((b, _), e) in enumerate(zip(cases, err_pos)) if fseq[i, e - 1] == seq[b, e - 1]]
    assert len(same) >= max(2, len(cases) // 2), (len(same), len(cases))  # compared where the new rollout committed the same token
    np.testing.assert_array_equal(np.asarray(fresh.anchor_BR[:len(cases), 0]), err_pos)  # drafting starts there
    idx = np.asarray(ro.drafted_support_index(drafter.params, drafter.spec, fresh.drafts_BRK))[:, 0, 0]
    logq = np.asarray(jax.nn.log_softmax(err, -1))
    got = np.array([logq[cases[i][0], cases[i][1], idx[i]] for i in same])
    np.testing.assert_allclose(got, np.asarray(fresh.logq_tok_BRK[:, 0, 0])[same], atol=2e-4)


def test_eos_mid_rollout_masks_the_finished_row(target):
    drafter = _drafter(target, "eagle3")
    free, _ = _rollout(target, drafter, temperature=0.0)
    # Make the token row 0 commits in its second round an EOS.
    n1 = int(free.anchor_BR[0, 1])
    eos = int(free.seq_BS[0, n1])
    stopped, _ = _rollout(target, drafter, temperature=0.0, eos=(eos,))
    act = np.asarray(stopped.active_BR)
    first_inactive = int(np.argmin(act[0])) if not act[0].all() else R
    assert 1 <= first_inactive <= 2 and not act[0, first_inactive:].any()
    # after finishing, the row's anchor no longer moves and it accepts nothing
    assert len(set(np.asarray(stopped.anchor_BR[0, first_inactive:]).tolist())) == 1
    assert (np.asarray(stopped.num_accepted_BR[0, first_inactive:]) == 0).all()
    # ... and gets no error position (no extra replay anchor, no rejected-stream weight)
    assert not np.asarray(ro.error_anchor_mask(stopped))[0, first_inactive:].any()
    from opd.training.opd_loss import OPDLossConfig, stream_weights

    w = stream_weights(stopped.num_accepted_BR, stopped.active_BR, K, OPDLossConfig(post_rejection_weight=1.0))
    assert all(float(np.abs(np.asarray(x)[0, first_inactive:]).sum()) == 0.0 for x in w)
    # the other rows see the same rounds as without the EOS, unless they emit that token too
    for b in (1, 2):
        if act[b].all():
            np.testing.assert_array_equal(np.asarray(stopped.drafts_BRK[b]), np.asarray(free.drafts_BRK[b]))
            np.testing.assert_array_equal(np.asarray(stopped.num_accepted_BR[b]), np.asarray(free.num_accepted_BR[b]))
