"""The target feature cache (`opd.training.feature_cache`) on a tiny random target: its ragged
rows equal a forward over each record alone (greedy tokens included), the build's batches and
FLOPs, reuse, refusal of a cache of another layout, and its features attached to padded and
packed batches alike."""

import json
import os
import types

import jax
import numpy as np
import pytest

from opd.data import pipeline
from opd.models import transformer as tfm
from opd.models.config import TransformerConfig
from opd.training import feature_cache
from opd.training.flops import target_forward_flops

V, T, B = 64, 144, 2  # T > 2 buckets, not a multiple of one: build batches of 64, 128 and 144 tokens


@pytest.fixture(scope="module")
def target():
    config = TransformerConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8)
    return types.SimpleNamespace(config=config, params=tfm.init_params(config, jax.random.PRNGKey(0)), source="tiny")


SPEC = types.SimpleNamespace(target_hidden_layers=(0, 1), needs_final_hidden=True)


def trajectories(n=11):
    """Records of 3 to ~200 tokens (some truncated to T)."""
    rng = np.random.default_rng(0)
    return [{"prompt_ids": rng.integers(2, V, int(rng.integers(2, 6))).tolist(),
             "response_ids": rng.integers(2, V, int(rng.integers(1, 200))).tolist()} for _ in range(n)]


def record_tokens(x):
    return pipeline.TokenizeTrajectory(T).map(x)["tokens"]


@pytest.fixture(scope="module")
def cache(target, tmp_path_factory):
    data = trajectories()
    directory = str(tmp_path_factory.mktemp("features"))
    info = feature_cache.build(target, SPEC, data, ["data"], T, directory, dtype="float32", batch_size=B)
    return data, directory, info


def cached_rows(directory):
    """Each record's cached (aux, final, top) rows."""
    offsets = np.load(f"{directory}/offsets.npy")
    arrays = [np.load(f"{directory}/{k}.npy") for k in ("aux", "final", "top")]
    return [[a[offsets[i] : offsets[i + 1]] for a in arrays] for i in range(len(offsets) - 1)]


def test_the_cache_holds_each_records_forward_alone(target, cache):
    """Each record's rows equal a target forward over that record alone, and so the rows of a
    forward over it padded to T (the padded layout's)."""
    data, directory, info = cache
    tokens = [record_tokens(x) for x in data]
    lengths = [len(t) for t in tokens]
    assert max(lengths) == T and min(lengths) < 64  # truncated records and every bucket
    offsets = np.load(f"{directory}/offsets.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert info["tokens"] == sum(lengths) and info["layout"] == "ragged"
    assert np.load(f"{directory}/aux.npy").shape == (sum(lengths), 2, 32)
    assert np.load(f"{directory}/top.npy").dtype == np.int32
    assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]
    forward = jax.jit(tfm.forward, static_argnums=1, static_argnames="hidden_layers")
    rows = cached_rows(directory)

    def check(i, out, b):  # record i's cached rows against row b of a forward's output
        aux, final, top = rows[i]
        n = len(top)
        np.testing.assert_allclose(aux, np.stack(out.aux_hidden, axis=2)[b, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(final, out.hidden_BTD[b, :n], rtol=1e-5, atol=1e-5)
        logits = np.asarray(tfm.lm_head(target.params, target.config, out.hidden_BTD[b : b + 1, :n]))[0]
        chosen = np.take_along_axis(logits, top[:, None], -1)[:, 0]
        np.testing.assert_allclose(chosen, logits.max(-1), rtol=0, atol=1e-5)  # the argmax, up to rounding ties

    for i in {0, int(np.argmin(lengths)), int(np.argmax(lengths))}:
        check(i, forward(target.params, target.config, tokens[i][None], hidden_layers=(0, 1)), 0)
    padded = np.zeros((len(data), T), np.int32)
    for i, t in enumerate(tokens):
        padded[i, : len(t)] = t
    every = forward(target.params, target.config, padded, hidden_layers=(0, 1))
    for i in range(len(data)):
        check(i, every, i)


def test_build_batches_and_flops(target, cache):
    """Longest records first, one token budget per batch, lengths rounded up to 64 (at most T);
    the FLOPs are those of the batches run, far below a forward over N padded rows of T."""
    batches = feature_cache._batches(np.array([10, 200, 64, 65, 0, 130]), 144, 288)
    assert [(S, rows, idx.tolist()) for S, rows, idx in batches] == [(144, 2, [1, 5]), (128, 2, [3, 2]),
                                                                      (64, 4, [0])]
    data, _, info = cache
    lengths = np.array([len(record_tokens(x)) for x in data])
    run = sum(S * rows for S, rows, _ in feature_cache._batches(lengths, T, B * T))
    assert info["build_flops"] == target_forward_flops(target.config, 1, run)
    assert lengths.sum() <= run < len(data) * T


def test_a_matching_cache_is_reused(target, cache):
    data, directory, info = cache
    before = {f: os.path.getmtime(os.path.join(directory, f)) for f in os.listdir(directory)}
    again = feature_cache.build(target, SPEC, data, ["data"], T, directory, dtype="float32", batch_size=B + 1)
    assert again == info  # its meta, the build's FLOPs included
    assert {f: os.path.getmtime(os.path.join(directory, f)) for f in os.listdir(directory)} == before


def test_a_cache_of_an_older_layout_is_refused(target, cache, tmp_path):
    data, directory, _ = cache
    with open(f"{directory}/meta.json") as f:
        meta = json.load(f)
    del meta["layout"], meta["tokens"], meta["build_flops"]  # a cache padded to [N, T, ...]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="delete it to rebuild"):
        feature_cache.build(target, SPEC, data, ["data"], T, str(tmp_path), dtype="float32", batch_size=B)


def test_a_failed_build_leaves_no_cache(target, cache, tmp_path, monkeypatch):
    """Hidden states beyond float16 stop the build; nothing that looks like a cache is left, and
    the next build starts over."""
    data, directory, _ = cache
    real = feature_cache._features
    monkeypatch.setattr(feature_cache, "_features", lambda *a, **k: jax.tree.map(lambda x: x * 1e5, real(*a, **k)))
    with pytest.raises(ValueError, match="beyond float16"):
        feature_cache.build(target, SPEC, data, ["data"], T, str(tmp_path), dtype="float16", batch_size=B)
    assert not [f for f in os.listdir(tmp_path) if not f.endswith(".tmp")]
    monkeypatch.setattr(feature_cache, "_features", real)
    feature_cache.build(target, SPEC, data, ["data"], T, str(tmp_path), dtype="float32", batch_size=B)
    for want, got in zip(cached_rows(directory), cached_rows(str(tmp_path))):
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)


def test_padded_and_packed_batches_get_each_tokens_features(cache):
    """Padded rows get their record's rows at positions 0 .. its length, packed rows each
    token's record's row at its position; zeros on padding; float32 features, int32 top."""
    data, directory, _ = cache
    rows = cached_rows(directory)
    attach = feature_cache.AttachFeatures(directory)
    keys = ("aux", "final", "top")

    def check(batch):
        n = batch["tokens"].shape[0]
        assert batch["aux"].shape == (n, T, 2, 32) and batch["final"].shape == (n, T, 32)
        assert batch["top"].shape == (n, T) and batch["top"].dtype == np.int32
        assert batch["aux"].dtype == batch["final"].dtype == np.float32
        real = batch["segment_ids"] > 0
        for k in keys:
            assert not np.any(batch[k][~real])
        return real

    seen = []
    for batch in pipeline.make_dataset(pipeline.IndexedSource(data), pipeline.PipelineConfig(
            T, 3, packing=False, shuffle=False, num_epochs=1, drop_remainder=False)).map(attach):
        check(batch)
        for b, i in enumerate(batch["record_index"]):
            n = len(rows[i][0])
            for k, want in zip(keys, rows[i]):
                np.testing.assert_array_equal(batch[k][b, :n], want)
            seen.append(int(i))
    assert sorted(seen) == list(range(len(data)))

    cfg = pipeline.PipelineConfig(T, 3, packing=True, seed=1, num_epochs=1, drop_remainder=False)
    n_real, most = 0, 0
    for batch in pipeline.make_dataset(pipeline.IndexedSource(data), cfg).map(attach):
        real = check(batch)
        most = max(most, int(batch["segment_ids"].max()))
        for b, t in zip(*np.nonzero(real)):
            i, p = int(batch["record_ids"][b, t]), batch["positions"][b, t]
            assert batch["tokens"][b, t] == record_tokens(data[i])[p]
            for k, want in zip(keys, rows[i]):
                np.testing.assert_array_equal(batch[k][b, t], want[p])
            n_real += 1
    assert n_real == sum(len(r[0]) for r in rows)  # every token once
    assert most >= 2  # rows do mix records
