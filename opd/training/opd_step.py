"""The Draft-OPD training step: rollout + replay + acceptance-aware loss + AdamW update of the
drafter, in one `jax.jit` with explicit shardings and the train state donated (DESIGN §7).

  1. rollout (no gradient): R recorded rounds of real speculative decoding from the batch's
     prompts with the current drafter at the rollout temperature (`opd.training.rollout`);
  2. the target's features over the committed text (one more target forward, no gradient);
  3. replay (gradient): the drafter's logits at offsets 1..K of every round, exactly as it
     drafted them; log q = log-softmax over its support;
  4. `opd_loss`: accepted / first-rejected / post-rejection streams, divergence D;
  5. optax update of the trainable drafter parameters only (target and frozen drafter parts
     are inputs, never outputs).

Batches: {"tokens": int32 [B, P] left-aligned prompts (padding after each prompt),
"lengths": int32 [B], "valid": bool [B] (False: a padding row, masked out)}.
The train state, shardings and checkpoints are SFT's (`opd.training.sft.TrainState`).

Memory held by the step beyond the models (S = P + 1 + (R + 1)(K + 1), rounded up to 16;
W = the drafter's support: EAGLE-3's draft vocabulary, DFlash's V; n target feature layers):
  rollout (no gradient)  committed text [B, S]; the target's KV cache 2·L·B·S·K_h·H and the
                         drafter's cache; per round, transiently, the verify logits
                         [B, K + 1, V] float32 and their log-softmax; the records [B, R, K]
                         (a few int/float arrays: k3 needs only the drafted tokens' log p),
                         plus [B, R, K, W] float32 log p over the support for the exact
                         divergences and [B, R, W] at the error offsets with error anchors;
  features (no gradient) [B, S, n, D];
  replay (gradient)      EAGLE-3: K TTT steps of one decoder layer over [B, S] positions, its
                         head applied at the R (2R) anchors only: logits [K, B, R, W];
                         DFlash: R (2R) blocks of Q positions over an S-token context, logits
                         [B, R, Q - 1, V] float32 (the target's LM head).
Never a float32 [B, R, K + 1, V] teacher buffer: at V = 150k the k3 default stores B·R·K floats.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from opd.decoding.sampling import SamplingParams
from opd.training import rollout as ro
from opd.training import sft
from opd.training.opd_loss import EXACT, OPDLossConfig, opd_loss

@dataclasses.dataclass(frozen=True)
class OPDConfig:
    num_rounds: int = 8  # R verify rounds per prompt
    num_draft_tokens: int = 4  # K drafts per round
    rollout_temperature: float = 1.0  # drafts sampled from q (and verified by rejection sampling) when > 0
    loss: OPDLossConfig = OPDLossConfig()

    def __post_init__(self):
        for name in ("num_rounds", "num_draft_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.rollout_temperature, (int, float)) and self.rollout_temperature >= 0):
            raise ValueError(f"rollout_temperature must be >= 0, got {self.rollout_temperature!r}")

    def cache_len(self, prompt_len: int) -> int:
        """Sequence buffer for prompts padded to `prompt_len` (R rounds + one round of slack)."""
        n = prompt_len + 1 + (self.num_rounds + 1) * (self.num_draft_tokens + 1)
        return -(-n // 16) * 16


def opd_step(state: sft.TrainState, target_params, drafter_frozen, batch, eos_ids, *, spec, target_config,
             optimizer: optax.GradientTransformation, cfg: OPDConfig, cache_len: int):
    """One Draft-OPD update. Returns (new state, metrics)."""
    rng, key = jax.random.split(state.rng)
    K, R = cfg.num_draft_tokens, cfg.num_rounds
    tparams = jax.lax.stop_gradient(target_params)
    dparams = jax.lax.stop_gradient(spec.join_params(state.params, drafter_frozen, tparams))
    exact = cfg.loss.divergence in EXACT
    err_anchors = cfg.loss.error_anchor_weight > 0
    rec = ro.rollout(tparams, dparams, batch["tokens"], batch["lengths"], key, eos_ids, tconfig=target_config,
                     dspec=spec, sp=SamplingParams(cfg.rollout_temperature, 0, 1.0), num_draft_tokens=K, num_rounds=R,
                     cache_len=cache_len, teacher_support="draft" if exact else "none", error_support=err_anchors)
    active = rec.active_BR & batch["valid"][:, None]
    aux = ro.target_features(tparams, target_config, spec, rec.seq_BS)
    idx = ro.drafted_support_index(dparams, spec, rec.drafts_BRK)

    def loss_fn(params):
        dp = spec.join_params(params, drafter_frozen, tparams)
        logits = spec.replay_logits(params, dp, target_config, rec, aux, error_anchors=err_anchors)
        err = {}
        if err_anchors:
            logits, err_logits = logits
            err = dict(error_logq_BRW=jax.nn.log_softmax(err_logits.astype(jnp.float32), -1),
                       teacher_error_BRW=rec.teacher_error_BRW, error_mask_BR=ro.error_anchor_mask(rec))
        logq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        out = opd_loss(logq, rec.num_accepted_BR, active, cfg.loss, drafted_BRK=idx,
                       teacher_logp_tok_BRK=rec.teacher_tok_BRK, teacher_logp_BRKW=rec.teacher_support_BRKW, **err)
        return out.loss, out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    act = active.astype(jnp.float32)
    rounds = jnp.maximum(jnp.sum(act), 1.0)
    n = rec.num_accepted_BR
    reached = jnp.stack([jnp.sum(act * (n >= i)) for i in range(K + 1)])  # rounds with >= i accepted
    metrics = {
        "loss": loss, "accepted_loss": out.accepted_loss, "rejected_loss": out.rejected_loss,
        "post_loss": out.post_loss, "error_loss": out.error_loss, "divergence": out.divergence_by_offset,
        "grad_norm": optax.global_norm(grads),
        "rollout_tau": jnp.sum(act * (n + 1)) / rounds,  # committed tokens per verify round (bonus included)
        "committed_tokens": jnp.sum(act * (n + 1)),
        "acceptance": reached[1:] / jnp.maximum(reached[:-1], 1.0),  # P(offset i accepted | i-1 were)
        "rollout_rounds": jnp.sum(act),
        # private (train_loop hands "_" keys to its on_step callback, not to the metrics means):
        "_seq": rec.seq_BS, "_seq_len": rec.seq_len_B,  # the committed text (for SFT-on-rollouts baselines)
    }
    return sft.TrainState(state.step + 1, params, opt_state, rng), metrics
