"""Autoregressive generation on tiny random models: equals transformers, ragged batches, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import opd
from conftest import make_hf_model
from opd.decoding.sampling import SamplingParams, process_logits
from opd.models import transformer as tfm


@pytest.fixture(scope="module")
def tiny():
    model, d = make_hf_model("llama", seed=3)
    config = opd.TransformerConfig.from_hf(d)
    params = jax.tree.map(jnp.asarray, tfm.params_from_hf(config, {k: v.detach().numpy() for k, v in model.state_dict().items()}))
    return model, opd.Target(config, params)


PROMPTS = [[5, 9, 2], [17] * 11, [1], list(range(40, 70))]


def test_greedy_equals_transformers_token_for_token(tiny):
    model, target = tiny
    out = opd.generate(target, PROMPTS, max_new_tokens=24)
    for prompt, got in zip(PROMPTS, out.tokens):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        assert got == ref
    assert out.stats["generated_tokens"] == 4 * 24
    assert out.stats["target_forwards"] == 24


def test_ragged_batch_equals_one_by_one_and_chunked(tiny):
    _, target = tiny
    together = opd.generate(target, PROMPTS, max_new_tokens=10).tokens
    assert together == [opd.generate(target, [p], max_new_tokens=10).tokens[0] for p in PROMPTS]
    assert together == opd.generate(target, PROMPTS, max_new_tokens=10, batch_size=3).tokens


def test_eos_truncates_and_stops(tiny):
    _, target = tiny
    free = opd.generate(target, PROMPTS[:2], max_new_tokens=12).tokens
    eos = free[0][4]
    out = opd.generate(target, PROMPTS[:2], max_new_tokens=12, eos_token_ids=[eos])
    first = free[0].index(eos)
    assert out.tokens[0] == free[0][:first]
    assert eos not in out.tokens[1]
    assert out.tokens[1] == free[1][: len(out.tokens[1])]


def test_sampling_is_seeded_and_follows_filters(tiny):
    _, target = tiny
    a = opd.generate(target, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7).tokens
    b = opd.generate(target, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7).tokens
    c = opd.generate(target, PROMPTS, max_new_tokens=8, temperature=1.0, seed=8).tokens
    assert a == b and a != c
    # top_k=1 sampling is greedy decoding.
    assert opd.generate(target, PROMPTS, max_new_tokens=8, temperature=0.8, top_k=1).tokens == \
        opd.generate(target, PROMPTS, max_new_tokens=8).tokens


def test_process_logits_hand_computed():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1]]))
    p = np.exp(process_logits(logits, SamplingParams(temperature=1.0, top_p=0.6)))
    np.testing.assert_allclose(p, [[5 / 9, 2 / 9, 2 / 9, 0.0]], atol=1e-6)  # ties at the cut are kept
    p = np.exp(process_logits(logits, SamplingParams(temperature=1.0, top_k=1)))
    np.testing.assert_allclose(p, [[1.0, 0, 0, 0]], atol=1e-6)
    p = np.exp(process_logits(logits, SamplingParams(temperature=0.5)))
    want = np.array([0.25, 0.04, 0.04, 0.01]) / 0.34
    np.testing.assert_allclose(p, [want], atol=1e-6)


def test_bad_input_is_a_clear_error(tiny):
    _, target = tiny
    with pytest.raises(opd.PromptError, match="prompt 1 is too long"):
        opd.generate(target, [[1, 2], list(range(100)) * 3], max_new_tokens=4)
    with pytest.raises(opd.PromptError, match="prompt 0 is empty"):
        opd.generate(target, [[]], max_new_tokens=4)
    with pytest.raises(opd.PromptError, match="outside the vocabulary"):
        opd.generate(target, [[1, 500]], max_new_tokens=4)
    with pytest.raises(opd.PromptError, match="need a tokenizer"):
        opd.generate(target, ["hello"], max_new_tokens=4)
    with pytest.raises(opd.PromptError, match="max_new_tokens"):
        opd.generate(target, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        opd.generate(target, [[1]], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        opd.generate(target, [[1]], temperature=1.0, top_p=0.0)


def test_prompt_lengths_in_one_bucket_reuse_the_compiled_loop(tiny):
    from opd.decoding.generate import _generate_jit

    _, target = tiny
    opd.generate(target, [[1] * 17, [2] * 20], max_new_tokens=5)  # bucket 24, batch 2
    before = _generate_jit._cache_size()
    opd.generate(target, [[3] * 24, [4] * 18], max_new_tokens=5)
    opd.generate(target, [[5] * 21], max_new_tokens=5, batch_size=2)  # batch 1 -> own bucket
    assert _generate_jit._cache_size() == before + 1
