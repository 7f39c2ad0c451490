"""SFT losses: hand-computed weighting / masking on tiny arrays, and the EAGLE-3 TTT unroll /
DFlash blocks checked against the drafters' inference paths."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_target, tol
from opd.drafters.dflash import model as dfm
from opd.drafters.eagle3 import model as e3
from opd.drafters.dflash import training as dft
from opd.drafters.eagle3 import training as e3t
from opd.training import losses

LOG = math.log


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=3)


def test_shift_left():
    x = jnp.arange(10).reshape(2, 5)
    np.testing.assert_array_equal(losses.shift_left(x, 2, fill=-1), [[2, 3, 4, -1, -1], [7, 8, 9, -1, -1]])
    np.testing.assert_array_equal(losses.shift_left(x, 0), x)
    np.testing.assert_array_equal(losses.shift_left(x, 7), jnp.zeros_like(x))


# ----------------------------------------------------------------------------- EAGLE-3, hand-computed


def test_eagle3_step_weights_and_masks_by_hand():
    # V = 3, draft vocab = {0, 1} (d2t = [0, 0]), T = 5; the target's argmax is token 0 except at
    # position 2 where it is token 2 (outside the draft vocabulary). Uniform drafter -> CE = log 2.
    d2t, t2d = jnp.array([0, 0], jnp.int32), jnp.array([True, True, False])
    tl = np.tile(np.array([2.0, 0.0, 0.0], np.float32), (1, 5, 1))
    tl[0, 2] = [0.0, 0.0, 3.0]
    loss_mask = jnp.array([[0, 0, 1, 1, 1]])
    logits = jnp.zeros((2, 1, 5, 2))
    out = e3t.ttt_loss_from_logits(logits, e3t.teacher_from_logits(jnp.asarray(tl), d2t, t2d), loss_mask, decay=0.8)
    # step 1: mask[t] = loss_mask[t+2] = [1,1,1,0,0]; in-vocab argmax of p_{t+1} = [1,0,1,1,0]
    #   -> 2 counted positions over 3; step 2: mask = loss_mask[t+3] = [1,1,0,0,0], in-vocab of
    #   p_{t+2} = [0,1,1,0,0] -> 1 over 2.
    np.testing.assert_allclose(out.per_step_loss, [2 / 3 * LOG(2), 1 / 2 * LOG(2)], rtol=1e-6)
    np.testing.assert_allclose(out.weights, [1.0, 0.8])
    np.testing.assert_allclose(out.loss, 2 / 3 * LOG(2) + 0.8 * 0.5 * LOG(2), rtol=1e-6)
    np.testing.assert_allclose(out.accuracy, [2 / 3, 1 / 2], rtol=1e-6)  # argmax 0 == target argmax 0
    assert float(out.supervised) == 3 + 2  # trained predictions: step 1 at 3 positions, step 2 at 2


def test_eagle3_soft_ce_renormalises_over_draft_vocab():
    # Only step 1 at t = 0 counts (loss_mask = [0, 0, 1]); target p_1 over V = 3 is [1, 3, 0.5]/4.5,
    # restricted to the draft vocab {0, 1}: [1/4, 3/4]. Drafter q = [3/4, 1/4].
    d2t, t2d = jnp.array([0, 0], jnp.int32), jnp.array([True, True, False])
    tl = jnp.asarray(np.log(np.array([[[1, 1, 1], [1, 3, 0.5], [1, 1, 1]]], np.float32)))
    logits = jnp.asarray(np.log(np.array([[[[3, 1], [1, 1], [1, 1]]]], np.float32)))
    out = e3t.ttt_loss_from_logits(logits, e3t.teacher_from_logits(tl, d2t, t2d), jnp.array([[0, 0, 1]]))
    want = -(0.25 * LOG(0.75) + 0.75 * LOG(0.25))
    np.testing.assert_allclose(out.loss, want, rtol=1e-6)
    np.testing.assert_allclose(out.accuracy, [0.0])


# ----------------------------------------------------------------------------- EAGLE-3 unroll vs inference


_ttt_logits = jax.jit(e3t.ttt_logits, static_argnums=(1, 5))
_e3_forward = jax.jit(e3.forward, static_argnums=(1,))


def test_ttt_steps_equal_the_inference_chain(target):
    drafter = opd.init_drafter("eagle3", target, seed=1)
    c, p = drafter.spec.config, drafter.params
    T = 9
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, c.vocab_size, (1, T)), jnp.int32)
    _, aux = target.forward(tokens, hidden_layers=c.target_layers)
    ttt = _ttt_logits(p["eagle"], c, p["embedding"], tokens, jnp.stack(aux, axis=2), 3)
    assert ttt.shape == (3, 1, T, c.draft_vocab_size)
    feat = e3.fuse(p["eagle"], c, aux)
    # step 1 = the cached causal forward over all pairs (f_t, x_{t+1}), t < T - 1
    pre = _e3_forward(p["eagle"], c, p["embedding"], tokens[:, 1:], feat[:, :-1], None, e3.init_cache(c, 1, 16))
    np.testing.assert_allclose(ttt[0, :, : T - 1], pre.logits_BTW, atol=tol())
    # steps 2, 3 at index t = chain steps from the verified pair t: (h_{k-1}, x_{t+k}) at position
    # t + k - 1 (the engine's way: cache lengths reset to t + 1, later slots stale and masked)
    for t in (0, 3, 5):
        h, cache = pre.hidden_BTD[:, t : t + 1], pre.cache._replace(lengths=jnp.array([t + 1], jnp.int32))
        for k in (2, 3):
            out = _e3_forward(p["eagle"], c, p["embedding"], tokens[:, t + k : t + k + 1], h, None, cache)
            np.testing.assert_allclose(ttt[k - 1, :, t], out.logits_BTW[:, 0], atol=tol())
            h, cache = out.hidden_BTD, out.cache


def test_ttt_loss_gradient_reaches_all_steps(target):
    drafter = opd.init_drafter("eagle3", target, seed=1)
    c, p = drafter.spec.config, drafter.params
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, c.vocab_size, (2, 8)), jnp.int32)
    _, aux = target.forward(tokens, hidden_layers=c.target_layers)
    tl = target.logits(tokens)
    mask = jnp.ones((2, 8))

    def f(q, last_step_only):
        teacher = e3t.teacher_from_logits(tl, p["vocab"]["d2t"], p["vocab"]["t2d"])
        out = e3t.ttt_loss(q, c, p["embedding"], teacher, aux, tokens, mask, steps=2)
        return out.per_step_loss[1] if last_step_only else out.loss

    g = jax.jit(jax.grad(f), static_argnums=1)(p["eagle"], True)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    assert float(jnp.abs(g["fc"]).sum()) > 0  # step 2 reads step 1's output: fc gets gradient through it


# ----------------------------------------------------------------------------- DFlash


def test_dflash_offset_weights():
    np.testing.assert_allclose(dft.offset_weights(4, 7.0), [1.0, math.exp(-1 / 7), math.exp(-2 / 7)], rtol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        dft.offset_weights(4, 0.0)


def test_dflash_weighting_and_masking_by_hand():
    # T = 5, Q = 3 (offsets 1, 2), V = 2, anchors 0 and 3. Labels: anchor 0 -> x_1 = 1, x_2 = 1;
    # anchor 3 -> x_4 = 1 and x_5 (outside the sequence: weight 0).
    tokens = jnp.array([[0, 1, 1, 0, 1]])
    loss_mask = jnp.array([[1, 1, 1, 0, 1]])
    anchors = jnp.array([[0, 3]])
    logits = jnp.asarray(np.log(np.array([[[[1, 3], [1, 1]], [[3, 1], [1e4, 1e-4]]]], np.float32)))
    g = 7.0
    e = math.exp(-1 / g)
    out = dft.loss_from_logits(logits, tokens, loss_mask, anchors, jnp.array([[True, True]]), gamma=g)
    want = (LOG(4 / 3) + e * LOG(2) + LOG(4)) / (2 + e)
    np.testing.assert_allclose(out.loss, want, rtol=1e-5)
    np.testing.assert_allclose(out.accuracy, [0.5, 0.0])
    np.testing.assert_allclose(out.per_step_loss, [(LOG(4 / 3) + LOG(4)) / 2, LOG(2)], rtol=1e-5)
    assert float(out.supervised) == 3  # anchor 0: offsets 1, 2; anchor 3: offset 1 (offset 2 is past the end)
    # A dropped anchor (keep = False) and a masked label (loss_mask[2] = 0) count nothing.
    out = dft.loss_from_logits(logits, tokens, jnp.array([[1, 1, 0, 0, 1]]), anchors,
                               jnp.array([[True, False]]), gamma=g)
    np.testing.assert_allclose(out.loss, LOG(4 / 3), rtol=1e-5)
    assert float(out.supervised) == 1


def test_sample_anchors_respects_mask():
    mask = jnp.array([[0, 1, 1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 0, 1]])
    anchors, keep = dft.sample_anchors(jax.random.PRNGKey(0), mask, 3)
    a, k = np.asarray(anchors), np.asarray(keep)
    assert k[0].all() and len(set(a[0])) == 3
    assert all(mask[0, i] == 1 and i <= 6 for i in a[0])
    assert k[1].tolist() == [True, False, False] and a[1, 0] == 5  # position 7 = T - 1 has no label
    with pytest.raises(ValueError, match="num_anchors"):
        dft.sample_anchors(jax.random.PRNGKey(0), mask, 0)


def test_dflash_blocks_equal_logits_from_features(target):
    drafter = opd.init_drafter("dflash", target, seed=2, block_size=4)
    c, p = drafter.spec.config, drafter.params
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, c.vocab_size, (2, 10)), jnp.int32)
    _, aux = target.forward(tokens, hidden_layers=c.target_layer_ids)
    anchors = jnp.array([[2, 7], [0, 5]], jnp.int32)
    got = jax.jit(dft.block_logits, static_argnums=(2, 3))(p["dflash"], p["target"], c, target.config, aux,
                                                                     tokens, anchors)
    assert got.shape == (2, 2, 3, c.vocab_size)
    for j in range(2):
        a = anchors[:, j]
        want = jax.jit(dfm.logits_from_features, static_argnums=(2, 3))(p["dflash"], p["target"], c, target.config,
                                                                         aux, tokens[jnp.arange(2), a], a)
        np.testing.assert_allclose(got[:, j], want, atol=tol())
