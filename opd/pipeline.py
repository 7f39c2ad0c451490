"""Launcher stages. `run(config, workdir)` executes `config.stages` in order.

Every stage writes only under `workdir/<stage>/` and skips work whose outputs are already
there, so an interrupted launch resumes by running the same command again.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable

from absl import logging
import ml_collections


def resolve_path(spec: str) -> str:
    """`asset:<name>` -> the cached offline asset (fetched if needed); anything else is a path."""
    if spec.startswith("asset:"):
        from opd.data.assets import asset_path

        return asset_path(spec[len("asset:"):])
    from opd import remote

    if remote.is_url(spec):  # gs://...: a local copy, downloaded once
        return remote.fetch(spec)
    return os.path.expanduser(spec)


def path_exists(spec: str) -> bool:
    """Whether a config path (local, `asset:` or a URL) names something that exists."""
    from opd import remote

    if spec.startswith(("asset:", "workdir:")):
        return True  # fetched / written by an earlier stage
    return remote.exists(spec) if remote.is_url(spec) else os.path.exists(os.path.expanduser(spec))


def load_target_from_config(config: ml_collections.ConfigDict):
    """The config's target, loaded once per process (stages of one launch share it).

    `target.param_dtype` (default float32) and `target.remat` are optional; with `target.preset`
    set, the checkpoint's architecture must be that preset's (`opd.models.presets`)."""
    t = config.target
    target = _load_target_cached(resolve_path(t.path), t.dtype, t.scan_layers, t.get("param_dtype", "float32"),
                                 bool(t.get("remat", False)))
    if t.get("preset"):
        from opd.models.presets import check_against

        check_against(t.preset, target.config)
    return target


@functools.lru_cache(maxsize=1)
def _load_target_cached(path: str, dtype: str, scan_layers: bool, param_dtype: str, remat: bool):
    from opd.target import load_target

    return load_target(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)


def stage_fetch_assets(config, workdir: str) -> dict:
    """Fetches (or finds cached) every asset the config names; writes their paths."""
    from opd.data.assets import asset_path

    from opd.sharding import is_main_process

    paths = {name: asset_path(name) for name in config.assets}  # each host fills its own asset cache
    if is_main_process():
        write_json(os.path.join(workdir, "fetch_assets", "paths.json"), paths)
    for name, p in paths.items():
        logging.info("asset %s: %s (%.1f MB)", name, p, os.path.getsize(p) / 1e6)
    return paths


def stage_chat(config, workdir: str) -> list:
    """Answers `config.chat.prompts` (strings) or the first turns of a prompt set with the target."""
    from opd.data.assets import load_prompt_set
    from opd.decoding.generate import generate

    from opd.sharding import is_main_process

    if not is_main_process():  # multi-host: process 0 chats on its own devices
        return []
    c = config.chat
    out_path = os.path.join(workdir, "chat", "responses.jsonl")
    prompts = list(c.prompts) if c.prompts else [r["turns"][0] for r in load_prompt_set(c.prompt_set)[: c.num_prompts]]
    done = _read_jsonl(out_path)
    if len(done) >= len(prompts):
        logging.info("chat: %d responses already in %s", len(done), out_path)
        _print_chat(done)
        return done
    target = load_target_from_config(config)
    records = list(done)
    for start in range(len(done), len(prompts), c.batch_size):
        batch = prompts[start : start + c.batch_size]
        t0 = time.perf_counter()
        out = generate(target, batch, max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=config.seed + start)
        dt = time.perf_counter() - t0
        for p, toks in zip(batch, out.tokens):
            records.append({"prompt": p, "response": target.tokenizer.decode(toks), "num_tokens": len(toks)})
        _append_jsonl(out_path, records[-len(batch):])
        logging.info("chat: %d/%d prompts, %.1f tokens/s", len(records), len(prompts), out.stats["generated_tokens"] / dt)
    _print_chat(records)
    return records


EVAL_DRAFTERS = ("none", "ngram", "eagle3", "dflash")  # eagle3 / dflash are read from `drafter_path`
_EVAL_RUN_REQUIRED = ("name", "drafter", "prompt_set")
_EVAL_RUN_OPTIONAL = ("drafter_path",)  # HF-layout drafter: a path, asset:<name> or workdir:<rel>
_EVAL_INT_FIELDS = ("num_prompts", "batch_size", "max_new_tokens", "num_draft_tokens", "repeats")


def eval_runs(config: ml_collections.ConfigDict) -> list[dict]:
    """`config.eval.runs` with the block's defaults filled in; raises ValueError naming the bad field.

    Every key of `config.eval` other than `runs` is a default a run may override.
    """
    import re

    from opd.data.assets import PROMPT_SETS

    if "eval" not in config:
        raise ValueError("config.stages has 'eval' but the config has no `eval` block (see experiments/quickstart.py)")
    e = config.eval
    defaults = {k: v for k, v in e.items() if k != "runs"}
    runs, names = [], set()
    if not e.runs:
        raise ValueError("config.eval.runs is empty: list at least one run (name, drafter, prompt_set)")
    for i, run in enumerate(e.runs):
        where = f"config.eval.runs[{i}]"
        if not isinstance(run, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"{where} must be a dict, got {type(run).__name__}")
        run = dict(run)
        missing = [k for k in _EVAL_RUN_REQUIRED if k not in run]
        unknown = sorted(set(run) - set(_EVAL_RUN_REQUIRED) - set(_EVAL_RUN_OPTIONAL) - set(defaults))
        if missing or unknown:
            raise ValueError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown}; "
                             f"allowed: {sorted(set(_EVAL_RUN_REQUIRED) | set(defaults))}")
        r = {**defaults, **run}
        where = f"{where} ({r['name']!r})"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(r["name"])) or r["name"] in names:
            raise ValueError(f"{where}: name must be unique and use only letters, digits, '_', '.', '-'")
        names.add(r["name"])
        if r["drafter"] not in EVAL_DRAFTERS:
            raise ValueError(f"{where}: drafter must be one of {EVAL_DRAFTERS}, got {r['drafter']!r}")
        if r["drafter"] in ("eagle3", "dflash") and not r.get("drafter_path"):
            raise ValueError(f"{where}: a {r['drafter']} drafter needs drafter_path (e.g. 'workdir:export/drafter')")
        ps = str(r["prompt_set"])
        if ps not in PROMPT_SETS and not (ps.endswith((".jsonl", ".jsonl.gz")) and os.path.isfile(os.path.expanduser(ps))):
            raise ValueError(f"{where}: prompt_set must be one of {list(PROMPT_SETS)} or an existing .jsonl file, got {ps!r}")
        for field in _EVAL_INT_FIELDS:
            if field in r and int(r[field]) < 1:
                raise ValueError(f"{where}: {field} must be >= 1, got {r[field]}")
        if not r.get("temperature", 0.0) >= 0:
            raise ValueError(f"{where}: temperature must be >= 0, got {r['temperature']}")
        runs.append(r)
    return runs


def eval_drafter(run: dict, target, workdir: str):
    """The drafter of one eval run: None, a fresh n-gram drafter, or an HF-layout checkpoint."""
    from opd.drafters import init_drafter

    if run["drafter"] == "none":
        return None
    if run["drafter"] == "ngram":
        return init_drafter("ngram", target)
    from opd.checkpoints.drafters import load_drafter
    from opd.training.sft_stage import resolve

    drafter = load_drafter(resolve(str(run["drafter_path"]), workdir), target)
    if drafter.kind != run["drafter"]:
        raise ValueError(f"eval run {run['name']!r}: {run['drafter_path']} holds a {drafter.kind} drafter, "
                         f"not {run['drafter']}")
    return drafter


def drafter_training(run: dict, workdir: str) -> dict:
    """{"source", "flops"} of an exported trained drafter (its export.json), else untrained."""
    if not run.get("drafter_path"):
        return {"source": "none", "flops": 0}
    from opd.training.sft_stage import resolve

    meta = os.path.join(resolve(str(run["drafter_path"]), workdir), "export.json")
    if not os.path.isfile(meta):
        return {"source": "none", "flops": 0}
    with open(meta) as f:
        info = json.load(f)
    return {"source": f"{info['source']} ({info['step']} steps)", "flops": info.get("flops", 0)}


def stage_eval(config, workdir: str) -> list:
    """Speculative vs autoregressive decoding for each of `config.eval.runs` (opd.eval.evaluate);
    writes `eval/<run>/metrics.json` (+ metrics.md, plots) and skips runs already written.
    Multi-host: process i runs runs i, i + P, ... on its own devices, then all wait."""
    import jax

    from opd.eval.harness import SUMMARY_COLUMNS, evaluate, write_eval
    from opd.eval.report import markdown_table
    from opd.sharding import barrier, is_main_process

    runs = eval_runs(config)
    target = None
    for i, r in enumerate(runs):
        out_dir = os.path.join(workdir, "eval", r["name"])
        path = os.path.join(out_dir, "metrics.json")
        if i % jax.process_count() != jax.process_index():
            continue
        if os.path.exists(path):
            logging.info("eval: run %s already done (%s)", r["name"], path)
            continue
        if target is None:
            target = load_target_from_config(config)
        drafter = eval_drafter(r, target, workdir)
        training = drafter_training(r, workdir)
        m = evaluate(
            target, drafter, os.path.expanduser(str(r["prompt_set"])), num_prompts=r.get("num_prompts"),
            temperature=r.get("temperature", 0.0), num_draft_tokens=r.get("num_draft_tokens", 4),
            batch_size=r.get("batch_size", 1), max_new_tokens=r.get("max_new_tokens", 128), seed=config.seed,
            drafter_name=r["drafter"], training=training["source"], training_flops=training["flops"],
            both_turns=r.get("both_turns", False), repeats=r.get("repeats", 1),
        )
        write_eval(m, out_dir)
        logging.info("eval: %s: tau %s, speedup %s, greedy_matches_ar %s -> %s", r["name"], m["tau"], m["speedup"],
                     m["greedy_matches_ar"], out_dir)
    barrier("eval: all runs written")
    results = []
    for r in runs:
        with open(os.path.join(workdir, "eval", r["name"], "metrics.json")) as f:
            results.append({"run": r["name"], **json.load(f)})
    if is_main_process():
        print("\n" + markdown_table(results, ("run",) + SUMMARY_COLUMNS))
    return results


def stage_report(config, workdir: str) -> dict:
    """The experiment's summary from the finished eval runs and the training curves: writes
    DIR/report/results.json (a row per run: drafter, method, training_flops, tau, speedup,
    prompt_set, temperature, batch_size, seed, ...), results.md (τ / speed-up tables, one per
    temperature and batch size) and curves.png (probe τ against cumulative training FLOPs of
    `config.report.curve_runs`); with `config.report.results_name` also
    experiments/results/<name>/ (with the command, commit and machine). Prints the tables."""
    import shutil

    from opd.eval import report
    from opd.sharding import is_main_process

    if not is_main_process():  # reads files only; process 0 writes the report
        return {}
    rows = []
    for r in eval_runs(config):
        path = os.path.join(workdir, "eval", r["name"], "metrics.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"report: eval run {r['name']!r} has no {path}; run the `eval` stage first")
        with open(path) as f:
            rows.append(report.summary_row(r["name"], json.load(f)))
    rc = config.report
    rows = report.autoregressive_rows(rows) + rows
    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    curves = report.probe_curves(workdir, list(rc.curve_runs), list(rc.curve_drafters))
    curve_rows = report.plot_curves(curves, os.path.join(out_dir, "curves.png")) if curves else []
    md = report.main_tables(rows)
    if curve_rows:
        md += ("Training curve (held-out probe τ; `curves.png`):\n\n"
               + report.markdown_table(curve_rows, report.CURVE_COLUMNS, "{:.3f}"))
    payload = {"rows": rows, "curves": curves, "curve_rows": curve_rows}
    report.write_results("report", payload, md, out_dir)
    if rc.results_name:
        dest = report.write_results(rc.results_name, payload, md)
        if curves:
            shutil.copy(os.path.join(out_dir, "curves.png"), os.path.join(dest, "curves.png"))
        logging.info("report: also written to %s", dest)
    print("\n" + md)
    logging.info("report: %d rows -> %s", len(rows), out_dir)
    return payload


def stage_regenerate(config, workdir: str) -> dict:
    """The target answers training prompts (`config.regenerate.sources`); writes trajectory
    shards to `DIR/regenerate/<source>/`, resuming shard by shard; hosts split the shards."""
    import jax

    from opd.data import regenerate as regen
    from opd.drafters import init_drafter

    c = config.regenerate
    target, out = None, {}
    for source in c.sources:
        name = os.path.splitext(os.path.basename(source))[0] if source.endswith(".jsonl") else source
        records = regen.training_prompts(source, c.num_prompts)
        if target is None:
            target = load_target_from_config(config)
        drafter = None if c.drafter == "none" else init_drafter(c.drafter, target)
        out[source] = regen.regenerate(
            target, records, os.path.join(workdir, "regenerate", name),
            prompt_set="alpacaeval_train" if source == "alpacaeval" else name, target_name=config.target.path,
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, batch_size=c.batch_size,
            shard_size=c.shard_size, seed=config.seed, drafter=drafter, num_draft_tokens=c.num_draft_tokens,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        logging.info("regenerate: %s -> %d shards", source, len(out[source]))
    return out


def stage_sft(config, workdir: str):
    from opd.training.sft_stage import stage_sft as run_sft

    return run_sft(config, workdir)


def stage_export(config, workdir: str):
    from opd.training.sft_stage import stage_export as run_export

    return run_export(config, workdir)


def stage_opd(config, workdir: str):
    from opd.training.opd_stage import stage_opd as run_opd

    return run_opd(config, workdir)


STAGES: dict[str, Callable] = {
    "fetch_assets": stage_fetch_assets,
    "chat": stage_chat,
    "regenerate": stage_regenerate,
    "sft": stage_sft,
    "opd": stage_opd,
    "export": stage_export,
    "eval": stage_eval,
    "report": stage_report,
}


def _dflash_block_size(config) -> int | None:
    """The DFlash drafter's block size as far as the config tells before loading: the drafter to
    start from (`drafter.init`, an existing HF dir) or the fresh drafter's overrides."""
    d = config.get("drafter")
    if d is None or d.kind != "dflash":
        return None
    from opd.checkpoints.dflash_hf import declared_block_size
    from opd.checkpoints.errors import CheckpointError
    from opd.models.dflash import DFlashConfig

    init = str(d.get("init", ""))
    if init and not init.startswith(("asset:", "workdir:")):
        try:
            return declared_block_size(os.path.expanduser(init))
        except (CheckpointError, ValueError, TypeError):
            return None  # the loader names the problem
    if init:
        return None
    return (dict(d.overrides) if "overrides" in d else {}).get("block_size", DFlashConfig.block_size)


def validate_launch(config: ml_collections.ConfigDict) -> None:
    """Checks what a launch needs from outside the config: the target checkpoint path, the
    meshes against the devices present, batch sizes against the data-parallel width, and the
    DFlash block size against K. Raises ValueError naming the field."""
    import jax

    from opd.training.sft_stage import stage_mesh

    t = config.target
    path = str(t.path)
    if not path:
        raise ValueError("config.target.path is empty: set it to the target's HF checkpoint directory "
                         "(config.json + *.safetensors) or a .gguf file")
    if not path_exists(path):
        raise ValueError(f"config.target.path: no checkpoint at {path!r}")
    if t.get("preset"):
        from opd.models.presets import PRESETS

        if t.preset not in PRESETS:
            raise ValueError(f"config.target.preset {t.preset!r} is unknown; known: {sorted(PRESETS)}")
    if config.get("num_devices") and int(config.num_devices) != jax.device_count():
        raise ValueError(f"config.num_devices = {config.num_devices} (slice {config.get('slice', '?')}) but "
                         f"{jax.device_count()} devices are present: pick the variant of this slice")
    if "opd" in config.stages:
        init = str(config.opd.init)
        if init and not path_exists(init):
            raise ValueError(f"config.opd.init: no drafter directory at {init!r} (the drafter Draft-OPD starts from)")
    if jax.process_count() > 1 and "sft" in config.stages and config.sft.target_features == "cache":
        raise ValueError("config.sft.target_features = 'cache' runs in single-process launches only (the cache "
                         "is one host's file); use 'online' on a multi-host slice")
    for name in ("sft", "opd"):
        if name in config.stages:
            stage_mesh(config[name], name)
    block_size = _dflash_block_size(config)
    if block_size:
        ks = {}
        if "opd" in config.stages:
            ks["config.opd.num_draft"] = int(config.opd.num_draft)
        if "eval" in config.stages:
            ks.update({f"config.eval.runs ({r['name']}).num_draft_tokens": int(r["num_draft_tokens"])
                       for r in eval_runs(config) if r["drafter"] == "dflash" and "num_draft_tokens" in r})
        bad = {k: v for k, v in ks.items() if not 1 <= v <= block_size - 1}
        if bad:
            raise ValueError(f"{', '.join(f'{k} = {v}' for k, v in bad.items())}: a DFlash drafter with block_size "
                             f"{block_size} drafts at most {block_size - 1} tokens per round")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks config values before any work starts; raises ValueError naming the field."""
    unknown = [s for s in config.stages if s.split(":")[0] not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in config.stages; available: {sorted(STAGES)}")
    if config.target.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.target.dtype must be float32 or bfloat16, got {config.target.dtype!r}")
    if config.target.get("param_dtype", "float32") not in ("float32", "bfloat16"):
        raise ValueError(f"config.target.param_dtype must be float32 or bfloat16, got {config.target.param_dtype!r}")
    if "chat" in config.stages:
        c = config.chat
        for field in ("num_prompts", "batch_size", "max_new_tokens"):
            if int(c[field]) < 1:
                raise ValueError(f"config.chat.{field} must be >= 1, got {c[field]}")
        if not c.temperature >= 0:
            raise ValueError(f"config.chat.temperature must be >= 0, got {c.temperature}")
    if "eval" in config.stages or "report" in config.stages:
        eval_runs(config)
    if "report" in config.stages:
        import re

        if "report" not in config:
            raise ValueError("config.stages has 'report' but the config has no `report` block (see experiments/quickstart.py)")
        rc = config.report
        for field in ("curve_runs", "curve_drafters"):
            if isinstance(rc[field], str):
                raise ValueError(f"config.report.{field} must be a list of names, got the string {rc[field]!r}")
        if rc.results_name and not re.fullmatch(r"[A-Za-z0-9_.-]+", rc.results_name):
            raise ValueError(f"config.report.results_name must be a plain directory name, got {rc.results_name!r}")
    if "sft" in config.stages:
        from opd.training.sft_stage import validate as validate_sft

        validate_sft(config)
    if "opd" in config.stages:
        from opd.training.opd_stage import validate as validate_opd

        validate_opd(config)
    if "regenerate" in config.stages:
        from opd.data.regenerate import SOURCES

        if "regenerate" not in config:
            raise ValueError("config.stages has 'regenerate' but the config has no `regenerate` block")
        c = config.regenerate
        for source in c.sources:
            if source not in SOURCES and not str(source).endswith(".jsonl"):
                raise ValueError(f"config.regenerate.sources: unknown source {source!r}; use {SOURCES} or a .jsonl file")
        for field in ("num_prompts", "max_new_tokens", "batch_size", "shard_size", "num_draft_tokens"):
            if int(c[field]) < 1:
                raise ValueError(f"config.regenerate.{field} must be >= 1, got {c[field]}")
        if c.drafter not in ("none", "ngram"):
            raise ValueError(f"config.regenerate.drafter must be 'none' or 'ngram', got {c.drafter!r}")
        if not c.temperature >= 0:
            raise ValueError(f"config.regenerate.temperature must be >= 0, got {c.temperature}")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if config.get("distributed", False):
        _initialize_distributed()
    validate(config)
    validate_launch(config)
    from opd import remote
    from opd.sharding import barrier, is_main_process

    rw = None
    if remote.is_url(workdir):  # gs://...: the stages run in a local copy synced with the bucket
        rw = remote.attach(str(workdir), config.get("local_workdir", ""))
        workdir = rw.local
    try:
        os.makedirs(workdir, exist_ok=True)
        if is_main_process():
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        for name in config.stages:
            logging.info("=== stage %s ===", name)
            base, _, source = name.partition(":")
            if source:  # "export:<run>": export that run (config.export.source for this stage only)
                from opd.training.sft_stage import with_export_source

                STAGES[base](with_export_source(config, source), workdir)
            else:
                STAGES[name](config, workdir)
            barrier(f"stage {name} done")  # multi-host: the next stage reads what every process wrote
    finally:
        if rw is not None:
            try:
                rw.push()  # also after a failure or preemption: what was written so far
            finally:
                remote.detach()


def _initialize_distributed() -> None:
    """`jax.distributed.initialize()` once per process (multi-host slices; on Cloud TPU the
    coordinator, process count and id are found from the environment)."""
    import jax

    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _print_chat(records) -> None:
    for r in records:
        print(f"\n>>> {r['prompt']}\n{r['response']}")


def write_json(path: str, obj) -> None:
    """Writes `obj` to `path` atomically (tmp + rename): a reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _read_jsonl(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
