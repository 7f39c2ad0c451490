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
"""

import ml_collections

from opd.configs import sibling_config

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
SLICES = {
    "v5p-8": dict(chips=4, hbm_gib=95, tensor=1),
    "v5p-32": dict(chips=16, hbm_gib=95, tensor=1),
    "v5p-128": dict(chips=64, hbm_gib=95, tensor=1),
    "v6e-8": dict(chips=8, hbm_gib=32, tensor=2),
    "v6e-32": dict(chips=32, hbm_gib=32, tensor=2),
}
# Not v5e (16 GiB): the eval, regenerate and probe decoding hold the whole target on one chip.
ROWS_PER_DATA_SHARD = 4  # prompts (OPD) / sequences (SFT) per data-parallel group and step


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    parts = [p for p in variant.split(",") if p]
    models = [p for p in parts if p in MODELS]
    kinds = [p for p in parts if p in ("dflash", "eagle3")]
    slices = [p for p in parts if p in SLICES]
    unknown = [p for p in parts if p not in (*MODELS, "dflash", "eagle3", *SLICES, "from_sft", "tiny")]
    if unknown or len(models) > 1 or len(kinds) > 1 or len(slices) > 1:
        raise ValueError(f"bad variant {variant!r} of experiments/pod.py: at most one model {sorted(MODELS)}, one "
                         f"drafter (dflash|eagle3), one slice {sorted(SLICES)}, optionally from_sft, tiny")
    model = models[0] if models else "qwen3_8b"
    kind = kinds[0] if kinds else "dflash"
    slice_name = slices[0] if slices else "v5p-8"
    from_sft, tiny = "from_sft" in parts, "tiny" in parts
    preset, public = MODELS[model]
    sl = SLICES[slice_name]

    # regenerate / sft / opd / eval blocks with their comments: the SmolLM2 configs
    c = sibling_config(__file__, "opd_smollm2.py", ",".join([kind] + (["tiny"] if tiny else [])))
    c.slice = slice_name  # informational: the AOT check compiles for this many devices
    c.num_devices = 8 if tiny else sl["chips"]
    c.hbm_gib = sl["hbm_gib"]
    # jax.distributed.initialize() before anything else (multi-host slices: every host runs the
    # same command; on Cloud TPU it finds the coordinator itself)
    c.distributed = not tiny and sl["chips"] > 4

    tensor = 2 if tiny else sl["tensor"]
    data = c.num_devices // tensor
    mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=tensor))
    c.sft.mesh = mesh
    c.opd.mesh = ml_collections.ConfigDict(mesh.to_dict())

    K = 15 if kind == "dflash" else 6  # z-lab b16 drafters draft 15; EAGLE-3 chains of 6
    if not tiny:
        c.assets = ["alpacaeval", "mtbench", "humaneval"]
        c.target.path = ""  # REQUIRED: HF dir of the target (e.g. huggingface-cli download Qwen/Qwen3-8B)
        c.target.dtype = "bfloat16"
        c.target.param_dtype = "bfloat16"  # weights in bf16
        # the drafter trains float32 master weights (and float32 AdamW moments) where HBM allows:
        # v5p; on v6e (32 GiB) a float32 DFlash state does not fit next to the 8B target (AOT plan)
        c.drafter.param_dtype = "float32" if sl["hbm_gib"] >= 64 else ""
        c.target.scan_layers = True  # one compiled layer: minutes less compile at 36 layers
        c.regenerate.num_prompts = 1024  # per source
        c.regenerate.max_new_tokens = 2048  # thinking-mode answers are long
        c.regenerate.batch_size = 8 * data
        c.regenerate.shard_size = 64
        c.drafter.init = ""  # REQUIRED unless from_sft: a public drafter dir (HF layout)
        c.drafter.public = public[kind]  # the HF repo to download into drafter.init
        if kind == "dflash":
            c.drafter.overrides.update(block_size=16, num_layers=5, num_target_features=5)
        else:
            c.drafter.overrides.update(draft_vocab_size=32000)
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
        c.opd.num_rounds = 32  # amortises the prompt prefill (BUILD_NOTES: 67 % of a P=256, R=8 step)
        c.opd.num_steps = 2000
        c.opd.log_every = 10
        c.opd.save_every = 100
        c.opd.probe.update(num_prompts=32, max_new_tokens=256, every=100, batch_size=8)
        c.eval.num_prompts = 80
        c.eval.max_new_tokens = 1024
        c.eval.batch_size = 4
    c.target.preset = "" if tiny else preset  # "" = no architecture check (the tiny SmolLM2 target)
    c.opd.num_draft = 7 if tiny and kind == "dflash" else (4 if tiny else K)
    c.eval.num_draft_tokens = c.opd.get_ref("num_draft")
    if not tiny:
        c.opd.init = "workdir:export/sft_" + kind if from_sft else c.drafter.get_ref("init")
    if from_sft or tiny:
        c.stages = ("fetch_assets", "regenerate", "sft", "export:sft", "opd", "export:opd", "eval")
    else:
        c.stages = ("fetch_assets", "regenerate", "opd", "export:opd", "eval")
        c.eval.runs = [r for r in c.eval.runs if "_sft_" not in r["name"]]
        # the public drafter as the OPD stage copied it (DIR/opd/<kind>/init): the baseline row
        c.eval.runs += [dict(name=f"{kind}_public_{ps}", drafter=kind, drafter_path=f"workdir:opd/{kind}/init",
                             prompt_set=ps) for ps in ("alpacaeval", "mtbench", "humaneval")]
    if tiny:
        c.opd.batch_size = 2 * data  # rows divide data x fsdp
        c.sft.batch_size = 2 * data
        c.opd.probe.batch_size = 2
    return c
