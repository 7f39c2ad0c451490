"""Regenerate SFT data: SmolLM2-135M-Instruct answers training prompts (AlpacaEval train split,
stdlib code, Python docs; evaluation prompts removed) into trajectory shards.

  python -m opd.main --config=experiments/regenerate_smollm2.py --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/regenerate_smollm2.py:tiny --workdir=/tmp/regen   # seconds
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stages = ("fetch_assets", "regenerate")  # run in order; each resumes from what DIR holds
    c.seed = 0  # base PRNG seed (shard i samples with seed + i)
    c.assets = ["smollm2_gguf", "alpacaeval", "mtbench", "humaneval"]  # eval sets: to exclude their prompts
    # with a gs:// (any URL) --workdir: this host's local copy of it (opd/remote.py); "" picks
    # ~/.cache/opd/workdirs/<scheme>/<path>
    c.local_workdir = ""

    c.target = ml_collections.ConfigDict()
    c.target.path = "asset:smollm2_gguf"  # HF dir, .gguf file, or asset:<name>
    c.target.dtype = "float32"  # activation dtype (bf16 is slower on CPU)
    c.target.scan_layers = False  # True compiles faster; False decodes faster on CPU

    c.regenerate = ml_collections.ConfigDict()
    c.regenerate.sources = ("alpacaeval", "stdlib_code", "pydocs")  # training prompt sources (or .jsonl files)
    c.regenerate.num_prompts = 256  # per source (first N in deterministic order)
    c.regenerate.max_new_tokens = 256  # per answer
    c.regenerate.temperature = 0.0  # 0 = greedy (the target's own most likely answer)
    c.regenerate.batch_size = 4  # prompts per decoding call
    c.regenerate.shard_size = 32  # prompts per JSONL shard (the unit of resumption)
    c.regenerate.drafter = "ngram"  # "ngram" (lossless speculative decoding) or "none"
    c.regenerate.num_draft_tokens = 4  # K for the n-gram drafter

    if variant == "tiny":
        c.assets = ["smollm2_gguf", "mtbench", "humaneval"]
        c.target.scan_layers = True
        c.regenerate.sources = ("stdlib_code",)
        c.regenerate.num_prompts = 2
        c.regenerate.max_new_tokens = 8
        c.regenerate.batch_size = 2
        c.regenerate.shard_size = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of experiments/regenerate_smollm2.py (known: '', 'tiny')")
    return c
