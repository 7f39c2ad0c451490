"""Tests for pallas_kernels.verify: the reference first (hand cases, losslessness), then the
kernel against the reference (identical decisions for the same key), then input errors.

`TestVerifyKernel` runs compiled, in the formulation the backend picks (TPU: grid, GPU:
split; skipped on CPU); the `...Interpret` subclasses run the same tests on CPU with the
Pallas interpreter, one per formulation (the split one with chunks of 3 tiles, so that the
in-kernel tile loop, a partial tile and tiles wholly past V all occur). Lowering for TPU and
CUDA from a CPU host: test_lowering.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd.decoding.sampling import SamplingParams, process_logits
from pallas_kernels.verify import common, verify, verify_reference

NEG_INF = -np.inf


def _ref(temperature=0.0, top_k=0, top_p=1.0):
    return jax.jit(functools.partial(verify_reference, temperature=temperature, top_k=top_k, top_p=top_p))


# ----------------------------------------------------------------------------- reference, by hand
class TestReference:
    def test_greedy_accept_counts(self):
        # K = 3, V = 8; argmax of p_1..p_4 is 3, 1, 4, 6.
        logits = np.zeros((3, 4, 8), np.float32)
        for i, t in enumerate([3, 1, 4, 6]):
            logits[:, i, t] = 5.0
        drafts = np.array([[3, 1, 5], [3, 1, 4], [0, 1, 4]], np.int32)
        n, nxt, acc = _ref()(jnp.asarray(logits), jnp.asarray(drafts), None, None)
        np.testing.assert_array_equal(n, [2, 3, 0])
        np.testing.assert_array_equal(nxt, [4, 6, 3])  # correction, bonus, correction
        np.testing.assert_array_equal(acc, [[1, 1, 0], [1, 1, 1], [0, 1, 1]])

    def test_p_equals_q_always_accepts_and_bonus_from_last_position(self):
        k, v = 3, 6
        logits = np.array(jax.random.normal(jax.random.key(0), (2, k + 1, v)), np.float32)
        logits[:, k] = NEG_INF
        logits[:, k, 2] = 0.0  # p_{K+1} = one-hot(2)
        sp = SamplingParams(temperature=0.8)
        logq = process_logits(jnp.asarray(logits[:, :k]), sp)
        drafts = jnp.array([[0, 1, 2], [5, 4, 3]], jnp.int32)
        run = jax.vmap(lambda key: _ref(0.8)(jnp.asarray(logits), drafts, logq, key))
        n, nxt, acc = run(jax.random.split(jax.random.key(1), 64))
        assert (np.asarray(n) == k).all() and np.asarray(acc).all()
        assert (np.asarray(nxt) == 2).all()

    def test_onehot_q_on_impossible_token_always_rejects(self):
        # p_1 = [0, .25, .75, 0, 0]; the drafter is certain of token 3, which p_1 forbids.
        v, k = 5, 2
        logits = np.zeros((1, k + 1, v), np.float32)
        logits[0, 0] = [NEG_INF, 0.0, math.log(3.0), NEG_INF, NEG_INF]
        logq = np.full((1, k, v), NEG_INF, np.float32)
        logq[0, :, 3] = 0.0
        drafts = jnp.array([[3, 3]], jnp.int32)
        run = jax.vmap(lambda key: _ref(1.0)(jnp.asarray(logits), drafts, jnp.asarray(logq), key))
        n, nxt, _ = run(jax.random.split(jax.random.key(2), 4000))
        assert (np.asarray(n) == 0).all()
        counts = np.bincount(np.asarray(nxt)[:, 0], minlength=v)
        assert counts[[0, 3, 4]].sum() == 0
        assert abs(counts[2] / 4000 - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)

    def test_accept_rule_edge_cases(self):
        # (log p(d), log q(d), u) -> accept; q(d) = 0 is a drafter bug: accept iff p(d) > 0.
        cases = [(-1.0, -1.0, 0.999, True), (-2.0, -1.0, 0.5, False), (-2.0, -1.0, 0.3, True),
                 (-1.0, NEG_INF, 0.9, True), (NEG_INF, NEG_INF, 0.5, False), (NEG_INF, -1.0, 0.0, False),
                 (-95.0, -96.0, 0.99, True)]
        lp, lq, u, want = (jnp.array([c[i] for c in cases]) for i in range(4))
        np.testing.assert_array_equal(common.accept_mask(lp, lq, u), want)

    def test_gumbel_noise_moments(self):
        g = common.gumbel_noise(common.row_seeds(jnp.int32(7), 4), jnp.arange(50_000, dtype=jnp.int32)[None])
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(float(g.mean()), np.euler_gamma, atol=0.02)
        np.testing.assert_allclose(float(g.std()), math.pi / math.sqrt(6), atol=0.02)
        assert float(jnp.abs(jnp.corrcoef(g[0], g[1])[0, 1])) < 0.02  # rows decorrelated


# ----------------------------------------------------------------------------- reference, statistics
def _chi2_sf(stat, dof):
    return float(jax.scipy.special.gammaincc(dof / 2.0, stat / 2.0))


def _assert_distributed_as(tokens, probs, false_alarm):
    """Chi-square goodness of fit of integer samples to `probs` (zero-probability tokens: never)."""
    counts = np.bincount(tokens, minlength=probs.size)
    support = probs > 0
    assert counts[~support].sum() == 0, counts
    expected = tokens.size * probs[support]
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    assert _chi2_sf(stat, support.sum() - 1) > false_alarm, (counts, expected)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 3)])
def test_reference_is_lossless(temperature, top_k):
    """Committed tokens of one round ~ p exactly when d_i ~ q_i (V = 5, K = 2, 20k rounds).

    With fixed p_1..p_3 (independent of the prefix here): the first committed token ~ p_1; the
    second, given d_1 accepted, ~ p_2; the third, given both accepted (the bonus), ~ p_3.
    Three tests at 1e-3 / 3 each: overall false alarm <= 1e-3.
    """
    v, k, n_keys = 5, 2, 20_000
    sp = SamplingParams(temperature=temperature, top_k=top_k)
    kt, kd = jax.random.split(jax.random.key(3))
    target = jax.random.normal(kt, (1, k + 1, v)) * 1.5
    draft = jax.random.normal(kd, (1, k, v)) * 1.5  # deliberately far from the target
    logq = process_logits(draft, sp)
    p = np.asarray(jnp.exp(process_logits(target[0], sp)), np.float64)  # [K+1, V]

    def one_round(key):
        k_draft, k_verify = jax.random.split(key)
        d = jax.random.categorical(k_draft, logq).astype(jnp.int32)  # [1, K]
        n, nxt, _ = verify_reference(target, d, logq, k_verify, temperature=temperature, top_k=top_k)
        committed = jnp.concatenate([d[0], jnp.zeros((1,), jnp.int32)]).at[n[0]].set(nxt[0])
        return committed, n[0]

    committed, n = jax.jit(jax.vmap(one_round))(jax.random.split(jax.random.key(4), n_keys))
    committed, n = np.asarray(committed), np.asarray(n)
    assert 0 < (n == 0).mean() < 1 and (n == k).mean() > 0.05  # every branch exercised
    for i in range(k + 1):
        _assert_distributed_as(committed[n >= i, i], p[i], false_alarm=1e-3 / (k + 1))


# ----------------------------------------------------------------------------- kernel vs reference
# (B, K, V, block_v, temperature, top_k, top_p, dtype): few distinct shapes, each compiled once.
KERNEL_CASES = [
    (1, 1, 1000, 256, 0.7, 0, 1.0, "float32"),
    (5, 1, 1000, 256, 0.0, 0, 1.0, "float32"),
    (5, 4, 1000, 256, 0.0, 0, 1.0, "float32"),
    (5, 4, 1000, 256, 1.0, 0, 1.0, "float32"),
    (1, 16, 1000, 256, 1.0, 0, 1.0, "float32"),
    (5, 16, 1000, 256, 0.7, 0, 1.0, "float32"),
    (5, 4, 1000, 256, 0.7, 50, 0.9, "float32"),  # top-k/top-p: processed log-probs into the same kernels
    (2, 4, 200, 512, 0.7, 0, 1.0, "float32"),  # V < block_v: one tile (grid: full width; split: 256, masked)
    (3, 4, 1000, 256, 0.0, 0, 1.0, "bfloat16"),  # bfloat16 logits (and log q), read as float32
    (3, 4, 1000, 256, 0.7, 0, 1.0, "bfloat16"),
]


@functools.partial(jax.jit, static_argnames=("b", "k", "v", "temperature", "top_k", "top_p", "dtype"))
def _round_inputs(key, *, b, k, v, temperature, top_k, top_p, dtype="float32"):
    """Target logits, a correlated drafter's processed log q, and drafts (d ~ q, or for greedy
    the target argmax with random corruptions so that every accept count occurs), in `dtype`."""
    k_t, k_d, k_s, k_c = jax.random.split(key, 4)
    target = (2.0 * jax.random.normal(k_t, (b, k + 1, v))).astype(dtype)
    draft_logits = target[:, :k] + 1.0 * jax.random.normal(k_d, (b, k, v))
    if temperature == 0.0:
        corrupt = jax.random.bernoulli(k_c, 1.0 / (k + 1), (b, k))
        d = jnp.where(corrupt, jax.random.randint(k_s, (b, k), 0, v), jnp.argmax(target[:, :k], -1))
        return target, d.astype(jnp.int32), None
    logq = process_logits(draft_logits, SamplingParams(temperature, top_k, top_p)).astype(dtype)
    return target, jax.random.categorical(k_s, logq.astype(jnp.float32)).astype(jnp.int32), logq


class TestVerifyKernel:
    INTERPRET = False
    FORMULATION = None  # compiled: the backend's pick
    CHUNK_V = None

    @pytest.fixture(autouse=True)
    def _backend(self):
        if not self.INTERPRET and jax.default_backend() not in ("tpu", "gpu"):
            pytest.skip("the compiled verify kernel needs a TPU or a GPU; see the Interpret subclasses")

    def _verify(self, *args, **kw):
        return verify(*args, **kw, chunk_v=self.CHUNK_V, formulation=self.FORMULATION, interpret=self.INTERPRET)

    @pytest.mark.parametrize("b,k,v,block_v,temperature,top_k,top_p,dtype", KERNEL_CASES)
    def test_matches_reference(self, b, k, v, block_v, temperature, top_k, top_p, dtype):
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        ref = _ref(**sampling)
        n_all = []
        for seed in range(8):
            k_data, key = jax.random.split(jax.random.key(100 + seed))
            target, d, logq = _round_inputs(k_data, b=b, k=k, v=v, **sampling, dtype=dtype)
            want = ref(target, d, logq, key)
            got = self._verify(target, d, logq, key, **sampling, block_v=block_v)
            for name, g, w in zip(want._fields, got, want):
                np.testing.assert_array_equal(g, w, err_msg=f"{name} (seed {seed})")
            n_all.append(np.asarray(got.num_accepted))
        n_all = np.concatenate(n_all)
        assert (n_all < k).any()  # the correction path ran
        if k <= 4:
            assert (n_all == k).any()  # the bonus path ran

    def test_greedy_without_draft_logprobs_or_key(self):
        target, d, _ = _round_inputs(jax.random.key(5), b=5, k=4, v=1000, temperature=0.0, top_k=0, top_p=1.0)
        got = self._verify(target, d, None, None, block_v=256)
        assert got.num_accepted.dtype == jnp.int32 and got.next_token.dtype == jnp.int32
        assert got.accepted.shape == (5, 4) and got.accepted.dtype == jnp.bool_

    @pytest.mark.parametrize("change,match", [
        (dict(d=jnp.zeros((2, 3), jnp.int32)), "draft_tokens must be"),
        (dict(target=jnp.zeros((2, 1, 256))), "K >= 1"),
        (dict(target=jnp.zeros((2, 256))), r"\[B, K\+1, V\]"),
        (dict(target=jnp.zeros((2, 3, 256), jnp.float16)), r"one of \('float32', 'bfloat16'\)"),
        (dict(logq=jnp.zeros((2, 2, 256), jnp.float16)), r"draft_logprobs must be one of"),
        (dict(d=jnp.zeros((2, 2), jnp.int16)), "int32"),
        (dict(logq=jnp.zeros((2, 2, 128))), "draft_logprobs must be"),
        (dict(logq=None), "needs draft_logprobs"),
        (dict(key=None), "needs a PRNG key"),
        (dict(block_v=100), "power of two"),
        (dict(block_v=384), "power of two"),
        (dict(chunk_v=0), "chunk_v must be a positive int"),
        (dict(formulation="triton"), "formulation must be one of"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
    ])
    def test_errors(self, change, match):
        args = dict(target=jnp.zeros((2, 3, 256)), d=jnp.zeros((2, 2), jnp.int32), logq=jnp.zeros((2, 2, 256)),
                    key=jax.random.key(0), temperature=1.0, top_p=1.0, block_v=128, chunk_v=self.CHUNK_V,
                    formulation=self.FORMULATION)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            verify(args["target"], args["d"], args["logq"], args["key"], temperature=args["temperature"],
                   top_p=args["top_p"], block_v=args["block_v"], chunk_v=args["chunk_v"],
                   formulation=args["formulation"], interpret=self.INTERPRET)


class TestVerifyKernelInterpret(TestVerifyKernel):
    """The grid (TPU) formulation in the Pallas interpreter."""

    INTERPRET = True
    FORMULATION = "grid"


@pytest.mark.parametrize("dtype,tile", [("bfloat16", 4096), ("float32", 1024)])
def test_split_default_tile_follows_the_logits_dtype(monkeypatch, dtype, tile):
    """No block_v: the GPU formulation tiles 2-byte logits by 4096 and float32 by 1024 (the H200
    sweep), and still decides as the reference (V = 5000 spans two 4096 tiles)."""
    from pallas_kernels.verify import split

    tiles = []
    real_plan = split.plan
    monkeypatch.setattr(split, "plan", lambda rows, vocab, block_v, chunk_v: tiles.append(block_v)
                        or real_plan(rows, vocab, block_v, chunk_v))
    sampling = dict(temperature=0.7, top_k=0, top_p=1.0)
    k_data, key = jax.random.split(jax.random.key(7))
    target, d, logq = _round_inputs(k_data, b=2, k=3, v=5000, **sampling, dtype=dtype)
    got = verify(target, d, logq, key, **sampling, formulation="split", interpret=True)
    want = _ref(**sampling)(target, d, logq, key)
    for name, g, w in zip(want._fields, got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)
    assert tiles and set(tiles) == {tile}


class TestSplitKernelInterpret(TestVerifyKernel):
    """The split (GPU) formulation in the Pallas interpreter; chunks of 3 tiles of 256: at
    V = 1000 the second chunk holds the partial tile [768, 1000) and two tiles past V."""

    INTERPRET = True
    FORMULATION = "split"
    CHUNK_V = 768
