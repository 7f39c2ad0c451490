"""DFlash drafter: lossless in the engine, context cache equal to a from-scratch computation,
sampling, block-size limit, z-lab HF layout round trip and fit checks."""

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
from opd.drafters.dflash import init_dflash
from opd.drafters.dflash import model as dfm
from opd.models import transformer as tfm

BLOCK = 4
PROMPTS = [[5, 9, 2, 5, 9], [17] * 11, [1], list(range(40, 70)) + list(range(40, 50))]


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


@pytest.mark.parametrize("num_draft_tokens", [1, 3])
def test_greedy_equals_autoregressive(target, drafter, num_draft_tokens):
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
        load_dflash_hf(edited(dflash_config={"target_layer_ids": [1, 2, 3]}), target)  # fc width disagrees
    with pytest.raises(opd.CheckpointError, match="not a DFlash v1 drafter"):
        load_dflash_hf(edited(architectures=["DFlash2DraftModel"]), target)
