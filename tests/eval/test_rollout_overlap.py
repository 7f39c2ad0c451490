"""experiments/benchmarks/rollout_overlap.py on hand-made trajectories: prefixes, first
differences, prompts outside the SFT set, and the error when none is in it."""

import json

import pytest

from conftest import load_script


def _traj(prompt, response):
    """A trajectory record as the regenerate stage and the rollouts write it."""
    return {"prompt_id": "-".join(map(str, prompt)), "prompt_set": "alpacaeval_train", "target": "t",
            "prompt_ids": prompt, "response_ids": response}


def test_overlap_counts_common_prefixes():
    mod = load_script("experiments/benchmarks/rollout_overlap.py")
    sft = [_traj([1, 2], [5, 6, 7, 8]), _traj([3], [9, 9, 9])]
    rollouts = [_traj([1, 2], [5, 6]),        # a prefix of the answer (a rollout cut at its round budget)
                _traj([3], [9, 4, 9]),        # differs at position 1
                _traj([7, 7], [1, 2, 3])]     # a prompt SFT does not have
    got = mod.overlap(rollouts, sft)
    assert got == {"rollouts": 3, "rollouts_with_an_sft_prompt": 2, "rollouts_a_prefix_of_the_sft_answer": 1,
                   "rollout_tokens": 5, "tokens_on_the_sft_answer": 3, "share_of_tokens_on_the_sft_answer": 0.6,
                   "median_position_of_first_difference": 1.0}
    assert mod.common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3 and mod.common_prefix([], [1]) == 0
    with pytest.raises(ValueError, match="no rollout prompt is an SFT prompt"):
        mod.overlap([_traj([7], [1])], sft)


def test_script_writes_results(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    for name, rows in (("ro", [_traj([1], [2, 3])]), ("sft", [_traj([1], [2, 3, 4])])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard-000001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, f"{REPO}/experiments/benchmarks/rollout_overlap.py", f"--rollouts={tmp_path / 'ro'}",
                          f"--sft_data={tmp_path / 'sft'}", f"--out_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["share_of_tokens_on_the_sft_answer"] == 1.0 and saved["rollouts_a_prefix_of_the_sft_answer"] == 1
