"""DFlash drafter: lossless in the engine, context cache equal to a from-scratch computation,
sampling, block-size limit, z-lab HF layout round trip and fit checks; the draft-vocabulary
(`draft_vocab_size`) and learned-MASK (`mask_embedding="learned"`) options."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_hf_model, tol
from opd.drafters.dflash.hf import export_dflash_hf, load_dflash_hf
from opd.decoding.generate import prefill
from opd.decoding.sampling import SamplingParams
from opd.drafters.base import DraftContext
from opd.drafters.base import TargetFeatures
from opd.drafters.dflash import DFlashSFTLoss, init_dflash
from opd.drafters.dflash import model as dfm
from opd.drafters.dflash import training as dft
from opd.drafters.eagle3.model import build_draft_vocab
from opd.models import transformer as tfm

BLOCK = 4
PROMPTS = [[5, 9, 2, 5, 9], [17] * 11, [1], list(range(40, 70)) + list(range(40, 50))]
W = 24  # draft vocabulary of the draft-vocab variants (V = 128)
VARIANTS = {"full": {}, "draft_vocab": dict(draft_vocab_size=W), "learned_mask": dict(mask_embedding="learned"),
            "both": dict(draft_vocab_size=W, mask_embedding="learned")}


def _target(seed=3, **overrides):
    model, d = make_hf_model("llama", seed=seed, **{"num_hidden_layers": 4, **overrides})
    config = opd.TransformerConfig.from_hf(d)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return opd.Target(config, jax.tree.map(jnp.asarray, tfm.params_from_hf(config, sd)))


@pytest.fixture(scope="module")
def target():
    return _target()


@pytest.fixture(scope="module")
def drafter(target):
    return init_dflash(target, seed=1, block_size=BLOCK, target_layer_ids=(1, 2))


def _prompt_counts(V):
    return np.bincount(np.concatenate([np.asarray(p) for p in PROMPTS]), minlength=V)


@pytest.fixture(scope="module")
def drafters(target, drafter):
    """The drafter of each of VARIANTS (same seed; draft vocabularies from the prompts' tokens)."""
    counts = _prompt_counts(target.config.vocab_size)
    out = {k: init_dflash(target, seed=1, block_size=BLOCK, target_layer_ids=(1, 2), token_counts=counts, **kw)
           for k, kw in VARIANTS.items() if k != "full"}
    return {"full": drafter, **out}


def test_target_layer_ids_follow_zlab():
    assert dfm.default_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)  # z-lab Qwen3-8B/4B drafters
    assert dfm.default_target_layer_ids(24, 1) == (12,)
    assert dfm.default_target_layer_ids(64, 2) == (1, 61)
    with pytest.raises(ValueError, match="target_layer_ids explicitly"):
        dfm.default_target_layer_ids(3, 2)


def test_params_layout(target, drafter):
    assert set(drafter.params) == {"dflash", "target"}
    assert drafter.params["target"]["embedding"] is target.params["embedding"]  # shared, not copied
    assert "embedding" not in jax.tree_util.keystr(drafter.params["dflash"])
    assert drafter.spec.target_hidden_layers == (1, 2)
    # Every trainable parameter carries logical axis names.
    boxed = dfm.abstract_params(drafter.spec.config)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(len(x.names) == len(x.value.shape) for x in leaves)


@pytest.mark.parametrize("variant,num_draft_tokens", [("full", 1), ("full", 3), ("draft_vocab", 1), ("draft_vocab", 3),
                                                      ("learned_mask", 3), ("both", 3)])
def test_greedy_equals_autoregressive(target, drafters, variant, num_draft_tokens):
    drafter = drafters[variant]
    want = opd.generate(target, PROMPTS, max_new_tokens=16).tokens
    out = opd.speculative_generate(target, drafter, PROMPTS, max_new_tokens=16, num_draft_tokens=num_draft_tokens)
    assert out.tokens == want
    assert 1.0 <= out.stats["tau"] <= num_draft_tokens + 1


def test_context_cache_equals_from_scratch(target, drafter):
    """Drive prefill/propose/commit with arbitrary acceptance counts; then the cached
    proposal equals one computed from a whole-sequence target forward."""
    spec, tc, K = drafter.spec, target.config, 3
    layers = spec.target_hidden_layers
    prompts = PROMPTS[:3]
    B, P, S = len(prompts), 16, 64
    toks = np.zeros((B, P), np.int32)
    for b, p in enumerate(prompts):
        toks[b, : len(p)] = p
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    tcache, last, pre = prefill(target.params, tc, jnp.asarray(toks), lens, S, hidden_layers=layers)
    seq = jnp.zeros((B, S), jnp.int32).at[:, :P].set(toks)
    seq = tfm.update_rows(seq, jnp.argmax(tfm.lm_head(target.params, tc, last), -1)[:, None].astype(jnp.int32), lens, axis=1)
    seq_len = lens + 1
    state = spec.prefill(drafter.params, DraftContext(seq[:, : P + 1], seq_len), pre.aux_hidden, S)
    sp = SamplingParams(1.0)
    rng = np.random.RandomState(0)
    for r in range(3):
        ctx = DraftContext(seq, seq_len)
        d, _, state = spec.propose(drafter.params, state, ctx, jax.random.PRNGKey(r), K, sp)
        o = tfm.forward(target.params, tc, jnp.concatenate([ctx.pending()[:, None], d], 1), cache=tcache, hidden_layers=layers)
        n = jnp.asarray(rng.randint(0, K + 1, size=B), jnp.int32)  # pretend acceptance counts
        bonus = jnp.asarray(rng.randint(0, tc.vocab_size, size=B), jnp.int32)
        new = jnp.where(jnp.arange(K + 1)[None] < n[:, None], jnp.pad(d, ((0, 0), (0, 1))), bonus[:, None])
        seq = tfm.update_rows(seq, new, seq_len, axis=1)
        seq_len = seq_len + n + 1
        tcache = o.cache._replace(lengths=seq_len - 1)
        state = spec.commit(drafter.params, state, DraftContext(seq, seq_len), n, o.aux_hidden)
    ctx = DraftContext(seq, seq_len)
    _, logq, _ = spec.propose(drafter.params, state, ctx, jax.random.PRNGKey(9), BLOCK - 1, sp)
    # From scratch: causal whole-sequence forward (padding after a row's end cannot leak).
    _, aux = target.forward(seq[:, : int(seq_len.max())], hidden_layers=layers)
    ref = dfm.logits_from_features(drafter.params["dflash"], drafter.params["target"], spec.config, tc, aux,
                                   ctx.pending(), seq_len - 1)
    np.testing.assert_allclose(np.asarray(logq), np.asarray(jax.nn.log_softmax(ref, -1)), atol=tol("float32"))
    # A stale context slot (past a row's length) must not matter: corrupt them and re-propose.
    S_ = state.k[0].shape[2]
    stale = (jnp.arange(S_)[None, None, :, None] >= state.lengths[:, None, None, None])
    bad = state._replace(k=tuple(jnp.where(stale, 1e3, k) for k in state.k), v=tuple(jnp.where(stale, -1e3, v) for v in state.v))
    _, logq_bad, _ = spec.propose(drafter.params, bad, ctx, jax.random.PRNGKey(9), BLOCK - 1, sp)
    np.testing.assert_allclose(np.asarray(logq_bad), np.asarray(logq), atol=tol("float32"))


def test_sampling_returns_valid_tokens(target, drafter):
    out = opd.speculative_generate(target, drafter, PROMPTS, max_new_tokens=12, num_draft_tokens=2,
                                   temperature=1.0, top_k=20, seed=5, eos_token_ids=())
    assert [len(t) for t in out.tokens] == [12] * len(PROMPTS)
    assert all(0 <= x < target.config.vocab_size for t in out.tokens for x in t)


def test_too_many_draft_tokens_is_a_clear_error(target, drafter):
    with pytest.raises(ValueError, match=r"block_size - 1 = 3"):
        opd.speculative_generate(target, drafter, PROMPTS[:1], max_new_tokens=4, num_draft_tokens=BLOCK)
    with pytest.raises(ValueError, match="unknown options"):
        init_dflash(target, blocksize=4)


def test_hf_round_trip_and_fit_checks(tmp_path, target, drafter):
    path = str(tmp_path / "dflash")
    export_dflash_hf(drafter, path)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["dflash_config"]["target_layer_ids"] == [1, 2] and cfg["block_size"] == BLOCK
    assert cfg["dflash_config"]["mask_token_id"] == drafter.spec.config.mask_token_id
    from safetensors.numpy import load_file

    names = set(load_file(f"{path}/model.safetensors"))
    assert "fc.weight" in names and "layers.0.self_attn.q_proj.weight" in names
    assert not any("embed" in n or "lm_head" in n for n in names)

    back = load_dflash_hf(path, target)
    assert back.spec == drafter.spec
    for a, b in zip(jax.tree.leaves(drafter.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a = opd.speculative_generate(target, drafter, PROMPTS, max_new_tokens=8, num_draft_tokens=3, temperature=1.0, seed=2)
    b = opd.speculative_generate(target, back, PROMPTS, max_new_tokens=8, num_draft_tokens=3, temperature=1.0, seed=2)
    assert a.tokens == b.tokens and a.stats["accept_hist"] == b.stats["accept_hist"]

    narrow = _target(hidden_size=32, intermediate_size=48)
    with pytest.raises(opd.CheckpointError, match="hidden_size 64 does not match the target's 32"):
        load_dflash_hf(path, narrow)

    def edited(**kw):
        bad = dict(cfg, **{k: v for k, v in kw.items() if k != "dflash_config"})
        bad["dflash_config"] = dict(cfg["dflash_config"], **kw.get("dflash_config", {}))
        with open(f"{path}/config.json", "w") as f:
            json.dump(bad, f)
        return path

    with pytest.raises(opd.CheckpointError, match="vocab_size 100 does not match the target's 128"):
        load_dflash_hf(edited(vocab_size=100), target)
    with pytest.raises(opd.CheckpointError, match=r"target_layer_ids \[1, 7\] out of range"):
        load_dflash_hf(edited(dflash_config={"target_layer_ids": [1, 7]}), target)
    with pytest.raises(opd.CheckpointError, match="num_target_layers 36"):
        load_dflash_hf(edited(num_target_layers=36), target)
    with pytest.raises(opd.CheckpointError, match="fc.weight"):
        load_dflash_hf(edited(dflash_config={"target_layer_ids": [0, 1, 2]}), target)  # fc width disagrees
    with pytest.raises(opd.CheckpointError, match="not a DFlash v1 drafter"):
        load_dflash_hf(edited(architectures=["DFlash2DraftModel"]), target)


# ----------------------------------------------------------------------------- draft vocabulary


def _aux(target, tokens, layers=(1, 2)):
    return target.forward(jnp.asarray(tokens, jnp.int32), hidden_layers=layers)[1]


def test_draft_vocab_layout_and_init_errors(target, drafters):
    d = drafters["draft_vocab"]
    ids = np.asarray(d.spec.support_ids(d.params))
    assert d.spec.config.draft_vocab_size == W and ids.shape == (W,) and (np.diff(ids) > 0).all()
    counts = _prompt_counts(target.config.vocab_size)
    d2t, t2d = build_draft_vocab(counts, W)  # EAGLE-3's choice, reused
    np.testing.assert_array_equal(np.asarray(d.params["vocab"]["d2t"]), d2t)
    np.testing.assert_array_equal(np.asarray(d.params["vocab"]["t2d"]), t2d)
    trainable, frozen = d.split()
    assert set(frozen) == {"vocab"} and "vocab" not in jax.tree_util.keystr(trainable)
    assert set(d.with_trainable(trainable).params) == {"dflash", "target", "vocab"}
    with pytest.raises(ValueError, match="needs token_counts"):
        init_dflash(target, draft_vocab_size=W)
    with pytest.raises(ValueError, match="needs token_counts"):
        opd.init_drafter("dflash", target, draft_vocab_size=W)
    with pytest.raises(ValueError, match=r"token_counts must have shape \(128,\)"):
        init_dflash(target, draft_vocab_size=W, token_counts=np.ones(7))
    with pytest.raises(ValueError, match="draft_vocab_size must be in"):
        init_dflash(target, draft_vocab_size=1000, token_counts=np.ones(128))
    from opd.drafters import registry

    assert registry.get_kind("dflash").uses_token_counts
    # draft_vocab_size 0 (the default) ignores token counts: the full-vocabulary drafter
    full = opd.init_drafter("dflash", target, seed=1, block_size=BLOCK, target_layer_ids=(1, 2), token_counts=counts)
    assert full.spec == drafters["full"].spec and set(full.params) == {"dflash", "target"}


@pytest.mark.parametrize("tied", [False, True])
def test_draft_vocab_block_logits_are_the_lm_head_columns(tied):
    target = _target(seed=4, tie_word_embeddings=tied)
    counts = np.random.RandomState(0).randint(0, 50, target.config.vocab_size)
    kw = dict(seed=1, block_size=BLOCK, target_layer_ids=(1, 2))
    full, small = init_dflash(target, **kw), init_dflash(target, token_counts=counts, draft_vocab_size=W, **kw)
    tokens = np.random.RandomState(1).randint(0, 128, (2, 12))
    aux, c, tc = _aux(target, tokens), small.spec.config, target.config
    anchor, ctx_len = jnp.asarray(tokens[:, 6]), jnp.asarray([6, 9], jnp.int32)
    want = dfm.logits_from_features(full.params["dflash"], full.params["target"], c.replace(draft_vocab_size=0), tc,
                                    aux, anchor, ctx_len)
    ids = small.spec.support_ids(small.params)
    got = dfm.logits_from_features(small.params["dflash"], small.params["target"], c, tc, aux, anchor, ctx_len, ids)
    assert got.shape == (2, BLOCK - 1, W)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want)[..., np.asarray(ids)], atol=tol("float32"))


def _sft_batch(seed=0):
    rs = np.random.RandomState(seed)
    tokens = jnp.asarray(rs.randint(0, 128, (2, 16)), jnp.int32)
    mask = jnp.asarray(np.r_[np.zeros(4), np.ones(12)][None].repeat(2, 0), jnp.int32)
    return tokens, mask


def _sft_loss_and_grads(target, drafter, tokens, mask, aux):
    trainable, frozen = drafter.split()

    def f(p):
        out = drafter.spec.sft_loss(p, frozen, target.params, target.config, TargetFeatures(aux), tokens, mask,
                                    jax.random.PRNGKey(3), DFlashSFTLoss(num_anchors=3))
        return out.loss, out

    return jax.value_and_grad(f, has_aux=True)(trainable)


def test_full_width_draft_vocab_equals_the_full_head(target, drafters):
    """draft_vocab_size = V (every token in the draft vocabulary): the same loss, diagnostics
    and gradients as the full-vocabulary head."""
    V = target.config.vocab_size
    tokens, mask = _sft_batch()
    aux = _aux(target, tokens)
    wide = init_dflash(target, seed=1, block_size=BLOCK, target_layer_ids=(1, 2), draft_vocab_size=V,
                       token_counts=np.random.RandomState(2).randint(0, 9, V))
    (l0, o0), g0 = _sft_loss_and_grads(target, drafters["full"], tokens, mask, aux)
    (l1, o1), g1 = _sft_loss_and_grads(target, wide, tokens, mask, aux)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(o0[:-1], o1[:-1]):  # all but `extra`: none without a draft vocabulary
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    assert o0.extra is None and float(o1.extra["oov_fraction"]) == 0.0
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_out_of_vocab_tokens_have_no_loss_term():
    """Excluding OOV tokens = zeroing their loss mask (loss, per-offset loss, supervised count);
    their logits get no gradient; accuracy counts them as misses; oov_fraction counts them."""
    V, Wd, K = 10, 4, BLOCK - 1
    d2t, t2d = build_draft_vocab(np.arange(V)[::-1], Wd)  # draft vocabulary: target ids 0..3
    vocab = {"d2t": jnp.asarray(d2t), "t2d": jnp.asarray(t2d)}
    tokens = jnp.asarray([[1, 2, 7, 3, 0, 9, 2, 1], [3, 3, 1, 8, 8, 2, 0, 1]], jnp.int32)
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 1]], jnp.int32)
    anchors, keep = jnp.asarray([[1, 4], [0, 2]], jnp.int32), jnp.ones((2, 2), bool)
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 2, K, Wd))
    f = lambda lg, m: dft.loss_from_logits(lg, tokens, m, anchors, keep, vocab=vocab)
    masked = mask * t2d[np.asarray(tokens)]
    got, want = f(logits, mask), f(logits, jnp.asarray(masked))
    for name in ("loss", "per_step_loss", "supervised"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), rtol=1e-6)
    # accuracy: the same hits over every supervised prediction (OOV ones included, as misses)
    n_all = dft._supervision(tokens, mask, anchors, keep, K, vocab=None)[1].sum(axis=(0, 1))
    n_in = dft._supervision(tokens, mask, anchors, keep, K, vocab=vocab)[2].sum(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(got.accuracy * n_all), np.asarray(want.accuracy * n_in), atol=1e-6)
    frac = float(got.extra["oov_fraction"])  # logged by the SFT step
    assert 0 < frac < 1 and frac == pytest.approx(1 - float(n_in.sum()) / float(n_all.sum()))
    assert dft.loss_from_logits(jnp.zeros((2, 2, K, V)), tokens, mask, anchors, keep).extra is None
    # the gradient at every prediction of an OOV token is zero
    g = np.asarray(jax.grad(lambda lg: f(lg, mask).loss)(logits))
    idx = np.asarray(anchors)[..., None] + np.arange(1, K + 1)
    label = np.asarray(tokens)[np.arange(2)[:, None, None], np.minimum(idx, 7)]
    oov = ~t2d[label] | (idx > 7)
    assert oov.any() and (~oov).any()
    assert np.abs(g[oov]).max() == 0 and np.abs(g[~oov]).max() > 0


def test_draft_vocab_sampling_and_replay(target, drafters):
    """Sampled drafts are target ids of the draft vocabulary with log q scattered to V (-inf
    elsewhere); Draft-OPD's replay reproduces that q over the support at every offset."""
    import functools

    from opd.decoding import batching
    from opd.decoding.sampling import SamplingParams
    from opd.training import rollout as ro

    d = drafters["both"]
    ids = np.asarray(d.spec.support_ids(d.params))
    out = opd.speculative_generate(target, d, PROMPTS, max_new_tokens=8, num_draft_tokens=2, temperature=1.0,
                                   top_k=20, seed=5, eos_token_ids=())
    assert all(0 <= x < target.config.vocab_size for t in out.tokens for x in t)
    K, R = 3, 3
    chunk = next(batching.chunks(PROMPTS, 0, None))
    cache_len = batching.round_up(chunk.tokens.shape[1] + (R + 2) * (K + 1) + 2, 32)
    fn = jax.jit(functools.partial(ro.rollout, tconfig=target.config, dspec=d.spec, sp=SamplingParams(1.0, 0, 1.0),
                                   num_draft_tokens=K, num_rounds=R, cache_len=cache_len, teacher_support="draft"))
    rec = fn(target.params, d.params, chunk.tokens, chunk.lengths, jax.random.PRNGKey(0), jnp.asarray([999], jnp.int32))
    assert np.isin(np.asarray(rec.drafts_BRK), ids).all()
    assert rec.teacher_support_BRKW.shape[-1] == W
    trainable, _ = d.split()
    aux = ro.target_features(target.params, target.config, d.spec, rec.seq_BS)
    logits = d.spec.replay_logits(trainable, d.params, target.config, rec, aux)
    assert logits.shape[-1] == W
    idx = ro.drafted_support_index(d.params, d.spec, rec.drafts_BRK)
    replayed = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), idx[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(replayed), np.asarray(rec.logq_tok_BRK), atol=2e-4)


def test_draft_vocab_flops_count_the_head_at_its_width(target, drafters):
    full, small = drafters["full"].spec, drafters["draft_vocab"].spec
    B, T, A = 2, 64, 8
    diff = dft.sft_flops(full.config, target.config, B, T, A) - dft.sft_flops(small.config, target.config, B, T, A)
    assert diff == 6 * (target.config.vocab_size - W) * target.config.hidden_size * B * A * BLOCK


# ----------------------------------------------------------------------------- learned MASK embedding


def test_learned_mask_embedding_is_trainable_and_fills_the_mask_positions(target, drafters):
    d, c, tc = drafters["learned_mask"], drafters["learned_mask"].spec.config, target.config
    trainable, frozen = d.split()
    emb = np.asarray(target.params["embedding"])
    np.testing.assert_allclose(np.asarray(trainable["mask_embedding"]), emb.mean(0), rtol=1e-5, atol=1e-7)
    assert frozen == {}
    boxed = dfm.abstract_params(c)
    assert boxed["mask_embedding"].names == ("embed",)
    tokens = np.random.RandomState(1).randint(0, 128, (2, 12))
    tokens[tokens == c.mask_token_id] = 0
    aux, anchor, ctx_len = _aux(target, tokens), jnp.asarray(tokens[:, 6]), jnp.asarray([6, 9], jnp.int32)
    logits = lambda p, tp, cfg=c: np.asarray(dfm.logits_from_features(p, tp, cfg, tc, aux, anchor, ctx_len))
    base = logits(trainable, d.params["target"])
    moved = {**trainable, "mask_embedding": trainable["mask_embedding"] + 0.5}
    assert np.abs(logits(moved, d.params["target"]) - base).max() > 1e-3  # the learned vector is read ...
    bumped = {**d.params["target"], "embedding": d.params["target"]["embedding"].at[c.mask_token_id].add(0.5)}
    np.testing.assert_array_equal(logits(trainable, bumped), base)  # ... not the mask token's row
    # (the "token" MASK does read that row)
    tok = drafters["full"]
    tok_logits = lambda tp: logits(tok.params["dflash"], tp, tok.spec.config)
    assert np.abs(tok_logits(bumped) - tok_logits(d.params["target"])).max() > 1e-3
    # it receives gradients from the SFT loss
    tokens_, mask = _sft_batch()
    (_, _), g = _sft_loss_and_grads(target, d, tokens_, mask, _aux(target, tokens_))
    assert np.abs(np.asarray(g["mask_embedding"])).max() > 0
    with pytest.raises(ValueError, match="mask_embedding must be one of"):
        init_dflash(target, mask_embedding="zeros")


# ----------------------------------------------------------------------------- checkpoints


def test_hf_round_trip_of_the_options(tmp_path, target, drafters):
    from safetensors.numpy import load_file

    d = drafters["both"]
    d = d.with_trainable({**d.split()[0], "mask_embedding": d.split()[0]["mask_embedding"] + 0.25})
    path = str(tmp_path / "both")
    export_dflash_hf(d, path)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    assert cfg["dflash_config"]["draft_vocab_size"] == W and cfg["dflash_config"]["mask_embedding"] == "learned"
    sd = load_file(f"{path}/model.safetensors")
    assert sd["d2t"].dtype == np.int64 and sd["t2d"].dtype == bool and sd["mask_embedding"].shape == (64,)
    back = load_dflash_hf(path, target)
    assert back.spec == d.spec
    for a, b in zip(jax.tree.leaves(d.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(back.params["vocab"]["d2t"]), np.asarray(d.params["vocab"]["d2t"]))
    tokens = np.random.RandomState(1).randint(0, 128, (2, 12))
    aux, anchor, ctx_len = _aux(target, tokens), jnp.asarray(tokens[:, 6]), jnp.asarray([6, 9], jnp.int32)
    block = lambda x: np.asarray(dfm.logits_from_features(x.params["dflash"], x.params["target"], x.spec.config,
                                                          target.config, aux, anchor, ctx_len,
                                                          x.spec.support_ids(x.params)))
    np.testing.assert_array_equal(block(back), block(d))
    # a float16 export keeps the maps exact (only float tensors are cast)
    opd.export_drafter(d, str(tmp_path / "fp16"), dtype="float16")
    half = load_dflash_hf(str(tmp_path / "fp16"), target)
    np.testing.assert_array_equal(np.asarray(half.params["vocab"]["d2t"]), np.asarray(d.params["vocab"]["d2t"]))
    # a full-vocabulary checkpoint has neither map; a draft-vocabulary one without d2t is refused
    full_path = str(tmp_path / "full")
    export_dflash_hf(drafters["full"], full_path)
    assert not {"d2t", "t2d", "mask_embedding"} & set(load_file(f"{full_path}/model.safetensors"))
    assert "draft_vocab_size" not in json.load(open(f"{full_path}/config.json"))["dflash_config"]
    from safetensors.numpy import save_file

    save_file({k: v for k, v in sd.items() if k not in ("d2t", "t2d")}, f"{path}/model.safetensors")
    with pytest.raises(opd.CheckpointError, match="no 'd2t' map"):
        load_dflash_hf(path, target)
