"""Draft-OPD on TPU pod slices: Qwen3-4B / Qwen3-8B (thinking mode) and Llama-3.1-8B-Instruct
targets, DFlash or EAGLE-3 drafters, starting from a public drafter checkpoint (or from SFT).

  # plan first, on any CPU machine (no TPU, no weights): per-device memory of the compiled steps
  python experiments/aot_compile.py --config=experiments/pod.py:qwen3_8b,dflash,v5p-32
  # then, on every host of the slice (same command; see README "Launching on a TPU pod"):
  python -m opd.main --config=experiments/pod.py:qwen3_8b,dflash,v5p-32 --workdir=gs://BUCKET/opd/qwen3_8b_dflash \
      --config.target.path=gs://BUCKET/models/Qwen3-8B --config.drafter.init=gs://BUCKET/models/Qwen3-8B-DFlash-b16

Variants (comma-separated):
  model    qwen3_4b | qwen3_8b (default) | llama31_8b;
  drafter  dflash (default) | eagle3;
  slice    a key of SLICES (default v5p-8): sets the mesh and the global batch;
  from_sft train the drafter by SFT on regenerated data first (no public checkpoint needed);
  tiny     the same stages and mesh logic on SmolLM2-135M (GGUF asset) with test-sized
           budgets, 8 devices (the tests run it on 8 fake CPU devices).

Paths: `target.path` is the HF checkpoint directory (config.json + *.safetensors + tokenizer
files), `drafter.init` a public drafter in its HF layout (z-lab DFlash, EAGLE-3 as SpecForge /
the EAGLE repo write it); local paths or gs:// URLs (downloaded once per host; the workdir
itself may be gs://, see opd/remote.py). They are checked before any work starts, and the loaded target is checked against `target.preset`.
Qwen3 runs in thinking mode: prompts are rendered with the model's own chat template, whose
default is `enable_thinking=True`. (z-lab's public Qwen3 DFlash drafters were trained with
thinking off; Draft-OPD's rollouts are thinking-mode text, so the OPD stage adapts them.)
Every field and its default: `opd.configs.default_config`.
"""

import ml_collections

from opd.configs import default_config, variant_parts

MODELS = {  # variant -> (target preset, suggested public drafters by kind)
    "qwen3_4b": ("qwen3-4b", {"dflash": "z-lab/Qwen3-4B-DFlash-b16", "eagle3": "AngelSlim/Qwen3-4B_eagle3"}),
    "qwen3_8b": ("qwen3-8b", {"dflash": "z-lab/Qwen3-8B-DFlash-b16", "eagle3": "AngelSlim/Qwen3-8B_eagle3"}),
    "llama31_8b": ("llama-3.1-8b", {"dflash": "z-lab/LLaMA3.1-8B-Instruct-DFlash-UltraChat",
                                    "eagle3": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B"}),
}
# slice -> chips, HBM per chip (GiB), tensor-parallel width. The rest of the chips are data
# parallel (fsdp = 1: the frozen target is replicated over data, so a decode step in the rollout
# never all-gathers weights). A bf16 8B target is 16 GiB: one v5p chip holds it whole; v6e
# chips split it over `tensor` in the training steps. experiments/aot_compile.py reports whether a plan fits.
# `topology`: libtpu's name of the slice (experiments/aot_compile.py --tpu compiles for it).
SLICES = {
    "v5p-8": dict(chips=4, hbm_gib=95, tensor=1, topology="v5p:2x2x1"),
    "v5p-32": dict(chips=16, hbm_gib=95, tensor=1, topology="v5p:2x2x4"),
    "v5p-128": dict(chips=64, hbm_gib=95, tensor=1, topology="v5p:4x4x4"),
    "v6e-8": dict(chips=8, hbm_gib=32, tensor=2, topology="v6e:2x4"),
    "v6e-32": dict(chips=32, hbm_gib=32, tensor=2, topology="v6e:4x8"),
}
# Not v5e (16 GiB): the eval, regenerate and probe decoding hold the whole target on one chip.
ROWS_PER_DATA_SHARD = 4  # prompts (OPD) / sequences (SFT) per data-parallel group and step


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    parts = variant_parts(variant, (*MODELS, "dflash", "eagle3", *SLICES, "from_sft", "tiny"), "experiments/pod.py")
    models = [p for p in parts if p in MODELS]
    kinds = [p for p in parts if p in ("dflash", "eagle3")]
    slices = [p for p in parts if p in SLICES]
    if len(models) > 1 or len(kinds) > 1 or len(slices) > 1:
        raise ValueError(f"bad variant {variant!r} of experiments/pod.py: at most one model {sorted(MODELS)}, one "
                         f"drafter (dflash|eagle3), one slice {sorted(SLICES)}, optionally from_sft, tiny")
    model = models[0] if models else "qwen3_8b"
    kind = kinds[0] if kinds else "dflash"
    slice_name = slices[0] if slices else "v5p-8"
    from_sft, tiny = "from_sft" in parts, "tiny" in parts
    preset, public = MODELS[model]
    sl = SLICES[slice_name]

    c = default_config()
    c.slice = slice_name  # informational: the AOT check compiles for this many devices
    c.num_devices = 8 if tiny else sl["chips"]
    c.hbm_gib = sl["hbm_gib"]
    c.tpu_topology = "" if tiny else sl["topology"]
    c.distributed = not tiny and sl["chips"] > 4  # multi-host slices: every host runs the same command
    tensor = 2 if tiny else sl["tensor"]
    data = c.num_devices // tensor
    c.sft.mesh.tensor = tensor
    c.opd.mesh.tensor = tensor
    c.drafter.kind = kind

    # the SFT data (from_sft): the target's greedy answers to the training prompts
    c.regenerate.sources = ("alpacaeval", "stdlib_code", "pydocs")
    c.regenerate.drafter = "ngram"
    c.sft.optimizer.update(learning_rate=1e-3, warmup_steps=20)
    c.opd.optimizer.update(learning_rate=3e-4, warmup_steps=5)
    c.opd.save_rollouts = True
    c.opd.probe.num_prompts = 8

    K = 15 if kind == "dflash" else 6  # z-lab b16 drafters draft 15; EAGLE-3 chains of 6
    if not tiny:
        c.assets = ("alpacaeval", "mtbench", "humaneval")
        c.target.path = ""  # REQUIRED: HF dir of the target (e.g. huggingface-cli download Qwen/Qwen3-8B)
        c.target.preset = preset  # the loaded checkpoint must be this architecture
        c.target.dtype = "bfloat16"
        c.target.param_dtype = "bfloat16"
        c.target.scan_layers = True  # one compiled layer: minutes less compile at 36 layers
        # the drafter trains float32 master weights (and float32 AdamW moments) where HBM allows:
        # v5p; on v6e (32 GiB) a float32 DFlash state does not fit next to the 8B target (AOT plan)
        c.drafter.param_dtype = "float32" if sl["hbm_gib"] >= 64 else ""
        c.drafter.init = ""  # REQUIRED unless from_sft: a public drafter dir (HF layout)
        c.drafter.public = public[kind]  # the HF repo to download into drafter.init
        if kind == "dflash":
            c.drafter.overrides.update(block_size=16, num_layers=5, num_target_features=5)
        else:
            c.drafter.overrides.update(draft_vocab_size=32000)
        c.regenerate.num_prompts = 1024  # per source
        c.regenerate.max_new_tokens = 2048  # thinking-mode answers are long
        c.regenerate.batch_size = 8 * data
        c.regenerate.shard_size = 64
        c.sft.target_features = "online"  # 8B features of the whole set would be terabytes
        c.sft.seq_len = 2048
        c.sft.batch_size = ROWS_PER_DATA_SHARD * data
        if kind == "eagle3":  # 7 TTT steps hold [B, T, W] float32 logits each: 2 rows per shard
            c.sft.batch_size = 2 * data  # (4 rows: 128 GiB per v5p chip, experiments/results/aot/)
            if sl["hbm_gib"] < 95:
                c.sft.seq_len = 1024
        c.sft.num_steps = 20000
        c.sft.log_every = 50
        c.sft.save_every = 500
        c.sft.loss = ml_collections.ConfigDict(dict(ttt_steps=7, step_decay=0.8) if kind == "eagle3"
                                               else dict(num_anchors=16, gamma=7.0))
        c.opd.prompt_len = 1024  # prompt + random prefix of the target's answer
        c.opd.batch_size = ROWS_PER_DATA_SHARD * data
        c.opd.num_rounds = 32  # amortises the prompt prefill (67 % of a P=256, R=8 step: opd_diagnosis)
        c.opd.num_steps = 2000
        c.opd.log_every = 10
        c.opd.save_every = 100
        c.opd.probe.update(num_prompts=32, max_new_tokens=256, every=100, batch_size=8)
        c.eval.num_prompts = 80
        c.eval.max_new_tokens = 1024
        c.eval.batch_size = 4
        c.opd.num_draft_tokens = K
        # from a public drafter (`--config.drafter.init=...`), or from this launch's SFT
        c.opd.init = "workdir:export/sft_" + kind if from_sft else c.drafter.get_ref("init")
    else:  # the same stages and mesh logic on SmolLM2-135M with test-sized budgets
        c.assets = ("smollm2_gguf", "mtbench", "humaneval")
        c.target.path = "asset:smollm2_gguf"
        c.target.scan_layers = True
        c.regenerate.num_prompts = 8
        c.regenerate.max_new_tokens = 32
        c.regenerate.batch_size = 4
        c.regenerate.shard_size = 4
        c.regenerate.sources = ("alpacaeval",)
        if kind == "dflash":
            c.drafter.overrides.update(block_size=8, num_layers=2, num_target_features=3)
        else:
            c.drafter.overrides.update(draft_vocab_size=2048)
        c.sft.seq_len = 96
        c.sft.batch_size = 2 * data  # rows divide data x fsdp
        c.sft.num_steps = 40
        c.sft.log_every = 5
        c.sft.save_every = 20
        c.sft.optimizer.warmup_steps = 5
        c.sft.loss = ml_collections.ConfigDict(dict(ttt_steps=4, step_decay=0.8) if kind == "eagle3"
                                               else dict(num_anchors=8, gamma=7.0))
        c.opd.init = "workdir:export/sft_" + kind
        c.opd.prompt_len = 96
        c.opd.batch_size = 2 * data
        c.opd.num_steps = 4
        c.opd.num_rounds = 3
        c.opd.log_every = 2
        c.opd.save_every = 2
        c.opd.optimizer.warmup_steps = 1
        c.opd.probe.update(num_prompts=2, max_new_tokens=16, every=2, batch_size=2)
        c.eval.num_prompts = 2
        c.eval.max_new_tokens = 16
        c.opd.num_draft_tokens = 7 if kind == "dflash" else 4
    c.eval.num_draft_tokens = c.opd.get_ref("num_draft_tokens")
    sets = ("alpacaeval",) if tiny else ("alpacaeval", "mtbench", "humaneval")
    if from_sft or tiny:
        runs = [(run, ps) for ps in sets for run in ("sft", "opd")]
    else:  # "public": the public drafter as the OPD stage copied it (DIR/opd/<kind>/init)
        runs = [(run, ps) for run in ("opd", "public") for ps in sets]
    for run, ps in runs:
        path = f"workdir:opd/{kind}/init" if run == "public" else f"workdir:export/{run}_{kind}"
        c.eval.runs.append(dict(name=f"{kind}_{run}_{ps}", drafter=kind, drafter_path=path, prompt_set=ps))
    if from_sft or tiny:
        c.stages = ("fetch_assets", "regenerate", "sft", "export:sft", "opd", "export:opd", "eval")
    else:
        c.stages = ("fetch_assets", "regenerate", "opd", "export:opd", "eval")
    return c
