"""Training FLOPs per step and a cumulative counter (for matched-FLOPs comparisons).

Convention (the usual 2N / 6N matmul estimate; attention score/softmax FLOPs, norms and
element-wise ops are ignored):
  * a forward costs 2 * N * tokens, a forward + backward 6 * N * tokens, where N counts the
    parameters (norm scales included, they are negligible) except an embedding table that is
    only looked up: the input embedding counts only when tied to the LM head;
  * target forward (frozen, every step):            2 * N_target * B * T;
  * EAGLE-3 SFT (training-time test, `steps`):      6 * N_drafter * B * T * steps,
    N_drafter = the trainable params (fc, the decoder layer, the draft LM head);
  * DFlash SFT:                                     6 * N_block * B * A * Q
                                                    + 6 * N_context * B * T,
    N_block = trainable params + the target's LM head it runs through (frozen, but the
    backward pass still flows through it), over the A anchored blocks of Q positions;
    N_context = fc + every layer's k/v projections, over all T context positions.
Total per step = target forward + drafter term.

A Draft-OPD step (`opd_step_flops`; prompts padded to P, R rounds of K drafts, buffer S):
  * rollout (forward only): the target's prefill 2 * N_target * B * P and R verify passes of
    K + 1 positions; the drafter's prefill over P and, per round, its drafting (EAGLE-3: K
    chained steps + the K + 1 committed positions' cache entries; DFlash: one block of Q
    positions + the K + 1 new context positions);
  * the target's features over the committed text: 2 * N_target * B * S;
  * the replay (forward + backward): EAGLE-3 unrolls K TTT steps over all S positions (the
    SFT term at T = S) but applies its draft LM head only at the R anchors (2R with error
    anchors); DFlash runs R blocks (2R with error anchors) over an S-token context.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax

from opd.drafters.base import DrafterSpec
from opd.models import dflash as dfm
from opd.models import eagle3 as e3
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig


def _count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def target_matmul_params(config: TransformerConfig) -> int:
    """N_target: all target params but the input embedding (unless tied to the LM head)."""
    n = _count(_unboxed(tfm.abstract_params(config)))
    if not config.tie_word_embeddings:
        n -= config.vocab_size * config.hidden_size
    return n


def _unboxed(boxed):
    return nn.unbox(boxed)


def target_forward_flops(config: TransformerConfig, batch: int, seq_len: int) -> int:
    return 2 * target_matmul_params(config) * batch * seq_len


def eagle3_sft_flops(config: e3.Eagle3Config, batch: int, seq_len: int, steps: int) -> int:
    return 6 * _count(_unboxed(e3.abstract_params(config))) * batch * seq_len * steps


def _dflash_params(config: dfm.DFlashConfig, target_config: TransformerConfig) -> tuple[int, int]:
    """(N_block, N_context) of the module docstring."""
    D, K, H = config.hidden_size, config.num_kv_heads, config.head_dim
    n_block = _count(_unboxed(dfm.abstract_params(config))) + target_config.vocab_size * D
    return n_block, len(config.target_layer_ids) * D * D + config.num_layers * 2 * D * K * H


def dflash_sft_flops(config: dfm.DFlashConfig, target_config: TransformerConfig, batch: int, seq_len: int,
                     num_anchors: int) -> int:
    n_block, n_context = _dflash_params(config, target_config)
    return 6 * n_block * batch * num_anchors * config.block_size + 6 * n_context * batch * seq_len


def sft_step_flops(spec: DrafterSpec, target_config: TransformerConfig, batch: int, seq_len: int,
                   ttt_steps: int = 7, num_anchors: int = 4, cached_features: bool = False) -> int:
    """Total training FLOPs of one SFT step (module docstring). With `cached_features` the
    target forward was paid once when the cache was built (counted then); the step pays only
    EAGLE-3's target LM head over the cached last hidden state (2 * D * V per token)."""
    if cached_features:
        f = 2 * target_config.hidden_size * target_config.vocab_size * batch * seq_len if spec.kind == "eagle3" else 0
    else:
        f = target_forward_flops(target_config, batch, seq_len)
    if spec.kind == "eagle3":
        return f + eagle3_sft_flops(spec.config, batch, seq_len, ttt_steps)
    if spec.kind == "dflash":
        return f + dflash_sft_flops(spec.config, target_config, batch, seq_len, num_anchors)
    raise ValueError(f"no FLOP model for drafter kind {spec.kind!r}")


def opd_step_flops(spec: DrafterSpec, target_config: TransformerConfig, batch: int, prompt_len: int,
                   num_rounds: int, num_draft: int, seq_len: int, error_anchors: bool = False) -> int:
    """Total training FLOPs of one Draft-OPD step (module docstring)."""
    B, P, R, K, S = batch, prompt_len, num_rounds, num_draft, seq_len
    n_t = target_matmul_params(target_config)
    target = 2 * n_t * B * (P + R * (K + 1)) + 2 * n_t * B * S
    if spec.kind == "eagle3":
        n_d = _count(_unboxed(e3.abstract_params(spec.config)))
        rollout = 2 * n_d * B * (P + R * (2 * K + 1))
        n_head = spec.config.hidden_size * spec.config.draft_vocab_size  # applied at the anchors only
        A = R * (2 if error_anchors else 1)
        replay = 6 * (n_d - n_head) * B * S * K + 6 * n_head * B * A * K
    elif spec.kind == "dflash":
        c = spec.config
        n_block, n_ctx = _dflash_params(c, target_config)
        rollout = 2 * n_ctx * B * (P + R * (K + 1)) + 2 * n_block * B * R * c.block_size
        replay = dflash_sft_flops(c, target_config, B, S, R * (2 if error_anchors else 1))
    else:
        raise ValueError(f"no FLOP model for drafter kind {spec.kind!r}")
    return target + rollout + replay


@dataclasses.dataclass
class FlopCounter:
    """Cumulative training FLOPs; `add_step((B, T))` adds one SFT step of that batch shape."""

    spec: Any
    target_config: TransformerConfig
    ttt_steps: int = 7
    num_anchors: int = 4
    total: int = 0

    def add_step(self, batch_shape) -> int:
        B, T = int(batch_shape[0]), int(batch_shape[1])
        self.total += sft_step_flops(self.spec, self.target_config, B, T, self.ttt_steps, self.num_anchors)
        return self.total

    def add(self, flops: int) -> int:
        """Adds FLOPs counted elsewhere (e.g. a Draft-OPD rollout)."""
        self.total += int(flops)
        return self.total
