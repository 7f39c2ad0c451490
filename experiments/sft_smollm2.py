"""SFT of an EAGLE-3 or DFlash drafter for SmolLM2-135M-Instruct on its own regenerated answers,
then export and evaluation against the untrained drafter (same draft vocabulary) and n-gram.

  python -m opd.main --config=experiments/sft_smollm2.py:eagle3 --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/sft_smollm2.py:dflash --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/sft_smollm2.py:eagle3,tiny --workdir=/tmp/sft   # ~2 min

Variants (comma-separated): the drafter kind (`eagle3`, default, or `dflash`) and `tiny`.
Stages resume from DIR: trajectories in DIR/regenerate/ (shared by both drafters), the drafter
in DIR/sft/<kind>/, the exported drafter in DIR/export/sft_<kind>/, evaluations in DIR/eval/.
"""

import ml_collections

from opd.configs import sibling_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    parts = [p for p in variant.split(",") if p]
    unknown = [p for p in parts if p not in ("eagle3", "dflash", "tiny")]
    if unknown or ("eagle3" in parts and "dflash" in parts):
        raise ValueError(f"bad variant {variant!r} of experiments/sft_smollm2.py: use eagle3 or dflash, optionally ',tiny'")
    kind = "dflash" if "dflash" in parts else "eagle3"
    tiny = "tiny" in parts

    c = sibling_config(__file__, "regenerate_smollm2.py", "tiny" if tiny else "")  # seed, assets, target, ...
    c.stages = ("fetch_assets", "regenerate", "sft", "export", "eval")

    c.drafter = ml_collections.ConfigDict()
    c.drafter.kind = kind
    c.drafter.init = ""  # "" = fresh drafter; or an HF-layout drafter dir to fine-tune (its d2t is kept)
    c.drafter.overrides = ml_collections.ConfigDict()  # Eagle3Config / DFlash config fields
    c.drafter.param_dtype = ""  # trained parameters (and AdamW moments): "" = the target's param_dtype
    if kind == "eagle3":
        c.drafter.overrides.draft_vocab_size = 8192  # covers the trajectories' tokens; V = 49152
    else:
        c.drafter.overrides.block_size = 8  # drafts up to 7 tokens per round
        c.drafter.overrides.num_layers = 2
        c.drafter.overrides.num_target_features = 3

    # Budget on 2 CPU cores (measured, BUILD_NOTES): the target's features are cached once (one
    # target pass over the data), then each step costs only the drafter: EAGLE-3 ~10 s, DFlash ~3 s.
    c.sft = ml_collections.ConfigDict()
    c.sft.data = ()  # trajectory folders; () = every DIR/regenerate/<source>/
    c.sft.target_features = "cache"  # "online": the frozen target runs in every step; "cache": once, to disk
    c.sft.feature_cache_dtype = "float16"  # "cache" only: float16 halves the disk of float32
    c.sft.seq_len = 320  # prompt + answer tokens per row (padded; longer ones truncated: keeps 72% of
    # the answer tokens of the long stdlib-code prompts, 97-99% of the others)
    c.sft.batch_size = 8  # rows per step (all processes)
    c.sft.num_steps = 180 if kind == "eagle3" else 200
    c.sft.log_every = 10
    c.sft.save_every = 50
    c.sft.keep_checkpoints = 2
    c.sft.tensorboard = True
    c.sft.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=20, end_lr_ratio=0.1,
                                                     weight_decay=0.0, clip_norm=0.5))
    # EAGLE-3 unrolls 4 TTT steps (the paper: 7) because the chain drafts K = 4 here and each
    # step costs a full drafter pass on this CPU budget.
    c.sft.loss = ml_collections.ConfigDict(dict(ttt_steps=4, step_decay=0.8) if kind == "eagle3"
                                           else dict(num_anchors=8, gamma=7.0))
    c.sft.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.export = ml_collections.ConfigDict(dict(source="sft"))

    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 8
    c.eval.batch_size = 1
    c.eval.max_new_tokens = 128
    c.eval.num_draft_tokens = 4 if kind == "eagle3" else 7
    c.eval.temperature = 0.0
    c.eval.repeats = 1
    c.eval.runs = []
    for ps in ("alpacaeval", "mtbench", "humaneval"):
        c.eval.runs.append(dict(name=f"{kind}_untrained_{ps}", drafter=kind, drafter_path=f"workdir:sft/{kind}/init",
                                prompt_set=ps))
        c.eval.runs.append(dict(name=f"{kind}_sft_{ps}", drafter=kind, drafter_path=f"workdir:export/sft_{kind}",
                                prompt_set=ps))

    if tiny:
        c.regenerate.sources = ("alpacaeval",)  # its train split; eval uses the held-out split
        c.regenerate.num_prompts = 8
        c.regenerate.max_new_tokens = 32
        c.regenerate.batch_size = 4
        c.regenerate.shard_size = 4
        c.sft.target_features = "online"
        c.sft.seq_len = 96
        c.sft.batch_size = 2
        c.sft.num_steps = 40
        c.sft.log_every = 5
        c.sft.save_every = 20
        c.sft.optimizer.warmup_steps = 5
        c.sft.tensorboard = True
        c.eval.num_prompts = 2
        c.eval.max_new_tokens = 16
        c.eval.runs = [r for r in c.eval.runs if r["prompt_set"] == "alpacaeval"]
        if kind == "eagle3":
            c.drafter.overrides.draft_vocab_size = 2048
    return c
