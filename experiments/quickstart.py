"""Quickstart: fetch the offline assets, chat with SmolLM2-135M-Instruct on CPU, and measure
n-gram (prompt-lookup) speculative decoding against autoregressive decoding (`eval`).

  python -m opd.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
  python -m opd.main --config=experiments/quickstart.py:tiny --workdir=/tmp/qs   # seconds, used by tests
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stages = ("fetch_assets", "chat", "eval")  # run in order; each resumes from what DIR holds
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

    # Speculative vs autoregressive decoding; writes DIR/eval/<name>/metrics.json (+ .md, plots).
    # Every field below except `runs` is a default that a run may override.
    c.eval = ml_collections.ConfigDict()
    c.eval.runs = [  # name (dir under DIR/eval), drafter ("none" | "ngram"), prompt_set (as chat.prompt_set)
        dict(name="ngram_mtbench", drafter="ngram", prompt_set="mtbench"),
        dict(name="ngram_humaneval", drafter="ngram", prompt_set="humaneval"),
    ]
    c.eval.num_prompts = 4  # first N prompts of each set (AlpacaEval: of its held-out split)
    c.eval.temperature = 0.0  # 0 = greedy, and then the outputs are checked against autoregressive decoding
    c.eval.num_draft_tokens = 4  # K drafts per verify round
    c.eval.batch_size = 1  # prompts per decoding call (both methods)
    c.eval.max_new_tokens = 128  # per prompt
    c.eval.both_turns = False  # MT-Bench: also decode turn 2 after the model's own first answer
    c.eval.repeats = 1  # timed repetitions per batch (median)

    if variant == "tiny":
        c.assets = ["smollm2_gguf", "mtbench", "humaneval"]
        c.target.scan_layers = True  # compiles one layer instead of 30: seconds saved per shape
        c.chat.num_prompts = 2
        c.chat.batch_size = 2
        c.chat.max_new_tokens = 8
        c.eval.num_prompts = 2
        c.eval.batch_size = 2  # one compiled shape per run
        c.eval.max_new_tokens = 8
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of experiments/quickstart.py (known: '', 'tiny')")
    return c
