"""Quickstart: fetch the offline assets and chat with SmolLM2-135M-Instruct on CPU.

  python -m opd.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
  python -m opd.main --config=experiments/quickstart.py:tiny --workdir=/tmp/qs   # seconds, used by tests
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stages = ["fetch_assets", "chat"]  # run in order; each resumes from what DIR holds
    c.seed = 0  # base PRNG seed for sampling
    c.assets = ["smollm2_gguf", "mtbench", "humaneval"]  # offline assets to fetch (opd.data.assets)

    c.target = ml_collections.ConfigDict()
    c.target.path = "asset:smollm2_gguf"  # HF dir, .gguf file, or asset:<name>
    c.target.dtype = "float32"  # activation dtype (bf16 is slower on CPU)
    c.target.scan_layers = False  # True for large models (compile time); False decodes faster on CPU

    c.chat = ml_collections.ConfigDict()
    c.chat.prompts = []  # explicit user messages; empty -> first turns of `prompt_set`
    c.chat.prompt_set = "mtbench"  # mtbench | humaneval | alpacaeval | path/to.jsonl
    c.chat.num_prompts = 4  # how many prompts of the set to answer
    c.chat.batch_size = 4  # prompts per generate call
    c.chat.max_new_tokens = 128  # per response
    c.chat.temperature = 0.0  # 0 = greedy

    if variant == "tiny":
        c.assets = ["smollm2_gguf", "mtbench"]
        c.chat.num_prompts = 2
        c.chat.batch_size = 2
        c.chat.max_new_tokens = 8
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of experiments/quickstart.py (known: '', 'tiny')")
    return c
