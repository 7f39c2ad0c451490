"""Training FLOPs per step (for matched-FLOPs comparisons; the loop keeps the cumulative count).

Convention (the usual 2N / 6N matmul estimate; attention score/softmax FLOPs, norms and
element-wise ops are ignored):
  * a forward costs 2 * N * tokens, a forward + backward 6 * N * tokens, where N counts the
    parameters (norm scales included, they are negligible) except an embedding table that is
    only looked up: the input embedding counts only when tied to the LM head;
  * target forward (frozen, every step):            2 * N_target * B * T;
  * the drafter's part: `spec.sft_flops` (each kind documents its own: e.g. EAGLE-3's
    6 * N_drafter * B * T * ttt_steps).
Total per step = target forward + drafter term.

Accounting (what matched-FLOPs comparisons price): every method is charged the target forwards
it uses. An SFT step that reads cached target features is charged the target forward over its
rows as if it computed them (the cache saves wall-clock, not FLOPs), so SFT pays for its feature
extraction at every read, like Draft-OPD pays for its rollouts and teacher passes.
`sft_step_flops(..., cached_features=True)` is the compute a cached step actually performs
(the throughput benchmark's model GFLOP/s), not what it is charged.

A Draft-OPD step (`opd_step_flops`; prompts padded to P, R rounds of K drafts, buffer S):
  * rollout (forward only): the target's prefill 2 * N_target * B * P and R verify passes of
    K + 1 positions; they also give the replay its target features (kept, no third pass);
  * the drafter's drafting in the rollout and the replay (forward + backward):
    `spec.opd_flops`;
  * with gradient accumulation (`OPDConfig.accumulate` = A micro-batches per step): A times that.
"""

from __future__ import annotations

import math

import jax

from opd.models import transformer as tfm
from opd.models.config import TransformerConfig


def count_params(tree) -> int:
    """Number of parameters of a tree of arrays / ShapeDtypeStructs (logical boxes allowed)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def target_matmul_params(config: TransformerConfig) -> int:
    """N_target: all target params but the input embedding (unless tied to the LM head)."""
    n = count_params(tfm.abstract_params(config))
    if not config.tie_word_embeddings:
        n -= config.vocab_size * config.hidden_size
    return n


def target_forward_flops(config: TransformerConfig, batch: int, seq_len: int) -> int:
    return 2 * target_matmul_params(config) * batch * seq_len


def sft_step_flops(spec, target_config: TransformerConfig, batch: int, seq_len: int, loss_config,
                   cached_features: bool = False) -> int:
    """Total training FLOPs of one SFT step (module docstring). With `cached_features`: the
    compute a step on cached features performs (the accounting charges the online count): only
    the target LM head's columns it reads over the cached last hidden state (2 * D * W per
    token, W = `spec.teacher_columns` or V) when the drafter's loss reads the target's logits
    (`spec.needs_final_hidden`)."""
    if cached_features:
        cols = spec.teacher_columns or target_config.vocab_size
        f = 2 * target_config.hidden_size * cols * batch * seq_len if spec.needs_final_hidden else 0
    else:
        f = target_forward_flops(target_config, batch, seq_len)
    return f + spec.sft_flops(target_config, batch, seq_len, loss_config)


def opd_step_flops(spec, target_config: TransformerConfig, batch: int, prompt_len: int, num_rounds: int,
                   num_draft_tokens: int, seq_len: int, error_anchors: bool = False, accumulate: int = 1) -> int:
    """Total training FLOPs of one Draft-OPD step (module docstring): `accumulate` micro-batches
    of `batch` prompts each."""
    B, P, R, K, S = batch, prompt_len, num_rounds, num_draft_tokens, seq_len
    n_t = target_matmul_params(target_config)
    target = 2 * n_t * B * (P + R * (K + 1))  # prefill + verify passes (their features are the replay's)
    return int(accumulate) * (target + spec.opd_flops(target_config, B, P, R, K, S, error_anchors))
