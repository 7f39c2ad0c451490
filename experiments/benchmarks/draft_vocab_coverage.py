"""Held-out coverage of EAGLE-3 draft vocabularies built from each training source and from their
mix: the fraction of SmolLM2's greedy answer tokens on held-out prompts that the W most frequent
training answer tokens contain (a drafted token outside it can never be accepted, so coverage
caps acceptance).

  python experiments/benchmarks/draft_vocab_coverage.py --workdir=workdirs/smollm2_scale
      # -> experiments/results/draft_vocab_coverage/

Sources: the trajectory folders under DIR/regenerate/ and DIR/text_corpus/ (each alone, then
all together, as `sft_smollm2.py:scale` builds its vocabulary). Held-out answers: greedy,
`--max_new_tokens` per prompt, for the probe prompts (the last 64 of AlpacaEval's held-out
split) and MT-Bench's first turns; they are generated once and kept in DIR/coverage/.
"""

import glob
import json
import os

from absl import app, flags
import numpy as np

import opd
from opd.data.assets import asset_path, load_prompt_set
from opd.drafters.eagle3 import drafter as e3d
from opd.drafters.eagle3 import model as e3
from opd.eval.report import markdown_table, write_results
from opd.configs import default_config
from opd.training import stage_common

_WORKDIR = flags.DEFINE_string("workdir", None, "a workdir holding regenerate/ and text_corpus/ trajectories")
_SIZES = flags.DEFINE_list("draft_vocab_sizes", ["4096", "8192", "16384"], "W values")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "held-out answer length")
_NUM = flags.DEFINE_integer("num_prompts", 64, "held-out prompts per set")
flags.mark_flags_as_required(["workdir"])


def heldout_answers(target, workdir: str) -> dict:
    """{set name: greedy answer token ids (concatenated)}, generated once into DIR/coverage/."""
    path = os.path.join(workdir, "coverage", f"heldout_{_NUM.value}x{_MAX_NEW.value}.json")
    if os.path.exists(path):
        with open(path) as f:
            return {k: np.asarray(v, np.int64) for k, v in json.load(f).items()}
    probe = default_config().sft.probe
    probe.update(prompt_set="alpacaeval", num_prompts=_NUM.value)
    sets = {"alpacaeval_heldout": stage_common.probe_prompts(probe),
            "mtbench": [r["turns"][0] for r in load_prompt_set("mtbench")][: _NUM.value]}
    out = {}
    for name, prompts in sets.items():
        gen = opd.generate(target, prompts, max_new_tokens=_MAX_NEW.value, temperature=0.0, batch_size=16)
        out[name] = [int(t) for row in gen.tokens for t in row]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


def main(argv):
    del argv
    target = opd.load_target(asset_path("smollm2_gguf"))
    V = target.config.vocab_size
    folders = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(_WORKDIR.value, "*", "*", "shard-00000.jsonl"))
                     if os.path.basename(os.path.dirname(os.path.dirname(p))) in ("regenerate", "text_corpus"))
    if not folders:
        raise FileNotFoundError(f"no trajectory folders under {_WORKDIR.value}/regenerate or /text_corpus")
    counts = {os.path.relpath(f, _WORKDIR.value): stage_common.response_token_counts([f], V) for f in folders}
    counts["all"] = sum(counts.values())
    answers = heldout_answers(target, _WORKDIR.value)
    special = e3d.special_token_ids(target)
    rows = []
    for source, c in counts.items():
        for W in (int(w) for w in _SIZES.value):
            _, t2d = e3.build_draft_vocab(c, W, special)
            row = {"source": source, "train_answer_tokens": int(c.sum()), "distinct_tokens": int((c > 0).sum()),
                   "draft_vocab_size": W}
            for name, ids in answers.items():
                row[f"coverage_{name}"] = float(np.asarray(t2d)[ids].mean())
            rows.append(row)
    cols = ("source", "train_answer_tokens", "distinct_tokens", "draft_vocab_size") + tuple(f"coverage_{n}" for n in answers)
    md = markdown_table(rows, cols, "{:.4g}")
    md += "\nHeld-out answers: " + ", ".join(f"{n} {len(ids)} tokens" for n, ids in answers.items()) + "\n"
    write_results("draft_vocab_coverage", {"rows": rows, "heldout_tokens": {n: len(i) for n, i in answers.items()}}, md)
    print(md)


if __name__ == "__main__":
    app.run(main)
