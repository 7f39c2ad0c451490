"""EAGLE-3 drafter: lossless through the engine, cache/catch-up consistent with a from-scratch
recomputation, draft-vocabulary maps, HF layout round trip."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_target, tol
from opd.drafters.eagle3.hf import load_eagle3_hf, export_eagle3_hf
from opd.decoding import batching
from opd.decoding.generate import prefill as target_prefill
from opd.decoding.sampling import SamplingParams
from opd.drafters.base import DraftContext, Drafter
from opd.drafters.eagle3 import init_eagle3
from opd.drafters.eagle3 import model as e3
from opd.models import transformer as tfm

PROMPTS = [[5, 9, 2, 5, 9], [17] * 11, [1], list(range(40, 70)) + list(range(40, 50))]


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=3)


@pytest.fixture(scope="module")
def drafter(target):
    return init_eagle3(target, seed=1)


@pytest.fixture(scope="module")
def small_vocab_drafter(target):
    counts = np.random.RandomState(0).randint(0, 50, target.config.vocab_size)
    return init_eagle3(target, seed=2, token_counts=counts, draft_vocab_size=24, special_ids=(7,), target_layers=(0, 1, 0))


# ----------------------------------------------------------------------------- (a), (c) engine


@pytest.mark.parametrize("num_draft_tokens", [1, 3])
def test_greedy_equals_autoregressive(target, drafter, num_draft_tokens):
    want = opd.generate(target, PROMPTS, max_new_tokens=16).tokens
    out = opd.speculative_generate(target, drafter, PROMPTS, max_new_tokens=16, num_draft_tokens=num_draft_tokens)
    assert out.tokens == want
    assert 1.0 <= out.stats["tau"] <= num_draft_tokens + 1
    one = opd.speculative_generate(target, drafter, PROMPTS[3:], max_new_tokens=16, num_draft_tokens=num_draft_tokens)
    assert one.tokens == want[3:]


def test_sampled_run_returns_valid_tokens(target, small_vocab_drafter):
    out = opd.speculative_generate(target, small_vocab_drafter, PROMPTS, max_new_tokens=12, num_draft_tokens=3,
                                   temperature=1.0, seed=5, eos_token_ids=())
    assert [len(t) for t in out.tokens] == [12] * len(PROMPTS)
    assert all(0 <= x < target.config.vocab_size for t in out.tokens for x in t)
    assert 1.0 <= out.stats["tau"] <= 4.0


# ----------------------------------------------------------------------------- (b) consistency


@functools.partial(jax.jit, static_argnames=("spec", "cache_len"))
def _d_prefill(params, seq, seq_len, aux, *, spec, cache_len):
    return spec.prefill(params, DraftContext(seq, seq_len), aux, cache_len)


@functools.partial(jax.jit, static_argnames=("spec", "K", "sp"))
def _d_propose(params, state, seq, seq_len, key, *, spec, K, sp):
    return spec.propose(params, state, DraftContext(seq, seq_len), key, K, sp)


@functools.partial(jax.jit, static_argnames=("spec",))
def _d_commit(params, state, seq, seq_len, n, aux, *, spec):
    return spec.commit(params, state, DraftContext(seq, seq_len), n, aux)


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _t_verify(tparams, tcache, inp, *, config, layers):
    o = tfm.forward(tparams, config, inp, cache=tcache, hidden_layers=layers)
    return o.cache, tfm.lm_head(tparams, config, o.hidden_BTD), o.aux_hidden


def test_state_after_commits_equals_recomputation_from_scratch(target, small_vocab_drafter):
    """Rounds with hand-chosen acceptance counts (ragged, 0..K, and a row that does not advance),
    then: the drafter's step-1 logits/hidden equal a cache-free forward over every pair
    (f_t, x_{t+1}) of the committed text, and its proposals equal those of a fresh prefill."""
    tc, dr = target.config, small_vocab_drafter
    spec, dp = dr.spec, dr.params
    layers, K, cache_len, V = spec.target_hidden_layers, 3, 128, tc.vocab_size
    prompts = [[3, 1, 4, 1, 5], list(range(20, 37)), [9]]
    schedule = [(0, 3, 1), (2, -1, 3), (1, 0, 0), (3, 2, -1), (0, 1, 2)]  # accepted per row; -1: row idle
    B = len(prompts)
    P = batching.bucket_length(max(map(len, prompts)))
    toks, lens, _ = batching.pad_batch(prompts, 0, B, P)
    tcache, last, pre = target_prefill(target.params, tc, jnp.asarray(toks), jnp.asarray(lens), cache_len, hidden_layers=layers)
    first = np.asarray(jnp.argmax(tfm.lm_head(target.params, tc, last), -1))
    seq = np.zeros((B, cache_len), np.int32)
    seq[:, :P] = toks
    seq[np.arange(B), lens] = first
    seq_len = lens + 1
    state = _d_prefill(dp, jnp.asarray(seq[:, : P + 1]), jnp.asarray(seq_len), pre.aux_hidden, spec=spec, cache_len=cache_len)
    greedy = SamplingParams()
    for r, accepts in enumerate(schedule):
        d, _, state = _d_propose(dp, state, jnp.asarray(seq), jnp.asarray(seq_len), jax.random.PRNGKey(r), spec=spec, K=K, sp=greedy)
        d = np.asarray(d)
        pending = seq[np.arange(B), seq_len - 1]
        inp = np.concatenate([pending[:, None], d], axis=1)
        tcache, logits, aux = _t_verify(target.params, tcache, jnp.asarray(inp), config=tc, layers=layers)
        logits = np.asarray(logits)
        n = np.zeros(B, np.int32)
        for b, a in enumerate(accepts):
            if a < 0:
                continue
            n[b] = a
            new = list(d[b, :a]) + [int(np.argmax(logits[b, a]))]
            seq[b, seq_len[b] : seq_len[b] + a + 1] = new
            seq_len[b] += a + 1
        tcache = tcache._replace(lengths=jnp.asarray(seq_len - 1))
        state = _d_commit(dp, state, jnp.asarray(seq), jnp.asarray(seq_len), jnp.asarray(n), aux, spec=spec)

    assert np.array_equal(np.asarray(state.cache.lengths), seq_len - 1)
    # From scratch: whole-sequence target forward, then the drafter without a cache.
    T = int(seq_len.max())
    _, aux_full = target.forward(seq[:, :T], hidden_layers=layers)
    feat = e3.fuse(dp["eagle"], spec.config, aux_full)
    ref = e3.forward(dp["eagle"], spec.config, dp["embedding"], jnp.asarray(seq[:, 1 : T + 1]), feat)
    rows, last_pair = np.arange(B), seq_len - 2
    np.testing.assert_allclose(np.asarray(state.logits_BW), np.asarray(ref.logits_BTW)[rows, last_pair], atol=tol(), rtol=0)
    np.testing.assert_allclose(np.asarray(state.hidden_BD), np.asarray(ref.hidden_BTD)[rows, last_pair], atol=tol(), rtol=0)

    fresh = _d_prefill(dp, jnp.asarray(seq[:, : T + 1]), jnp.asarray(seq_len), aux_full, spec=spec, cache_len=cache_len)
    sp = SamplingParams(temperature=1.0)
    key = jax.random.PRNGKey(42)
    d_a, q_a, _ = _d_propose(dp, state, jnp.asarray(seq), jnp.asarray(seq_len), key, spec=spec, K=K, sp=sp)
    d_b, q_b, _ = _d_propose(dp, fresh, jnp.asarray(seq), jnp.asarray(seq_len), key, spec=spec, K=K, sp=sp)
    assert np.array_equal(np.asarray(d_a), np.asarray(d_b))
    q_a, q_b = np.asarray(q_a), np.asarray(q_b)
    assert q_a.shape == (B, K, V)
    finite = np.isfinite(q_b)
    assert np.array_equal(np.isfinite(q_a), finite)
    np.testing.assert_allclose(q_a[finite], q_b[finite], atol=10 * tol(), rtol=0)


# ----------------------------------------------------------------------------- (d) draft vocab


def test_build_draft_vocab_on_hand_counts():
    counts = [5, 1, 5, 0, 9, 2]
    d2t, t2d = e3.build_draft_vocab(counts, 3)  # 4 (9), then the tie 0/2 (5) by id
    assert d2t.tolist() == [0, 1, 2] and t2d.tolist() == [True, False, True, False, True, False]
    d2t, t2d = e3.build_draft_vocab(counts, 3, always_include=(3,))  # forced 3, then 4, 0
    assert d2t.tolist() == [0, 2, 2] and t2d.tolist() == [True, False, False, True, True, False]
    assert (np.arange(3) + d2t).tolist() == [0, 3, 4]
    d2t, t2d = e3.build_draft_vocab(counts, 6)
    assert d2t.tolist() == [0] * 6 and t2d.all()
    with pytest.raises(ValueError, match="draft_vocab_size"):
        e3.build_draft_vocab(counts, 7)


def test_q_is_zero_outside_the_draft_vocab(target, small_vocab_drafter):
    dr = small_vocab_drafter
    t2d = np.asarray(dr.params["vocab"]["t2d"])
    assert t2d.sum() == 24 and t2d[7]  # special id kept
    assert np.array_equal(np.flatnonzero(t2d), np.arange(24) + np.asarray(dr.params["vocab"]["d2t"]))
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 24)) * 3
    toks, logq = e3.sample_draft(jax.random.PRNGKey(1), logits, dr.params["vocab"]["d2t"], target.config.vocab_size,
                                 SamplingParams(temperature=0.8))
    logq = np.asarray(logq)
    assert np.all(np.isneginf(logq[:, ~t2d]))
    np.testing.assert_allclose(np.exp(logq).sum(-1), 1.0, atol=1e-5)
    assert t2d[np.asarray(toks)].all() and np.isfinite(logq[np.arange(2), np.asarray(toks)]).all()
    greedy, none = e3.sample_draft(None, logits, dr.params["vocab"]["d2t"], target.config.vocab_size, SamplingParams())
    assert none is None
    assert np.array_equal(np.asarray(greedy), np.flatnonzero(t2d)[np.argmax(np.asarray(logits), -1)])
    want = opd.generate(target, PROMPTS[:2], max_new_tokens=10).tokens
    assert opd.speculative_generate(target, dr, PROMPTS[:2], max_new_tokens=10, num_draft_tokens=3).tokens == want


def test_default_target_layers_convention():
    assert e3.default_target_layers(32) == (1, 15, 28)  # inputs of layers {2, 16, 29} in EAGLE's terms
    assert e3.default_target_layers(2) == (0, 0, 0)  # never L-1: no serving engine can capture it


# ----------------------------------------------------------------------------- (e) HF layout


def test_hf_round_trip_and_mismatch_errors(target, small_vocab_drafter, tmp_path):
    dr = small_vocab_drafter  # its layer 1 is this 2-layer target's last, which the layout refuses: tap 0
    dr = Drafter(dataclasses.replace(dr.spec, config=dataclasses.replace(dr.spec.config, target_layers=(0, 0, 0))), dr.params)
    path = tmp_path / "eagle3"
    export_eagle3_hf(dr, str(path))
    hf = json.loads((path / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"]
    assert (hf["vocab_size"], hf["draft_vocab_size"], hf["hidden_size"]) == (128, 24, 64)
    assert "target_hidden_size" not in hf  # equal to hidden_size: EAGLE would skip the target's embedding
    assert hf["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 0, 0]
    assert hf["eagle_aux_hidden_state_layer_ids"] == [1, 1, 1]  # vLLM: input of layer i
    from safetensors.numpy import load_file

    sd = load_file(str(path / "model.safetensors"))
    assert set(sd) == set(e3.hf_tensor_shapes(dr.spec.config)) | {"d2t", "t2d"}
    assert sd["d2t"].dtype == np.int64 and sd["t2d"].dtype == bool and sd["fc.weight"].shape == (64, 192)

    back = load_eagle3_hf(str(path), target)
    assert back.spec == dr.spec
    for a, b in zip(jax.tree.leaves(dr.params), jax.tree.leaves(back.params)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    a = opd.speculative_generate(target, dr, PROMPTS, max_new_tokens=8, num_draft_tokens=3, temperature=1.0, seed=3)
    b = opd.speculative_generate(target, back, PROMPTS, max_new_tokens=8, num_draft_tokens=3, temperature=1.0, seed=3)
    assert a.tokens == b.tokens and a.stats["accept_hist"] == b.stats["accept_hist"]

    for key, value, pattern in (("vocab_size", 100, "vocab_size 100 .* target's vocab_size 128"),
                                ("hidden_size", 32, "hidden_size 32 .* target's hidden_size 64")):
        bad = dict(hf, **{key: value})
        (path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(opd.CheckpointError, match=pattern):
            load_eagle3_hf(str(path), target)
    (path / "config.json").write_text(json.dumps(hf))
    (path / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(opd.CheckpointError, match="cannot read safetensors"):
        load_eagle3_hf(str(path), target)


def _numpy_eagle3_reference(sd, cfg, emb_TD, feat_TD):
    """EAGLE-3's layer written from the public tensors (HF layouts), whole sequence, causal."""
    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

    T, D = feat_TD.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = np.concatenate([rms(emb_TD, sd["midlayer.input_layernorm.weight"]), rms(feat_TD, sd["midlayer.hidden_norm.weight"])], -1)
    q = (x @ sd["midlayer.self_attn.q_proj.weight"].T).reshape(T, N, H)
    k = (x @ sd["midlayer.self_attn.k_proj.weight"].T).reshape(T, K, H)
    v = (x @ sd["midlayer.self_attn.v_proj.weight"].T).reshape(T, K, H)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = lambda t: np.concatenate([-t[..., H // 2 :], t[..., : H // 2]], -1)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
    s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(H) + np.where(np.tril(np.ones((T, T))) > 0, 0.0, -np.inf)[None]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = np.einsum("nts,snh->tnh", p, v).reshape(T, N * H) @ sd["midlayer.self_attn.o_proj.weight"].T
    h = feat_TD + a
    m = rms(h, sd["midlayer.post_attention_layernorm.weight"])
    g = m @ sd["midlayer.mlp.gate_proj.weight"].T
    h = h + (g / (1 + np.exp(-g)) * (m @ sd["midlayer.mlp.up_proj.weight"].T)) @ sd["midlayer.mlp.down_proj.weight"].T
    return h, rms(h, sd["norm.weight"]) @ sd["lm_head.weight"].T


def test_model_matches_a_reference_written_from_the_public_layout(target, small_vocab_drafter):
    dr = small_vocab_drafter
    cfg, p = dr.spec.config, dr.params["eagle"]
    p = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), p)  # non-trivial norms
    sd = {k: np.asarray(v, np.float64) for k, v in e3.params_to_hf(cfg, p).items()}
    rng = np.random.RandomState(0)
    aux = [rng.randn(1, 9, 64).astype(np.float32) for _ in range(3)]
    toks = rng.randint(0, 128, (1, 9))
    feat = np.concatenate(aux, -1)[0].astype(np.float64) @ sd["fc.weight"].T
    emb = np.asarray(dr.params["embedding"], np.float64)[toks[0]]
    h_ref, lg_ref = _numpy_eagle3_reference(sd, cfg, emb, feat)
    out = e3.forward(p, cfg, dr.params["embedding"], jnp.asarray(toks), e3.fuse(p, cfg, [jnp.asarray(a) for a in aux]))
    np.testing.assert_allclose(np.asarray(out.hidden_BTD[0]), h_ref, atol=10 * tol(), rtol=0)
    np.testing.assert_allclose(np.asarray(out.logits_BTW[0]), lg_ref, atol=10 * tol(), rtol=0)


def test_every_parameter_has_logical_axes(small_vocab_drafter):
    import flax.linen as nn

    boxed = e3.abstract_params(small_vocab_drafter.spec.config)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == len(x.value.shape) for x in leaves)


def test_warm_start_is_the_targets_logit_lens_at_the_last_fused_layer(target, small_vocab_drafter):
    # (opt-in; see init_eagle3)
    """`warm_start`: fc passes the last fused layer through, the head is the target's final norm
    + output rows at d2t; the decoder layer stays random. warm_start=False: all random."""
    warm = init_eagle3(target, seed=2, token_counts=np.random.RandomState(0).randint(0, 50, target.config.vocab_size),
                       draft_vocab_size=24, special_ids=(7,), target_layers=(0, 1, 0), warm_start=True)
    p, c = warm.params["eagle"], warm.spec.config
    d2t = np.asarray(e3.draft_target_ids(warm.params["vocab"]["d2t"]))
    aux = [np.random.RandomState(i).randn(2, 5, c.hidden_size).astype(np.float32) for i in range(3)]
    fused = e3.fuse(p, c, tuple(jnp.asarray(a) for a in aux))
    np.testing.assert_array_equal(np.asarray(fused), aux[2])
    np.testing.assert_array_equal(np.asarray(p["lm_head"]), np.asarray(target.params["lm_head"])[:, d2t])
    np.testing.assert_array_equal(np.asarray(p["final_norm"]["scale"]), np.asarray(target.params["final_norm"]["scale"]))
    cold = small_vocab_drafter.params["eagle"]  # the default: no warm start
    assert not np.array_equal(np.asarray(cold["fc"]), np.asarray(p["fc"]))
    np.testing.assert_array_equal(np.asarray(cold["attn"]["q"]), np.asarray(p["attn"]["q"]))  # same seed, layer untouched
