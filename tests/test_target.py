"""`opd.load_target` on HF directories: parity through the public API, tokenizer wiring, errors."""

import json
import os

import numpy as np
import pytest
import tokenizers
import torch

import opd
from conftest import make_hf_model, tol


def _save(model, tmp_path, vocab_words=None):
    model.save_pretrained(tmp_path, safe_serialization=True)
    if vocab_words is not None:
        vocab = {w: i for i, w in enumerate(vocab_words)}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=vocab_words[0]))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok.save(os.path.join(tmp_path, "tokenizer.json"))
        with open(os.path.join(tmp_path, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": vocab_words[1], "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}, f)
    return str(tmp_path)


def test_load_hf_dir_logits_and_generation(tmp_path):
    model, _ = make_hf_model("qwen3_qknorm", seed=5)
    path = _save(model, tmp_path, ["<unk>", "<eos>"] + [f"w{i}" for i in range(100)])
    target = opd.load_target(path)
    assert target.config.family == "qwen3" and target.tokenizer.eos_token_ids == (1,)
    tokens = np.random.RandomState(0).randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(target.logits(tokens)) - ref).max() <= tol()
    # String prompts: the model's own chat template, then its tokenizer.
    out = opd.generate(target, ["w3 w7 w9"], max_new_tokens=5, eos_token_ids=())
    ids = target.tokenizer.encode("w3 w7 w9 ")
    assert out.tokens == opd.generate(target, [ids], max_new_tokens=5, eos_token_ids=()).tokens


def test_scan_layers_load_matches_unrolled(tmp_path):
    model, _ = make_hf_model("llama", seed=6)
    path = _save(model, tmp_path)
    tokens = np.arange(10)[None] % 128
    a = opd.load_target(path).logits(tokens)
    b = opd.load_target(path, scan_layers=True).logits(tokens)
    np.testing.assert_allclose(a, b, atol=tol())
    prompts = [[3, 4, 5], [9] * 7]
    assert opd.generate(opd.load_target(path), prompts, max_new_tokens=6).tokens == \
        opd.generate(opd.load_target(path, scan_layers=True), prompts, max_new_tokens=6).tokens


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    model, _ = make_hf_model("llama")
    path = _save(model, tmp_path, ["<unk>", "<eos>"] + [f"w{i}" for i in range(200)])
    with pytest.raises(opd.CheckpointError, match="vocab mismatch"):
        opd.load_target(path)


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(opd.CheckpointError, match="does not exist"):
        opd.load_target(str(tmp_path / "nope"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(opd.CheckpointError, match=r"\.gguf"):
        opd.load_target(str(f))
    g = tmp_path / "model.gguf"
    g.write_bytes(b"NOTGGUF" * 4)
    with pytest.raises(opd.CheckpointError, match="not a GGUF file"):
        opd.load_target(str(g))
