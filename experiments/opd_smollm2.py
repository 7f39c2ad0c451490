"""Draft-OPD for SmolLM2-135M-Instruct from the SFT warm-up, and its matched-FLOPs baselines.

  python -m opd.main --config=experiments/opd_smollm2.py:eagle3 --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/opd_smollm2.py:eagle3,sft_cont --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/opd_smollm2.py:eagle3,sft_rollouts --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/opd_smollm2.py:eagle3,tiny --workdir=/tmp/opd   # minutes

Variants (comma-separated): the drafter kind (`eagle3`, default, or `dflash`); the branch:
  opd           (default) regenerate -> SFT warm-up -> export -> Draft-OPD from the warm-up
                (DIR/opd/<kind>/, its committed rollout text kept in rollouts/) -> export -> eval;
  sft_cont      continued SFT from the same warm-up (DIR/sft_cont/<kind>/) to the cumulative
                training FLOPs the OPD run ended at;
  sft_rollouts  SFT from the same warm-up on the OPD rollouts' committed text (DIR/sft_rollouts/
                <kind>/), also to the OPD run's FLOPs;
  ttt_rollouts  (EAGLE-3) the reference's EAGLE-3 recipe: the same, with full TTT (7 unrolled
                steps of soft cross-entropy; the SFT runs here unroll 4);
and `tiny` (a few steps of everything, for tests). Both baselines need the OPD run first.
`reference` (issue 16): Draft-OPD as the reference implementation (bingyang-lei/Draft-OPD) runs
it: the `reference_yaml` loss preset, greedy rollouts (T = 0) from bare prompts, 64 rounds per
prompt, gradient accumulation to >= 4k supervised positions per update; its runs are named
`opd_reference`, `sft_cont_reference`, `sft_rollouts_reference` (e.g. `:dflash,reference`,
`:eagle3,sft_cont,reference`), next to the default runs in one DIR.
`plateau` (issue 16's decisive experiment): every branch starts from the plateaued drafter shipped
in the repo (`shipped:smollm2_<kind>`, issue 15) instead of a warm-up; Draft-OPD rolls out the
AlpacaEval-train prompts, continued SFT trains on the plateau run's data mix (a fresh shuffle:
partly data the drafter read, as continuing SFT on one's dataset does), and every run is probed
on 64 held-out prompts x 128 tokens. The answers ship in the repo (`data:smollm2_alpacaeval_answers`)
and the text corpus is rebuilt in seconds, so any DIR works; give a
seed part `s0`/`s1`/`s2` (config.seed 1/2/3, and a run-name suffix), e.g.
  python -m opd.main --config=experiments/opd_smollm2.py:eagle3,plateau,reference,s1 --workdir=workdirs/smollm2_scale
  python -m opd.main --config=experiments/opd_smollm2.py:eagle3,plateau,reference,sft_cont,s1 --workdir=workdirs/smollm2_scale
An ablation part (`abl_correction`, `abl_suffix`, `abl_clamps`, `abl_tokens`, `abl_greedy`,
`abl_update`: `ABLATIONS`) switches one difference of the reference on alone in our default
Draft-OPD from the plateaued drafter (run `opd_plateau_<part>[_sN]`), e.g.
  python -m opd.main --config=experiments/opd_smollm2.py:eagle3,plateau,abl_correction,s0 --workdir=workdirs/smollm2_scale
Every stage resumes from DIR and logs cumulative FLOPs from the same warm-up, so the curves
(metrics.jsonl: `flops`, `probe_tau`) share one axis. Builds on experiments/sft_smollm2.py (the
warm-up); every field and its default: `opd.configs.default_config`.
"""

import ml_collections

from opd.configs import sibling_config, variant_parts
from opd.drafters.eagle3.training import TTT_STEPS

BRANCHES = ("opd", "sft_cont", "sft_rollouts", "ttt_rollouts")
SEEDS = ("s0", "s1", "s2")
# issue 16 §5: one difference of the reference switched on alone, on our default Draft-OPD from the
# plateaued drafter (`plateau`), so the source of a gain is known; run name opd_plateau_<part>[_sN]
ABLATIONS = {
    "abl_correction": dict(loss=dict(response_weight=1.0)),  # + the response stream: committed tokens and
    # the target's correction token at the first rejected position
    "abl_suffix": dict(loss=dict(suffix_weight=1.0)),  # + every rejected draft n+1..K, decay^(offset-1)
    "abl_clamps": dict(loss=dict(k3_clamps=True, loss_max_clamp=10.0)),  # verl's k3 clamps + the loss clamp
    "abl_tokens": dict(loss=dict(normalization="tokens")),  # per-token mean, one shared denominator
    "abl_greedy": dict(rollout_temperature=0.0),  # greedy rollouts (ours: T = 1)
    "abl_update": dict(accumulate=4),  # a 4x larger update (the reference's ~50x: beyond this CPU)
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    parts = variant_parts(variant, BRANCHES + SEEDS + tuple(ABLATIONS) + ("eagle3", "dflash", "tiny", "reference",
                                                                          "plateau"), "experiments/opd_smollm2.py")
    branches = [p for p in parts if p in BRANCHES]
    seeds = [p for p in parts if p in SEEDS]
    ablations = [p for p in parts if p in ABLATIONS]
    if len(branches) > 1 or len(seeds) > 1 or ("eagle3" in parts and "dflash" in parts):
        raise ValueError(f"bad variant {variant!r} of experiments/opd_smollm2.py: use eagle3|dflash, "
                         f"at most one of {BRANCHES} and one of {SEEDS}, optionally reference, plateau and tiny")
    if ablations and (len(ablations) > 1 or "plateau" not in parts or "reference" in parts
                      or branches not in ([], ["opd"])):
        raise ValueError(f"bad variant {variant!r} of experiments/opd_smollm2.py: an ablation ({', '.join(ABLATIONS)}) "
                         "is one Draft-OPD run with `plateau`, without `reference`")
    kind = "dflash" if "dflash" in parts else "eagle3"
    branch = branches[0] if branches else "opd"
    if branch == "ttt_rollouts" and kind != "eagle3":
        raise ValueError(f"bad variant {variant!r} of experiments/opd_smollm2.py: ttt_rollouts is EAGLE-3's recipe")
    tiny = "tiny" in parts
    reference = "reference" in parts
    plateau = "plateau" in parts
    # the run names: opd{tag}, sft_cont{tag}, sft_rollouts{tag}
    tag = (("_plateau" if plateau else "") + ("_reference" if reference else "") + (f"_{ablations[0]}" if ablations else "")
           + (f"_{seeds[0]}" if seeds else ""))
    opd_run = f"opd{tag}"
    # the SFT warm-up (seed, assets, target, regenerate, drafter, sft, eval), or the plateau run's
    c = sibling_config(__file__, "sft_smollm2.py", ",".join([kind] + (["scale"] if plateau else [])
                                                            + (["tiny"] if tiny else [])))
    warmup = f"shipped:smollm2_{kind}" if plateau else f"workdir:export/sft_{kind}"
    K = 4 if kind == "eagle3" else 7
    if seeds:  # sN: config.seed = N + 1 (seed 0 is the data order the plateau runs read)
        c.seed = int(seeds[0][1:]) + 1
    if plateau:  # every run probed as the plateau run was (64 held-out prompts x 128 tokens)
        c.opd.probe = ml_collections.ConfigDict(c.sft.probe.to_dict())
        c.opd.probe.every = 10

    c.opd.init = warmup  # the SFT warm-up drafter (HF layout)
    c.opd.num_draft_tokens = K
    c.opd.optimizer.update(learning_rate=3e-4, warmup_steps=5, end_lr_ratio=0.1, weight_decay=0.0, clip_norm=0.5)
    c.opd.save_rollouts = True  # the data of the sft_rollouts baseline
    # tau on a fixed held-out probe set: the last prompts of AlpacaEval's held-out split (the eval
    # stage reports the first ones), every `every` steps and at step 0; greedy (the rollout
    # temperature optimises acceptance at that temperature: probe there too to see it)
    if not plateau:
        c.opd.probe.num_prompts = 8
    c.opd.name = opd_run
    if reference:
        c.opd.loss_preset = "reference_yaml"
        c.opd.rollout_temperature = 0.0  # greedy, as the reference rolls out
        c.opd.prefix = "prompt"  # bare prompts: the rollout is the answer from its first token
        # bare prompts are short (AlpacaEval-train: median 52 tokens, 93 % <= 128): P = 128 halves the
        # padded prefill and the replay's buffer; the 7 % longer are skipped (verl's overlong filter)
        c.opd.prompt_len = 128
        c.opd.num_rounds = 64  # long rollouts: the prompt's prefill amortised over 64 verify rounds
        # supervised positions per update ~ B * A * R * (K + 1) (each round: the n + 1 committed
        # tokens of the response stream and the K - n rejected drafts of the suffix stream, sharing
        # offset n + 1; fewer for rows that reach EOS): EAGLE-3 (K = 4) 8 * 3 * 64 * 5 = 7680,
        # DFlash (K = 7) 8 * 2 * 64 * 8 = 8192; >= 4096 even when a third of the rounds end early
        c.opd.accumulate = 3 if kind == "eagle3" else 2

    for part in ablations:
        change = dict(ABLATIONS[part])
        c.opd.loss.update(change.pop("loss", {}))
        c.opd.update(change)
        c.opd.probe.every = 20  # every ablation is probed at steps 0, 20, 40, 60

    if branch == "opd" and plateau:  # from the shipped drafter: no warm-up; AlpacaEval-train prompts
        c.stages = ("fetch_assets", "opd", f"export:{opd_run}", "eval")
        c.opd.data = c.sft.data[:1]  # the plateau run's answers to them, shipped in the repo (`data:`)
    elif branch == "opd":
        c.stages = ("fetch_assets", "regenerate", "sft", "export:sft", "opd", f"export:{opd_run}", "eval")
    else:  # a baseline: SFT from the warm-up to the OPD run's cumulative FLOPs
        c.stages = ("fetch_assets", "sft", f"export:{branch}{tag}", "eval")
        c.drafter.init = warmup
        c.sft.name = f"{branch}{tag}"
        c.sft.probe = ml_collections.ConfigDict(c.opd.probe.to_dict())
        if plateau:  # one reference OPD step is priced as 3.6-5.6 SFT steps (217-334 steps to match its 60):
            c.sft.probe.every = 40  # ~7 probes, spaced in FLOPs like the OPD run's every 10 steps
        c.sft.match_flops = f"workdir:{opd_run}/{kind}"
        c.sft.optimizer.learning_rate = c.opd.optimizer.learning_rate
        c.sft.optimizer.warmup_steps = c.opd.optimizer.warmup_steps
        if branch == "sft_cont" and plateau:  # the plateau run's data mix, shuffled by the seed
            c.stages = ("fetch_assets", "text_corpus", "sft", f"export:{branch}{tag}", "eval")
        elif branch == "sft_cont":
            c.sft.feature_cache_dir = f"workdir:sft/{kind}/features"  # the warm-up's cache (same data)
        else:
            c.sft.data = (f"workdir:{opd_run}/{kind}/rollouts",)  # features cached once (charged per step)
            c.sft.data_repeats = ()
            # a rollout row is prompt + answer prefix (<= P) + R (K + 1) committed tokens at most
            c.sft.seq_len = c.opd.prompt_len + c.opd.num_rounds * (K + 1)
            if branch == "ttt_rollouts":
                c.sft.loss.ttt_steps = TTT_STEPS
    c.eval.runs = []
    # the start (the warm-up's export, or the shipped drafter) next to the run
    start = ("shipped", warmup) if plateau else ("sft", f"workdir:export/sft_{kind}")
    for ps in ("alpacaeval", "mtbench", "humaneval"):
        for run, path in (((start, (opd_run, f"workdir:export/{opd_run}_{kind}"))) if branch == "opd"
                          else ((f"{branch}{tag}", f"workdir:export/{branch}{tag}_{kind}"),)):
            c.eval.runs.append(dict(name=f"{kind}_{run}_{ps}", drafter=kind, drafter_path=path, prompt_set=ps))
    if ablations:  # measured by their probe curves alone
        c.stages = tuple(st for st in c.stages if st != "eval")

    if tiny:
        c.opd.prompt_len = 96
        c.opd.batch_size = 2
        c.opd.num_steps = 4
        c.opd.num_rounds = 3
        if reference:
            c.opd.accumulate = 2
        c.opd.log_every = 2
        c.opd.save_every = 2
        c.opd.probe.num_prompts = 2
        c.opd.probe.max_new_tokens = 16
        c.opd.probe.every = 2
        c.opd.probe.batch_size = 2
        c.opd.optimizer.warmup_steps = 1
        if branch in ("sft_rollouts", "ttt_rollouts"):
            c.sft.seq_len = c.opd.prompt_len + c.opd.num_rounds * (K + 1)
        if branch != "opd":
            c.sft.probe.update(num_prompts=2, max_new_tokens=16, every=2, batch_size=2)
        c.eval.runs = [r for r in c.eval.runs if r["prompt_set"] == "alpacaeval"]
    return c
