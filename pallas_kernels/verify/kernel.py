"""Blockwise speculative verification as Pallas kernels (streaming over vocabulary tiles).

Same contract as `reference.verify_reference` (the spec), and bit-for-bit the same decisions
for the same key (`common` holds everything both share).  Softmax over V is never written
to HBM; per row, two `pallas_call`s stream over vocabulary tiles of `block_v`:

* pass 1, grid (B, V / block_v), over the K+1 target rows and K draft rows of a batch row:
  greedy: running (max, first argmax) of the raw logits;
  sampling: online log-sum-exp (running max m and rescaled sum s) of x = logits / T, and the
  gathers x_i(d_i), log q_i(d_i) by an iota == token compare (no dynamic gather).
  Then, in the wrapper on [B, K] arrays only: accept mask, accepted count n.
* pass 2 (sampling only), grid (B, V / block_v), over the single row j = n of each batch row
  (gathered by the wrapper: p_{n+1} and q_{n+1}, or q == 0 for the bonus): running
  Gumbel-max over log max(0, p - q) + g and over log p + g, with g from the counter hash of
  `common.gumbel_noise` evaluated on the tile's vocabulary indices.

The drafter side is taken as processed log-probabilities log q (what the drafter sampled
from), not raw logits: q is then exactly the distribution the drafts came from.

top-k / top-p need a sort over the whole vocabulary, which does not stream; with either
filter on (and T > 0) the wrapper first applies `opd.decoding.sampling.process_logits` to the
target logits (materialising log p over V once) and feeds those log-probs to the same kernels
at temperature 1.

A vocabulary that is not a multiple of `block_v` is handled inside the kernels: the last
tile's out-of-range lanes are masked to -inf with an iota < V compare (no padded copy).

Backends.  The kernel bodies use only elementwise ops, iota, compares, `jnp.where`, max/min/
sum lane reductions and int32 wrap-around arithmetic, all of which Mosaic (TPU) and Triton
(GPU) lower.  The driver, however, accumulates across the vocabulary grid axis into output
blocks whose index map ignores that axis (the TPU "arbitrary" reduction-axis pattern, also
what `interpret=True` executes); Triton runs grid programs concurrently, so a GPU build needs
an in-kernel `fori_loop` over tiles instead, and `verify` refuses compiled non-TPU backends
rather than race.  Only interpret mode on CPU is tested here.

Axis letters: B batch, K drafted tokens, K1 = K + 1 target positions, V vocabulary, T vocab
tile (block_v).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from opd.decoding.sampling import SamplingParams, process_logits
from pallas_kernels.verify import common

# ----------------------------------------------------------------------------- constants
DEFAULT_BLOCK_V = 512
MIN_BLOCK_V = 128  # TPU lane width; also a power of two as Triton wants
_NEG_INF = float("-inf")
_BIG_INDEX = 2**31 - 1


# ----------------------------------------------------------------------------- block sizes
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the vocabulary axis.

    block_v: vocabulary tile; a power of two >= 128 (a TPU lane multiple and a Triton block).
      When V <= block_v the whole vocabulary is one tile (block equals the full dimension).
    """

    block_v: int = DEFAULT_BLOCK_V

    def __post_init__(self):
        bv = self.block_v
        if not isinstance(bv, int) or isinstance(bv, bool):
            raise ValueError(f"block_v must be an int, got {bv!r}")
        if bv < MIN_BLOCK_V or bv & (bv - 1):
            raise ValueError(f"block_v must be a power of two >= {MIN_BLOCK_V}, got {bv}")

    def tile(self, vocab: int) -> int:
        return vocab if vocab <= self.block_v else self.block_v


# ----------------------------------------------------------------------------- public wrapper
@functools.partial(
    jax.jit, static_argnames=("temperature", "top_k", "top_p", "block_v", "interpret"))
def verify(
    target_logits_BKV1: jax.Array,
    draft_tokens_BK: jax.Array,
    draft_logprobs_BKV: jax.Array | None,
    key: jax.Array | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    block_v: int = DEFAULT_BLOCK_V,
    interpret: bool = False,
) -> common.VerifyResult:
    """One lossless verify round, streaming over vocabulary tiles.

    Args:
      target_logits_BKV1: [B, K+1, V] float32 raw target logits (p_1..p_{K+1}).
      draft_tokens_BK: [B, K] int32 drafted tokens, in [0, V).
      draft_logprobs_BKV: [B, K, V] float32 drafter log-probs after the same
        `process_logits` processing (-inf where q == 0); None allowed when temperature == 0.
      key: PRNG key; may be None when temperature == 0.
      temperature, top_k, top_p: as `opd.decoding.sampling.SamplingParams` (static).
      block_v: vocabulary tile (static), see `BlockSizes`.
      interpret: run the Pallas interpreter (static; CPU tests).
    Returns:
      `VerifyResult(num_accepted [B] int32 in [0, K], next_token [B] int32,
      accepted [B, K] bool)`; identical to `verify_reference` for the same key.
    Raises:
      ValueError: malformed shapes/dtypes, K < 1, bad block size or sampling parameters.
    """
    b, k, v = common.check_inputs(target_logits_BKV1, draft_tokens_BK, draft_logprobs_BKV, key, temperature)
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tile = BlockSizes(block_v).tile(v)
    if not interpret and jax.default_backend() != "tpu":
        raise NotImplementedError(
            "compiled verify accumulates over a sequential vocabulary grid axis (TPU); use "
            "interpret=True on this backend (a GPU driver with an in-kernel tile loop is not built)")

    if sp.greedy:
        _, argmax_BK1 = _pass1(target_logits_BKV1, None, None, temperature=0.0, tile=tile, interpret=interpret)
        accepted_BK = draft_tokens_BK == argmax_BK1[:, :k]
        n_B = common.num_accepted(accepted_BK)
        next_B = jnp.take_along_axis(argmax_BK1, n_B[:, None], axis=1)[:, 0]
        return common.VerifyResult(n_B, next_B, accepted_BK)

    if sp.top_k > 0 or sp.top_p < 1.0:  # non-streamable filters: materialise log p once
        x_BKV1, scale_t = process_logits(target_logits_BKV1, sp), 1.0
    else:
        x_BKV1, scale_t = target_logits_BKV1, float(sp.temperature)
    uniforms_BK, row_seed_B1 = common.split_key(key, b, k)
    (m_BK1, s_BK1, xd_BK, qd_BK) = _pass1(
        x_BKV1, draft_tokens_BK, draft_logprobs_BKV, temperature=scale_t, tile=tile, interpret=interpret)
    log_s_BK1 = jnp.log(s_BK1)
    logp_d_BK = common.log_softmax_from_stats(xd_BK, m_BK1[:, :k], log_s_BK1[:, :k])
    accepted_BK = common.accept_mask(logp_d_BK, qd_BK, uniforms_BK)
    n_B = common.num_accepted(accepted_BK)

    # Row j = n of each batch row: p_{n+1}, and q_{n+1} (or q == 0 for the bonus draw).
    x_B1V = jnp.take_along_axis(x_BKV1, n_B[:, None, None], axis=1)
    lq_B1V = jnp.take_along_axis(draft_logprobs_BKV, jnp.minimum(n_B, k - 1)[:, None, None], axis=1)
    lq_B1V = jnp.where((n_B < k)[:, None, None], lq_B1V, -jnp.inf)
    m_B = jnp.take_along_axis(m_BK1, n_B[:, None], axis=1)
    log_s_B = jnp.take_along_axis(log_s_BK1, n_B[:, None], axis=1)
    res_best_B, res_tok_B, p_tok_B = _pass2(
        x_B1V, lq_B1V, m_B, log_s_B, row_seed_B1, temperature=scale_t, tile=tile, interpret=interpret)
    return common.VerifyResult(n_B, common.select_next_token(res_best_B, res_tok_B, p_tok_B), accepted_BK)


def _compiler_params():
    # Batch rows are independent; the vocabulary axis carries the running reductions.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _pass1(x_BKV1, d_BK, lq_BKV, *, temperature: float, tile: int, interpret: bool):
    """Greedy (temperature == 0): (max, argmax) [B, K1].  Else (m, s) [B, K1], x(d), log q(d) [B, K]."""
    b, k1, v = x_BKV1.shape
    k = k1 - 1
    grid = (b, pl.cdiv(v, tile))
    col_K1 = pl.BlockSpec((1, k1, 1), _row_index_map)
    col_K = pl.BlockSpec((1, k, 1), _row_index_map)
    in_specs = [pl.BlockSpec((1, k1, tile), _row_tile_index_map)]
    args = [x_BKV1]
    if temperature == 0.0:
        out_shape = [jax.ShapeDtypeStruct((b, k1, 1), jnp.float32), jax.ShapeDtypeStruct((b, k1, 1), jnp.int32)]
        out_specs = [col_K1, col_K1]
        body = functools.partial(_greedy_pass1_kernel, vocab=v, tile=tile)
    else:
        in_specs += [col_K, pl.BlockSpec((1, k, tile), _row_tile_index_map)]
        args += [d_BK[:, :, None], lq_BKV]
        out_shape = [jax.ShapeDtypeStruct((b, k1, 1), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((b, k, 1), jnp.float32)] * 2
        out_specs = [col_K1, col_K1, col_K, col_K]
        body = functools.partial(_sampling_pass1_kernel, vocab=v, tile=tile, temperature=temperature)
    outs = pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_compiler_params(),
        cost_estimate=_cost_estimate(b, k1, v, passes=1 if temperature == 0.0 else 2),
        interpret=interpret,
        name="verify_pass1",
    )(*args)
    return tuple(o[..., 0] for o in outs)


def _pass2(x_B1V, lq_B1V, m_B1, log_s_B1, row_seed_B1, *, temperature: float, tile: int, interpret: bool):
    """Gumbel-max over the residual and over p on one row per batch row: ([B] best, [B] tok, [B] tok)."""
    b, _, v = x_B1V.shape
    row_tile = pl.BlockSpec((1, 1, tile), _row_tile_index_map)
    scalar = pl.BlockSpec((1, 1, 1), _row_index_map)
    f32, i32 = jax.ShapeDtypeStruct((b, 1, 1), jnp.float32), jax.ShapeDtypeStruct((b, 1, 1), jnp.int32)
    outs = pl.pallas_call(
        functools.partial(_pass2_kernel, vocab=v, tile=tile, temperature=temperature),
        out_shape=[f32, i32, f32, i32],
        grid=(b, pl.cdiv(v, tile)),
        in_specs=[row_tile, row_tile, scalar, scalar, scalar],
        out_specs=[scalar] * 4,
        compiler_params=_compiler_params(),
        cost_estimate=_cost_estimate(b, 1, v, passes=2),
        interpret=interpret,
        name="verify_pass2",
    )(x_B1V, lq_B1V, m_B1[:, :, None], log_s_B1[:, :, None], row_seed_B1[:, :, None])
    res_best, res_tok, _, p_tok = (o[:, 0, 0] for o in outs)
    return res_best, res_tok, p_tok


# ----------------------------------------------------------------------------- kernel bodies
def _tile_ids(rows: int, tile: int, vocab: int):
    """Absolute vocabulary indices [rows, tile] of the current tile and their validity (< V)."""
    ids = pl.program_id(1) * tile + jax.lax.broadcasted_iota(jnp.int32, (rows, tile), 1)
    return ids, ids < vocab


def _update_argmax(best_ref, idx_ref, scores, ids):
    """Running (max, first argmax) along lanes; ties keep the lower vocabulary index."""
    tile_best = jnp.max(scores, axis=-1, keepdims=True)
    tile_idx = jnp.min(jnp.where(scores == tile_best, ids, _BIG_INDEX), axis=-1, keepdims=True)
    better = tile_best > best_ref[0]
    idx_ref[0] = jnp.where(better, tile_idx, idx_ref[0])
    best_ref[0] = jnp.where(better, tile_best, best_ref[0])


def _init_argmax(best_ref, idx_ref):
    best_ref[...] = jnp.full(best_ref.shape, _NEG_INF, jnp.float32)
    idx_ref[...] = jnp.zeros(idx_ref.shape, jnp.int32)


def _greedy_pass1_kernel(x_ref, best_ref, idx_ref, *, vocab: int, tile: int):
    k1 = x_ref.shape[1]
    ids, valid = _tile_ids(k1, tile, vocab)

    @pl.when(pl.program_id(1) == 0)
    def _init():
        _init_argmax(best_ref, idx_ref)

    _update_argmax(best_ref, idx_ref, jnp.where(valid, x_ref[0], _NEG_INF), ids)


def _sampling_pass1_kernel(x_ref, d_ref, lq_ref, m_ref, s_ref, xd_ref, qd_ref, *, vocab: int, tile: int,
                           temperature: float):
    k1, k = x_ref.shape[1], d_ref.shape[1]

    @pl.when(pl.program_id(1) == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG_INF, jnp.float32)
        s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)
        xd_ref[...] = jnp.full(xd_ref.shape, _NEG_INF, jnp.float32)
        qd_ref[...] = jnp.full(qd_ref.shape, _NEG_INF, jnp.float32)

    # Online log-sum-exp of x / T over all K+1 target rows.
    ids, valid = _tile_ids(k1, tile, vocab)
    xs = jnp.where(valid, x_ref[0] / temperature, _NEG_INF)
    m_old = m_ref[0]
    m_new = jnp.maximum(m_old, jnp.max(xs, axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)  # all -inf so far (filtered tiles)
    s_ref[0] = s_ref[0] * jnp.exp(m_old - m_safe) + jnp.sum(jnp.exp(xs - m_safe), axis=-1, keepdims=True)
    m_ref[0] = m_new

    # x_i(d_i) and log q_i(d_i): exactly one tile holds d_i; the others contribute -inf.
    ids_k, valid_k = _tile_ids(k, tile, vocab)
    hit = valid_k & (ids_k == d_ref[0])
    xd_tile = jnp.where(hit, x_ref[0, :k, :] / temperature, _NEG_INF)
    qd_tile = jnp.where(hit, lq_ref[0], _NEG_INF)
    xd_ref[0] = jnp.maximum(xd_ref[0], jnp.max(xd_tile, axis=-1, keepdims=True))
    qd_ref[0] = jnp.maximum(qd_ref[0], jnp.max(qd_tile, axis=-1, keepdims=True))


def _pass2_kernel(x_ref, lq_ref, m_ref, log_s_ref, seed_ref, res_best_ref, res_tok_ref, p_best_ref, p_tok_ref,
                  *, vocab: int, tile: int, temperature: float):
    @pl.when(pl.program_id(1) == 0)
    def _init():
        _init_argmax(res_best_ref, res_tok_ref)
        _init_argmax(p_best_ref, p_tok_ref)

    ids, valid = _tile_ids(1, tile, vocab)
    xs = jnp.where(valid, x_ref[0] / temperature, _NEG_INF)
    logp = common.log_softmax_from_stats(xs, m_ref[0], log_s_ref[0])
    logq = jnp.where(valid, lq_ref[0], _NEG_INF)
    noise = common.gumbel_noise(seed_ref[0], ids)
    _update_argmax(res_best_ref, res_tok_ref, common.residual_logits(logp, logq) + noise, ids)
    _update_argmax(p_best_ref, p_tok_ref, logp + noise, ids)


# ----------------------------------------------------------------------------- index maps
def _row_tile_index_map(b, v):
    """Batch row b, all rows of the middle axis, vocabulary tile v."""
    return b, 0, v


def _row_index_map(b, v):
    """Batch row b, whole block; constant in v, so the block stays resident as an accumulator."""
    del v
    return b, 0, 0


# ----------------------------------------------------------------------------- cost estimate
def _cost_estimate(b: int, rows: int, v: int, passes: int) -> pl.CostEstimate:
    """Rough: a few flops and one exp per streamed element; every input element read once."""
    elems = b * rows * v
    return pl.CostEstimate(flops=8 * elems, transcendentals=elems if passes > 1 else 0,
                           bytes_accessed=4 * elems * passes)
