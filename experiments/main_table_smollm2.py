"""The main table: τ and wall-clock speed-up of every drafter on SmolLM2-135M-Instruct, at batch
1 and 4, greedy and T = 1, on MT-Bench, HumanEval and AlpacaEval's held-out split.

  python -m opd.main --config=experiments/main_table_smollm2.py --workdir=workdirs/smollm2
      # -> DIR/eval/main_*/ (one run each, resumable) and experiments/results/main_table/

Needs the drafters of `experiments/opd_smollm2.py` in the same DIR: for EAGLE-3 and DFlash the
Draft-OPD run (`export/opd_<kind>`) and continued SFT to the same cumulative training FLOPs
(`export/sft_cont_<kind>`), both from one SFT warm-up. The "no drafter" rows are the
autoregressive throughput measured inside the same runs (each run times both, side by side).
Every field and its default: `opd.configs.default_config`.
"""

import ml_collections

from opd.configs import default_config, variant_parts

PROMPT_SETS = ("mtbench", "humaneval", "alpacaeval")
DRAFTERS = (  # (drafter, exported run or "" for n-gram, K)
    ("ngram", "", 4),
    ("eagle3", "sft_cont", 4),
    ("eagle3", "opd", 4),
    ("dflash", "sft_cont", 7),
    ("dflash", "opd", 7),
)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    variant_parts(variant, (), "experiments/main_table_smollm2.py")  # it has none
    c = default_config()
    c.stages = ("fetch_assets", "eval", "report")
    c.assets = ("smollm2_gguf", "alpacaeval", "mtbench", "humaneval")
    c.target.path = "asset:smollm2_gguf"

    # Budget (2 CPU cores): 60 runs of 4 prompts x 64 new tokens, autoregressive + speculative each.
    c.eval.num_prompts = 4  # the first prompts of each set (AlpacaEval: of its held-out split)
    c.eval.max_new_tokens = 64
    for temperature in (0.0, 1.0):
        for batch in (1, 4):
            for drafter, run, K in DRAFTERS:
                for ps in PROMPT_SETS:
                    r = dict(name=f"main_{drafter}{'_' + run if run else ''}_{ps}_t{temperature:g}_b{batch}",
                             drafter=drafter, prompt_set=ps, temperature=temperature, batch_size=batch,
                             num_draft_tokens=K)
                    if run:
                        r["drafter_path"] = f"workdir:export/{run}_{drafter}"
                    c.eval.runs.append(r)

    c.report.results_name = "main_table"  # (the curves are experiments/benchmarks/opd_curves.py's figure)
    return c
