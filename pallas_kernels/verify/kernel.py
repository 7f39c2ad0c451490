"""Blockwise speculative verification as Pallas kernels (streaming over vocabulary tiles).

Same contract as `reference.verify_reference` (the spec), and the same decisions for the same
key (`common` holds everything that is not a vocabulary reduction; the one float difference
is the summation order of the log-sum-exp, so a decision could differ only where a compare
sits within a few ulp).  Softmax over V is never written to HBM.  A round runs one (greedy)
or two (sampling) reductions over vocabulary tiles of `block_v`, each one `pallas_call`, with
small [B, K] arithmetic in the wrapper between them:

* argmax (greedy): per target row, running (max, first argmax) of the raw logits.
* log-sum-exp (sampling): per target row, online max m and rescaled sum s of x = logits / T.
  The wrapper then gathers x_i(d_i) and log q_i(d_i) (B*K elements, an XLA gather), forms
  log p_i(d_i) = x_i(d_i) - m_i - log s_i, the accept mask and the accepted count n.
* draw (sampling): on the single row j = n of each batch row (p_{n+1}, and q_{n+1}, or
  q == 0 for the bonus), running Gumbel-max over log max(0, p - q) + g and over log p + g,
  with g from the counter hash of `common.gumbel_noise` evaluated on the tile's indices.

Two formulations of those reductions (the same arithmetic: `common.running_argmax`,
`common.running_logsumexp`):

* "grid" (TPU, this file): grid (B, V / block_v); blocks (1, K+1, block_v) cover every
  target row of a batch row, and the running values live in output blocks whose index map
  ignores the vocabulary axis, revisited along it (the Mosaic "arbitrary" reduction axis:
  grid steps run in order on one core).  The draw's row j = n is gathered by the wrapper
  (a copy of two rows per batch row: a (1, 1, block_v) block of row n of [B, K+1, V] is not
  a legal TPU block, whose last two dims must be (8, 128) multiples or whole).
* "split" (GPU, `split.py`): no state crosses grid programs, which Triton runs
  concurrently.  Grid (B, K+1, C) (draw: (B, C)): each program reduces one contiguous chunk
  of one row with an in-kernel `fori_loop` over power-of-two tiles (masked loads past V)
  and writes its partial (max, argmax) or (m, s); a jnp combine over the C chunks finishes.
  The draw reads row n in place (no copy).

`verify` picks the formulation when the program is lowered (`jax.lax.platform_dependent`),
so an export from a CPU host for TPU or CUDA gets that platform's kernel: TPU -> "grid"
compiled (Mosaic, `tpu_custom_call`), CUDA / ROCm -> "split" compiled (Triton), any other
platform (CPU) -> "grid" in the Pallas interpreter.  `formulation` and `interpret` override
the choice (tests run both formulations interpreted).  The kernel bodies use only elementwise
ops, iota, compares, `jnp.where`, max/min/sum lane reductions and int32 wrap-around
arithmetic, which Mosaic and Triton both lower (tests/pallas_kernels/test_lowering.py
exports every kernel for both from a CPU host; lowering is not compiling: Mosaic's and
Triton's own compilers run only on the device).

The drafter side is taken as processed log-probabilities log q (what the drafter sampled
from), not raw logits: q is then exactly the distribution the drafts came from.  Target
logits and draft log-probs may be float32 or bfloat16; kernels read either and compute in
float32 (the upcast is exact, so bfloat16 inputs give the reference's decisions on them).

top-k / top-p need a sort over the whole vocabulary, which does not stream; with either
filter on (and T > 0) the wrapper first applies `opd.decoding.sampling.process_logits` to the
target logits (materialising log p over V once) and feeds those log-probs to the same kernels
at temperature 1.

A vocabulary that is not a multiple of the tile is handled inside the kernels: lanes past V
are masked to -inf by an iota < V compare (grid: the last block's padding; split: masked
loads), never by a padded copy.

Axis letters: B batch, K drafted tokens, K1 = K + 1 target positions, V vocabulary, T vocab
tile (block_v), C vocabulary chunks (split).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from opd.decoding.sampling import SamplingParams, process_logits
from pallas_kernels.verify import common, split

# ----------------------------------------------------------------------------- constants
FORMULATIONS = ("grid", "split")
# grid (TPU): (K+1, 8192) float32 blocks are 0.5 MiB at K = 15, double-buffered well inside
# the 16 MiB default scoped VMEM, and few enough grid steps (~19 at V = 152k) that the
# per-step overhead does not dominate.  split (GPU): by the logits' width, `split.default_block_v`.
GRID_BLOCK_V = 8192
MIN_BLOCK_V = 128  # TPU lane width; also a power of two as Triton wants
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- block sizes
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the vocabulary axis.

    block_v: vocabulary tile; a power of two >= 128 (a TPU lane multiple and a Triton block).
      grid: when V <= block_v the whole vocabulary is one tile (block equals the full
      dimension).  split: the tile is min(block_v, next power of two >= V).
    chunk_v: split only: vocabulary entries one grid program reduces, rounded down to whole
      tiles (at least one); None picks it from the shapes (`split.plan`).
    """

    block_v: int = GRID_BLOCK_V
    chunk_v: int | None = None

    def __post_init__(self):
        bv, cv = self.block_v, self.chunk_v
        if not isinstance(bv, int) or isinstance(bv, bool):
            raise ValueError(f"block_v must be an int, got {bv!r}")
        if bv < MIN_BLOCK_V or bv & (bv - 1):
            raise ValueError(f"block_v must be a power of two >= {MIN_BLOCK_V}, got {bv}")
        if cv is not None and (not isinstance(cv, int) or isinstance(cv, bool) or cv < 1):
            raise ValueError(f"chunk_v must be a positive int (vocabulary entries per grid program) or None, got {cv!r}")

    def tile(self, vocab: int) -> int:
        """The grid formulation's tile."""
        return vocab if vocab <= self.block_v else self.block_v


# ----------------------------------------------------------------------------- public wrapper
@functools.partial(
    jax.jit, static_argnames=("temperature", "top_k", "top_p", "block_v", "chunk_v", "formulation", "interpret"))
def verify(
    target_logits_BKV1: jax.Array,
    draft_tokens_BK: jax.Array,
    draft_logprobs_BKV: jax.Array | None,
    key: jax.Array | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    block_v: int | None = None,
    chunk_v: int | None = None,
    formulation: str | None = None,
    interpret: bool | None = None,
) -> common.VerifyResult:
    """One lossless verify round, streaming over vocabulary tiles.

    Args:
      target_logits_BKV1: [B, K+1, V] float32 or bfloat16 raw target logits (p_1..p_{K+1}).
      draft_tokens_BK: [B, K] int32 drafted tokens, in [0, V).
      draft_logprobs_BKV: [B, K, V] float32 or bfloat16 drafter log-probs after the same
        `process_logits` processing (-inf where q == 0); None allowed when temperature == 0.
      key: PRNG key; may be None when temperature == 0.
      temperature, top_k, top_p: as `opd.decoding.sampling.SamplingParams` (static).
      block_v: vocabulary tile (static), see `BlockSizes`; None: the default of the formulation
        that runs (grid: `GRID_BLOCK_V`; split: `split.default_block_v` of the logits' dtype).
      chunk_v: split formulation only (static), see `BlockSizes`.
      formulation: "grid" | "split" | None (static): None picks by the lowering platform
        (module docstring: TPU grid, CUDA/ROCm split, else grid).
      interpret: run the Pallas interpreter (static); None: on platforms other than TPU,
        CUDA and ROCm only.
    Returns:
      `VerifyResult(num_accepted [B] int32 in [0, K], next_token [B] int32,
      accepted [B, K] bool)`; the decisions of `verify_reference` for the same key.
    Raises:
      ValueError: malformed shapes/dtypes, K < 1, bad block sizes, formulation or sampling
        parameters.
    """
    common.check_inputs(target_logits_BKV1, draft_tokens_BK, draft_logprobs_BKV, key, temperature)
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if formulation not in (None, *FORMULATIONS):
        raise ValueError(f"formulation must be one of {FORMULATIONS} or None, got {formulation!r}")
    args = (target_logits_BKV1, draft_tokens_BK, draft_logprobs_BKV, key)

    def pick(default_formulation: str, default_interpret: bool):
        """The round with the formulation fixed (its block sizes checked now, before tracing)."""
        f = formulation or default_formulation
        interp = default_interpret if interpret is None else interpret
        default = split.default_block_v(target_logits_BKV1.dtype) if f == "split" else GRID_BLOCK_V
        return functools.partial(_verify, sp=sp, formulation=f, interpret=interp,
                                 sizes=BlockSizes(block_v or default, chunk_v))

    if formulation is not None and interpret is not None:
        return pick(formulation, interpret)(*args)
    gpu = pick("split", False)
    return jax.lax.platform_dependent(*args, tpu=pick("grid", False), cuda=gpu, rocm=gpu, default=pick("grid", True))


def _verify(target_logits_BKV1, draft_tokens_BK, draft_logprobs_BKV, key, *, sp: SamplingParams, formulation: str,
            interpret: bool, sizes: BlockSizes) -> common.VerifyResult:
    """`verify` with the formulation fixed: the reductions of `formulation`, the rest in jnp."""
    b, k1, _ = target_logits_BKV1.shape
    k = k1 - 1
    ops = _FORMULATIONS[formulation]
    kw = dict(block_v=sizes.block_v, chunk_v=sizes.chunk_v, interpret=interpret)
    if sp.greedy:
        argmax_BK1 = ops.argmax(target_logits_BKV1, **kw)
        accepted_BK = draft_tokens_BK == argmax_BK1[:, :k]
        n_B = common.num_accepted(accepted_BK)
        next_B = jnp.take_along_axis(argmax_BK1, n_B[:, None], axis=1)[:, 0]
        return common.VerifyResult(n_B, next_B, accepted_BK)

    if sp.top_k > 0 or sp.top_p < 1.0:  # non-streamable filters: materialise log p once
        x_BKV1, scale_t = process_logits(target_logits_BKV1, sp), 1.0
    else:
        x_BKV1, scale_t = target_logits_BKV1, float(sp.temperature)
    uniforms_BK, row_seed_B1 = common.split_key(key, b, k)
    m_BK1, s_BK1 = ops.logsumexp(x_BKV1, temperature=scale_t, **kw)
    log_s_BK1 = jnp.log(s_BK1)
    # x_i(d_i) / T and log q_i(d_i): B*K elements, gathered where they lie (no kernel pass over q)
    rows_B1, offs_1K = jnp.arange(b)[:, None], jnp.arange(k)[None, :]
    xd_BK = x_BKV1[rows_B1, offs_1K, draft_tokens_BK].astype(jnp.float32) / scale_t
    qd_BK = draft_logprobs_BKV[rows_B1, offs_1K, draft_tokens_BK].astype(jnp.float32)
    logp_d_BK = common.log_softmax_from_stats(xd_BK, m_BK1[:, :k], log_s_BK1[:, :k])
    accepted_BK = common.accept_mask(logp_d_BK, qd_BK, uniforms_BK)
    n_B = common.num_accepted(accepted_BK)

    m_B = jnp.take_along_axis(m_BK1, n_B[:, None], axis=1)[:, 0]
    log_s_B = jnp.take_along_axis(log_s_BK1, n_B[:, None], axis=1)[:, 0]
    res_best_B, res_tok_B, p_tok_B = ops.draw(x_BKV1, draft_logprobs_BKV, n_B, m_B, log_s_B, row_seed_B1[:, 0],
                                              temperature=scale_t, **kw)
    return common.VerifyResult(n_B, common.select_next_token(res_best_B, res_tok_B, p_tok_B), accepted_BK)


# ----------------------------------------------------------------------------- grid formulation (TPU)
def _compiler_params():
    # Batch rows are independent; the vocabulary axis carries the running reductions.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _grid_argmax(x_BKV1, *, block_v: int, chunk_v, interpret: bool):
    """(first) argmax over V of every row: [B, K1] int32."""
    del chunk_v
    b, k1, v = x_BKV1.shape
    tile = BlockSizes(block_v).tile(v)
    col = pl.BlockSpec((1, k1, 1), _row_index_map)
    _, idx = pl.pallas_call(
        functools.partial(_argmax_kernel, vocab=v, tile=tile),
        out_shape=[jax.ShapeDtypeStruct((b, k1, 1), jnp.float32), jax.ShapeDtypeStruct((b, k1, 1), jnp.int32)],
        grid=(b, pl.cdiv(v, tile)),
        in_specs=[pl.BlockSpec((1, k1, tile), _row_tile_index_map)],
        out_specs=[col, col],
        compiler_params=_compiler_params(),
        cost_estimate=_cost_estimate(x_BKV1, transcendentals=False),
        interpret=interpret,
        name="verify_grid_argmax",
    )(x_BKV1)
    return idx[..., 0]


def _grid_logsumexp(x_BKV1, *, temperature: float, block_v: int, chunk_v, interpret: bool):
    """Online log-sum-exp of x / T over V of every row: (m, s), each [B, K1] float32."""
    del chunk_v
    b, k1, v = x_BKV1.shape
    tile = BlockSizes(block_v).tile(v)
    col = pl.BlockSpec((1, k1, 1), _row_index_map)
    m, s = pl.pallas_call(
        functools.partial(_logsumexp_kernel, vocab=v, tile=tile, temperature=temperature),
        out_shape=[jax.ShapeDtypeStruct((b, k1, 1), jnp.float32)] * 2,
        grid=(b, pl.cdiv(v, tile)),
        in_specs=[pl.BlockSpec((1, k1, tile), _row_tile_index_map)],
        out_specs=[col, col],
        compiler_params=_compiler_params(),
        cost_estimate=_cost_estimate(x_BKV1, transcendentals=True),
        interpret=interpret,
        name="verify_grid_logsumexp",
    )(x_BKV1)
    return m[..., 0], s[..., 0]


def _grid_draw(x_BKV1, lq_BKV, n_B, m_B, log_s_B, row_seed_B, *, temperature: float, block_v: int, chunk_v,
               interpret: bool):
    """Gumbel-max over the residual and over p on row n of each batch row: ([B] best, [B] tok, [B] tok)."""
    del chunk_v
    b, k1, v = x_BKV1.shape
    k = k1 - 1
    tile = BlockSizes(block_v).tile(v)
    # Row j = n of each batch row: p_{n+1}, and q_{n+1} (or q == 0 for the bonus draw).
    x_B1V = jnp.take_along_axis(x_BKV1, n_B[:, None, None], axis=1)
    lq_B1V = jnp.take_along_axis(lq_BKV, jnp.minimum(n_B, k - 1)[:, None, None], axis=1)
    lq_B1V = jnp.where((n_B < k)[:, None, None], lq_B1V, jnp.array(_NEG_INF, lq_B1V.dtype))
    row_tile = pl.BlockSpec((1, 1, tile), _row_tile_index_map)
    scalar = pl.BlockSpec((1, 1, 1), _row_index_map)
    f32, i32 = jax.ShapeDtypeStruct((b, 1, 1), jnp.float32), jax.ShapeDtypeStruct((b, 1, 1), jnp.int32)
    outs = pl.pallas_call(
        functools.partial(_draw_kernel, vocab=v, tile=tile, temperature=temperature),
        out_shape=[f32, i32, f32, i32],
        grid=(b, pl.cdiv(v, tile)),
        in_specs=[row_tile, row_tile, scalar, scalar, scalar],
        out_specs=[scalar] * 4,
        compiler_params=_compiler_params(),
        cost_estimate=_cost_estimate(x_B1V, lq_B1V, transcendentals=True),
        interpret=interpret,
        name="verify_grid_draw",
    )(x_B1V, lq_B1V, m_B[:, None, None], log_s_B[:, None, None], row_seed_B[:, None, None])
    res_best, res_tok, _, p_tok = (o[:, 0, 0] for o in outs)
    return res_best, res_tok, p_tok


class _Reductions(NamedTuple):
    """The three vocabulary reductions of one formulation (same signatures in both)."""

    argmax: Callable
    logsumexp: Callable
    draw: Callable


_FORMULATIONS = {"grid": _Reductions(_grid_argmax, _grid_logsumexp, _grid_draw),
                 "split": _Reductions(split.argmax, split.logsumexp, split.draw)}


# ----------------------------------------------------------------------------- kernel bodies (grid)
def _tile_ids(rows: int, tile: int, vocab: int):
    """Absolute vocabulary indices [rows, tile] of the current tile and their validity (< V)."""
    ids = pl.program_id(1) * tile + jax.lax.broadcasted_iota(jnp.int32, (rows, tile), 1)
    return ids, ids < vocab


def _init_argmax(best_ref, idx_ref):
    best_ref[...] = jnp.full(best_ref.shape, _NEG_INF, jnp.float32)
    idx_ref[...] = jnp.zeros(idx_ref.shape, jnp.int32)


def _argmax_kernel(x_ref, best_ref, idx_ref, *, vocab: int, tile: int):
    @pl.when(pl.program_id(1) == 0)
    def _init():
        _init_argmax(best_ref, idx_ref)

    ids, valid = _tile_ids(x_ref.shape[1], tile, vocab)
    scores = jnp.where(valid, x_ref[0].astype(jnp.float32), _NEG_INF)
    best_ref[0], idx_ref[0] = common.running_argmax(best_ref[0], idx_ref[0], scores, ids)


def _logsumexp_kernel(x_ref, m_ref, s_ref, *, vocab: int, tile: int, temperature: float):
    @pl.when(pl.program_id(1) == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG_INF, jnp.float32)
        s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)

    _, valid = _tile_ids(x_ref.shape[1], tile, vocab)
    xs = jnp.where(valid, x_ref[0].astype(jnp.float32) / temperature, _NEG_INF)
    m_ref[0], s_ref[0] = common.running_logsumexp(m_ref[0], s_ref[0], xs)


def _draw_kernel(x_ref, lq_ref, m_ref, log_s_ref, seed_ref, res_best_ref, res_tok_ref, p_best_ref, p_tok_ref,
                 *, vocab: int, tile: int, temperature: float):
    @pl.when(pl.program_id(1) == 0)
    def _init():
        _init_argmax(res_best_ref, res_tok_ref)
        _init_argmax(p_best_ref, p_tok_ref)

    ids, valid = _tile_ids(1, tile, vocab)
    xs = jnp.where(valid, x_ref[0].astype(jnp.float32) / temperature, _NEG_INF)
    logp = common.log_softmax_from_stats(xs, m_ref[0], log_s_ref[0])
    logq = jnp.where(valid, lq_ref[0].astype(jnp.float32), _NEG_INF)
    noise = common.gumbel_noise(seed_ref[0], ids)
    res_best_ref[0], res_tok_ref[0] = common.running_argmax(
        res_best_ref[0], res_tok_ref[0], common.residual_logits(logp, logq) + noise, ids)
    p_best_ref[0], p_tok_ref[0] = common.running_argmax(p_best_ref[0], p_tok_ref[0], logp + noise, ids)


# ----------------------------------------------------------------------------- index maps (grid)
def _row_tile_index_map(b, v):
    """Batch row b, all rows of the middle axis, vocabulary tile v."""
    return b, 0, v


def _row_index_map(b, v):
    """Batch row b, whole block; constant in v, so the block stays resident as an accumulator."""
    del v
    return b, 0, 0


# ----------------------------------------------------------------------------- cost estimate
def _cost_estimate(*inputs, transcendentals: bool) -> pl.CostEstimate:
    """Rough: a few flops (and one exp) per streamed element; every input element read once."""
    elems = sum(x.size for x in inputs)
    return pl.CostEstimate(flops=8 * elems, transcendentals=elems if transcendentals else 0,
                           bytes_accessed=sum(x.size * x.dtype.itemsize for x in inputs))
