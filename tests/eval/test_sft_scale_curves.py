"""`experiments/benchmarks/sft_scale_curves.py`: the plateau test and the log-linear trend that says
where a probe-tau curve would reach a goal, on hand-made probes."""

import math

import pytest

from conftest import load_script


def _module():
    return load_script("experiments/benchmarks/sft_scale_curves.py")


def _probes(taus_at):
    return [{"tokens": t, "probe_tau": tau} for t, tau in taus_at]


def test_trend_crosses_the_goal_where_the_log_linear_fit_says():
    m = _module()
    # tau = 1 + 0.1 log2(tokens / 1e5) on the later half; the early probes (and tokens 0) are ignored
    probe = _probes([(0, 1.0), (5e4, 0.5), (7e4, 3.0)] + [(1e5 * 2 ** k, 1 + 0.1 * k) for k in range(3)])
    out = m.crossing(probe, goal=1.5)
    assert out["fit_from_tokens"] == 1e5 and out["fit_to_tokens"] == 4e5
    assert out["tau_per_doubling"] == pytest.approx(0.1)
    assert out["tokens_at_goal"] == pytest.approx(1e5 * 2 ** 5)
    assert out["doublings_to_goal"] == pytest.approx(3.0)


def test_a_flat_or_falling_trend_never_reaches_the_goal():
    m = _module()
    out = m.crossing(_probes([(1e5, 1.3), (2e5, 1.3), (4e5, 1.29), (8e5, 1.28)]), goal=2.0)
    assert out["tau_per_doubling"] < 0 and math.isinf(out["tokens_at_goal"])
    assert "why" in m.crossing(_probes([(1e5, 1.3)]), goal=2.0)


def test_plateau_compares_the_last_quarter():
    m = _module()
    flat = m.plateau(_probes([(0, 1.0), (7e5, 1.35), (8e5, 1.36), (1e6, 1.37)]))
    assert flat["from_tokens"] == 7e5 and flat["flat"] and flat["relative_change"] == pytest.approx(0.02 / 1.35)
    assert not m.plateau(_probes([(0, 1.0), (7e5, 1.30), (1e6, 1.37)]))["flat"]
