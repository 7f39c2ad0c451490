"""Target transformer: parity with transformers, cached decoding, scan/remat, hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import FAMILIES, make_hf_model, tol
from opd.models import transformer as tfm
from opd.models.config import ConfigError, TransformerConfig

# Jitted once per shape: much faster than op-by-op execution on CPU.
_forward = jax.jit(tfm.forward, static_argnames=("config", "hidden_layers"))
_lm_head = jax.jit(tfm.lm_head, static_argnames=("config",))


def _ours(hf_model, hf_dict, **cfg_overrides):
    config = TransformerConfig.from_hf(hf_dict, **cfg_overrides)
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    return config, jax.tree.map(jnp.asarray, tfm.params_from_hf(config, sd))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_hidden_match_transformers(family):
    model, d = make_hf_model(family)
    config, params = _ours(model, d)
    tokens = np.random.RandomState(0).randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = model(torch.tensor(tokens), output_hidden_states=True)
    out = _forward(params, config, jnp.asarray(tokens), hidden_layers=(0, 1))
    logits = _lm_head(params, config, out.hidden_BTD)
    assert np.abs(np.asarray(logits) - ref.logits.numpy()).max() <= tol()
    for j, layer in enumerate((0, 1)):
        # Layer i's output is transformers' hidden_states[i + 1] (the last one is post-norm there).
        want = ref.hidden_states[layer + 1].numpy()
        if layer + 1 == config.num_layers:
            continue
        assert np.abs(np.asarray(out.aux_hidden[j]) - want).max() <= tol()


@pytest.mark.parametrize("scan", [False, True])
def test_cached_incremental_equals_full_forward(scan):
    model, d = make_hf_model("qwen3_qknorm")
    config, params = _ours(model, d, scan_layers=scan)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (3, 19)))
    full = _lm_head(params, config, _forward(params, config, tokens).hidden_BTD)
    cache = tfm.init_cache(config, 3, 32)
    pieces, start = [], 0
    for size in (5, 1, 4, 1, 8):  # prefill, single steps and multi-token (verify-sized) chunks
        o = _forward(params, config, tokens[:, start:start + size], cache=cache)
        cache = o.cache
        pieces.append(_lm_head(params, config, o.hidden_BTD))
        start += size
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=tol())
    np.testing.assert_array_equal(cache.lengths, [19, 19, 19])


def test_ragged_cache_rows_advance_independently():
    model, d = make_hf_model("llama")
    config, params = _ours(model, d)
    rs = np.random.RandomState(2)
    seqs = [rs.randint(0, 128, n) for n in (7, 3)]
    # Row b has seqs[b] in the cache; then each row gets two new tokens at its own position.
    cache = tfm.init_cache(config, 2, 16)
    pad = np.zeros((2, 7), np.int32)
    pad[0, :7], pad[1, :3] = seqs[0], seqs[1]
    cache = _forward(params, config, jnp.asarray(pad), cache=cache).cache._replace(lengths=jnp.array([7, 3], jnp.int32))
    new = rs.randint(0, 128, (2, 2))
    o = _forward(params, config, jnp.asarray(new), cache=cache)
    got = _lm_head(params, config, o.hidden_BTD)
    for b in range(2):
        full = np.concatenate([seqs[b], new[b]])[None]
        want = _lm_head(params, config, _forward(params, config, jnp.asarray(full)).hidden_BTD)[0, -2:]
        np.testing.assert_allclose(got[b], want, atol=tol())
    np.testing.assert_array_equal(o.cache.lengths, [9, 5])


def test_scan_and_remat_match_unrolled_including_gradients():
    model, d = make_hf_model("qwen2_bias_tied")
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 128, (2, 9)))
    results = []
    for kw in ({}, {"scan_layers": True, "remat": True}):
        config, params = _ours(model, d, **kw)

        def loss(p):
            return jnp.mean(jax.nn.log_softmax(tfm.lm_head(p, config, tfm.forward(p, config, tokens).hidden_BTD))[..., 0])

        val, grad = jax.value_and_grad(loss)(params)
        emb_grad = grad["embedding"]
        results.append((val, emb_grad))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=tol())
    np.testing.assert_allclose(results[0][1], results[1][1], atol=tol())


def test_every_param_has_logical_axes():
    model, d = make_hf_model("qwen3_qknorm")
    for scan in (False, True):
        config = TransformerConfig.from_hf(d, scan_layers=scan)
        boxed = tfm.abstract_params(config)
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
        assert leaves and all(hasattr(x, "names") and len(x.names) == len(x.value.shape) for x in leaves)


def test_config_errors_are_clear():
    _, d = make_hf_model("llama")
    with pytest.raises(ConfigError, match="unsupported architecture"):
        TransformerConfig.from_hf({**d, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    bad = dict(d)
    del bad["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        TransformerConfig.from_hf(bad)
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        TransformerConfig.from_hf({**d, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="rope scaling type"):
        TransformerConfig.from_hf({**d, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    config = TransformerConfig.from_hf(d)
    with pytest.raises(ValueError, match="hidden layer 5 out of range"):
        tfm.forward(tfm.init_params(config, jax.random.PRNGKey(0)), config, jnp.zeros((1, 2), jnp.int32), hidden_layers=(5,))
