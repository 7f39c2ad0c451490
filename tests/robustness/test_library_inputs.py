"""Bad inputs to the public decoding API are clear errors raised before any JAX work:
malformed prompt lists (`opd.PromptError`) and a drafter built for a target of another width."""

import dataclasses

import numpy as np
import pytest

import opd
from conftest import make_target


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=3)  # vocab 128, hidden 64, 2 layers, no tokenizer


@pytest.fixture(scope="module")
def ngram(target):
    return opd.init_drafter("ngram", target)


BAD_PROMPTS = [  # prompts, what the message must say
    pytest.param([], "prompts is empty", id="empty"),
    pytest.param(None, "must be a list .* got NoneType", id="none"),
    pytest.param(7, "must be a list .* got int", id="int"),
    pytest.param(b"\x05\x06", "must be a list .* got bytes", id="bytes"),
    pytest.param([5, 6, 7], "flat list of ints.*\\[\\[id, id", id="flat_ints"),
    pytest.param([None], "prompt 0 must be a string or a flat list of integer token ids, got NoneType", id="row_none"),
    pytest.param([[1, 2], b"\x05\x06"], "prompt 1 .* got bytes", id="row_bytes"),  # bytes iterate as ints: never token ids
    pytest.param([[1.0, 2.0]], "prompt 0 .* got an element float 1.0", id="row_floats"),
    pytest.param([[1, 2.5]], "prompt 0 .* got an element float 2.5", id="row_mixed_float"),
    pytest.param([["hello", "world"]], "prompt 0 .* got an element str 'hello'", id="row_strings"),
    pytest.param([["1", "2"]], "prompt 0 .* got an element str '1'", id="row_digit_strings"),  # int("1") passed silently
    pytest.param([[[1, 2]]], "prompt 0 .* got an element list", id="row_nested"),
    pytest.param([[True, False]], "prompt 0 .* got an element bool", id="row_bools"),
    pytest.param([np.zeros((2, 3), np.int32)], "prompt 0 .* array of shape \\(2, 3\\)", id="row_2d_array"),
    pytest.param([np.array([1.0, 2.0])], "prompt 0 .* dtype float64", id="row_float_array"),
]


@pytest.mark.parametrize("prompts,message", BAD_PROMPTS)
def test_generate_rejects_malformed_prompts(target, prompts, message):
    with pytest.raises(opd.PromptError, match=message):
        opd.generate(target, prompts, max_new_tokens=2)


@pytest.mark.parametrize("prompts,message", BAD_PROMPTS[:7])
def test_speculative_generate_rejects_malformed_prompts(target, ngram, prompts, message):
    with pytest.raises(opd.PromptError, match=message):
        opd.speculative_generate(target, ngram, prompts, max_new_tokens=2)


def test_legitimate_prompt_forms_still_decode(target):
    """Lists / tuples / ranges / 1-D integer arrays (numpy, jax) of ids, ragged, in a list or a
    tuple: the same tokens as plain lists."""
    import jax.numpy as jnp

    plain = opd.generate(target, [[5, 6, 7], [17, 3]], max_new_tokens=3).tokens
    for forms in ([range(5, 8), (17, 3)], ([5, 6, 7], np.array([17, 3], np.int64)),
                  [np.array([5, 6, 7], np.int32), (np.int32(17), 3)], [jnp.array([5, 6, 7]), [17, 3]]):
        assert opd.generate(target, forms, max_new_tokens=3).tokens == plain


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_drafter_for_another_hidden_size_is_a_clear_error(target, kind):
    """A drafter built for a 64-wide target, run on a 32-wide one (same vocabulary and depth).
    Parameters are None on both sides: any JAX work before the check would fail differently."""
    from opd.drafters.dflash import DFlashSpec, config_for_target
    from opd.drafters.eagle3 import Eagle3Config, Eagle3Spec

    V = target.config.vocab_size
    spec = (Eagle3Spec(V, config=Eagle3Config.for_target(target.config, target_layers=(0, 1, 0), draft_vocab_size=32))
            if kind == "eagle3" else
            DFlashSpec(V, config=config_for_target(target, target_layer_ids=(1,), block_size=4), target_config=target.config))
    narrow = opd.Target(dataclasses.replace(target.config, hidden_size=32), params=None)
    with pytest.raises(ValueError, match=f"hidden size mismatch: the {kind} drafter reads target hidden states of "
                                         "width 64, this target's hidden_size is 32"):
        opd.speculative_generate(narrow, opd.Drafter(spec), [[5, 9, 2]], max_new_tokens=2, num_draft_tokens=2)


def test_drafter_reading_layers_the_target_lacks_is_a_clear_error(target):
    deep = opd.init_drafter("ngram", target).spec  # any spec: the layer check is the engine's, not the kind's
    spec = dataclasses.replace(deep, target_hidden_layers=(0, 5))
    with pytest.raises(ValueError, match=r"layer mismatch: the ngram drafter reads target layers \(0, 5\), this "
                                         "target has 2 layers"):
        opd.speculative_generate(target, opd.Drafter(spec), [[5, 9, 2]], max_new_tokens=2)
