"""Packed SFT rows: a row holding several sequences gives exactly the loss of those sequences
in separate padded rows (EAGLE-3 TTT, DFlash blocks, the target's own forward), and the
compact teacher equals the one from the target's full logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import opd
from conftest import make_target, tol
from opd.drafters.base import Segments
from opd.drafters.dflash import training as dft
from opd.drafters.eagle3 import training as e3t
from opd.models import transformer as tfm
from opd.training import run as run_mod
from opd.training import sft

T = 16
LENGTHS = (7, 6)  # two sequences packed into one row of T (3 padding slots)


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=5)


def _sequences(vocab: int):
    rs = np.random.RandomState(0)
    seqs = [rs.randint(0, vocab, n).astype(np.int32) for n in LENGTHS]
    masks = [np.r_[np.zeros(2), np.ones(n - 2)].astype(np.int32) for n in LENGTHS]  # 2-token "prompts"
    return seqs, masks


def _separate(seqs, masks):
    """One sequence per row, padded to T."""
    tokens, mask = np.zeros((len(seqs), T), np.int32), np.zeros((len(seqs), T), np.int32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        tokens[i, : len(s)], mask[i, : len(s)] = s, m
    return jnp.asarray(tokens), jnp.asarray(mask)


def _packed(seqs, masks):
    """Every sequence in one row: tokens, loss mask, Segments, the start of each sequence."""
    tokens, mask, pos, ids = (np.zeros((1, T), np.int32) for _ in range(4))
    starts, o = [], 0
    for i, (s, m) in enumerate(zip(seqs, masks)):
        n = len(s)
        tokens[0, o : o + n], mask[0, o : o + n] = s, m
        pos[0, o : o + n], ids[0, o : o + n] = np.arange(n), i + 1
        starts.append(o)
        o += n
    return jnp.asarray(tokens), jnp.asarray(mask), Segments(jnp.asarray(pos), jnp.asarray(ids)), starts


def _features(target, tokens_BT, layers, lengths_and_starts=None):
    """Target features of each sequence alone (as the feature cache holds them), laid out like
    `tokens_BT` (separate rows, or one packed row)."""
    _, aux = target.forward(tokens_BT, hidden_layers=layers)
    aux = jnp.stack(aux, axis=2)
    if lengths_and_starts is None:
        return aux
    out = jnp.zeros((1, T) + aux.shape[2:], aux.dtype)
    for row, (n, start) in enumerate(lengths_and_starts):
        out = out.at[0, start : start + n].set(aux[row, :n])
    return out


def test_eagle3_packed_row_equals_separate_rows(target):
    drafter = opd.init_drafter("eagle3", target, seed=1)
    c, p = drafter.spec.config, drafter.params
    seqs, masks = _sequences(c.vocab_size)
    tok_s, mask_s = _separate(seqs, masks)
    tok_p, mask_p, seg, starts = _packed(seqs, masks)
    aux_s = _features(target, tok_s, c.target_layers)
    aux_p = _features(target, tok_s, c.target_layers, list(zip(LENGTHS, starts)))
    logits_s = target.logits(tok_s)
    logits_p = jnp.zeros((1, T, c.vocab_size))
    for row, (n, start) in enumerate(zip(LENGTHS, starts)):
        logits_p = logits_p.at[0, start : start + n].set(logits_s[row, :n])
    d2t, t2d = p["vocab"]["d2t"], p["vocab"]["t2d"]
    loss = jax.jit(e3t.ttt_loss, static_argnames=("config", "steps"))
    sep = loss(p["eagle"], config=c, embedding_VD=p["embedding"], teacher=e3t.teacher_from_logits(logits_s, d2t, t2d),
               target_hidden=aux_s, tokens_BT=tok_s, loss_mask_BT=mask_s, steps=3)
    pk = loss(p["eagle"], config=c, embedding_VD=p["embedding"], teacher=e3t.teacher_from_logits(logits_p, d2t, t2d),
              target_hidden=aux_p, tokens_BT=tok_p, loss_mask_BT=mask_p, steps=3, segments=seg)
    assert float(pk.supervised) == float(sep.supervised) > 0
    np.testing.assert_allclose(pk.per_step_loss, sep.per_step_loss, atol=tol())
    np.testing.assert_allclose(pk.accuracy, sep.accuracy, atol=1e-6)
    # without the segments the second sequence would see the first: a different loss
    mixed = loss(p["eagle"], config=c, embedding_VD=p["embedding"], teacher=e3t.teacher_from_logits(logits_p, d2t, t2d),
                 target_hidden=aux_p, tokens_BT=tok_p, loss_mask_BT=mask_p, steps=3)
    assert float(mixed.supervised) > float(sep.supervised)


def test_compact_teacher_equals_full_logits(target):
    drafter = opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=32)
    p = drafter.params
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, target.config.vocab_size, (2, 9)), jnp.int32)
    out = tfm.forward(target.params, target.config, tokens)
    full = tfm.lm_head(target.params, target.config, out.hidden_BTD)
    d2t, t2d = p["vocab"]["d2t"], p["vocab"]["t2d"]
    want = e3t.teacher_from_logits(full, d2t, t2d)
    got = e3t.compact_teacher(target.params, target.config, out.hidden_BTD, jnp.argmax(full, -1), d2t, t2d)
    np.testing.assert_allclose(got.logp_BTW, want.logp_BTW, atol=1e-5)
    np.testing.assert_array_equal(got.in_vocab_BT, want.in_vocab_BT)
    assert 0 < float(want.in_vocab_BT.mean()) < 1  # both cases occur with 32 of 128 ids


def test_dflash_packed_row_equals_separate_rows(target):
    drafter = opd.init_drafter("dflash", target, seed=2, block_size=4)
    c, p = drafter.spec.config, drafter.params
    seqs, masks = _sequences(c.vocab_size)
    tok_s, mask_s = _separate(seqs, masks)
    tok_p, mask_p, seg, starts = _packed(seqs, masks)
    aux_s = _features(target, tok_s, c.target_layer_ids)
    aux_p = _features(target, tok_s, c.target_layer_ids, list(zip(LENGTHS, starts)))
    local = np.array([[2, 5], [3, 4]])  # anchors inside each sequence (5 + 3 offsets runs past sequence 0)
    anchors_s = jnp.asarray(local, jnp.int32)
    anchors_p = jnp.asarray((local + np.array(starts)[:, None]).reshape(1, -1), jnp.int32)
    loss = jax.jit(dft.loss, static_argnames=("config", "tconfig"))
    kw = dict(params=p["dflash"], target_params=p["target"], config=c, tconfig=target.config)
    sep = loss(**kw, target_hidden=aux_s, tokens_BT=tok_s, loss_mask_BT=mask_s, anchors_BA=anchors_s,
               keep_BA=jnp.ones((2, 2), bool))
    pk = loss(**kw, target_hidden=aux_p, tokens_BT=tok_p, loss_mask_BT=mask_p, anchors_BA=anchors_p,
              keep_BA=jnp.ones((1, 4), bool), segments=seg)
    assert float(pk.supervised) == float(sep.supervised) > 0
    np.testing.assert_allclose(pk.loss, sep.loss, atol=tol())
    np.testing.assert_allclose(pk.per_step_loss, sep.per_step_loss, atol=tol())


def test_dflash_packed_anchors_have_a_target():
    mask = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0]])
    ids = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    anchors, keep = dft.sample_anchors(jax.random.PRNGKey(0), mask, 6, ids)
    chosen = sorted(int(a) for a, k in zip(np.asarray(anchors[0]), np.asarray(keep[0])) if k)
    assert chosen == [0, 1, 3, 4]  # 2 and 5 end their sequences; 6, 7 are padding


def test_target_forward_on_packed_rows_equals_each_sequence_alone(target):
    seqs, masks = _sequences(target.config.vocab_size)
    tok_s, _ = _separate(seqs, masks)
    tok_p, _, seg, starts = _packed(seqs, masks)
    layers = (0, 1)
    alone = tfm.forward(target.params, target.config, tok_s, hidden_layers=layers)
    packed = tfm.forward(target.params, target.config, tok_p, positions_BT=seg.positions_BT, hidden_layers=layers,
                         segment_ids_BT=seg.ids_BT)
    for row, (n, start) in enumerate(zip(LENGTHS, starts)):
        np.testing.assert_allclose(packed.hidden_BTD[0, start : start + n], alone.hidden_BTD[row, :n], atol=tol())
        for a, b in zip(packed.aux_hidden, alone.aux_hidden):
            np.testing.assert_allclose(a[0, start : start + n], b[row, :n], atol=tol())


def test_packed_sft_loss_online_equals_cached_features(target):
    """The SFT step's loss on packed rows: the target's segment-masked online forward gives the
    loss that the feature cache's per-sequence features give."""
    drafter = opd.init_drafter("eagle3", target, seed=1)
    trainable, frozen = drafter.split()
    seqs, masks = _sequences(target.config.vocab_size)
    tok_s, _ = _separate(seqs, masks)
    tok_p, mask_p, seg, starts = _packed(seqs, masks)
    layout = list(zip(LENGTHS, starts))
    online = {"tokens": tok_p, "loss_mask": mask_p, "positions": seg.positions_BT, "segment_ids": seg.ids_BT}
    alone = tfm.forward(target.params, target.config, tok_s, hidden_layers=drafter.spec.target_hidden_layers)
    final = jnp.zeros((1, T, target.config.hidden_size))
    for row, (n, start) in enumerate(layout):
        final = final.at[0, start : start + n].set(alone.hidden_BTD[row, :n])
    top = jnp.argmax(tfm.lm_head(target.params, target.config, final), -1).astype(jnp.int32)
    cached = {**online, "aux": _features(target, tok_s, drafter.spec.target_hidden_layers, layout), "final": final,
              "top": top}
    cfg = opd.drafters.get_kind("eagle3").loss_config({"ttt_steps": 2})
    loss = jax.jit(sft.sft_loss, static_argnames=("spec", "target_config", "loss_config"))
    kw = dict(spec=drafter.spec, target_config=target.config, loss_config=cfg)
    a = loss(trainable, target.params, frozen, online, jax.random.PRNGKey(0), **kw)
    b = loss(trainable, target.params, frozen, cached, jax.random.PRNGKey(0), **kw)
    assert float(a.supervised) == float(b.supervised) > 0
    np.testing.assert_allclose(a.per_step_loss, b.per_step_loss, atol=tol())


def test_packing_is_refused_for_kinds_without_it(target):
    drafter = opd.init_drafter("eagle3", target, seed=1)

    @dataclasses.dataclass(frozen=True)
    class NoPacking(type(drafter.spec)):
        packed_sft = False

    spec = NoPacking(**{f.name: getattr(drafter.spec, f.name) for f in dataclasses.fields(drafter.spec)})
    _, frozen = drafter.split()
    with pytest.raises(ValueError, match="do not support packed SFT rows"):
        run_mod.sft_run(spec, frozen, target.config, mesh=run_mod.make_mesh(1, 1, 1, 2),
                        optimizer=optax.sgd(0.1), loss_config=None, batch_size=2, seq_len=8, packed=True)


@pytest.mark.parametrize("capacity", [0.7, 0.3])  # room for every trained position; too little (full fallback)
def test_eagle3_head_at_trained_positions_only_is_the_same_loss(target, capacity):
    drafter = opd.init_drafter("eagle3", target, seed=1)
    c, p = drafter.spec.config, drafter.params
    seqs, masks = _sequences(c.vocab_size)
    tok_p, mask_p, seg, starts = _packed(seqs, masks)
    aux = _features(target, _separate(seqs, masks)[0], c.target_layers, list(zip(LENGTHS, starts)))
    teacher = e3t.teacher_from_logits(target.logits(tok_p), p["vocab"]["d2t"], p["vocab"]["t2d"])

    def loss(q, cap):
        out = e3t.ttt_loss(q, c, p["embedding"], teacher, aux, tok_p, mask_p, steps=3, segments=seg, head_capacity=cap)
        return out.loss, out

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (full, full_out), g_full = fn(p["eagle"], 1.0)
    (got, got_out), g_got = fn(p["eagle"], capacity)
    assert float(jnp.sum(mask_p)) / T < 0.7  # the gathered branch has room at 0.7
    np.testing.assert_allclose(got, full, rtol=1e-5)
    np.testing.assert_allclose(got_out.accuracy, full_out.accuracy, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, atol=1e-5)
