"""The drafter interface of the speculative decoding engine.

A drafter is a hashable, static `DrafterSpec` (its hyper-parameters and pure functions) plus
a parameter pytree. The engine (`opd.decoding.speculative`) calls, inside one jitted loop:

  state = spec.prefill(params, ctx, target_aux, cache_len)
  tokens_BK, logq_BKV, state = spec.propose(params, state, ctx, key, K, sp)
  state = spec.commit(params, state, ctx, n_accepted_B, target_aux)

`ctx` is the committed text (`DraftContext`); `target_aux` the target's hidden states of the
layers named by `spec.target_hidden_layers` from the forward that just ran (the prompt
prefill, or the verify pass over [pending, d_1..d_K]), so drafting never costs an extra
target pass. `logq_BKV` are the drafter's *processed* log-probs (`process_logits` with the
same SamplingParams as the target): required when temperature > 0, where d_i must be a sample
from q_i; None is allowed for greedy decoding.

Axis letters: B batch, S sequence buffer, K draft tokens, V vocabulary.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple, Optional

import jax


class DraftContext(NamedTuple):
    """Committed tokens per row: prompt + generated (the last one is the *pending* token,
    whose target logits are computed by the next verify pass)."""

    seq_BS: jax.Array  # int32
    seq_len_B: jax.Array  # int32, number of committed tokens

    def pending(self) -> jax.Array:
        import jax.numpy as jnp

        return jnp.take_along_axis(self.seq_BS, (self.seq_len_B - 1)[:, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class DrafterSpec(abc.ABC):
    """Base class of drafter specs. Subclasses are frozen dataclasses (jit static args)."""

    vocab_size: int

    kind = "base"
    target_hidden_layers: tuple = ()  # target layers whose outputs the drafter consumes

    @abc.abstractmethod
    def prefill(self, params, ctx: DraftContext, target_aux, cache_len: int):
        """Drafter state after the prompt (`ctx` holds the padded prompt bucket + first token)."""

    @abc.abstractmethod
    def propose(self, params, state, ctx: DraftContext, key, num_draft: int, sp):
        """-> (tokens [B, K] int32, processed log q [B, K, V] or None when greedy, state)."""

    @abc.abstractmethod
    def commit(self, params, state, ctx: DraftContext, n_accepted_B, target_aux):
        """State after a verify round committed `n_accepted + 1` tokens (ctx is already updated)."""


@dataclasses.dataclass
class Drafter:
    """What `opd.init_drafter` / `opd.load_drafter` return."""

    spec: DrafterSpec
    params: Any = None
    tokenizer: Optional[Any] = None  # set when the drafter has its own tokenizer (LM drafter)

    @property
    def kind(self) -> str:
        return self.spec.kind
