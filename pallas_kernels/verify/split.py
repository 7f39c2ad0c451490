"""The "split" formulation of the verify reductions: no state crosses grid programs (GPU).

Triton runs the programs of a grid concurrently, so the TPU pattern of accumulating along a
grid axis into a resident output block (kernel.py's "grid" formulation) would race there.
Here every program owns its output:

  argmax / logsumexp: grid (B, K1, C).  Program (b, i, c) reduces chunk c (`chunk_tiles`
    consecutive tiles of `tile` entries) of row (b, i) with an in-kernel `lax.fori_loop`
    over its tiles (Triton pipelines the loads of an scf.for), and writes one partial:
    (max, first argmax) or (m, s).
  draw: grid (B, C); program (b, c) reads row n_b of x and row min(n_b, K-1) of log q in
    place (the whole [K1, V] slab of batch row b is the block; only the selected row's tiles
    are loaded) and writes the chunk's two running Gumbel-max pairs.

A jnp combine over the C partials (tiny [B, K1, C] arrays) finishes each reduction: the first
chunk holding the max (chunks are in vocabulary order, so ties keep the lower index, as
`jnp.argmax`), and m = max_c m_c, s = sum_c s_c exp(m_c - m).  The per-tile arithmetic is
`common.running_argmax` / `common.running_logsumexp`, shared with the grid formulation.

Tiles are powers of two (Triton tensors must be); the loads past V are masked (other = -inf),
so V need not be a multiple of anything.  Rows are 1-D refs (block (None, None, V)), loaded
tile by tile with `pl.ds`; nothing is padded or copied.  This formulation uses Triton's
masked load (`jax.experimental.pallas.triton.load`) and Triton compiler parameters: it
lowers for CUDA / ROCm and runs in the Pallas interpreter anywhere, not under Mosaic (TPU).

Axis letters: B batch, K drafted tokens, K1 = K + 1 target rows, V vocabulary, C chunks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.verify import common

DEFAULT_BLOCK_V = 1024  # 4 KiB of float32 per load: 128 threads x 2 x 16-byte vector loads
# 2-byte logits: a 4096 tile (8 KiB per load) read faster on an H200 than 1024 at 256x15x151936
# (greedy 0.67 -> 0.73 of HBM peak, sampling 0.33 -> 0.37; experiments/results/verify_kernel_h200/
# block_v_sweep.txt); float32 at 1024 already reads at 0.81 there.
DEFAULT_BLOCK_V_2BYTE = 4096
NUM_WARPS = 4
NUM_STAGES = 3  # Triton's software pipelining depth of the tile loop
# Programs a reduction aims for when chunk_v is not given: several per SM of an H100/H200
# (132 SMs), so that enough loads are in flight to keep HBM busy at small B * K1.
TARGET_PROGRAMS = 1024
_NEG_INF = float("-inf")


def default_block_v(dtype) -> int:
    """The tile `verify` uses on GPU when none is given: by the logits' width."""
    return DEFAULT_BLOCK_V_2BYTE if jnp.dtype(dtype).itemsize == 2 else DEFAULT_BLOCK_V


class Plan(NamedTuple):
    """How a row of V entries is cut: `chunks` programs of `chunk_tiles` tiles of `tile`."""

    tile: int
    chunk_tiles: int
    chunks: int


def plan(rows: int, vocab: int, block_v: int, chunk_v: int | None) -> Plan:
    """Tile = min(block_v, next power of two >= V); chunk = chunk_v // tile tiles, or (None)
    enough chunks for ~`TARGET_PROGRAMS` programs over `rows` rows; never more than V needs."""
    tile = min(block_v, pl.next_power_of_2(vocab))
    n_tiles = pl.cdiv(vocab, tile)
    if chunk_v is None:
        chunk_tiles = max(1, rows * n_tiles // TARGET_PROGRAMS)
    else:
        chunk_tiles = max(1, chunk_v // tile)
    chunk_tiles = min(chunk_tiles, n_tiles)
    return Plan(tile, chunk_tiles, pl.cdiv(n_tiles, chunk_tiles))


# ----------------------------------------------------------------------------- reductions
def argmax(x_BKV1, *, block_v: int, chunk_v: int | None, interpret: bool):
    """(first) argmax over V of every row: [B, K1] int32."""
    b, k1, v = x_BKV1.shape
    p = plan(b * k1, v, block_v, chunk_v)
    part = pl.BlockSpec((None, None, 1), _partial_index_map)
    best, idx = pl.pallas_call(
        functools.partial(_argmax_kernel, vocab=v, plan=p),
        out_shape=[jax.ShapeDtypeStruct((b, k1, p.chunks), jnp.float32),
                   jax.ShapeDtypeStruct((b, k1, p.chunks), jnp.int32)],
        grid=(b, k1, p.chunks),
        in_specs=[pl.BlockSpec((None, None, v), _row_index_map)],
        out_specs=[part, part],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="verify_split_argmax",
    )(x_BKV1)
    return _combine_argmax(best, idx)[1]


def logsumexp(x_BKV1, *, temperature: float, block_v: int, chunk_v: int | None, interpret: bool):
    """Online log-sum-exp of x / T over V of every row: (m, s), each [B, K1] float32."""
    b, k1, v = x_BKV1.shape
    p = plan(b * k1, v, block_v, chunk_v)
    part = pl.BlockSpec((None, None, 1), _partial_index_map)
    m_C, s_C = pl.pallas_call(
        functools.partial(_logsumexp_kernel, vocab=v, plan=p, temperature=temperature),
        out_shape=[jax.ShapeDtypeStruct((b, k1, p.chunks), jnp.float32)] * 2,
        grid=(b, k1, p.chunks),
        in_specs=[pl.BlockSpec((None, None, v), _row_index_map)],
        out_specs=[part, part],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="verify_split_logsumexp",
    )(x_BKV1)
    m = jnp.max(m_C, axis=-1)
    m_safe = jnp.where(m == _NEG_INF, 0.0, m)
    return m, jnp.sum(s_C * jnp.exp(m_C - m_safe[..., None]), axis=-1)


def draw(x_BKV1, lq_BKV, n_B, m_B, log_s_B, row_seed_B, *, temperature: float, block_v: int, chunk_v: int | None,
         interpret: bool):
    """Gumbel-max over the residual and over p on row n of each batch row: ([B] best, [B] tok, [B] tok)."""
    b, k1, v = x_BKV1.shape
    p = plan(b, v, block_v, chunk_v)
    scalar = pl.BlockSpec((1,), _scalar_index_map)
    part = pl.BlockSpec((None, 1), _draw_partial_index_map)
    f32, i32 = jax.ShapeDtypeStruct((b, p.chunks), jnp.float32), jax.ShapeDtypeStruct((b, p.chunks), jnp.int32)
    res_best, res_tok, p_best, p_tok = pl.pallas_call(
        functools.partial(_draw_kernel, vocab=v, plan=p, temperature=temperature),
        out_shape=[f32, i32, f32, i32],
        grid=(b, p.chunks),
        in_specs=[scalar] * 4 + [pl.BlockSpec((None, k1, v), _slab_index_map),
                                 pl.BlockSpec((None, k1 - 1, v), _slab_index_map)],
        out_specs=[part] * 4,
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="verify_split_draw",
    )(n_B.astype(jnp.int32), m_B, log_s_B, row_seed_B, x_BKV1, lq_BKV)
    res_best, res_tok = _combine_argmax(res_best, res_tok)
    return res_best, res_tok, _combine_argmax(p_best, p_tok)[1]


def _combine_argmax(best_C, idx_C):
    """(max, argmax) over the chunk axis: the first chunk holding the max."""
    c = jnp.argmax(best_C, axis=-1, keepdims=True)
    return jnp.take_along_axis(best_C, c, axis=-1)[..., 0], jnp.take_along_axis(idx_C, c, axis=-1)[..., 0]


def _compiler_params():
    return pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


# ----------------------------------------------------------------------------- kernel bodies
def _load_tile(ref, row, g, tile: int, vocab: int):
    """Tile g of a row as float32 [T] (-inf past V) and its vocabulary ids [T].

    ref: a 1-D row (row None) or a 2-D slab whose row `row` (a traced int) is read; one
    indexer either way (the Triton lowering takes a single `.at[...]`)."""
    start = pl.multiple_of(g * tile, tile)
    ids = start + jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)
    window = pl.ds(start, tile)
    x = pltriton.load(ref.at[window] if row is None else ref.at[row, window], mask=ids < vocab,
                      other=jnp.array(_NEG_INF, ref.dtype))
    return x.astype(jnp.float32), ids


def _argmax_kernel(x_ref, best_ref, idx_ref, *, vocab: int, plan: Plan):
    first = pl.program_id(2) * plan.chunk_tiles

    def body(t, carry):
        xs, ids = _load_tile(x_ref, None, first + t, plan.tile, vocab)
        return common.running_argmax(*carry, xs, ids)

    init = (jnp.full((1,), _NEG_INF, jnp.float32), jnp.zeros((1,), jnp.int32))
    best_ref[...], idx_ref[...] = jax.lax.fori_loop(0, plan.chunk_tiles, body, init)


def _logsumexp_kernel(x_ref, m_ref, s_ref, *, vocab: int, plan: Plan, temperature: float):
    first = pl.program_id(2) * plan.chunk_tiles

    def body(t, carry):
        xs, _ = _load_tile(x_ref, None, first + t, plan.tile, vocab)
        return common.running_logsumexp(*carry, xs / temperature)

    init = (jnp.full((1,), _NEG_INF, jnp.float32), jnp.zeros((1,), jnp.float32))
    m_ref[...], s_ref[...] = jax.lax.fori_loop(0, plan.chunk_tiles, body, init)


def _draw_kernel(n_ref, m_ref, log_s_ref, seed_ref, x_ref, lq_ref, res_best_ref, res_tok_ref, p_best_ref, p_tok_ref,
                 *, vocab: int, plan: Plan, temperature: float):
    k = lq_ref.shape[0]
    n = n_ref[0]
    first = pl.program_id(1) * plan.chunk_tiles
    q_row = jnp.minimum(n, k - 1)
    m, log_s, seed = m_ref[...], log_s_ref[...], seed_ref[...]

    def body(t, carry):
        res_best, res_tok, p_best, p_tok = carry
        xs, ids = _load_tile(x_ref, n, first + t, plan.tile, vocab)
        logq, _ = _load_tile(lq_ref, q_row, first + t, plan.tile, vocab)
        logq = jnp.where(n < k, logq, _NEG_INF)  # the bonus draw: q == 0
        logp = common.log_softmax_from_stats(xs / temperature, m, log_s)
        noise = common.gumbel_noise(seed, ids)
        res_best, res_tok = common.running_argmax(res_best, res_tok, common.residual_logits(logp, logq) + noise, ids)
        p_best, p_tok = common.running_argmax(p_best, p_tok, logp + noise, ids)
        return res_best, res_tok, p_best, p_tok

    f, i = jnp.full((1,), _NEG_INF, jnp.float32), jnp.zeros((1,), jnp.int32)
    outs = jax.lax.fori_loop(0, plan.chunk_tiles, body, (f, i, f, i))
    res_best_ref[...], res_tok_ref[...], p_best_ref[...], p_tok_ref[...] = outs


# ----------------------------------------------------------------------------- index maps
def _row_index_map(b, i, c):
    """The whole row (b, i): every chunk program of the row sees it and loads its own tiles."""
    del c
    return b, i, 0


def _partial_index_map(b, i, c):
    """Program (b, i, c)'s own partial."""
    return b, i, c


def _scalar_index_map(b, c):
    del c
    return (b,)


def _slab_index_map(b, c):
    """All rows of batch row b (the kernel loads tiles of the one it needs)."""
    del c
    return b, 0, 0


def _draw_partial_index_map(b, c):
    return b, c
