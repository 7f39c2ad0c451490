"""The Draft-OPD training step: rollout + replay + acceptance-aware loss + AdamW update of the
drafter, in one `jax.jit` with explicit shardings and the train state donated (DESIGN §7).

  1. rollout (no gradient): R recorded rounds of real speculative decoding from the batch's
     prompts with the current drafter at the rollout temperature (`opd.training.rollout`);
  2. the target's features over the committed text: kept from the rollout's prefill and verify
     forwards (no target forward of its own; the ones the drafter saw while drafting);
  3. replay (gradient): the drafter's logits at offsets 1..K of every round, exactly as it
     drafted them; log q = log-softmax over its support (computed in chunks of the support:
     `vocab_chunk`);
  4. `opd_loss`: accepted / first-rejected / post-rejection streams, divergence D; optionally
     the reference's response (correction token included) and suffix streams, clamps, per-token
     normalisation and the expected-acceptance objective;
  5. optax update of the trainable drafter parameters only (target and frozen drafter parts
     are inputs, never outputs).

Batches: {"tokens": int32 [B, P] left-aligned prompts (padding after each prompt),
"lengths": int32 [B], "valid": bool [B] (False: a padding row, masked out)}; with gradient
accumulation (`OPDConfig.accumulate` = A) A x B rows, steps 1-4 scanned over A micro-batches of
B (the memory below is one micro-batch's, plus a float32 gradient accumulator), one update.
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
                         head applied at the R (2R) anchors only; DFlash: R (2R) blocks of Q
                         positions over an S-token context, then the target's LM head. Their
                         final hidden states [B, R, K, D] go through the head `vocab_chunk`
                         columns at a time: float32 [B·R·K, vocab_chunk] logits, a few at once,
                         in the forward and the backward (`opd.training.chunked_logprobs`);
                         with vocab_chunk = 0, logits [B, R, K, W] float32, their log-softmax
                         and their gradient (4.3 GiB each at 16 rows, R = 32, K = 15, V = 152k).
Never a float32 [B, R, K + 1, V] teacher buffer: at V = 150k the k3 default stores B·R·K floats.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from opd.decoding.sampling import SamplingParams
from opd.training import chunked_logprobs as cl
from opd.training import rollout as ro
from opd.training import sft
from opd.training.opd_loss import (OPDLossConfig, OPDLossOut, TokenLogProbs, committed_teacher_logp,
                                   error_anchor_config, head_divergence, head_token_logprobs, k3_divergence,
                                   loss_from_divergences, opd_loss, tv_config)

@dataclasses.dataclass(frozen=True)
class OPDConfig:
    num_rounds: int = 8  # R verify rounds per prompt
    num_draft_tokens: int = 4  # K drafts per round
    rollout_temperature: float = 1.0  # drafts sampled from q (and verified by rejection sampling) when > 0
    loss: OPDLossConfig = OPDLossConfig()
    # the replay's log q over the drafter's support this many columns at a time, never [B, R, K, W]
    # logits (`opd.training.chunked_logprobs`); 0 (or a support no larger): from the full logits,
    # as for kinds without `replay_hidden`
    vocab_chunk: int = 8192
    # A micro-batches per optimizer update: the step takes A x B prompts, runs rollout + replay +
    # loss on each B in a `lax.scan`, sums the numerators of the loss and its gradient and their
    # denominators, divides once (exactly one big batch's loss: `opd_step`)
    accumulate: int = 1

    def __post_init__(self):
        for name in ("num_rounds", "num_draft_tokens", "accumulate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.rollout_temperature, (int, float)) and self.rollout_temperature >= 0):
            raise ValueError(f"rollout_temperature must be >= 0, got {self.rollout_temperature!r}")
        cl.check_chunk(self.vocab_chunk)

    def cache_len(self, prompt_len: int) -> int:
        """Sequence buffer for prompts padded to `prompt_len` (R rounds + one round of slack)."""
        n = prompt_len + 1 + (self.num_rounds + 1) * (self.num_draft_tokens + 1)
        return -(-n // 16) * 16


def opd_step(state: sft.TrainState, target_params, drafter_frozen, batch, eos_ids, *, spec, target_config,
             optimizer: optax.GradientTransformation, cfg: OPDConfig, cache_len: int):
    """One Draft-OPD update. Returns (new state, metrics). With `cfg.accumulate` = A > 1 the
    batch holds A x B prompts: row b * A + a is row b of micro-batch a (so every micro-batch
    keeps the batch's row sharding), each rolled out with its own key (`_accumulated_grads`)."""
    rng, key = jax.random.split(state.rng)
    tparams = jax.lax.stop_gradient(target_params)
    dparams = jax.lax.stop_gradient(spec.join_params(state.params, drafter_frozen, tparams))
    run = functools.partial(_rollout, tparams, dparams, eos_ids, spec=spec, target_config=target_config, cfg=cfg,
                            cache_len=cache_len)
    if cfg.accumulate > 1:
        grads, loss, out, stats, seq, seq_len = _accumulated_grads(state.params, batch, key, run,
                                                                   drafter_frozen, tparams, spec, target_config, cfg)
    else:
        rec, active, aux = run(batch, key)
        loss_fn = functools.partial(replay_loss, drafter_frozen=drafter_frozen, tparams=tparams, rec=rec, aux=aux,
                                    active_BR=active, spec=spec, target_config=target_config, cfg=cfg)
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        stats, seq, seq_len = _rollout_stats(rec, active, cfg.num_draft_tokens), rec.seq_BS, rec.seq_len_B
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    committed, rounds_sum, reached = stats
    rounds = jnp.maximum(rounds_sum, 1.0)
    metrics = {
        "loss": loss, "accepted_loss": out.accepted_loss, "rejected_loss": out.rejected_loss,
        "post_loss": out.post_loss, "error_loss": out.error_loss, "divergence": out.divergence_by_offset,
        "response_loss": out.response_loss, "suffix_loss": out.suffix_loss, "acceptance_loss": out.acceptance_loss,
        "expected_accepted": out.expected_accepted,
        "grad_norm": optax.global_norm(grads),
        "rollout_tau": committed / rounds,  # committed tokens per verify round (bonus included)
        "committed_tokens": committed,
        "acceptance": reached[1:] / jnp.maximum(reached[:-1], 1.0),  # P(offset i accepted | i-1 were)
        "rollout_rounds": rounds_sum,
        # private (train_loop hands "_" keys to its on_step callback, not to the metrics means):
        "_seq": seq, "_seq_len": seq_len,  # the committed text (for SFT-on-rollouts baselines)
    }
    return sft.TrainState(state.step + 1, params, opt_state, rng), metrics


def _rollout(tparams, dparams, eos_ids, batch, key, *, spec, target_config, cfg: OPDConfig, cache_len: int):
    """Steps 1 and 2 on one (micro-)batch: (`RolloutRecord`, active rounds [B, R], the target's
    features at the committed positions, as the rollout's own forwards computed them)."""
    K, R = cfg.num_draft_tokens, cfg.num_rounds
    exact = cfg.loss.needs_teacher_support
    err_anchors = cfg.loss.error_anchor_weight > 0
    rec = ro.rollout(tparams, dparams, batch["tokens"], batch["lengths"], key, eos_ids, tconfig=target_config,
                     dspec=spec, sp=SamplingParams(cfg.rollout_temperature, 0, 1.0), num_draft_tokens=K, num_rounds=R,
                     cache_len=cache_len, teacher_support="draft" if exact else "none", error_support=err_anchors)
    active = rec.active_BR & batch["valid"][:, None]
    return rec, active, rec.features


def _rollout_stats(rec: ro.RolloutRecord, active_BR, K: int):
    """(committed tokens, active rounds, [K + 1] rounds with >= i accepted), sums over the batch."""
    act = active_BR.astype(jnp.float32)
    n = rec.num_accepted_BR
    reached = jnp.stack([jnp.sum(act * (n >= i)) for i in range(K + 1)])
    return jnp.sum(act * (n + 1)), jnp.sum(act), reached


def _accumulated_grads(params, batch, key, run, drafter_frozen, tparams, spec, target_config,
                       cfg: OPDConfig):
    """Rollout + replay + loss of A = `cfg.accumulate` micro-batches in a `lax.scan`, exactly
    one big batch's loss and gradient: each micro-batch contributes the numerators of its loss
    terms (its normalised terms times its own denominators, which carry no gradient) and of
    their gradients, and its raw denominators; they are summed and divided once. Two groups:
    the streams (divided by the total token weight with "tokens", else by the active rounds)
    and the error-anchor and expected-acceptance terms (always by the active rounds); with
    "tokens" and either term on, each micro-batch pulls back both groups (two backward passes).
    Returns (grads, loss, `OPDLossOut` of the whole batch, rollout sums, seq [A·B, S], seq_len)."""
    A, L = cfg.accumulate, cfg.loss
    tokens = L.normalization == "tokens"
    split = tokens and (L.error_anchor_weight > 0 or L.expected_acceptance_weight > 0)
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // A, A) + x.shape[1:]), 0, 1), batch)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    f32 = lambda t: jax.tree.map(lambda g: g.astype(jnp.float32), t)

    def body(carry, xs):
        g_tok, g_rnd, sums = carry
        mb, k = xs
        rec, active, aux = run(mb, k)
        rounds_raw = jnp.sum(active.astype(jnp.float32))
        # the denominators `loss_from_divergences` divided this micro-batch's terms by (no gradient)
        d_rnd = jnp.maximum(rounds_raw, 1.0)
        d_tok = lambda out: jnp.where(out.stream_denominator > 0, out.stream_denominator, 1.0)
        loss_fn = functools.partial(replay_loss, drafter_frozen=drafter_frozen, tparams=tparams, rec=rec, aux=aux,
                                    active_BR=active, spec=spec, target_config=target_config, cfg=cfg)

        def numerators(p):
            _, out = loss_fn(p)
            streams = out.accepted_loss + out.rejected_loss + out.post_loss + out.response_loss + out.suffix_loss
            return jnp.stack([streams * d_tok(out), (out.error_loss + out.acceptance_loss) * d_rnd]), out

        _, pull, out = jax.vjp(numerators, params, has_aux=True)
        if split:
            g_tok = jax.tree.map(jnp.add, g_tok, f32(pull(jnp.asarray([1.0, 0.0]))[0]))
            g_rnd = jax.tree.map(jnp.add, g_rnd, f32(pull(jnp.asarray([0.0, 1.0]))[0]))
        else:  # one denominator (with "tokens", the second group is 0)
            g_tok = jax.tree.map(jnp.add, g_tok, f32(pull(jnp.ones((2,), jnp.float32))[0]))
        new = {"tok": out.stream_denominator, "rounds": rounds_raw,
               "parts_tok": jnp.stack([out.accepted_loss, out.rejected_loss, out.post_loss, out.response_loss,
                                       out.suffix_loss]) * d_tok(out),
               "parts_rnd": jnp.stack([out.error_loss, out.acceptance_loss, out.expected_accepted]) * d_rnd,
               "by_offset": out.divergence_by_offset * d_rnd,  # every offset's count is the active rounds
               "stats": _rollout_stats(rec, active, cfg.num_draft_tokens)}
        sums = jax.tree.map(jnp.add, sums, new)
        return (g_tok, g_rnd, sums), (rec.seq_BS, rec.seq_len_B)

    K = cfg.num_draft_tokens
    z = jnp.zeros((), jnp.float32)
    sums0 = {"tok": z, "rounds": z, "parts_tok": jnp.zeros((5,)), "parts_rnd": jnp.zeros((3,)),
             "by_offset": jnp.zeros((K,)), "stats": (z, z, jnp.zeros((K + 1,)))}
    (g_tok, g_rnd, s), (seq, seq_len) = jax.lax.scan(body, (zeros, zeros, sums0), (micro, jax.random.split(key, A)))
    D_rnd = jnp.maximum(s["rounds"], 1.0)
    D_tok = jnp.where(s["tok"] > 0, s["tok"], 1.0) if tokens else D_rnd
    grads = jax.tree.map(lambda p, a, b: (a / D_tok + b / D_rnd).astype(p.dtype), params, g_tok, g_rnd)
    pt, pr = s["parts_tok"] / D_tok, s["parts_rnd"] / D_rnd
    out = OPDLossOut(loss=jnp.sum(pt) + pr[0] + pr[1], accepted_loss=pt[0], rejected_loss=pt[1], post_loss=pt[2],
                     error_loss=pr[0], divergence_by_offset=s["by_offset"] / D_rnd, response_loss=pt[3],
                     suffix_loss=pt[4], acceptance_loss=pr[1], expected_accepted=pr[2])
    unmix = lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])  # back to the batch's row order
    return grads, out.loss, out, s["stats"], unmix(seq), unmix(seq_len)


def replay_loss(params, *, drafter_frozen, tparams, rec: ro.RolloutRecord, aux, active_BR, spec, target_config,
                cfg: OPDConfig):
    """Steps 3 and 4: the replay and `opd_loss`, differentiable in the trainable drafter
    `params`. Returns (loss, `OPDLossOut`). With `cfg.vocab_chunk` > 0 and a kind with
    `replay_hidden`, log q is computed from the hidden states before the drafter's head, the
    support in chunks (`opd_loss.head_divergence`, `head_token_logprobs`); otherwise from the
    full replay logits."""
    L = cfg.loss
    dp = spec.join_params(params, drafter_frozen, tparams)
    err_anchors = L.error_anchor_weight > 0
    idx = ro.drafted_support_index(dp, spec, rec.drafts_BRK)
    teacher = dict(drafted_BRK=idx, teacher_logp_tok_BRK=rec.teacher_tok_BRK,
                   teacher_logp_BRKW=rec.teacher_support_BRKW)
    commit = {}
    if L.token_streams:  # the response stream reads the committed tokens (the correction token's log p: rollout)
        if rec.teacher_commit_BR is None:
            raise ValueError("response_weight / suffix_weight > 0 need RolloutRecord.teacher_commit_BR (the "
                             "teacher's log p of each round's correction token; `rollout` records it)")
        c_idx, c_ok = ro.support_index(dp, spec, ro.committed_tokens(rec))
        commit = dict(committed_BRK=c_idx, commit_valid_BRK=c_ok,
                      teacher_commit_BRK=committed_teacher_logp(rec.teacher_tok_BRK, rec.teacher_commit_BR,
                                                                rec.num_accepted_BR))
    hidden = None
    if cfg.vocab_chunk:
        hidden = spec.replay_hidden(params, dp, target_config, rec, aux, error_anchors=err_anchors)
    if hidden is not None:
        h, err_h, head = hidden
        tokens = None
        if L.token_streams:
            lq_draft, lq_commit = head_token_logprobs(head, h, [idx, commit["committed_BRK"]], cfg.vocab_chunk)
            tokens = TokenLogProbs(lq_draft, lq_commit, rec.teacher_tok_BRK, commit["teacher_commit_BRK"],
                                   commit["commit_valid_BRK"])
        if tokens is not None and L.divergence == "k3":  # the drafts' log q is already there: no second pass
            D = k3_divergence(tokens.logq_draft, rec.teacher_tok_BRK, L)
        else:
            D = head_divergence(head, h, L, cfg.vocab_chunk, **teacher)
        D_err = None
        if err_anchors:
            D_err = head_divergence(head, err_h[:, :, None], error_anchor_config(L), cfg.vocab_chunk,
                                    teacher_logp_BRKW=rec.teacher_error_BRW[:, :, None])[..., 0]
        tv = None
        if L.expected_acceptance_weight > 0:
            tv = D if L.divergence == "tvd" else head_divergence(head, h, tv_config(L), cfg.vocab_chunk,
                                                                teacher_logp_BRKW=rec.teacher_support_BRKW)
        out = loss_from_divergences(D, rec.num_accepted_BR, active_BR, L, error_D_BR=D_err,
                                    error_mask_BR=ro.error_anchor_mask(rec) if err_anchors else None, tokens=tokens,
                                    tv_BRK=tv)
        return out.loss, out
    logits = spec.replay_logits(params, dp, target_config, rec, aux, error_anchors=err_anchors)
    err = {}
    if err_anchors:
        logits, err_logits = logits
        err = dict(error_logq_BRW=jax.nn.log_softmax(err_logits.astype(jnp.float32), -1),
                   teacher_error_BRW=rec.teacher_error_BRW, error_mask_BR=ro.error_anchor_mask(rec))
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    out = opd_loss(logq, rec.num_accepted_BR, active_BR, L, **teacher, **err, **commit)
    return out.loss, out
