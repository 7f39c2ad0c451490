"""The real SmolLM2-135M-Instruct GGUF: our loading, logits and greedy decoding vs transformers'."""

import numpy as np
import pytest
import torch

import opd

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of the 🦀 Rust language — briefly, en français.",
]

# Both sides dequantise the same Q4_1/Q8_0 blocks to float32 (checked bit-exactly in
# tests/checkpoints); the remaining difference is float32 summation order over 30 layers.
LOGITS_ATOL = 2e-3


def _chat_ids(target, text):
    return target.tokenizer.encode(target.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_config_and_tokenizer(smollm2_target):
    c = smollm2_target.config
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings
    assert smollm2_target.tokenizer.eos_token_ids == (2,)


def test_logits_match_transformers_gguf_loading(smollm2_target, smollm2_hf):
    model, _ = smollm2_hf
    for text in PROMPTS[:3]:
        ids = _chat_ids(smollm2_target, text)
        ours = np.asarray(smollm2_target.logits(np.array([ids])))[0]
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(ours - ref).max() <= LOGITS_ATOL, np.abs(ours - ref).max()
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0


def test_greedy_generation_matches_transformers_token_for_token(smollm2_target, smollm2_hf):
    model, _ = smollm2_hf
    prompts = [_chat_ids(smollm2_target, p) for p in PROMPTS]
    ours = opd.generate(smollm2_target, prompts, max_new_tokens=32).tokens  # one ragged batch
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=2)
        ref = ref[0, len(ids):].tolist()
        if 2 in ref:
            ref = ref[: ref.index(2)]
        assert got == ref, (smollm2_target.tokenizer.decode(got), smollm2_target.tokenizer.decode(ref))


def test_string_prompts_use_the_chat_template(smollm2_target):
    out = opd.generate(smollm2_target, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in smollm2_target.tokenizer.decode(out.tokens[0])
