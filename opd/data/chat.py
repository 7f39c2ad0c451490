"""Chat templates: the model's own jinja template, or a builtin one written in Python.

`render_chat(template, messages)` takes either a jinja source string (as shipped in a GGUF's
`tokenizer.chat_template` or an HF `tokenizer_config.json`) or a builtin name:

* "chatml": SmolLM2's ChatML; like SmolLM2's embedded template it inserts SmolLM2's default
  system prompt when the conversation does not start with a system message
  (`default_system_prompt=None` turns that off).
* "qwen3": Qwen3's ChatML with thinking: earlier assistant turns lose their `<think>` block;
  `enable_thinking=False` appends an empty `<think>\\n\\n</think>\\n\\n` to the generation prompt.
* "llama3": Llama-3 headers and `<|eot_id|>`.

Jinja templates run in `ImmutableSandboxedEnvironment` (no file or attribute access beyond the
sandbox), with the helpers transformers provides (`raise_exception`, `strftime_now`, a `tojson`
that keeps non-ASCII text).
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Callable, Mapping, Sequence

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

Message = Mapping[str, Any]


def _check_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
        out.append(dict(m))
    return out


# ----------------------------------------------------------------------------- builtins


def _chatml(messages, add_generation_prompt, default_system_prompt=SMOLLM2_SYSTEM_PROMPT, **_):
    parts = []
    if messages and messages[0]["role"] != "system" and default_system_prompt is not None:
        parts.append(f"<|im_start|>system\n{default_system_prompt}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _split_thinking(content: str) -> tuple[str, str]:
    """Splits an assistant message into (reasoning, answer) the way Qwen3's template does."""
    if "</think>" not in content:
        return "", content
    pieces = content.split("</think>")
    reasoning = pieces[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, pieces[-1].lstrip("\n")


def _qwen3(messages, add_generation_prompt, enable_thinking=True, **_):
    parts = []
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role in ("system", "user"):
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning, content = _split_thinking(content)
            # Reasoning is kept only after the last user query (the turn being continued).
            if i > last_user and (i == len(messages) - 1 or reasoning):
                reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                parts.append(f"<|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{content}<|im_end|>\n")
            else:
                parts.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
        else:
            raise ValueError(f"qwen3 builtin template: unsupported role {role!r} (use the model's jinja template)")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
        if enable_thinking is False:
            parts.append("<think>\n\n</think>\n\n")
    return "".join(parts)


def _llama3(messages, add_generation_prompt, bos_token=None, **_):
    bos = "<|begin_of_text|>" if bos_token is None else bos_token
    parts = []
    for i, m in enumerate(messages):
        if i == 0:
            parts.append(bos)
        parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


BUILTIN_TEMPLATES: dict[str, Callable[..., str]] = {"chatml": _chatml, "qwen3": _qwen3, "llama3": _llama3}


# ----------------------------------------------------------------------------- jinja


def _raise_exception(message):
    raise ValueError(f"chat template error: {message}")


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """Renders a conversation to the prompt text a chat model expects.

    Args:
      template: a builtin name (see `BUILTIN_TEMPLATES`) or a jinja template source.
      messages: list of {"role": "system"|"user"|"assistant"|..., "content": str}.
      add_generation_prompt: append the header that starts the assistant's reply.
      bos_token, eos_token: exposed to jinja templates (and used by "llama3" for BOS).
      **kwargs: template variables, e.g. `enable_thinking=False` (qwen3),
        `default_system_prompt=None` (chatml), `tools=[...]` (jinja).

    Returns:
      The rendered text; special tokens appear as text and are matched whole by the tokenizer.

    Raises:
      ValueError: no template, malformed messages, a template that fails or calls
        `raise_exception`.
    """
    if template is None:
        raise ValueError(
            "this model has no chat template; pass a builtin template name "
            f"({', '.join(BUILTIN_TEMPLATES)}) or a jinja template"
        )
    msgs = _check_messages(messages)
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template](msgs, add_generation_prompt, bos_token=bos_token, eos_token=eos_token, **kwargs)
    compiled = _compile(template)
    import jinja2

    try:
        return compiled.render(
            messages=msgs,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token if bos_token is not None else "",
            eos_token=eos_token if eos_token is not None else "",
            **kwargs,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from e
