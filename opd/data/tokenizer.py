"""Tokenizer: one class over a `tokenizers.Tokenizer`, built from an HF dir or GGUF metadata.

GGUF files carry their vocabulary as `tokenizer.ggml.*` metadata. For byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`) we rebuild the `tokenizers` pipeline llama.cpp runs:

* the pre-tokenizer named by `tokenizer.ggml.pre` (the regex splits llama.cpp applies in order),
  then the GPT-2 byte-to-unicode mapping;
* BPE with the embedded merges (`ignore_merges` for Llama-3 vocabularies, as llama.cpp does);
* tokens typed CONTROL become special added tokens (matched whole, dropped by
  `decode(skip_special_tokens=True)`), USER_DEFINED ones plain added tokens (matched whole).

Note on "smollm": llama.cpp splits every digit on its own before the GPT-2 regex (as SmolLM2's
own tokenizer.json does with `Digits(individual_digits=True)`). transformers' GGUF loader (5.24)
does not know "smollm" and falls back to the bare GPT-2 regex; the two differ when whitespace
runs meet digits (e.g. "a  1": llama.cpp gives ["a", "ĠĠ", "1"], transformers ["a", "Ġ", "Ġ", "1"]).
We follow llama.cpp / the original tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from opd.checkpoints.gguf_file import read_gguf_metadata
from opd.data import chat

# llama.cpp token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# llama.cpp's fallback for a BPE vocabulary whose pre type it does not recognise.
_LLAMACPP_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regex splits applied in order, or a special marker; ignore_merges)
_PRE_TYPES: dict[str, tuple[tuple[str, ...], bool]] = {
    "smollm": (("<digits>", _GPT2_SPLIT), False),
    "gpt2": ((_GPT2_SPLIT,), False),
    "gpt-2": ((_GPT2_SPLIT,), False),
    "qwen2": ((_QWEN2_SPLIT,), False),
    "llama-bpe": ((_LLAMA3_SPLIT,), True),
    "llama3": ((_LLAMA3_SPLIT,), True),
    "llama-v3": ((_LLAMA3_SPLIT,), True),
    "default": (_LLAMACPP_DEFAULT_SPLITS, False),
}
SUPPORTED_GGUF_PRE_TYPES = tuple(_PRE_TYPES)


def _byte_level_pre_tokenizer(splits: Sequence[str]) -> pre_tokenizers.PreTokenizer:
    steps = []
    for s in splits:
        if s == "<digits>":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(s), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def _unique(ids) -> tuple[int, ...]:
    out = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return tuple(out)


class Tokenizer:
    """Text <-> token ids, special ids, and the model's chat template.

    Attributes:
      vocab_size: number of token ids (added tokens included).
      bos_token_id, pad_token_id: ids or None.
      eos_token_ids: every id that ends generation (EOS, end-of-turn), primary first.
      chat_template: the model's jinja template source, or None.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        vocab_size: int | None = None,
    ):
        self._tok = tokenizer
        self.vocab_size = vocab_size or tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = _unique(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        for what, i in [("bos", bos_token_id), ("pad", pad_token_id)] + [("eos", e) for e in self.eos_token_ids]:
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"{what} token id {i} is outside the vocabulary (size {self.vocab_size})")

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self._tok.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self._tok.id_to_token(self.eos_token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # ------------------------------------------------------------------ text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) are
        matched whole; `add_special_tokens` adds the BOS/EOS the model's post-processor asks for."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[chat.Message],
        add_generation_prompt: bool = True,
        template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Renders `messages` with `template` (a builtin name or jinja source), by default the
        model's own chat template. See `opd.data.chat.render_chat`."""
        return chat.render_chat(
            template if template is not None else self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        """Loads `tokenizer.json` plus special tokens / chat template from `tokenizer_config.json`
        (or `chat_template.jinja`) and EOS ids from `generation_config.json` / `config.json`."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"cannot load {tok_file}: {e}") from e
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))

        def special_id(key: str) -> int | None:
            content = _token_content(cfg.get(key))
            return None if content is None else tok.token_to_id(content)

        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if template is None:
            template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")

        gen_cfg = _read_json(os.path.join(path, "generation_config.json"))
        model_cfg = _read_json(os.path.join(path, "config.json"))
        eos = [special_id("eos_token"), *_as_id_list(gen_cfg.get("eos_token_id")), *_as_id_list(model_cfg.get("eos_token_id"))]
        bos = special_id("bos_token")
        if bos is None:
            bos = gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id"))
        pad = special_id("pad_token")
        if pad is None:
            pad = gen_cfg.get("pad_token_id", model_cfg.get("pad_token_id"))
        return cls(tok, bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad, chat_template=template)

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        """Reads a GGUF file's metadata and builds its tokenizer."""
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata).

        Raises:
          ValueError: a tokenizer model other than byte-level BPE ("gpt2"), an unknown
            `tokenizer.ggml.pre`, or missing/inconsistent vocabulary fields.
        """
        model_type = meta.get("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {model_type!r} (tokenizer.ggml.model); only byte-level "
                "BPE ('gpt2') vocabularies are supported; use the model's HF tokenizer.json instead"
            )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TYPES:
            raise ValueError(
                f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {', '.join(_PRE_TYPES)}"
            )
        splits, ignore_merges = _PRE_TYPES[pre]
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        merge_pairs = []
        for m in merges:
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError(f"malformed GGUF merge {m!r} (expected two tokens separated by one space)")
            merge_pairs.append((parts[0], parts[1]))

        tok = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
        )
        tok.pre_tokenizer = _byte_level_pre_tokenizer(splits)
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            single = ([f"{tokens[bos]}:0"] if add_bos else []) + ["$A:0"] + ([f"{tokens[eos]}:0"] if add_eos else [])
            pair = single + ["$B:1"] + ([f"{tokens[eos]}:1"] if add_eos else [])
            specials = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos and eos != bos else [])
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        eos_ids = [eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
        return cls(
            tok,
            bos_token_id=bos,
            eos_token_ids=[i for i in eos_ids if i is not None],
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            vocab_size=len(tokens),  # a duplicated token string keeps its first id only
        )


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a target checkpoint without its weights (what `opd.load_target` reads):
    a `.gguf` file's metadata, or an HF directory's tokenizer.json and config files."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_hf_dir(path)
