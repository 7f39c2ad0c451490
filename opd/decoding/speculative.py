"""Lossless speculative decoding: draft K tokens, verify them in one target forward over K+1
positions, commit the accepted prefix + one target token; the whole generation is one jitted
`lax.while_loop`.

Invariants per row b: `seq[b, :seq_len[b]]` is the committed text (prompt + generated); its
last token is *pending* (its target logits are computed by the next verify pass); the
target's KV cache (and an LM drafter's) holds exactly the first `seq_len[b] - 1` tokens.

Axis letters: B batch, P padded prompt, S sequence/cache length, K draft tokens, V vocabulary.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd.decoding import batching
from opd.decoding.generate import GenerateOutput, prefill
from opd.decoding.sampling import SamplingParams, sample
from opd.drafters.base import DraftContext, Drafter, DrafterSpec
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig
# submodules, not names: `import pallas_kernels.verify` first imports opd (its kernel reads
# opd.decoding.sampling), which imports this module while that package is half-initialised
from pallas_kernels.verify import kernel as verify_kernel
from pallas_kernels.verify import reference as verify_ref

VERIFY_IMPLS = ("reference", "pallas")


def _verify(impl: str, logits_BKV1, d_BK, logq_BKV, key, sp: SamplingParams):
    if impl == "pallas":  # the kernel formulation is picked per lowering platform (CPU: interpreted)
        return verify_kernel.verify(logits_BKV1, d_BK, logq_BKV, key, sp.temperature, sp.top_k, sp.top_p)
    return verify_ref.verify_reference(logits_BKV1, d_BK, logq_BKV, key, sp.temperature, sp.top_k, sp.top_p)


def start_state(tparams, dparams, tokens_BP, lengths_B, done_B, key, eos_ids, *, tconfig: TransformerConfig,
                dspec: DrafterSpec, sp: SamplingParams, max_new_tokens: int, cache_len: int,
                with_features: bool = False):
    """The decoding state after the prompt: prefill into the target cache, the first token from
    the target (not a verify round), the drafter's state. Rows with `done_B` never advance.
    With `with_features`: (state, the prefill's target-layer outputs over the prompt [B, P, D] each)."""
    B, P = tokens_BP.shape
    tcache, last_BD, pre = prefill(tparams, tconfig, tokens_BP, lengths_B, cache_len,
                                   hidden_layers=tuple(dspec.target_hidden_layers))
    key, k0 = jax.random.split(key)
    first_B = sample(k0, tfm.lm_head(tparams, tconfig, last_BD), sp)
    seq_BS = jnp.zeros((B, cache_len), jnp.int32).at[:, :P].set(tokens_BP)
    seq_BS = tfm.update_rows(seq_BS, first_B[:, None], lengths_B, axis=1)
    seq_len_B = lengths_B + 1
    dstate = dspec.prefill(dparams, DraftContext(seq_BS[:, : P + 1], seq_len_B), pre.aux_hidden, cache_len)
    n_gen_B = jnp.where(done_B, 0, 1).astype(jnp.int32)
    done_B = done_B | jnp.isin(first_B, eos_ids) | (n_gen_B >= max_new_tokens)
    state = {
        "round": jnp.int32(0), "key": key, "seq": seq_BS, "seq_len": seq_len_B, "tcache": tcache,
        "dstate": dstate, "n_gen": n_gen_B, "done": done_B,
        "rounds": jnp.zeros((B,), jnp.int32), "committed": jnp.zeros((B,), jnp.int32),
    }
    return (state, pre.aux_hidden) if with_features else state


class Round(NamedTuple):
    """What one verify round saw (returned by `verify_round` for training rollouts)."""

    seq_len_B: jax.Array  # committed length before the round (the pending token is at seq_len - 1)
    drafts_BK: jax.Array  # proposals d_1..d_K (target ids)
    logq_BKV: Optional[jax.Array]  # the drafter's processed log q at each offset (None when greedy)
    logits_BKV1: jax.Array  # the target's logits on the draft-induced prefixes, offsets 1..K+1
    num_accepted_B: jax.Array  # accepted drafts (0 for inactive rows)
    active_B: jax.Array  # the row was still generating in this round
    # the drafter's target-layer outputs over the round's K + 1 inputs (the pending token at
    # position seq_len - 1, then d_1..d_K): a tuple of [B, K + 1, D]
    aux_hidden: tuple = ()


def verify_round(s: dict, tparams, dparams, eos_ids, *, tconfig: TransformerConfig, dspec: DrafterSpec,
                 sp: SamplingParams, num_draft_tokens: int, max_new_tokens: int, verify_impl: str):
    """One round: draft K tokens, verify them in one target forward over K+1 positions, commit
    per row. Returns (new state, `Round`)."""
    K, N = num_draft_tokens, max_new_tokens
    key, kd, kv = jax.random.split(s["key"], 3)
    ctx = DraftContext(s["seq"], s["seq_len"])
    d_BK, logq_BKV, dstate = dspec.propose(dparams, s["dstate"], ctx, kd, K, sp)
    inp_BK1 = jnp.concatenate([ctx.pending()[:, None], d_BK], axis=1)
    o = tfm.forward(tparams, tconfig, inp_BK1, cache=s["tcache"], hidden_layers=tuple(dspec.target_hidden_layers))
    logits_BKV1 = tfm.lm_head(tparams, tconfig, o.hidden_BTD)
    res = _verify(verify_impl, logits_BKV1, d_BK, logq_BKV, kv, sp)
    active = ~s["done"]
    n_B = jnp.where(active, res.num_accepted, 0)
    # Committed this round: d_1..d_n, then the correction/bonus token.
    offs = jnp.arange(K + 1)[None]
    new_BK1 = jnp.where(offs < n_B[:, None], jnp.pad(d_BK, ((0, 0), (0, 1))), res.next_token[:, None])
    # Tokens that count: up to and including the first EOS, and at most N in total.
    eos_BK1 = jnp.isin(new_BK1, eos_ids) & (offs <= n_B[:, None])
    upto_eos_B = jnp.where(jnp.any(eos_BK1, axis=1), jnp.argmax(eos_BK1, axis=1) + 1, n_B + 1)
    count_B = jnp.where(active, jnp.minimum(upto_eos_B, N - s["n_gen"]), 0)
    seq = tfm.update_rows(s["seq"], jnp.where(active[:, None], new_BK1, 0), s["seq_len"], axis=1)
    seq_len = s["seq_len"] + jnp.where(active, n_B + 1, 0)
    hit_eos = jnp.any(eos_BK1 & (offs < count_B[:, None]), axis=1)
    n_gen = s["n_gen"] + count_B
    new = {
        "round": s["round"] + 1,
        "key": key,
        "seq": seq,
        "seq_len": seq_len,
        "tcache": o.cache._replace(lengths=seq_len - 1),
        "dstate": dspec.commit(dparams, dstate, DraftContext(seq, seq_len), n_B, o.aux_hidden),
        "n_gen": n_gen,
        "done": s["done"] | hit_eos | (n_gen >= N),
        "rounds": s["rounds"] + active.astype(jnp.int32),
        "committed": s["committed"] + count_B,
    }
    return new, Round(s["seq_len"], d_BK, logq_BKV, logits_BKV1, n_B, active, tuple(o.aux_hidden))


@functools.partial(
    jax.jit,
    static_argnames=("tconfig", "dspec", "sp", "num_draft_tokens", "max_new_tokens", "cache_len", "verify_impl"),
)
def _speculative_jit(tparams, dparams, tokens_BP, lengths_B, done_B, key, eos_ids, *,
                     tconfig: TransformerConfig, dspec: DrafterSpec, sp: SamplingParams, num_draft_tokens: int,
                     max_new_tokens: int, cache_len: int, verify_impl: str):
    K, N = num_draft_tokens, max_new_tokens
    state = start_state(tparams, dparams, tokens_BP, lengths_B, done_B, key, eos_ids, tconfig=tconfig, dspec=dspec,
                        sp=sp, max_new_tokens=N, cache_len=cache_len)
    state["accept_hist"] = jnp.zeros((K + 1,), jnp.int32)

    def cond(s):
        return (s["round"] < N) & ~jnp.all(s["done"])

    def body(s):
        hist = s.pop("accept_hist")
        new, r = verify_round(s, tparams, dparams, eos_ids, tconfig=tconfig, dspec=dspec, sp=sp, num_draft_tokens=K,
                              max_new_tokens=N, verify_impl=verify_impl)
        # accept_hist[n] = active rounds that accepted exactly n drafts
        new["accept_hist"] = hist + jnp.sum(jax.nn.one_hot(r.num_accepted_B, K + 1, dtype=jnp.int32)
                                            * r.active_B[:, None], axis=0)
        return new

    s = jax.lax.while_loop(cond, body, state)
    return s["seq"], s["n_gen"], s["round"], s["rounds"], s["committed"], s["accept_hist"]


def check_compatible(target, drafter: Drafter) -> None:
    """Raises ValueError (before any JAX work) when drafter and target do not share a
    vocabulary / tokenizer, or the drafter reads target hidden states this target lacks."""
    spec, tc = drafter.spec, target.config
    if spec.vocab_size != tc.vocab_size:
        raise ValueError(
            f"vocab mismatch: drafter ({drafter.kind}) has vocab_size {spec.vocab_size}, "
            f"target has {tc.vocab_size}"
        )
    if spec.target_hidden_size is not None and spec.target_hidden_size != tc.hidden_size:
        raise ValueError(
            f"hidden size mismatch: the {drafter.kind} drafter reads target hidden states of width "
            f"{spec.target_hidden_size}, this target's hidden_size is {tc.hidden_size} (the drafter was built "
            "for another target)"
        )
    layers = tuple(int(i) for i in spec.target_hidden_layers)
    if any(not 0 <= i < tc.num_layers for i in layers):
        raise ValueError(f"layer mismatch: the {drafter.kind} drafter reads target layers {layers}, this target "
                         f"has {tc.num_layers} layers")
    tt, dt = target.tokenizer, drafter.tokenizer
    if tt is not None and dt is not None and tt is not dt:
        if tt.backend.get_vocab(with_added_tokens=True) != dt.backend.get_vocab(with_added_tokens=True):
            raise ValueError(f"tokenizer mismatch: the {drafter.kind} drafter's tokenizer maps tokens to different ids than the target's")


def speculative_generate(
    target,
    drafter: Drafter,
    prompts: Sequence[batching.Prompt],
    max_new_tokens: int = 128,
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    verify_impl: str = "reference",
) -> GenerateOutput:
    """Speculative generation; the output distribution is exactly the target's.

    Args as `opd.generate`, plus the drafter, `num_draft_tokens` (K) and `verify_impl`
    ("reference" jnp or the "pallas" blockwise kernel; identical tokens for the same seed).
    Returns GenerateOutput; `stats` has tau (committed tokens per verify round, bonus
    included), acceptance_by_offset, target_forwards, generated_tokens, seconds.
    """
    sp = SamplingParams(temperature, top_k, top_p)
    if verify_impl not in VERIFY_IMPLS:
        raise ValueError(f"verify_impl must be one of {VERIFY_IMPLS}, got {verify_impl!r}")
    check_compatible(target, drafter)
    drafter.spec.check_num_draft_tokens(num_draft_tokens)  # e.g. DFlash: K <= block_size - 1
    K, config = int(num_draft_tokens), target.config
    ids = batching.encode_prompts(target, prompts)
    # A round may write K + 1 cache slots past the committed text.
    batching.check_lengths(ids, max_new_tokens, config.max_position_embeddings, extra=K + 1)
    eos = batching.resolve_eos(target, eos_token_ids)
    key = jax.random.PRNGKey(seed)
    results, forwards, rounds, committed = [], 0, 0, 0
    prompt_rounds, prompt_committed = [], []  # per prompt, in prompt order (intervals over prompts)
    hist = np.zeros(K + 1, np.int64)
    t0 = time.perf_counter()
    for chunk in batching.chunks(ids, config.pad_token_id or 0, batch_size):
        cache_len = batching.round_up(chunk.tokens.shape[1] + max_new_tokens + 2 * (K + 1), 128)
        key, sub = jax.random.split(key)
        seq, n_gen, n_rounds, row_rounds, row_committed, acc_hist = _speculative_jit(
            target.params, drafter.params, chunk.tokens, chunk.lengths, ~chunk.valid, sub, batching.eos_array(eos),
            tconfig=config, dspec=drafter.spec, sp=sp, num_draft_tokens=K, max_new_tokens=max_new_tokens,
            cache_len=cache_len, verify_impl=verify_impl,
        )
        seq, n_gen = np.asarray(seq), np.asarray(n_gen)
        forwards += int(n_rounds) + 1
        rounds += int(np.asarray(row_rounds).sum())
        committed += int(np.asarray(row_committed).sum())
        hist += np.asarray(acc_hist)
        prompt_rounds += np.asarray(row_rounds)[: len(chunk.prompts)].tolist()
        prompt_committed += np.asarray(row_committed)[: len(chunk.prompts)].tolist()
        for r, p in enumerate(chunk.prompts):
            results.append(batching.truncate_at_eos(seq[r, len(p) : len(p) + n_gen[r]], max_new_tokens, eos))
    seconds = time.perf_counter() - t0
    generated = sum(len(r) for r in results)
    reached = hist[::-1].cumsum()[::-1]  # reached[i] = rounds with n >= i
    stats = {
        "tau": committed / rounds if rounds else float("nan"),
        "acceptance_by_offset": [float(reached[i + 1] / reached[i]) if reached[i] else float("nan") for i in range(K)],
        "target_forwards": forwards,
        "verify_rounds": rounds,
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_second": generated / seconds if seconds > 0 else float("nan"),
        "num_draft_tokens": K,
        "accept_hist": hist.tolist(),  # accept_hist[n]: verify rounds that accepted exactly n drafts
        "committed_tokens": committed,  # counted up to EOS / max_new_tokens; tau = committed / rounds
        "prompt_rounds": prompt_rounds,  # per prompt: verify rounds and committed tokens (tau = sum / sum)
        "prompt_committed": prompt_committed,
    }
    return GenerateOutput(results, stats)
