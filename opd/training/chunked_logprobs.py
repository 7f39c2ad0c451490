"""Vocabulary-chunked log-probs of a linear head: the Draft-OPD loss without [.., V] logits.

Per replayed position (a row of hidden states h [D] before the drafter's head, whose weight
W covers a support of V tokens) the Draft-OPD loss needs only
  - the log-normaliser lse(h) = logsumexp_v h . W_v,
  - the logits at a few ids (the drafted token: `gathered_logits`), and
  - for the exact divergences, a sum over the support sum_v phi(log q_v, t_v) against the
    teacher's stored log-probs t (`sum_over_support`).
Computed from full logits these store [N, V] float32 several times (the logits, their
log-softmax, their gradient): 4.3 GiB each for Qwen3-8B + DFlash at 16 rows per chip (N = 16 x
32 rounds x 15 offsets, V = 152k). Here the support is scanned `chunk` columns at a time: the
forward keeps a running max and sum (online logsumexp) and the backward (`jax.custom_vjp`)
recomputes each chunk's logits, so at most a few [N, chunk] arrays exist at a time. A step takes
the same columns of each of G equal groups of the support (`_Layout`), so that a vocabulary
sharded over devices is sliced where it lives; the last step overlaps its predecessor and masks
the columns already counted, so V need not be a multiple of the chunk and W is never padded or
copied.

Gradients equal the unchunked computation's to float32 rounding
(tests/training/test_chunked_logprobs.py). The backward recomputes the head's logits once
more (2 N D V FLOPs, per pass over the support).

Axis letters: N rows, D width, V support (the head's columns), G groups, C columns per group and step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """logits = h @ W in float32 with both operands in `dtype` (as `transformer.lm_head`)."""

    weight: jax.Array  # [V, D] (vocab_axis 0: an embedding table) or [D, V] (vocab_axis 1: a kernel)
    vocab_axis: int  # the weight's support axis
    dtype: str  # the operands' compute dtype

    def __post_init__(self):
        if self.vocab_axis not in (0, 1) or self.weight.ndim != 2:
            raise ValueError(f"LinearHead needs a 2-D weight and vocab_axis 0 or 1, got shape "
                             f"{self.weight.shape} and vocab_axis {self.vocab_axis!r}")

    @property
    def size(self) -> int:
        """V, the support's size."""
        return self.weight.shape[self.vocab_axis]

    def logits(self, h_ND) -> jax.Array:
        """Float32 logits [..., V] (the unchunked path)."""
        dt = jnp.dtype(self.dtype)
        eq = "...d,vd->...v" if self.vocab_axis == 0 else "...d,dv->...v"
        return jnp.einsum(eq, h_ND.astype(dt), self.weight.astype(dt), preferred_element_type=jnp.float32)


def check_chunk(chunk) -> None:
    """ValueError unless `chunk` is an int >= 0 (0: unchunked)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"vocab_chunk must be an integer >= 0 (0 = unchunked full logits), got {chunk!r}")


# ----------------------------------------------------------------------------- chunk layout

# The support is split into G equal groups of contiguous columns (G = the largest power of two
# <= MAX_GROUPS dividing V) and each step takes C columns of every group: a vocabulary sharded
# over up to MAX_GROUPS devices (the "tensor" mesh axis, `opd.sharding`) keeps its shards local
# (each device slices its own groups) instead of gathering the whole weight for the slices.
MAX_GROUPS = 16


@dataclasses.dataclass(frozen=True)
class _Layout:
    axis: int  # the weight's support axis
    G: int  # groups
    Vg: int  # columns per group
    C: int  # columns per group and step (the step covers G * C ~ chunk columns)
    n: int  # steps

    @classmethod
    def of(cls, w, axis: int, chunk: int) -> "_Layout":
        V = w.shape[axis]
        G = math.gcd(V, MAX_GROUPS)
        Vg = V // G
        C = max(1, min(chunk // G, Vg))
        return cls(axis, G, Vg, C, math.ceil(Vg / C))

    def group(self, w):
        """[V, D] -> [G, Vg, D] or [D, V] -> [D, G, Vg] (a reshape: no copy)."""
        if self.axis == 0:
            return w.reshape(self.G, self.Vg, w.shape[1])
        return w.reshape(w.shape[0], self.G, self.Vg)

    def ungroup(self, w_g):
        return w_g.reshape(w_g.shape[0] * w_g.shape[1], -1) if self.axis == 0 else w_g.reshape(w_g.shape[0], -1)

    def start(self, i):
        """First column (within each group) of step i; the last step is moved back to end at
        Vg and overlaps its predecessor."""
        return jnp.minimum(i * self.C, self.Vg - self.C)

    def fresh(self, i, start):
        """[1, 1, C] columns of step i that no earlier step covered."""
        return (start + jnp.arange(self.C) >= i * self.C)[None, None]

    def chunk(self, w_g, start):
        """The step's [G, C, D] / [D, G, C] slice of the grouped weight."""
        return jax.lax.dynamic_slice_in_dim(w_g, start, self.C, axis=self.axis + 1)

    def logits(self, h_ND, w_g, start):
        """Float32 logits [N, G, C] of the step."""
        eq = "nd,gcd->ngc" if self.axis == 0 else "nd,dgc->ngc"
        return jnp.einsum(eq, h_ND, self.chunk(w_g, start).astype(h_ND.dtype), preferred_element_type=jnp.float32)

    def teacher(self, t_NV, start):
        """The step's [N, G, C] columns of per-row values [N, V]."""
        t = t_NV.reshape(t_NV.shape[0], self.G, self.Vg)
        return jax.lax.dynamic_slice_in_dim(t, start, self.C, axis=2)


def _lse(h_ND, w, axis: int, chunk: int):
    """Online logsumexp over the steps: [N] float32."""
    lay = _Layout.of(w, axis, chunk)
    w_g = lay.group(w)

    def body(i, carry):
        m, s = carry
        start = lay.start(i)
        l = jnp.where(lay.fresh(i, start), lay.logits(h_ND, w_g, start), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(l, axis=(1, 2)))
        return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(l - m_new[:, None, None]), axis=(1, 2))

    N = h_ND.shape[0]
    m, s = jax.lax.fori_loop(0, lay.n, body, (jnp.full((N,), -jnp.inf, jnp.float32), jnp.zeros((N,), jnp.float32)))
    return m + jnp.log(s)


def _head_vjp(h_ND, w, axis: int, chunk: int, dlogits):
    """(dh, dW) of the head for the logit cotangents `dlogits(lay, i, start, logits_NGC)` ->
    [N, G, C] float32 (zero on columns that are not fresh); dh accumulated in float32."""
    lay = _Layout.of(w, axis, chunk)
    w_g = lay.group(w)
    dt = h_ND.dtype
    wc_eq = "gcd" if axis == 0 else "dgc"

    def body(i, carry):
        dh, dw = carry
        start = lay.start(i)
        g = dlogits(lay, i, start, lay.logits(h_ND, w_g, start)).astype(dt)
        dh = dh + jnp.einsum(f"ngc,{wc_eq}->nd", g, lay.chunk(w_g, start).astype(dt), preferred_element_type=jnp.float32)
        dwc = jnp.einsum(f"nd,ngc->{wc_eq}", h_ND, g, preferred_element_type=jnp.float32)
        # each column gets its gradient from one step (elsewhere g = 0, adding exact zeros): dW
        # is written in the weight's dtype, not accumulated in float32
        old = lay.chunk(dw, start)
        return dh, jax.lax.dynamic_update_slice_in_dim(dw, old + dwc.astype(w.dtype), start, axis=axis + 1)

    dh, dw = jax.lax.fori_loop(0, lay.n, body, (jnp.zeros(h_ND.shape, jnp.float32), jnp.zeros(w_g.shape, w.dtype)))
    return dh.astype(dt), lay.ungroup(dw)


# ----------------------------------------------------------------------------- logsumexp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logsumexp(h_ND, w, axis: int, chunk: int):
    return _lse(h_ND, w, axis, chunk)


def _logsumexp_fwd(h_ND, w, axis, chunk):
    lse = _lse(h_ND, w, axis, chunk)
    return lse, (h_ND, w, lse)


def _logsumexp_bwd(axis, chunk, res, g_N):
    h_ND, w, lse = res
    return _head_vjp(h_ND, w, axis, chunk, lambda lay, i, start, l: jnp.where(
        lay.fresh(i, start), g_N[:, None, None] * jnp.exp(l - lse[:, None, None]), 0.0))


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def logsumexp(head: LinearHead, h_ND, chunk: int) -> jax.Array:
    """lse [N] float32 of the head's logits at hidden states `h_ND` [N, D], `chunk` columns at a
    time (0, or a chunk covering the support: from the full logits)."""
    if chunk == 0 or chunk >= head.size:
        return jax.nn.logsumexp(head.logits(h_ND), axis=-1)
    return _logsumexp(h_ND.astype(jnp.dtype(head.dtype)), head.weight, head.vocab_axis, chunk)


def gathered_logits(head: LinearHead, h_ND, ids_N) -> jax.Array:
    """Float32 logits [N] of support ids `ids_N` (one row of W each; no [N, V] array)."""
    dt = jnp.dtype(head.dtype)
    rows = jnp.take(head.weight, ids_N, axis=head.vocab_axis).astype(dt)  # [N, D] or [D, N]
    eq = "nd,nd->n" if head.vocab_axis == 0 else "nd,dn->n"
    return jnp.einsum(eq, h_ND.astype(dt), rows, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- sums over the support


def _terms(phi, lay: _Layout, i, start, l_NGC, lse_N, t_NV):
    """log q, and phi and its derivative in log q on the fresh columns of one step (0 elsewhere)."""
    lq = l_NGC - lse_N[:, None, None]
    t = lay.teacher(t_NV, start)
    val, dval = jax.jvp(lambda x: phi(x, t), (lq,), (jnp.ones_like(lq),))
    fresh = lay.fresh(i, start)
    return lq, jnp.where(fresh, val, 0.0), jnp.where(fresh, dval, 0.0)


def _sums(h_ND, w, t_NV, phi, axis, chunk):
    """(sum_v phi, sum_v dphi/dlog q, lse), each [N]."""
    lse = _lse(h_ND, w, axis, chunk)
    lay = _Layout.of(w, axis, chunk)
    w_g = lay.group(w)

    def body(i, carry):
        start = lay.start(i)
        _, val, dval = _terms(phi, lay, i, start, lay.logits(h_ND, w_g, start), lse, t_NV)
        return carry[0] + jnp.sum(val, axis=(1, 2)), carry[1] + jnp.sum(dval, axis=(1, 2))

    zero = jnp.zeros((h_ND.shape[0],), jnp.float32)
    total, dtotal = jax.lax.fori_loop(0, lay.n, body, (zero, zero))
    return total, dtotal, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _sum_over_support(h_ND, w, t_NV, phi, axis, chunk):
    return _sums(h_ND, w, t_NV, phi, axis, chunk)[0]


def _sum_fwd(h_ND, w, t_NV, phi, axis, chunk):
    total, dtotal, lse = _sums(h_ND, w, t_NV, phi, axis, chunk)
    return total, (h_ND, w, t_NV, lse, dtotal)


def _sum_bwd(phi, axis, chunk, res, g_N):
    # D = sum_v phi(l_v - lse): dD/dl_v = phi'_v - q_v sum_u phi'_u
    h_ND, w, t_NV, lse, dtotal = res

    def dlogits(lay, i, start, l_NGC):
        lq, _, dval = _terms(phi, lay, i, start, l_NGC, lse, t_NV)
        q = jnp.where(lay.fresh(i, start), jnp.exp(lq), 0.0)
        return g_N[:, None, None] * (dval - q * dtotal[:, None, None])

    dh, dw = _head_vjp(h_ND, w, axis, chunk, dlogits)
    return dh, dw, None  # the teacher gets no gradient


_sum_over_support.defvjp(_sum_fwd, _sum_bwd)


def sum_over_support(head: LinearHead, h_ND, teacher_NV, phi: Callable, chunk: int) -> jax.Array:
    """sum_v phi(log q_v, teacher_v) [N] float32, q = softmax of the head's logits at `h_ND`
    [N, D], `teacher_NV` float32 [N, V] (no gradient), `phi` elementwise and differentiable in
    its first argument (a module-level function: it is a static argument). `chunk` columns at a
    time (0, or a chunk covering the support: from the full log-softmax)."""
    t = jax.lax.stop_gradient(teacher_NV.astype(jnp.float32))
    if chunk == 0 or chunk >= head.size:
        return jnp.sum(phi(jax.nn.log_softmax(head.logits(h_ND), axis=-1), t), axis=-1)
    return _sum_over_support(h_ND.astype(jnp.dtype(head.dtype)), head.weight, t, phi, head.vocab_axis, chunk)
