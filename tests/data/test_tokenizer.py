"""Tests for opd.data.tokenizer against transformers' GGUF tokenizer and llama.cpp semantics."""

import json
import os
import re

import pytest

from opd.data.assets import asset_path
from opd.data.tokenizer import SUPPORTED_GGUF_PRE_TYPES, Tokenizer

TEXTS = [
    "Hello world! Ünïcödé — naïve café, 日本語のテキスト, Привет мир. ÀÉÎõü ß ﬁ",
    "emoji 🤖🎉👍🏽 and a family 👨‍👩‍👧 \u200b zero width",
    "12345 and 3.14159, x=1234; 1e-9 0x1F 2024-01-02",
    "def f(x):\n\tif x:\n        return x  # tab\n\n\n    pass\r\n\t\t}",
    "<|im_start|>system\nBe nice<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "it's don't I'M we'LL <file_sep>x<|endoftext|>",
    "  leading spaces and trailing   ",
    "a  1\n  2\t3    45",  # whitespace runs before digits: where llama.cpp and transformers differ
]


@pytest.fixture(scope="module")
def gguf_path():
    return asset_path("smollm2_gguf")


@pytest.fixture(scope="module")
def ours(gguf_path):
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gguf")
    os.symlink(gguf_path, d / "model.gguf")
    return transformers.AutoTokenizer.from_pretrained(str(d), gguf_file="model.gguf")


def llamacpp_reference(hf, text):
    """llama.cpp's "smollm" pre-tokenizer = isolate each digit, then the GPT-2 regex on each piece.

    transformers applies only the GPT-2 regex, so we feed it the digit-split pieces one by one."""
    pieces = [p for p in re.split(r"(\d)", text) if p]
    return [i for p in pieces for i in hf.encode(p, add_special_tokens=False)]


def test_special_ids(ours):
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == 1 and ours.bos_token == "<|im_start|>"
    assert ours.eos_token_ids == (2,) and ours.eos_token == "<|im_end|>"
    assert ours.pad_token_id == 2
    assert ours.chat_template.startswith("{% for message in messages %}")


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_matches_llamacpp_semantics(ours, hf, i):
    text = TEXTS[i]
    ids = ours.encode(text)
    assert ids == llamacpp_reference(hf, text)
    assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("i", range(len(TEXTS) - 1))
def test_matches_transformers(ours, hf, i):
    text = TEXTS[i]
    if i == 2:  # "x=1234;  99" has a whitespace run before digits too
        text = text.replace(";  ", "; ")
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


def test_known_transformers_digit_discrepancy(ours, hf):
    # transformers 5.24 ignores tokenizer.ggml.pre == "smollm" (no digit split); llama.cpp and
    # SmolLM2's own tokenizer.json split digits first, so "  " before "1" stays one piece.
    assert [ours.id_to_token(i) for i in ours.encode("a  1")] == ["a", "ĠĠ", "1"]
    assert hf.convert_ids_to_tokens(hf.encode("a  1", add_special_tokens=False)) == ["a", "Ġ", "Ġ", "1"]
    assert [ours.id_to_token(i) for i in ours.encode("12345")] == list("12345")


def test_special_tokens(ours):
    ids = ours.encode(TEXTS[4])
    assert ids.count(1) == 3 and ids.count(2) == 2
    assert ours.decode(ids) == "system\nBe nice\nuser\nHi\nassistant\n"
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi")  # add_bos_token is False
    assert ours.encode_batch(["a", "b c"]) == [ours.encode("a"), ours.encode("b c")]


def test_chat_template(ours, hf):
    msgs = [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42"},
            {"role": "user", "content": "And 1+1?"}]
    text = ours.apply_chat_template(msgs)
    assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ours.apply_chat_template(msgs, template="chatml")
    assert ours.encode(text)[:2] == [1, ours.encode("system")[0]]


def test_from_hf_dir(hf, tmp_path):
    hf.save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    tok = Tokenizer.from_hf_dir(str(tmp_path))
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and tok.pad_token_id == 2
    assert tok.eos_token_ids == (2, 0)
    for text in TEXTS:  # the saved tokenizer.json is transformers' own (GPT-2 split, see above)
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_from_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot load"):
        Tokenizer.from_hf_dir(str(tmp_path))


# ----------------------------------------------------------------------------- synthetic GGUF vocabularies


def _byte_alphabet():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _tiny_meta(pre, **extra):
    tokens = ["<|end|>", "<user>"] + _byte_alphabet() + ["ab", "abc", "12", "123"]
    types = [3, 4] + [1] * (len(tokens) - 2)
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["a b", "1 2", "12 3"],  # no merge makes "abc"
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.eot_token_id": 1,
    }
    meta.update(extra)
    return meta


@pytest.mark.parametrize(
    "pre, text, pieces",
    [
        ("smollm", "ab 12345", ["ab", "Ġ", "1", "2", "3", "4", "5"]),
        ("gpt2", "ab 12345", ["ab", "Ġ12345"]),
        ("qwen2", "ab 12345", ["ab", "Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", "ab 12345", ["ab", "Ġ", "123", "45"]),
        ("default", "a+b 12345", ["a", "+", "b", "Ġ", "123", "45"]),
    ],
)
def test_pre_tokenizers(pre, text, pieces):
    tok = Tokenizer.from_gguf_metadata(_tiny_meta(pre))
    assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)] == pieces


def test_tiny_vocab_behaviour():
    tok = Tokenizer.from_gguf_metadata(_tiny_meta("gpt2"))
    assert tok.vocab_size == 262 and tok.eos_token_ids == (0, 1)
    assert [tok.id_to_token(i) for i in tok.encode("abc123")] == ["ab", "c", "123"]
    assert [tok.id_to_token(i) for i in tok.encode("x<user>y<|end|>")] == ["x", "<user>", "y", "<|end|>"]
    assert tok.decode(tok.encode("x<user>y<|end|>")) == "x<user>y"  # control dropped, user-defined kept
    # Llama-3 vocabularies take a whole word from the vocabulary before merging (ignore_merges).
    llama = Tokenizer.from_gguf_metadata(_tiny_meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": True}))
    assert [llama.id_to_token(i) for i in llama.encode("abc")] == ["abc"]
    assert llama.encode("abc", add_special_tokens=True) == [0] + llama.encode("abc")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tokenizer.ggml.model": "llama"}, "unsupported GGUF tokenizer model 'llama'"),
        ({"tokenizer.ggml.model": None}, "unsupported GGUF tokenizer model None"),
        ({"tokenizer.ggml.pre": "chameleon"}, "unsupported GGUF pre-tokenizer 'chameleon'"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "malformed GGUF merge"),
        ({"tokenizer.ggml.token_type": [1]}, "token_type has 1 entries"),
        ({"tokenizer.ggml.eos_token_id": 10_000}, "eos token id 10000 is outside"),
    ],
)
def test_gguf_errors(change, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        Tokenizer.from_gguf_metadata(_tiny_meta("gpt2", **change))
    assert "smollm" in SUPPORTED_GGUF_PRE_TYPES
