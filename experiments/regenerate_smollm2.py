"""Regenerate SFT data: SmolLM2-135M-Instruct answers training prompts (AlpacaEval train split,
stdlib code, Python docs; evaluation prompts removed) into trajectory shards.

  python -m opd.main --config=experiments/regenerate_smollm2.py --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/regenerate_smollm2.py:tiny --workdir=/tmp/regen   # seconds
  python -m opd.main --config=experiments/regenerate_smollm2.py:scale --workdir=workdirs/smollm2_scale   # hours
  python -m opd.main --config=experiments/regenerate_smollm2.py:text --workdir=workdirs/smollm2_text   # ~35 s
  python -m opd.main --config=experiments/regenerate_smollm2.py:answers --workdir=workdirs/answers   # ~0.5 h
  python experiments/ship_data.py --src=workdirs/answers/regenerate/alpacaeval --name=smollm2_alpacaeval_answers

`scale`: every training prompt of each source (AlpacaEval train split 652, stdlib code 9714,
Python docs), answered by plain batched greedy decoding at batch 32 (on this CPU faster per
token than n-gram speculative decoding at batch 4), resumable shard by shard.

`answers`: `scale` for the AlpacaEval train split alone: the answers the plateau SFT runs and the
Draft-OPD experiments from them train on, shipped in the repo (`data:smollm2_alpacaeval_answers`,
by experiments/ship_data.py, the second command above).

`text`: no generation (stage `text_corpus`, `opd.data.text_corpus`): every stdlib function's
source and the Python docs' prose as assistant turns, tokenised with SmolLM2's tokenizer, max 256
tokens per answer, into DIR/text_corpus/{stdlib_code,pydocs}/: 13,785 + 2,467 records, 1.42M + 0.50M
answer tokens (Python 3.11; `python3.11-doc` for the docs). Train on them with
`config.sft.data = ("workdir:text_corpus/stdlib_code", "workdir:text_corpus/pydocs")`.

Every field and its default: `opd.configs.default_config`.
"""

import ml_collections

from opd.configs import default_config, variant_parts


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    parts = variant_parts(variant, ("tiny", "scale", "answers", "text"), "experiments/regenerate_smollm2.py")
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

    if "scale" in parts or "answers" in parts:
        c.regenerate.num_prompts = 100_000  # all of them
        c.regenerate.batch_size = 32
        c.regenerate.shard_size = 64
        c.regenerate.drafter = "none"
    if "answers" in parts:
        c.regenerate.sources = ("alpacaeval",)
    if "text" in parts:
        c.stages = ("fetch_assets", "text_corpus")  # tokenizer only: no model forward
        c.text_corpus.sources = ("stdlib_code", "pydocs")
        c.text_corpus.num_records = 1_000_000  # all of them
        c.text_corpus.max_tokens = 256
    if tiny:
        c.assets = ("smollm2_gguf", "mtbench", "humaneval")
        c.target.scan_layers = True
        c.regenerate.sources = ("stdlib_code",)
        c.regenerate.num_prompts = 2
        c.regenerate.max_new_tokens = 8
        c.regenerate.batch_size = 2
        c.regenerate.shard_size = 2
    return c
