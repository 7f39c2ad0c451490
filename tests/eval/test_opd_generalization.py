"""experiments/benchmarks/opd_generalization.py: the evenly spread training prompts, the paired
bootstrap ratio of τ over the same prompts, and the summary rows (gain over the start, ratio to the
last run), on hand-made per-prompt counts."""

import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def mod():
    return load_script("experiments/benchmarks/opd_generalization.py")


def test_spread_takes_evenly_spaced_records(mod):
    assert mod.spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert mod.spread([1, 2], 5) == [1, 2]


def test_paired_ratio_is_the_ratio_of_summed_tau_with_a_bootstrap_interval(mod):
    rng = np.random.default_rng(0)
    a = {"rounds": [10, 20, 30], "committed": [15, 30, 45]}  # τ 1.5 on every prompt
    b = {"rounds": [10, 20, 30], "committed": [12, 24, 36]}  # τ 1.2 on every prompt
    got = mod.paired_ratio(a, b, rng)
    assert got["ratio"] == pytest.approx(1.25)
    assert got["lo"] == pytest.approx(1.25) and got["hi"] == pytest.approx(1.25)  # no spread across prompts
    c = {"rounds": [10, 10, 10], "committed": [10, 20, 30]}  # τ 1, 2, 3: the interval has width
    got = mod.paired_ratio(c, {"rounds": [10, 10, 10], "committed": [20, 20, 20]}, rng)
    assert got["ratio"] == pytest.approx(1.0) and got["lo"] < 0.9 and got["hi"] > 1.1


def test_summary_rows_gain_over_the_start_and_ratio_to_the_last_run(mod):
    def res(c_train, c_held):
        return {"train": {"tau": sum(c_train) / 20, "acceptance_by_offset": [0.5], "rounds": [10, 10],
                          "committed": c_train},
                "heldout": {"tau": sum(c_held) / 20, "acceptance_by_offset": [0.4], "rounds": [10, 10],
                            "committed": c_held}}

    results = {"start": res([14, 14], [13, 13]), "opd": res([18, 18], [13, 13]), "sft": res([14, 14], [13, 13])}
    rows = mod.summarise(results, ["opd", "sft"], np.random.default_rng(0))
    by = {(r["drafter"], r["prompts"]): r for r in rows}
    assert len(rows) == 6
    assert by["opd", "train"]["gain_over_start"] == pytest.approx(18 / 14 - 1)
    assert by["opd", "heldout"]["gain_over_start"] == pytest.approx(0.0)
    assert by["opd", "train"]["ratio_to_sft"] == pytest.approx(18 / 14)
    assert "ratio_to_sft" not in by["sft", "train"] and "ratio_to_sft" not in by["start", "train"]
    assert by["start", "heldout"]["acc1"] == 0.4
