"""How much of a Draft-OPD run's rollouts the SFT data already hold: for every rollout whose
prompt is in the SFT set, the longest common prefix of its response and the SFT answer.

  python experiments/benchmarks/rollout_overlap.py \
      --rollouts=workdirs/smollm2_scale/opd_plateau_reference_s0/eagle3/rollouts \
      --sft_data=data:smollm2_alpacaeval_answers --name=rollout_overlap_eagle3_reference_s0

Greedy speculative decoding is lossless, so greedy rollouts (the reference preset) from the SFT
prompts commit the target's greedy answers: the very sequences SFT on target-generated data
trains on (up to numerical ties between batch shapes). Then the only contexts Draft-OPD adds are
inside a draft block (the drafter's own drafts after the anchor). Sampled rollouts leave the SFT
answers after a few tokens. Writes experiments/results/<name>/ (JSON + table).
"""

import numpy as np
from absl import app, flags

from opd.data.builders import read_trajectory_shards
from opd.eval.report import markdown_table, write_results
from opd.paths import resolve_path

def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    same = np.asarray(a[:n]) == np.asarray(b[:n])
    return int(n if same.all() else np.argmin(same))


def overlap(rollouts: list, sft: list) -> dict:
    """Counts over the rollouts whose prompt (token ids) is an SFT prompt."""
    answers = {tuple(r["prompt_ids"]): r["response_ids"] for r in sft}
    matched = [(r["response_ids"], answers[tuple(r["prompt_ids"])]) for r in rollouts if tuple(r["prompt_ids"]) in answers]
    if not matched:
        raise ValueError("no rollout prompt is an SFT prompt: nothing to compare")
    shared = [common_prefix(ro, a) for ro, a in matched]
    tokens = sum(len(ro) for ro, _ in matched)
    first_split = [s for s, (ro, _) in zip(shared, matched) if s < len(ro)]
    return {
        "rollouts": len(rollouts), "rollouts_with_an_sft_prompt": len(matched),
        "rollouts_a_prefix_of_the_sft_answer": sum(s == len(ro) for s, (ro, _) in zip(shared, matched)),
        "rollout_tokens": tokens, "tokens_on_the_sft_answer": sum(shared),
        "share_of_tokens_on_the_sft_answer": sum(shared) / tokens,
        "median_position_of_first_difference": float(np.median(first_split)) if first_split else float("nan"),
    }


def main(argv):
    del argv
    F = flags.FLAGS
    rollouts = read_trajectory_shards(F.rollouts)
    sft = read_trajectory_shards(resolve_path(F.sft_data))
    row = {"rollouts_dir": F.rollouts, "sft_data": F.sft_data, **overlap(rollouts, sft)}
    cols = list(row)[2:]
    md = markdown_table([row], cols, "{:.3f}") + f"\nRollouts: `{F.rollouts}`; SFT data: `{F.sft_data}`.\n"
    out = write_results(F.name, row, md, F.out_dir)
    print(md)
    print(f"wrote {out}")


if __name__ == "__main__":  # flags defined here: tests load this module next to other scripts
    flags.DEFINE_string("rollouts", None, "a Draft-OPD run's rollouts folder (DIR/<run>/<kind>/rollouts)")
    flags.DEFINE_string("sft_data", "data:smollm2_alpacaeval_answers", "the SFT trajectories (folder or path spec)")
    flags.DEFINE_string("name", "rollout_overlap", "experiments/results/<name>/")
    flags.DEFINE_string("out_dir", None, "default experiments/results/<name>/")
    flags.mark_flag_as_required("rollouts")
    app.run(main)
