"""Tests for opd.data.chat: builtin templates against the jinja templates models ship."""

import pytest

from opd.data.assets import asset_path
from opd.data.chat import BUILTIN_TEMPLATES, SMOLLM2_SYSTEM_PROMPT, render_chat

# SmolLM2-135M-Instruct's embedded template, as stored in its GGUF (checked below).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3-Instruct's template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CONVERSATIONS = [
    [],
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "  Another one, with ünïcode 🎨\nand two lines. "},
    ],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Arr!"},
    ],
]


def test_smollm2_template_is_the_embedded_one():
    from opd.checkpoints.gguf_file import read_gguf_metadata

    meta = read_gguf_metadata(asset_path("smollm2_gguf"))
    assert meta["tokenizer.chat_template"] == SMOLLM2_TEMPLATE


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chatml_matches_smollm2_jinja(conv, gen):
    msgs = CONVERSATIONS[conv]
    assert render_chat("chatml", msgs, gen) == render_chat(SMOLLM2_TEMPLATE, msgs, gen)


def test_chatml_example_and_no_default_system():
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_chat("chatml", msgs) == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat("chatml", msgs, default_system_prompt=None) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_llama3_matches_jinja(conv, gen):
    msgs = CONVERSATIONS[conv]
    expected = render_chat(LLAMA3_TEMPLATE, msgs, gen, bos_token="<|begin_of_text|>")
    assert render_chat("llama3", msgs, gen) == expected


def test_llama3_example():
    out = render_chat("llama3", [{"role": "system", "content": "S"}, {"role": "user", "content": " U "}])
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_qwen3_thinking_switch():
    msgs = [{"role": "user", "content": "Hi"}]
    base = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat("qwen3", msgs) == base
    assert render_chat("qwen3", msgs, enable_thinking=True) == base
    assert render_chat("qwen3", msgs, enable_thinking=False) == base + "<think>\n\n</think>\n\n"
    assert render_chat("qwen3", msgs, add_generation_prompt=False, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_qwen3_history_drops_old_reasoning():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"},
    ]
    assert render_chat("qwen3", msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n"
    )


def test_jinja_helpers_and_kwargs():
    tpl = (
        "{% if messages|length == 0 %}{{ raise_exception('empty') }}{% endif %}"
        "{{ bos_token }}{{ messages[0].content|tojson }}|{{ strftime_now('%Y')|length }}|{{ custom }}"
    )
    out = render_chat(tpl, [{"role": "user", "content": "é"}], bos_token="<s>", custom="x")
    assert out == '<s>"é"|4|x'
    with pytest.raises(ValueError, match="chat template error: empty"):
        render_chat(tpl, [])


def test_sandbox_blocks_unsafe_access():
    tpl = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ValueError, match="failed to render"):
        render_chat(tpl, [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="failed to render"):
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


def test_errors():
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="does not parse"):
        render_chat("{% for %}", [])
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        render_chat("chatml", [{"content": "x"}])
    with pytest.raises(TypeError):
        render_chat("chatml", "just a string")
    with pytest.raises(ValueError, match="unsupported role 'tool'"):
        render_chat("qwen3", [{"role": "tool", "content": "x"}])
    assert set(BUILTIN_TEMPLATES) == {"chatml", "qwen3", "llama3"}
