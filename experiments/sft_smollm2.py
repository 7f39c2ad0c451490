"""SFT of an EAGLE-3 or DFlash drafter for SmolLM2-135M-Instruct on its own regenerated answers,
then export and evaluation against the untrained drafter (same draft vocabulary) and n-gram.

  python -m opd.main --config=experiments/sft_smollm2.py:eagle3 --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/sft_smollm2.py:dflash --workdir=workdirs/smollm2
  python -m opd.main --config=experiments/sft_smollm2.py:eagle3,tiny --workdir=/tmp/sft   # ~2 min

Variants (comma-separated): the drafter kind (`eagle3`, default, or `dflash`), `tiny`, and
`scale`: the issue-15 data-scale run, in legs that each fit a session:

  python -m opd.main --config=experiments/sft_smollm2.py:eagle3,scale --workdir=workdirs/smollm2_scale

`scale,src_<source>` (source: answers, chat, code, docs or mix) trains a fresh drafter for 80 steps
on that source alone (mix: the scale run's mix), with one draft vocabulary for all of them (the
whole corpus's, `config.drafter.vocab_data`), into DIR/sft_src_<source>/<kind>/; then
`experiments/benchmarks/sft_sources.py --workdir=DIR` reports tau per CPU-hour of each.

It trains on SmolLM2's own answers to the 652 AlpacaEval-train prompts (plain batched greedy
decoding, ~150k tokens, read 4x per epoch) and the offline-text corpus (stdlib code and Python docs
as assistant turns, ~1.9M answer tokens, `regenerate_smollm2.py:text`; AlpacaEval's reference answers
to the same train prompts, 47k tokens, read 2x), packed rows of 640 tokens with the target's features computed online (segment-masked;
no cache to rebuild in a new session), at a constant learning rate after warm-up, with the
held-out probe (64 AlpacaEval held-out prompts x 128 tokens) every 75 steps. A leg stops on
SIGTERM or at `num_steps` with a checkpoint; a later session continues from the exported
drafter (`config.drafter.init`, which also continues the FLOP count).
Stages resume from DIR: trajectories in DIR/regenerate/ (shared by both drafters; `scale` reads the
answers shipped in experiments/data/ instead), the drafter
in DIR/sft/<kind>/, the exported drafter in DIR/export/sft_<kind>/, evaluations in DIR/eval/.
Every field and its default: `opd.configs.default_config`.
"""

import ml_collections

from opd.configs import default_config, sibling_config, variant_parts


# `src_<source>` (issue 15: tau per CPU-hour of each data source): the scale run's settings on one
# source alone, or the mix, for SOURCE_STEPS steps, probed at the start and the end
# (experiments/benchmarks/sft_sources.py reads the runs and prices each source's data generation)
# SmolLM2's greedy answers to the 652 AlpacaEval-train prompts (`regenerate_smollm2.py:answers`, ~0.5
# CPU-h), shipped in the repo (experiments/ship_data.py) so that no machine regenerates them again
ANSWERS = "data:smollm2_alpacaeval_answers"
SOURCES = {"answers": ANSWERS, "chat": "workdir:text_corpus/alpacaeval_outputs",
           "code": "workdir:text_corpus/stdlib_code", "docs": "workdir:text_corpus/pydocs", "mix": ""}
SOURCE_STEPS = 80


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    parts = variant_parts(variant, ("eagle3", "dflash", "tiny", "scale") + tuple(f"src_{s}" for s in SOURCES),
                          "experiments/sft_smollm2.py")
    if "eagle3" in parts and "dflash" in parts:
        raise ValueError(f"bad variant {variant!r} of experiments/sft_smollm2.py: eagle3 or dflash, not both")
    sources = [p[len("src_"):] for p in parts if p.startswith("src_")]
    if sources and (len(sources) > 1 or "scale" not in parts):
        raise ValueError(f"bad variant {variant!r} of experiments/sft_smollm2.py: one src_<source> part, with `scale`")
    kind = "dflash" if "dflash" in parts else "eagle3"
    tiny = "tiny" in parts
    c = default_config()
    c.stages = ("fetch_assets", "regenerate", "sft", "export", "eval")
    c.assets = ("smollm2_gguf", "alpacaeval", "mtbench", "humaneval")  # eval sets: to exclude their prompts
    c.target.path = "asset:smollm2_gguf"

    # the SFT data: SmolLM2's greedy answers (n-gram speculative decoding: the same answers, faster)
    c.regenerate.sources = ("alpacaeval", "stdlib_code", "pydocs")
    c.regenerate.num_prompts = 256
    c.regenerate.max_new_tokens = 256
    c.regenerate.batch_size = 4
    c.regenerate.shard_size = 32
    c.regenerate.drafter = "ngram"

    c.drafter.kind = kind
    if kind == "eagle3":
        c.drafter.overrides.draft_vocab_size = 8192  # covers the trajectories' tokens; V = 49152
    else:
        c.drafter.overrides.block_size = 8  # drafts up to 7 tokens per round
        c.drafter.overrides.num_layers = 2
        c.drafter.overrides.num_target_features = 3

    # Budget on 2 CPU cores (measured, BUILD_NOTES): the target's features are cached once (one
    # target pass over the data), then each step costs only the drafter: EAGLE-3 ~10 s, DFlash ~3 s.
    c.sft.target_features = "cache"
    c.sft.seq_len = 320  # keeps 72% of the answer tokens of the long stdlib-code prompts, 97-99% of the others
    c.sft.num_steps = 180 if kind == "eagle3" else 200
    c.sft.optimizer.update(learning_rate=1e-3, warmup_steps=20, end_lr_ratio=0.1, weight_decay=0.0, clip_norm=0.5)
    # EAGLE-3 unrolls 4 TTT steps (the paper: 7): the chain drafts K = 4 here and each step costs a
    # full drafter pass on this CPU budget
    c.sft.loss = ml_collections.ConfigDict(dict(ttt_steps=4, step_decay=0.8) if kind == "eagle3"
                                           else dict(num_anchors=8, gamma=7.0))

    c.eval.num_draft_tokens = 4 if kind == "eagle3" else 7
    for ps in ("alpacaeval", "mtbench", "humaneval"):
        c.eval.runs.append(dict(name=f"{kind}_untrained_{ps}", drafter=kind, drafter_path=f"workdir:sft/{kind}/init",
                                prompt_set=ps))
        c.eval.runs.append(dict(name=f"{kind}_sft_{ps}", drafter=kind, drafter_path=f"workdir:export/sft_{kind}",
                                prompt_set=ps))

    if "scale" in parts:
        # the data: the shipped answers (ANSWERS) and regenerate_smollm2.py's `text` corpus
        c.text_corpus = sibling_config(__file__, "regenerate_smollm2.py", "text").text_corpus
        c.text_corpus.sources = ("stdlib_code", "pydocs", "alpacaeval_outputs")
        c.stages = ("fetch_assets", "text_corpus", "sft", "export")
        c.sft.data = (ANSWERS, "workdir:text_corpus/alpacaeval_outputs",
                      "workdir:text_corpus/stdlib_code", "workdir:text_corpus/pydocs")
        # the chat sources are ~10 % of the tokens: read 4x / 2x per epoch (and counted so in the
        # draft vocabulary), so chat is ~1/3 of what is trained on
        c.sft.data_repeats = (4, 2, 1, 1)
        c.sft.name = "sft_scale"
        c.sft.target_features = "online"
        c.sft.packing = True
        c.sft.seq_len, c.sft.batch_size = 640, 4  # 2560 tokens per step, as the padded rows above
        c.sft.num_steps = 4000
        c.sft.log_every, c.sft.save_every = 10, 50
        c.sft.optimizer.update(learning_rate=1e-3, warmup_steps=30, end_lr_ratio=1.0)  # constant: legs chain
        c.sft.probe.update(prompt_set="alpacaeval", num_prompts=64, max_new_tokens=128, every=75, batch_size=16,
                           num_draft_tokens=c.eval.num_draft_tokens)
        if kind == "eagle3":  # ~71 % of a packed row's positions are answer tokens: the draft head runs there only
            c.sft.loss.head_capacity = 0.75
        else:  # 128 blocks per 640-token row (sft_throughput: 2x the supervision per second of 32 once the
            # online target forward is counted); a draft-vocabulary head (EAGLE-3's width) and a neutral MASK
            c.sft.loss.num_anchors = 128
            c.drafter.overrides.update(draft_vocab_size=8192, mask_embedding="learned")
        c.export.source = "sft_scale"
        c.eval.runs = []
        if sources:  # one source alone (or the mix), short, all with the whole corpus's draft vocabulary
            c.drafter.vocab_data = c.sft.data
            if sources[0] != "mix":
                c.sft.data, c.sft.data_repeats = (SOURCES[sources[0]],), ()
            c.sft.name = f"sft_src_{sources[0]}"
            c.stages = ("fetch_assets", "text_corpus", "sft")
            c.sft.num_steps = SOURCE_STEPS
            c.sft.probe.every = SOURCE_STEPS
    if tiny:
        c.target.scan_layers = True  # faster compiles
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
        c.eval.num_prompts = 2
        c.eval.max_new_tokens = 16
        c.eval.runs = [r for r in c.eval.runs if r["prompt_set"] == "alpacaeval"]
        c.text_corpus.num_records = 8
        c.text_corpus.max_tokens = 32
        if "scale" in parts:
            c.sft.probe.update(num_prompts=2, max_new_tokens=16, every=20, batch_size=2)
        if "draft_vocab_size" in c.drafter.overrides:
            c.drafter.overrides.draft_vocab_size = 2048
    return c
