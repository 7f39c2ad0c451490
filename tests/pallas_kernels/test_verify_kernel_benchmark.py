"""experiments/benchmarks/verify_kernel.py's device path (timing, breakdown) run on CPU at a tiny
shape with the kernels interpreted, so the script a device run depends on cannot rot."""

import numpy as np
import pytest

from conftest import load_script
from pallas_kernels.verify import split


@pytest.fixture(scope="module")
def vk():
    return load_script("experiments/benchmarks/verify_kernel.py")


@pytest.fixture
def interpreted(monkeypatch):
    """The split kernel's passes in the Pallas interpreter (the breakdown calls them for a GPU)."""
    for name in ("argmax", "logsumexp", "draw"):
        fn = getattr(split, name)
        monkeypatch.setattr(split, name, lambda *a, _fn=fn, **k: _fn(*a, **{**k, "interpret": True}))


def test_timing_rows_agree_and_count_the_bytes_each_impl_reads(vk):
    rows = vk.timing([(2, 3, 300)], ["float32"], ["greedy", "sampling"], peak=100.0, inner=2, repeats=1, block_v=256)
    assert [(r["mode"], r["impl"]) for r in rows] == [(m, i) for m in ("greedy", "sampling")
                                                      for i in ("kernel", "reference", "roofline")]
    by = {(r["mode"], r["impl"]): r for r in rows}
    assert all(by[m, i]["mismatched_rows"] == 0 for m in ("greedy", "sampling") for i in ("kernel", "reference"))
    assert by["greedy", "kernel"]["bytes_read_MB"] == pytest.approx(2 * 4 * 300 * 4 / 1e6)
    assert by["sampling", "kernel"]["bytes_read_MB"] == pytest.approx((2 * 4 + 2 * 2) * 300 * 4 / 1e6)
    assert by["sampling", "roofline"]["bytes_read_MB"] == by["greedy", "kernel"]["bytes_read_MB"]
    for r in rows:
        assert r["us_per_call"] > 0 and r["peak_fraction"] == pytest.approx(r["GB_per_s"] / 100.0)


def test_each_timed_call_reads_its_own_inputs(vk):
    xs, ds, lqs, keys = vk._distinct_inputs(2, 3, 300, "sampling", "float32", inner=3)
    assert len(xs) == len(lqs) == len(keys) == 3
    assert not np.array_equal(xs[0], xs[1]) and not np.array_equal(lqs[1], lqs[2])
    xs, ds, lqs, keys = vk._distinct_inputs(2, 3, 300, "greedy", "bfloat16", inner=2)
    assert lqs is None and keys is None and xs[0].dtype.name == "bfloat16"


def test_breakdown_times_both_sampling_passes(vk, interpreted):
    rows = vk.breakdown([(2, 3, 300)], ["float32"], peak=100.0, inner=2, repeats=1, block_v=256)
    assert [r["impl"] for r in rows] == ["split.logsumexp", "split.draw"]
    assert [r["bytes_read_MB"] for r in rows] == pytest.approx([2 * 4 * 300 * 4 / 1e6, 2 * 2 * 300 * 4 / 1e6])


def test_peak_bandwidth_by_device_kind(vk):
    assert vk.peak_gbps("NVIDIA H200") == 4800 and vk.peak_gbps("NVIDIA H100 PCIe") == 2000
    assert vk.peak_gbps("TPU v5p") == 2765 and vk.peak_gbps("some new chip") is None


def test_tpu_compile_rows_name_the_compiled_kernels(vk, monkeypatch):
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) compiles for TPU on this host")
    monkeypatch.setattr(vk, "TPU_CHIPS", {"v6e": "v6e:2x4"})
    rows = vk.tpu_compile({(2, 3, 4096): ["tiny"]}, ["float32"], ["greedy", "sampling"])
    assert [(r["chip"], r["mode"], r["compiled"]) for r in rows] == [("TPU v6 lite", m, "yes (not run)")
                                                                      for m in ("greedy", "sampling")]
    assert [r["kernels"] for r in rows] == ["verify_grid_argmax", "verify_grid_draw, verify_grid_logsumexp"]
    # a topology libtpu does not know: the section is skipped with a message, not a crash
    monkeypatch.setattr(vk, "TPU_CHIPS", {"v9z": "v9z:1x1"})
    assert vk.tpu_compile({(2, 3, 4096): ["tiny"]}, ["float32"], ["greedy"]) == []
