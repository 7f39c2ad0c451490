"""`opd.Target`: a frozen target model (config + params + tokenizer), `opd.load_target` and
`load_target_from_config` (a launch config's target, loaded once per process)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from opd.checkpoints.errors import CheckpointError
from opd.checkpoints.gguf_file import open_gguf, read_gguf_checkpoint, read_gguf_metadata
from opd.checkpoints.hf import read_hf_checkpoint
from opd.data.tokenizer import Tokenizer
from opd.models import presets
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig
from opd.paths import resolve_path


@dataclasses.dataclass
class Target:
    """A target LLM. `params` is a plain pytree; `tokenizer` may be None for id-only use."""

    config: TransformerConfig
    params: Any
    tokenizer: Any = None
    source: Optional[str] = None

    @property
    def eos_token_ids(self) -> tuple:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return tuple(self.tokenizer.eos_token_ids)
        return tuple(self.config.eos_token_ids)

    def logits(self, tokens_BT) -> jax.Array:
        """Whole-sequence causal forward: [B, T] int32 -> [B, T, V] float32."""
        return _logits_jit(self.params, jnp.asarray(tokens_BT, jnp.int32), config=self.config)

    def forward(self, tokens_BT, hidden_layers=()):
        """Final-normed hidden [B, T, D] and the requested layers' outputs (see transformer.py)."""
        return _forward_jit(self.params, jnp.asarray(tokens_BT, jnp.int32), config=self.config, hidden_layers=tuple(hidden_layers))


@functools.partial(jax.jit, static_argnames=("config",))
def _logits_jit(params, tokens_BT, *, config):
    return tfm.lm_head(params, config, tfm.forward(params, config, tokens_BT).hidden_BTD)


@functools.partial(jax.jit, static_argnames=("config", "hidden_layers"))
def _forward_jit(params, tokens_BT, *, config, hidden_layers):
    out = tfm.forward(params, config, tokens_BT, hidden_layers=hidden_layers)
    return out.hidden_BTD, out.aux_hidden


def load_target(path: str, *, dtype: str = "float32", param_dtype: str = "float32", scan_layers: bool = False, remat: bool = False) -> Target:
    """Loads a target from an HF directory (config.json + *.safetensors) or a `.gguf` file.

    Only safetensors and GGUF are read: nothing is unpickled and no checkpoint code runs.
    Raises CheckpointError (or ConfigError) naming the problem for bad input.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(f"{path}: a file checkpoint must be a .gguf file (or pass an HF directory)")
        reader = open_gguf(path)
        config, state = read_gguf_checkpoint(path, reader)
        tokenizer = Tokenizer.from_gguf_metadata(read_gguf_metadata(reader))
    else:
        config, state = read_hf_checkpoint(path)
        tokenizer = Tokenizer.from_hf_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
            f"{config.vocab_size} rows (vocab mismatch between tokenizer and weights)"
        )
    config = config.replace(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)
    params = jax.tree.map(jnp.asarray, tfm.params_from_hf(config, state))
    return Target(config, params, tokenizer, source=path)


def load_target_from_config(config) -> Target:
    """The config's target, loaded once per process (stages of one launch share it).

    `config.target` (`opd.configs.default_config`): `path` (a path spec, `opd.paths.resolve_path`),
    `dtype`, `param_dtype`, `scan_layers`, `remat`; with `preset` set, the checkpoint's
    architecture must be that preset's (`opd.models.presets`)."""
    t = config.target
    target = _load_target_cached(resolve_path(t.path), t.dtype, bool(t.scan_layers), t.param_dtype, bool(t.remat))
    if t.preset:
        presets.check_against(t.preset, target.config)
    return target


@functools.lru_cache(maxsize=1)
def _load_target_cached(path: str, dtype: str, scan_layers: bool, param_dtype: str, remat: bool) -> Target:
    return load_target(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)
