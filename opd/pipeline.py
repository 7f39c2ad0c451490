"""Launcher stages. `run(config, workdir)` executes `config.stages` in order.

Every stage writes only under `workdir/<stage>/` and skips work whose outputs are already
there, so an interrupted launch resumes by running the same command again.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from typing import Callable

from absl import logging
import jax
import ml_collections

from opd import console, remote
from opd.configs import branch_config, eval_runs, stage_parts, validate, validate_launch
from opd.data import regenerate as regen
from opd.data import text_corpus
from opd.data.assets import asset_path, load_prompt_set
from opd.data.tokenizer import load_tokenizer
from opd.decoding.generate import generate
from opd.drafters import registry
from opd.eval import report
from opd.eval.harness import SUMMARY_COLUMNS, Side, evaluate_side_by_side, write_eval
from opd.paths import append_jsonl, read_jsonl, resolve_path, write_json
from opd.sharding import barrier, is_main_process
from opd.target import load_target_from_config
from opd.training import stage_common
from opd.training.opd_stage import stage_opd
from opd.training.sft_stage import stage_sft
from opd.workdir_lock import workdir_lock


def stage_fetch_assets(config, workdir: str) -> dict:
    """Fetches (or finds cached) every asset the config names; writes their paths."""
    paths = {name: asset_path(name) for name in config.assets}  # each host fills its own asset cache
    if is_main_process():
        write_json(os.path.join(workdir, "fetch_assets", "paths.json"), paths)
    for name, p in paths.items():
        logging.info("asset %s: %s (%.1f MB)", name, p, os.path.getsize(p) / 1e6)
    return paths


def stage_chat(config, workdir: str) -> list:
    """Answers `config.chat.prompts` (strings) or the first turns of a prompt set with the target."""
    if not is_main_process():  # multi-host: process 0 chats on its own devices
        return []
    c = config.chat
    out_path = os.path.join(workdir, "chat", "responses.jsonl")
    prompts = list(c.prompts) if c.prompts else [r["turns"][0] for r in load_prompt_set(c.prompt_set)[: c.num_prompts]]
    done = read_jsonl(out_path)
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
        append_jsonl(out_path, records[-len(batch):])
        logging.info("chat: %d/%d prompts, %.1f tokens/s", len(records), len(prompts), out.stats["generated_tokens"] / dt)
    _print_chat(records)
    return records


def eval_drafter(run: dict, target, workdir: str):
    """The drafter of one eval run: None, an HF-layout checkpoint (`drafter_path`), or a fresh
    drafter of that kind (e.g. n-gram)."""
    if run["drafter"] == "none":
        return None
    if not run.get("drafter_path"):
        return registry.init_drafter(run["drafter"], target)
    drafter = registry.load_drafter(resolve_path(str(run["drafter_path"]), workdir), target)
    if drafter.kind != run["drafter"]:
        raise ValueError(f"eval run {run['name']!r}: {run['drafter_path']} holds a {drafter.kind} drafter, "
                         f"not {run['drafter']}")
    return drafter


def drafter_training(run: dict, workdir: str) -> dict:
    """{"source", "flops"} of an exported trained drafter (its export.json), else untrained."""
    if not run.get("drafter_path"):
        return {"source": "none", "flops": 0}
    meta = os.path.join(resolve_path(str(run["drafter_path"]), workdir), "export.json")
    if not os.path.isfile(meta):
        return {"source": "none", "flops": 0}
    with open(meta) as f:
        info = json.load(f)
    return {"source": f"{info['source']} ({info['step']} steps)", "flops": info.get("flops", 0)}


SIDE_BY_SIDE_KEYS = ("prompt_set", "num_prompts", "temperature", "batch_size", "max_new_tokens", "repeats",
                     "both_turns")  # runs equal in these (and with a drafter) can share one AR timing


def eval_groups(runs: list, side_by_side: bool) -> list[list[dict]]:
    """The runs decoded together: with `side_by_side`, those equal in SIDE_BY_SIDE_KEYS that have
    a drafter (in config order); otherwise (and for "none" runs) each alone."""
    groups, index = [], {}
    for r in runs:
        key = tuple(str(r[k]) for k in SIDE_BY_SIDE_KEYS) if side_by_side and r["drafter"] != "none" else None
        if key is None or key not in index:
            if key is not None:
                index[key] = len(groups)
            groups.append([r])
        else:
            groups[index[key]].append(r)
    return groups


def stage_eval(config, workdir: str) -> list:
    """Speculative vs autoregressive decoding for each of `config.eval.runs` (opd.eval.evaluate);
    writes `eval/<run>/metrics.json` (+ metrics.md, plots) and skips runs already written; an
    unfinished run resumes at its next batch (`eval/<first run>/batches.jsonl`). With
    `config.eval.side_by_side`, runs that differ only in their drafter are decoded in one run
    against one autoregressive timing (`evaluate_side_by_side`).
    Multi-host: process i runs groups i, i + P, ... on its own devices, then all wait."""
    runs = eval_runs(config)
    target = None
    for i, group in enumerate(eval_groups(runs, bool(config.eval.side_by_side))):
        if i % jax.process_count() != jax.process_index():
            continue
        todo = []
        for r in group:
            path = os.path.join(workdir, "eval", r["name"], "metrics.json")
            if os.path.exists(path):
                logging.info("eval: run %s already done (%s)", r["name"], path)
            else:
                todo.append(r)
        if not todo:
            continue
        if target is None:
            target = load_target_from_config(config)
        sides = []
        for r in todo:
            if r["drafter"] != "none":
                training = drafter_training(r, workdir)
                sides.append(Side(eval_drafter(r, target, workdir), r["drafter"], int(r["num_draft_tokens"]),
                                  training["source"], training["flops"]))
        r0 = todo[0]
        ms = evaluate_side_by_side(
            target, sides, os.path.expanduser(str(r0["prompt_set"])), num_prompts=r0["num_prompts"],
            temperature=r0["temperature"], batch_size=r0["batch_size"], max_new_tokens=r0["max_new_tokens"],
            seed=config.seed, both_turns=r0["both_turns"], repeats=r0["repeats"],
            journal=os.path.join(workdir, "eval", r0["name"], "batches.jsonl"))
        for r, m in zip(todo, ms):
            out_dir = os.path.join(workdir, "eval", r["name"])
            write_eval(m, out_dir)
            logging.info("eval: %s: tau %s, speedup %s, greedy_matches_ar %s -> %s", r["name"], m["tau"],
                         m["speedup"], m["greedy_matches_ar"], out_dir)
    barrier("eval: all runs written")
    results = []
    for r in runs:
        with open(os.path.join(workdir, "eval", r["name"], "metrics.json")) as f:
            results.append({"run": r["name"], **json.load(f)})
    if is_main_process():
        print("\n" + report.markdown_table(results, ("run",) + SUMMARY_COLUMNS))
    return results


def stage_report(config, workdir: str) -> dict:
    """The experiment's summary from the finished eval runs and the training curves: writes
    DIR/report/results.json (a row per run: drafter, method, training_flops, tau, speedup,
    prompt_set, temperature, batch_size, seed, ...), results.md (τ / speed-up tables, one per
    temperature and batch size) and curves.png (probe τ against cumulative training FLOPs of
    `config.report.curve_runs`); with `config.report.results_name` also
    experiments/results/<name>/ (with the command, commit and machine; `config.report.results_root`
    puts <name>/ elsewhere). Prints the tables.
    With `config.report.partial`, runs not decoded yet are left out and named (results.md's
    first line, results.json's `missing`); otherwise a missing run is an error."""
    if not is_main_process():  # reads files only; process 0 writes the report
        return {}
    rc = config.report
    rows, missing = [], []
    runs = eval_runs(config)
    for r in runs:
        path = os.path.join(workdir, "eval", r["name"], "metrics.json")
        if not os.path.isfile(path):
            if rc.partial:
                missing.append(r["name"])
                continue
            raise FileNotFoundError(f"report: eval run {r['name']!r} has no {path}; run the `eval` stage first")
        with open(path) as f:
            rows.append(report.summary_row(r["name"], json.load(f)))
    if not rows:
        raise FileNotFoundError(f"report: none of the {len(runs)} eval runs has a metrics.json under "
                                f"{os.path.join(workdir, 'eval')}; run the `eval` stage first")
    rows = report.autoregressive_rows(rows) + rows
    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    curves = report.probe_curves(workdir, list(rc.curve_runs), list(rc.curve_drafters))
    curve_rows = report.plot_curves(curves, os.path.join(out_dir, "curves.png")) if curves else []
    md = report.main_tables(rows)
    if missing:
        md = (f"**Partial:** {len(missing)} of {len(runs)} eval runs are not decoded yet: "
              f"{', '.join(missing)}.\n\n" + md)
    if curve_rows:
        md += ("Training curve (held-out probe τ; `curves.png`):\n\n"
               + report.markdown_table(curve_rows, report.CURVE_COLUMNS, "{:.3f}"))
    payload = {"rows": rows, "curves": curves, "curve_rows": curve_rows, "missing": missing}
    report.write_results("report", payload, md, out_dir)
    if rc.results_name:
        dest = os.path.join(rc.results_root, rc.results_name) if rc.results_root else None  # None: experiments/results/
        dest = report.write_results(rc.results_name, payload, md, dest)
        if curves:
            shutil.copy(os.path.join(out_dir, "curves.png"), os.path.join(dest, "curves.png"))
        logging.info("report: also written to %s", dest)
    print("\n" + md)
    logging.info("report: %d rows -> %s", len(rows), out_dir)
    return payload


def stage_regenerate(config, workdir: str) -> dict:
    """The target answers training prompts (`config.regenerate.sources`); writes trajectory
    shards to `DIR/regenerate/<source>/`, resuming shard by shard; hosts split the shards."""
    c = config.regenerate
    target, out = None, {}
    for source in c.sources:
        name = os.path.splitext(os.path.basename(source))[0] if source.endswith(".jsonl") else source
        records = regen.training_prompts(source, c.num_prompts)
        if target is None:
            target = load_target_from_config(config)
        drafter = None if c.drafter == "none" else registry.init_drafter(c.drafter, target)
        out[source] = regen.regenerate(
            target, records, os.path.join(workdir, "regenerate", name),
            prompt_set="alpacaeval_train" if source == "alpacaeval" else name, target_name=config.target.path,
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, batch_size=c.batch_size,
            shard_size=c.shard_size, seed=config.seed, drafter=drafter, num_draft_tokens=c.num_draft_tokens,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        logging.info("regenerate: %s -> %d shards", source, len(out[source]))
    return out


def stage_text_corpus(config, workdir: str) -> dict:
    """SFT data without generation: offline text (`config.text_corpus.sources`) as chat records,
    tokenised with the target's tokenizer (no weights loaded) into trajectory shards
    `DIR/text_corpus/<source>/`, resuming shard by shard; writes the per-source counts and the
    wall time to `DIR/text_corpus/summary.json`. Process 0 writes everything (it is cheap); train
    on it with `config.sft.data = ("workdir:text_corpus/<source>", ...)`."""
    if not is_main_process():
        return {}
    c = config.text_corpus
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(resolve_path(config.target.path))
    summary = {"max_tokens": int(c.max_tokens), "sources": {}}
    for source in c.sources:
        summary["sources"][source] = counts = text_corpus.build(
            source, tokenizer, os.path.join(workdir, "text_corpus", source), target_name=str(config.target.path),
            max_tokens=int(c.max_tokens), num_records=int(c.num_records), shard_size=int(c.shard_size))
        logging.info("text_corpus: %s: %d records, %d response tokens (%d truncated)", source, counts["records"],
                     counts["response_tokens"], counts["truncated"])
    summary["seconds"] = time.perf_counter() - t0
    write_json(os.path.join(workdir, "text_corpus", "summary.json"), summary)
    return summary


def stage_export(config, workdir: str) -> str:
    """Writes the latest checkpoint of run `config.export.source` to DIR/export/<source>_<kind>/."""
    return stage_common.export_run(workdir, load_target_from_config(config), config.drafter.kind,
                                   str(config.export.source), param_dtype=config.drafter.param_dtype)


STAGES: dict[str, Callable] = {
    "fetch_assets": stage_fetch_assets,
    "chat": stage_chat,
    "regenerate": stage_regenerate,
    "text_corpus": stage_text_corpus,
    "sft": stage_sft,
    "opd": stage_opd,
    "export": stage_export,
    "eval": stage_eval,
    "report": stage_report,
}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if config.distributed:
        _initialize_distributed()
    validate(config)
    validate_launch(config)
    with workdir_lock(str(workdir), config.local_workdir):  # one launch per workdir (a second is refused)
        _run_stages(config, workdir)


def _run_stages(config: ml_collections.ConfigDict, workdir: str) -> None:
    rw = None
    if remote.is_url(workdir):  # gs://...: the stages run in a local copy synced with the bucket
        rw = remote.attach(str(workdir), config.local_workdir)
        workdir = rw.local
    try:
        os.makedirs(workdir, exist_ok=True)
        if is_main_process():  # this launch's config, also kept with every earlier launch's in launches/
            launch = f"launches/config-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
            for rel in ("config.json", launch):
                os.makedirs(os.path.dirname(os.path.join(workdir, rel)), exist_ok=True)
                with open(os.path.join(workdir, rel), "w") as f:
                    f.write(config.to_json_best_effort(indent=2))
        for name in config.stages:
            base, branch, source = stage_parts(name)
            # "<stage>@<branch>": config.branches.<branch> merged on top for this stage only
            stage_config = branch_config(config, branch) if branch else config
            # "export:<run>": export that run (config.export.source for this stage only)
            stage_config = _with_export_source(stage_config, source) if source else stage_config
            console.run_stage(name, STAGES[base], stage_config, workdir)  # start / end lines, elapsed time
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
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _print_chat(records) -> None:
    for r in records:
        print(f"\n>>> {r['prompt']}\n{r['response']}")


def _with_export_source(config, source: str):
    """A copy of `config` whose export stage writes run `source` (stage name "export:<source>")."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.export.source = source
    return c
