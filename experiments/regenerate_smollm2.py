"""Regenerate SFT data: SmolLM2-135M-Instruct answers training prompts (AlpacaEval train split,
stdlib code, Python docs; evaluation prompts removed) into trajectory shards.

  python -m opd.main --config=experiments/regenerate_smollm2.py --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/regenerate_smollm2.py:tiny --workdir=/tmp/regen   # seconds
  python -m opd.main --config=experiments/regenerate_smollm2.py:scale --workdir=workdirs/smollm2_scale   # hours

`scale`: every training prompt of each source (AlpacaEval train split 652, stdlib code 9714,
Python docs), answered by plain batched greedy decoding at batch 32 (on this CPU faster per
token than n-gram speculative decoding at batch 4), resumable shard by shard.

Every field and its default: `opd.configs.default_config`.
"""

import ml_collections

from opd.configs import default_config, variant_parts


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    parts = variant_parts(variant, ("tiny", "scale"), "experiments/regenerate_smollm2.py")
    tiny = "tiny" in parts
    c = default_config()
    c.stages = ("fetch_assets", "regenerate")
    c.assets = ("smollm2_gguf", "alpacaeval", "mtbench", "humaneval")  # eval sets: to exclude their prompts
    c.target.path = "asset:smollm2_gguf"

    c.regenerate.sources = ("alpacaeval", "stdlib_code", "pydocs")
    c.regenerate.num_prompts = 256  # per source (first N in deterministic order)
    c.regenerate.max_new_tokens = 256
    c.regenerate.batch_size = 4
    c.regenerate.shard_size = 32
    c.regenerate.drafter = "ngram"  # lossless speculative decoding: the same answers, faster

    if "scale" in parts:
        c.regenerate.num_prompts = 100_000  # all of them
        c.regenerate.batch_size = 32
        c.regenerate.shard_size = 64
        c.regenerate.drafter = "none"
    if tiny:
        c.assets = ("smollm2_gguf", "mtbench", "humaneval")
        c.target.scan_layers = True
        c.regenerate.sources = ("stdlib_code",)
        c.regenerate.num_prompts = 2
        c.regenerate.max_new_tokens = 8
        c.regenerate.batch_size = 2
        c.regenerate.shard_size = 2
    return c
