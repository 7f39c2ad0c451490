"""The one config schema of the launcher, its validation, and loading config files.

`default_config()` defines every field once, with its default and a one-line comment; the
option blocks that have a dataclass (optimizer, Draft-OPD loss, rollout) take their defaults
from it. An experiment file (`experiments/<name>.py`) starts from `default_config()` and sets
what differs, so it reads top to bottom next to this file. `validate(config)` is the one
place where values are checked (before any work starts), with errors naming the field;
`validate_launch(config)` checks what needs the machine (paths, devices, meshes).

Stages: fetch_assets, chat, regenerate, text_corpus, sft, opd, export (or "export:<run>"), eval, report.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import os
import re

import jax
import ml_collections

from opd.data.assets import PROMPT_SETS
from opd.data.regenerate import SOURCES as REGENERATE_SOURCES
from opd.data.text_corpus import SOURCES as TEXT_CORPUS_SOURCES
from opd.drafters import registry
from opd.paths import path_exists, resolve_path
from opd.models.presets import PRESETS
from opd.training.feature_cache import DTYPES as FEATURE_CACHE_DTYPES
from opd.training import opd_loss
from opd.training.opd_loss import OPDLossConfig
from opd.training.opd_step import OPDConfig
from opd.training.optim import OptimConfig
from opd.training.run import make_mesh

STAGES = ("fetch_assets", "chat", "regenerate", "text_corpus", "sft", "opd", "export", "eval", "report")
TARGET_FEATURES = ("online", "cache")  # SFT: the target runs in every step, or once to disk (feature_cache.py)
OPD_PREFIXES = ("random", "prompt")
EVAL_RUN_FIELDS = ("name", "drafter", "prompt_set", "drafter_path")  # besides the eval block's defaults
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
FREE_FORM = ("drafter.overrides", "sft.loss", "branches")  # blocks whose keys belong to the drafter kind

CD = ml_collections.ConfigDict


def _optimizer() -> CD:
    """AdamW + warm-up + cosine (`opd.training.optim.OptimConfig`; total_steps = the stage's steps)."""
    return CD({k: v for k, v in dataclasses.asdict(OptimConfig()).items() if k != "total_steps"})


def _mesh() -> CD:
    return CD(dict(data=-1, fsdp=1, tensor=1))  # devices per axis; data = -1: all remaining devices


def _probe() -> CD:
    """Speculative decoding of a fixed held-out prompt set during training (`probe_tau`)."""
    p = CD()
    p.prompt_set = "alpacaeval"  # the last `num_prompts` of this set (AlpacaEval: its held-out split)
    p.num_prompts = 0  # 0 = no probe
    p.max_new_tokens = 48  # per probe prompt
    p.every = 20  # steps between probes (and at step 0)
    p.batch_size = 8  # prompts per decoding call
    p.temperature = 0.0  # 0 = greedy
    p.num_draft_tokens = 0  # K; 0 = config.opd.num_draft_tokens (SFT and Draft-OPD probes share one curve)
    return p


def default_config() -> CD:
    """Every field of a launch config with its default (module docstring)."""
    c = CD()
    c.seed = 0  # data order, drafter initialisation and sampling
    c.stages = ()  # stages to run, in order: `<stage>[@<branch>][:<run>]` (STAGES; "export:<run>" exports
    # that run; "sft@<branch>" runs the stage with config.branches.<branch> merged on top)
    c.branches = CD()  # named partial configs, e.g. branches.sft_cont = {"sft": {"name": "sft_cont"}, ...}:
    # a second run of a stage in the same launch (continued SFT next to Draft-OPD)
    c.assets = ()  # offline assets to fetch (`opd.data.assets`), e.g. ("smollm2_gguf", "mtbench")
    c.distributed = False  # jax.distributed.initialize() before anything else (multi-host slices)
    c.local_workdir = ""  # URL workdirs: the local copy ("" = ~/.cache/opd/workdirs/<url>)
    c.num_devices = 0  # the device count this launch is for (0 = any; checked at launch)
    c.slice = ""  # informational: the TPU slice the launch is sized for
    c.hbm_gib = 0.0  # AOT check: HBM per device the plans are compared with
    c.tpu_topology = ""  # AOT check --tpu: the slice's TPU topology (e.g. "v5p:2x2x1"), compiled by libtpu
    c.resume_override = ()  # settings a resume may change though they alter the run, e.g. "sft.optimizer.learning_rate"

    c.target = CD()  # the frozen target model
    c.target.path = ""  # HF dir (config.json + *.safetensors), a .gguf file, asset:<name> or a URL
    c.target.dtype = "float32"  # activations: float32 | bfloat16
    c.target.param_dtype = "float32"  # weights: float32 | bfloat16
    c.target.scan_layers = False  # nn.scan over layers (faster compiles of deep targets)
    c.target.remat = False  # rematerialise target layers in backward passes
    c.target.preset = ""  # the architecture the checkpoint must have (`opd.models.presets`; "" = any)

    c.chat = CD()  # stage `chat`: the target answers a few prompts
    c.chat.prompts = ()  # user messages; empty = the first turns of `prompt_set`
    c.chat.prompt_set = "mtbench"  # mtbench | humaneval | alpacaeval | path/to.jsonl
    c.chat.num_prompts = 2  # first turns of the set
    c.chat.batch_size = 2  # prompts per decoding call
    c.chat.max_new_tokens = 64  # per answer
    c.chat.temperature = 0.0  # 0 = greedy

    c.regenerate = CD()  # stage `regenerate`: the SFT data, the target's own answers
    c.regenerate.sources = ("alpacaeval",)  # training prompts (REGENERATE_SOURCES or .jsonl files)
    c.regenerate.num_prompts = 64  # per source
    c.regenerate.max_new_tokens = 128  # per answer
    c.regenerate.temperature = 0.0  # 0 = the target's greedy answers
    c.regenerate.batch_size = 8  # prompts per decoding call
    c.regenerate.shard_size = 16  # records per trajectory shard (the unit of resume)
    c.regenerate.drafter = "none"  # "none" (autoregressive) or "ngram" (speculative, same output)
    c.regenerate.num_draft_tokens = 4  # K of the n-gram drafter

    c.text_corpus = CD()  # stage `text_corpus`: SFT data from offline text, tokenised only (`opd.data.text_corpus`)
    c.text_corpus.sources = ("stdlib_code", "pydocs")  # TEXT_CORPUS_SOURCES; each to DIR/text_corpus/<source>/
    c.text_corpus.num_records = 1_000_000  # per source, the first N in deterministic order (large = all)
    c.text_corpus.max_tokens = 256  # per response (the text + its end-of-turn token, truncated)
    c.text_corpus.shard_size = 512  # records per trajectory shard (the unit of resume)

    c.drafter = CD()  # the drafter the training stages build or load
    c.drafter.kind = "eagle3"  # a trainable kind of the registry (eagle3, dflash, ...)
    c.drafter.init = ""  # "" = a fresh drafter; else an HF-layout drafter to fine-tune (its vocabulary kept)
    c.drafter.overrides = CD()  # the kind's hyper-parameters for a fresh drafter (e.g. draft_vocab_size)
    c.drafter.vocab_data = ()  # trajectory folders whose answer tokens choose a fresh drafter's draft vocabulary
    # (its `uses_token_counts`, e.g. EAGLE-3); () = the SFT data with its repeats. One vocabulary for
    # runs on different data: a data-source comparison isolates the data, not the vocabulary
    c.drafter.param_dtype = ""  # trained weights and AdamW moments ("" = as initialised / loaded)
    c.drafter.public = ""  # informational: the public checkpoint `drafter.init` was downloaded from

    c.sft = CD()  # stage `sft`: supervised fine-tuning on trajectories
    c.sft.name = "sft"  # DIR/<name>/<kind>/ (other branches, e.g. continued SFT, get their own)
    c.sft.data = ()  # trajectory folders; () = every DIR/regenerate/<source>/
    c.sft.data_repeats = ()  # times each `data` folder is read per epoch, e.g. (4, 1): upweights a small
    # on-policy source in the mix and in a fresh EAGLE-3 draft vocabulary's token counts; () = once each
    c.sft.target_features = "online"  # TARGET_FEATURES
    c.sft.feature_cache_dtype = "float16"  # "cache": float16 | float32 on disk
    c.sft.feature_cache_dir = ""  # "cache": reuse this cache ("" = DIR/<name>/<kind>/features)
    c.sft.seq_len = 320  # tokens per row (prompt + answer, padded / truncated)
    c.sft.packing = False  # several sequences per row, each attending only within itself (target and drafter)
    c.sft.batch_size = 8  # rows per step (all processes)
    c.sft.num_steps = 200  # optimizer steps
    c.sft.match_flops = ""  # train to the cumulative FLOPs this run dir (or metrics JSONL) ended at (overrides num_steps)
    c.sft.skip_batches = 0  # a new run first skips this many batches of its data order: a leg continued from
    # an exported drafter (`drafter.init`, same seed and data) whose checkpoints are gone reads on where it stopped
    c.sft.log_every = 10  # steps between metrics rows (means over them)
    c.sft.save_every = 50  # steps between checkpoints (also at the end and on SIGTERM)
    c.sft.keep_checkpoints = 2  # newest checkpoints kept
    c.sft.tensorboard = True  # also TensorBoard events next to metrics.jsonl
    c.sft.optimizer = _optimizer()  # AdamW + warm-up + cosine (`opd.training.optim.OptimConfig`)
    c.sft.loss = CD()  # the drafter kind's SFT loss options (e.g. eagle3: ttt_steps, step_decay)
    c.sft.mesh = _mesh()  # the ("data", "fsdp", "tensor") mesh of the step
    c.sft.probe = _probe()  # held-out tau during training (off: num_prompts = 0)

    o = OPDConfig()
    c.opd = CD()  # stage `opd`: Draft-OPD from a warm-up drafter
    c.opd.name = "opd"  # DIR/<name>/<kind>/ (ablations get their own)
    c.opd.init = ""  # the drafter Draft-OPD starts from (an HF-layout dir, e.g. workdir:export/sft_eagle3)
    c.opd.data = ()  # trajectory folders whose prompts are rolled out; () = every DIR/regenerate/<source>/
    c.opd.prefix = "random"  # OPD_PREFIXES: prompt + a random-length prefix of the answer, or the bare prompt
    c.opd.prompt_len = 256  # P: longer rows are skipped
    c.opd.batch_size = 8  # prompts per micro-batch (all processes); a step takes batch_size x accumulate
    c.opd.num_steps = 60  # optimizer steps
    c.opd.num_rounds = o.num_rounds  # R verify rounds per prompt and step
    c.opd.num_draft_tokens = o.num_draft_tokens  # K drafts per round
    c.opd.rollout_temperature = o.rollout_temperature  # > 0: drafts sampled from q, rejection sampling
    c.opd.loss = CD(dataclasses.asdict(OPDLossConfig()))  # `opd.training.opd_loss.OPDLossConfig`
    # the loss starts from this reference preset when set; c.opd.loss fields changed from their defaults override it
    c.opd.loss_preset = ""  # `opd_loss.PRESETS`: "reference_yaml", "reference_script"; "" = none
    c.opd.vocab_chunk = o.vocab_chunk  # replay log q over this many support columns at a time (0: full logits)
    c.opd.accumulate = o.accumulate  # A micro-batches of batch_size prompts per optimizer update (one jitted step)
    c.opd.optimizer = _optimizer()  # AdamW + warm-up + cosine (`opd.training.optim.OptimConfig`)
    c.opd.log_every = 5  # steps between metrics rows
    c.opd.save_every = 20  # steps between checkpoints (also at the end and on SIGTERM)
    c.opd.keep_checkpoints = 2  # newest checkpoints kept
    c.opd.tensorboard = True  # also TensorBoard events next to metrics.jsonl
    c.opd.save_rollouts = False  # keep every step's committed text (the "SFT on rollouts" baseline's data)
    c.opd.probe = _probe()  # held-out tau during training (off: num_prompts = 0)
    c.opd.mesh = _mesh()  # the ("data", "fsdp", "tensor") mesh of the step

    c.export = CD()  # stage `export`: a run's latest checkpoint in its HF layout
    c.export.source = "sft"  # the run `export` writes (DIR/export/<source>_<kind>/)

    c.eval = CD()  # stage `eval`: speculative vs autoregressive; every field but `runs` is a run default
    c.eval.num_prompts = 8  # the first N prompts of the set
    c.eval.batch_size = 1  # prompts per decoding call (both methods)
    c.eval.max_new_tokens = 128  # per answer
    c.eval.num_draft_tokens = 4  # K
    c.eval.temperature = 0.0  # 0 = greedy (then outputs are checked identical to autoregressive)
    c.eval.repeats = 1  # timed repetitions per batch (median)
    c.eval.both_turns = False  # MT-Bench: also the second turns
    c.eval.side_by_side = False  # runs that differ only in their drafter decode together, against one
    # shared autoregressive timing (one AR pass instead of one per drafter); not a run default
    c.eval.runs = []  # dicts: name, drafter ("none" or a kind), prompt_set, [drafter_path], [overrides]

    c.report = CD()  # stage `report`: tables and curves from the eval runs
    c.report.curve_runs = ()  # DIR/<run>/<kind>/metrics.jsonl with probe_tau rows, for curves.png
    c.report.curve_drafters = ()  # drafter kinds whose runs are plotted
    c.report.results_name = ""  # also write experiments/results/<name>/ ("" = only DIR/report/)
    c.report.results_root = ""  # the folder that <results_name>/ goes in ("" = this checkout's experiments/results)
    c.report.partial = False  # report the eval runs written so far and name the others (a table still decoding)
    return c


# ----------------------------------------------------------------------------- loading


def load_module(path: str):
    """The module of a Python file that is not in a package (a config file, a benchmark script)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Python file at {path!r}")
    mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a config file, from "path/to/file.py[:variant]" (the launcher's
    --config syntax), e.g. `load_config("experiments/quickstart.py:tiny")` in a notebook."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path!r}")
    return load_module(path).get_config(variant)


def sibling_config(here: str, name: str, variant: str = "") -> ml_collections.ConfigDict:
    """`get_config(variant)` of the config file `name` in the folder of `here` (a config file's
    `__file__`), so that one experiment can build on another."""
    return load_config(os.path.join(os.path.dirname(os.path.abspath(here)), name) + ":" + variant)


def set_path(config, path: str, value) -> None:
    """`config.<path> = value` for a dotted path ("sft.loss.num_anchors") in a ConfigDict or a
    nested dict, as the launcher's `--config.<path>=value` does."""
    *parents, leaf = path.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


def check_overrides(argv) -> None:
    """ValueError, one line, for the first launcher override `--config.<path>=value` whose path
    the config file lacks, naming it and the nearest known key (ml_collections would stop with a
    long traceback from inside flag parsing). Without overrides, or when the config file itself
    does not load (the launcher then reports that), nothing is checked."""
    from absl import flags
    from ml_collections.config_flags import config_path

    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    overrides = [a.split("=", 1)[0].split(".", 1)[1] for a in argv if re.match(r"-{1,2}(no)?config\.", a)]
    spec = next((a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
                 for i, a in enumerate(argv) if re.match(r"-{1,2}config(=|$)", a)), "")
    if not overrides or not spec:
        return
    try:
        config = load_config(spec)
    except Exception:  # noqa: BLE001 - the launcher's own parsing reports it, with its traceback
        return
    for override in overrides:
        try:
            parts = config_path.split(override)
        except (SyntaxError, ValueError):
            raise ValueError(f"--config.{override}: not a config path (use dotted names, e.g. --config.sft.num_steps=3)") from None
        node, where = config, "config"
        for part in parts:
            if isinstance(part, int) and isinstance(node, (list, tuple)) and -len(node) <= part < len(node):
                node, where = node[part], f"{where}[{part}]"
                continue
            if not isinstance(part, str) or not isinstance(node, (dict, ml_collections.ConfigDict)):
                break  # an index or a leaf value: ml_collections checks the rest
            if part not in node:
                keys = [str(k) for k in node.keys()]
                near = difflib.get_close_matches(part, keys, n=1)
                hint = (f"did you mean {where}.{near[0]}?" if near
                        else f"{where} has: {', '.join(keys) if keys else 'no keys'}")
                free = " (a free-form block: new keys go in the config file)" if where[7:] in FREE_FORM else ""
                raise ValueError(f"unknown config key {where}.{part} in --config.{override}{free}; {hint}")
            node, where = node[part], f"{where}.{part}"


def variant_parts(variant: str, allowed, where: str) -> list:
    """The comma-separated parts of a config variant, each one of `allowed`."""
    parts = [p for p in str(variant).split(",") if p]
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise ValueError(f"bad variant {variant!r} of {where}: unknown variant {unknown[0]!r} (known, comma-separated: "
                         f"{', '.join(allowed) or 'none'})")
    return parts


# ----------------------------------------------------------------------------- validation


def _positive(block, fields, where: str, minimum: int = 1) -> None:
    for f in fields:
        if int(block[f]) < minimum:
            raise ValueError(f"config.{where}.{f} must be >= {minimum}, got {block[f]}")


def _check_name(value, where: str) -> None:
    if not _NAME.fullmatch(str(value)) or not str(value).strip("."):
        raise ValueError(f"config.{where} must be a plain directory name (letters, digits, '_', '.', '-'), "
                         f"got {value!r}")


def _check_mesh(m, where: str) -> None:
    sizes = [int(m.data), int(m.fsdp), int(m.tensor)]
    if sizes[1] < 1 or sizes[2] < 1 or (sizes[0] < 1 and sizes[0] != -1):
        raise ValueError(f"config.{where}.mesh: data must be -1 (all remaining devices) or >= 1, fsdp and tensor "
                         f">= 1; got {sizes}")


def _check_probe(p, where: str) -> None:
    if int(p.num_prompts) < 0:
        raise ValueError(f"config.{where}.probe.num_prompts must be >= 0, got {p.num_prompts}")
    _positive(p, ("max_new_tokens", "every", "batch_size"), f"{where}.probe")
    _positive(p, ("num_draft_tokens",), f"{where}.probe", minimum=0)
    if not float(p.temperature) >= 0:
        raise ValueError(f"config.{where}.probe.temperature must be >= 0, got {p.temperature}")


def optim_config(block, num_steps: int) -> OptimConfig:
    """The stage's `OptimConfig` (`config.<stage>.optimizer`, total_steps = its steps)."""
    return OptimConfig.from_config({"total_steps": int(num_steps), **dict(block.optimizer)})


def opd_loss_config(o) -> OPDLossConfig:
    """`OPDLossConfig` of `config.opd.loss`, on the preset `config.opd.loss_preset` when one is named."""
    fields = dict(o.loss)
    name = str(o.get("loss_preset", "") or "")
    if not name:
        return OPDLossConfig(**fields)
    default = dataclasses.asdict(OPDLossConfig())
    return opd_loss.preset(name, **{k: v for k, v in fields.items() if k not in default or v != default[k]})


def opd_config(o) -> OPDConfig:
    """`OPDConfig` of `config.opd`."""
    return OPDConfig(num_rounds=int(o.num_rounds), num_draft_tokens=int(o.num_draft_tokens),
                     rollout_temperature=float(o.rollout_temperature), loss=opd_loss_config(o),
                     vocab_chunk=o.vocab_chunk, accumulate=o.accumulate)


def _check_drafter(config) -> None:
    d = config.drafter
    kinds = registry.names(trainable=True)
    if d.kind not in kinds:
        raise ValueError(f"config.drafter.kind must be a trainable drafter kind {kinds}, got {d.kind!r}")
    if d.param_dtype not in ("", "float32", "bfloat16"):
        raise ValueError(f"config.drafter.param_dtype must be '', 'float32' or 'bfloat16', got {d.param_dtype!r}")


def _check_sft(config) -> None:
    s = config.sft
    if config.drafter.init and not path_exists(config.drafter.init):
        raise ValueError(f"config.drafter.init: no drafter directory at {config.drafter.init!r}")
    _positive(s, ("seq_len", "batch_size", "num_steps", "log_every", "save_every", "keep_checkpoints"), "sft")
    _positive(s, ("skip_batches",), "sft", minimum=0)
    _check_name(s.name, "sft.name")
    if s.target_features not in TARGET_FEATURES:
        raise ValueError(f"config.sft.target_features must be one of {TARGET_FEATURES}, got {s.target_features!r}")
    if config.drafter.vocab_data and config.drafter.init:
        raise ValueError("config.drafter.vocab_data chooses a fresh drafter's vocabulary, but config.drafter.init "
                         f"loads {config.drafter.init!r} (its vocabulary is kept): set one of them")
    if s.data_repeats:
        if len(s.data_repeats) != len(s.data):
            raise ValueError(f"config.sft.data_repeats needs one count per config.sft.data folder "
                             f"({len(s.data)}), got {tuple(s.data_repeats)}")
        if not all(isinstance(r, int) and r >= 1 for r in s.data_repeats):
            raise ValueError(f"config.sft.data_repeats must be integers >= 1, got {tuple(s.data_repeats)}")
        if s.target_features == "cache":
            raise ValueError("config.sft.data_repeats needs config.sft.target_features = 'online' (a feature "
                             "cache stores each record once)")
    if s.feature_cache_dtype not in FEATURE_CACHE_DTYPES:
        raise ValueError(f"config.sft.feature_cache_dtype must be one of {FEATURE_CACHE_DTYPES}, "
                         f"got {s.feature_cache_dtype!r}")
    optim_config(s, s.num_steps)
    try:
        registry.get_kind(config.drafter.kind).loss_config(s.loss)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.sft.loss: {e}") from None
    _check_mesh(s.mesh, "sft")
    _check_probe(s.probe, "sft")


def _check_opd(config) -> None:
    o = config.opd
    if not o.init:
        raise ValueError("config.opd.init must name the drafter Draft-OPD starts from: an HF-layout drafter "
                         "directory (the pod configs take it from config.drafter.init) or an SFT warm-up "
                         "('workdir:export/sft_eagle3')")
    _check_name(o.name, "opd.name")
    if o.prefix not in OPD_PREFIXES:
        raise ValueError(f"config.opd.prefix must be one of {OPD_PREFIXES}, got {o.prefix!r}")
    _positive(o, ("prompt_len", "batch_size", "num_steps", "log_every", "save_every", "keep_checkpoints"), "opd")
    try:
        opd_config(o)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.opd: {e}") from None
    optim_config(o, o.num_steps)
    _check_probe(o.probe, "opd")
    _check_mesh(o.mesh, "opd")


def eval_runs(config: ml_collections.ConfigDict) -> list[dict]:
    """`config.eval.runs` with the block's defaults filled in; raises ValueError naming the bad field."""
    e = config.eval
    defaults = {k: v for k, v in e.items() if k not in ("runs", "side_by_side")}
    if not e.runs:
        raise ValueError("config.eval.runs is empty: list at least one run (name, drafter, prompt_set)")
    kinds = ("none",) + registry.names()
    runs, names = [], set()
    for i, run in enumerate(e.runs):
        where = f"config.eval.runs[{i}]"
        if not isinstance(run, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"{where} must be a dict, got {type(run).__name__}")
        run = dict(run)
        missing = [k for k in ("name", "drafter", "prompt_set") if k not in run]
        unknown = sorted(set(run) - set(EVAL_RUN_FIELDS) - set(defaults))
        if missing or unknown:
            raise ValueError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown}; "
                             f"allowed: {sorted(set(EVAL_RUN_FIELDS) | set(defaults))}")
        r = {**defaults, **run}
        where = f"{where} ({r['name']!r})"
        if not _NAME.fullmatch(str(r["name"])) or r["name"] in names:
            raise ValueError(f"{where}: name must be unique and use only letters, digits, '_', '.', '-'")
        names.add(r["name"])
        if r["drafter"] not in kinds:
            raise ValueError(f"{where}: drafter must be one of {kinds}, got {r['drafter']!r}")
        if r["drafter"] != "none" and registry.get_kind(r["drafter"]).trainable and not r.get("drafter_path"):
            raise ValueError(f"{where}: a {r['drafter']} drafter needs drafter_path (e.g. 'workdir:export/drafter')")
        if str(r.get("drafter_path", "")).startswith("shipped:") and not path_exists(r["drafter_path"]):
            resolve_path(r["drafter_path"])  # raises, naming the shipped drafters there are
        ps = str(r["prompt_set"])
        if ps not in PROMPT_SETS and not (ps.endswith((".jsonl", ".jsonl.gz")) and os.path.isfile(os.path.expanduser(ps))):
            raise ValueError(f"{where}: prompt_set must be one of {list(PROMPT_SETS)} or an existing .jsonl file, got {ps!r}")
        for field in ("num_prompts", "batch_size", "max_new_tokens", "num_draft_tokens", "repeats"):
            if int(r[field]) < 1:
                raise ValueError(f"{where}: {field} must be >= 1, got {r[field]}")
        if not r["temperature"] >= 0:
            raise ValueError(f"{where}: temperature must be >= 0, got {r['temperature']}")
        runs.append(r)
    return runs


def check_fields(config, schema=None, where: str = "") -> None:
    """ValueError naming a field of `config` that the schema (`default_config()`) lacks (with
    the nearest known name) or a schema block / field the config lacks."""
    schema = default_config() if schema is None else schema
    for key in config.keys():
        if key not in schema:
            near = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f"; did you mean config.{where}{near[0]}?" if near else ""
            raise ValueError(f"unknown config field config.{where}{key}{hint} (the schema: opd.configs.default_config)")
    for key, value in schema.items():
        if key not in config:
            kind = "block" if isinstance(value, ml_collections.ConfigDict) else "field"
            raise ValueError(f"the config has no `{where}{key}` {kind} (start from opd.configs.default_config())")
        if isinstance(value, ml_collections.ConfigDict) and f"{where}{key}" not in FREE_FORM:
            check_fields(config[key], value, f"{where}{key}.")


def stage_parts(name: str) -> tuple[str, str, str]:
    """(stage, branch, run) of a stage name `<stage>[@<branch>][:<run>]`, e.g. "export:opd" ->
    ("export", "", "opd"), "sft@sft_cont" -> ("sft", "sft_cont", "")."""
    head, _, run = str(name).partition(":")
    stage, _, branch = head.partition("@")
    return stage, branch, run


def branch_config(config: ml_collections.ConfigDict, branch: str) -> ml_collections.ConfigDict:
    """`config` with `config.branches[branch]` (a partial config tree) merged on top: the config
    the stages named `<stage>@<branch>` run with. ValueError naming an unknown branch or field."""
    if branch not in config.branches:
        raise ValueError(f"config.stages: no config.branches.{branch} for the stages `...@{branch}` "
                         f"(branches: {list(config.branches) or 'none'})")
    c = copy.deepcopy(config)

    def merge(dst, src, where):
        for key, value in src.items():
            if key not in dst and where.rstrip(".") not in FREE_FORM:
                near = difflib.get_close_matches(key, list(dst.keys()), n=1)
                hint = f"; did you mean {where}{near[0]}?" if near else ""
                raise ValueError(f"config.branches.{branch}: unknown config field {where}{key}{hint}")
            if key in dst and isinstance(dst[key], ml_collections.ConfigDict) and hasattr(value, "items"):
                merge(dst[key], value, f"{where}{key}.")
            else:
                dst[key] = value

    with c.unlocked():
        merge(c, config.branches[branch], "")
    return c


def _stage_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The config of the plain stages, then one per branch named in config.stages, each holding
    only its own stages (without the `@<branch>`)."""
    plain = copy.deepcopy(config)
    with plain.unlocked():
        plain.stages = tuple(s for s in config.stages if not stage_parts(s)[1])
    out = [plain]
    for branch in dict.fromkeys(stage_parts(s)[1] for s in config.stages if stage_parts(s)[1]):
        c = branch_config(config, branch)
        with c.unlocked():
            c.stages = tuple(s.replace(f"@{branch}", "", 1) for s in config.stages if stage_parts(s)[1] == branch)
        out.append(c)
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field and value the config's stages read, before any work starts; raises
    ValueError naming the field."""
    check_fields(config)
    unknown = [s for s in config.stages if stage_parts(s)[0] not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in config.stages; available: {list(STAGES)}")
    if any(stage_parts(s)[1] for s in config.stages):  # each branch's stages under its own config
        for c in _stage_configs(config):
            validate(c)
        return
    stages = {stage_parts(s)[0] for s in config.stages}
    t = config.target
    for field in ("dtype", "param_dtype"):
        if t[field] not in ("float32", "bfloat16"):
            raise ValueError(f"config.target.{field} must be float32 or bfloat16, got {t[field]!r}")
    if t.preset and t.preset not in PRESETS:
        raise ValueError(f"config.target.preset {t.preset!r} is unknown; known: {sorted(PRESETS)}")
    if "chat" in stages:
        _positive(config.chat, ("num_prompts", "batch_size", "max_new_tokens"), "chat")
        if not config.chat.temperature >= 0:
            raise ValueError(f"config.chat.temperature must be >= 0, got {config.chat.temperature}")
    if "regenerate" in stages:
        g = config.regenerate
        for source in g.sources:
            if source not in REGENERATE_SOURCES and not str(source).endswith(".jsonl"):
                raise ValueError(f"config.regenerate.sources: unknown source {source!r}; use "
                                 f"{REGENERATE_SOURCES} or a .jsonl file")
        _positive(g, ("num_prompts", "max_new_tokens", "batch_size", "shard_size", "num_draft_tokens"), "regenerate")
        if g.drafter not in ("none", "ngram"):
            raise ValueError(f"config.regenerate.drafter must be 'none' or 'ngram', got {g.drafter!r}")
        if not g.temperature >= 0:
            raise ValueError(f"config.regenerate.temperature must be >= 0, got {g.temperature}")
    if "text_corpus" in stages:
        t = config.text_corpus
        unknown = [s for s in t.sources if s not in TEXT_CORPUS_SOURCES]
        if unknown or isinstance(t.sources, str):
            raise ValueError(f"config.text_corpus.sources must be a list of {TEXT_CORPUS_SOURCES}, got {t.sources!r}")
        _positive(t, ("num_records", "shard_size"), "text_corpus")
        _positive(t, ("max_tokens",), "text_corpus", minimum=2)
    if stages & {"sft", "opd", "export"}:
        _check_drafter(config)
    if "sft" in stages:
        _check_sft(config)
    if "opd" in stages:
        _check_opd(config)
    if stages & {"eval", "report"}:
        eval_runs(config)
    if "report" in stages:
        rc = config.report
        for field in ("curve_runs", "curve_drafters"):
            if isinstance(rc[field], str):
                raise ValueError(f"config.report.{field} must be a list of names, got the string {rc[field]!r}")
        if rc.results_name:
            _check_name(rc.results_name, "report.results_name")
        if rc.results_root and not os.path.isdir(rc.results_root):
            raise ValueError(f"config.report.results_root {rc.results_root!r} is not a folder")


def probe_num_draft_tokens(config, block) -> int:
    """K of a stage's probe (`config.<block>.probe.num_draft_tokens`, 0 = the Draft-OPD K)."""
    return int(config[block].probe.num_draft_tokens) or int(config.opd.num_draft_tokens)


def stage_mesh(block, what: str, devices=None):
    """The mesh of a training stage from `config.<what>.mesh` and `.batch_size` (`run.make_mesh`)
    over `devices` (default: the devices present)."""
    m = block.mesh
    return make_mesh(int(m.data), int(m.fsdp), int(m.tensor), int(block.batch_size), what, devices)


def validate_launch(config: ml_collections.ConfigDict) -> None:
    """Checks what a launch needs from outside the config: the target checkpoint path, the
    device count, the meshes and batch sizes against the devices present, and K against the
    drafter's limit (e.g. a DFlash block size). Raises ValueError naming the field."""
    if any(stage_parts(s)[1] for s in config.stages):
        for c in _stage_configs(config):
            validate_launch(c)
        return
    stages = {stage_parts(s)[0] for s in config.stages}
    path = str(config.target.path)
    if not path:
        raise ValueError("config.target.path is empty: set it to the target's HF checkpoint directory "
                         "(config.json + *.safetensors) or a .gguf file")
    if not path_exists(path):
        raise ValueError(f"config.target.path: no checkpoint at {path!r}")
    if config.num_devices and int(config.num_devices) != jax.device_count():
        raise ValueError(f"config.num_devices = {config.num_devices} (slice {config.slice or '?'}) but "
                         f"{jax.device_count()} devices are present: pick the variant of this slice")
    if "opd" in stages and not path_exists(str(config.opd.init)):
        raise ValueError(f"config.opd.init: no drafter directory at {config.opd.init!r} (the drafter Draft-OPD starts from)")
    if jax.process_count() > 1 and "sft" in stages and config.sft.target_features == "cache":
        raise ValueError("config.sft.target_features = 'cache' runs in single-process launches only (the cache "
                         "is one host's file); use 'online' on a multi-host slice")
    for name in ("sft", "opd"):
        if name in stages:
            stage_mesh(config[name], name)
    if not stages & {"sft", "opd", "eval"}:
        return
    kind = registry.get_kind(config.drafter.kind)
    init = str(config.drafter.init)
    if init.startswith(("asset:", "workdir:")) or "://" in init:
        return  # checked once loaded (the drafter's spec refuses a K above its limit)
    try:  # from a checkpoint's config.json, or a fresh drafter's overrides
        most, why = kind.draft_limit(dict(config.drafter.overrides), os.path.expanduser(init) if init else "")
    except (ValueError, OSError):
        return  # the loader names the problem
    if most is None:
        return
    ks = {}
    if "opd" in stages:
        ks["config.opd.num_draft_tokens"] = int(config.opd.num_draft_tokens)
    if "eval" in stages:
        ks.update({f"config.eval.runs ({r['name']}).num_draft_tokens": int(r["num_draft_tokens"])
                   for r in eval_runs(config) if r["drafter"] == kind.name})
    bad = {k: v for k, v in ks.items() if not 1 <= v <= most}
    if bad:
        raise ValueError(f"{', '.join(f'{k} = {v}' for k, v in bad.items())}: a {kind.name} drafter with {why} "
                         f"drafts at most {most} tokens per round")
