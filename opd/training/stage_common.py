"""What the training stages (`sft`, `opd`) and `export` share: a run directory's identity,
its step-0 drafter, restoring and exporting its checkpoints, its data folders, the probe.

A run directory `DIR/<name>/<kind>/` holds
  run.json       what the run depends on (the target and the drafter it starts from); a
                 resume with another target / drafter is refused;
  init/          the step-0 drafter in its public HF layout, written once: every resume and
                 export starts from it (a fresh drafter's draft vocabulary is built once, here);
  checkpoints/   orbax steps (`opd.training.checkpoint`);
  <block>_config.json  the training settings (`config.sft` / `config.opd`) the run continues
                 with; a resume that changes one that alters what the run computes is refused
                 (`check_settings`), unless `config.resume_override` names it;
  launches.jsonl every launch's settings, with the step it started from and what it changed;
  metrics.jsonl, tb/   training metrics (`opd.training.metrics`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time

from absl import logging
import jax
import numpy as np

from opd import sharding as shd
from opd.checkpoints.errors import CheckpointError
from opd.data.builders import read_trajectory_shards, trajectory_shards
from opd.decoding.speculative import speculative_generate
from opd.drafters import registry
from opd.eval.harness import load_eval_records
from opd.paths import append_jsonl, read_jsonl, resolve_path, write_json
from opd.training import checkpoint as ckpt
from opd.training import optim
from opd.training import run as run_mod
from opd.training.loop import Stopped
from opd.training.metrics import MetricsWriter

# ----------------------------------------------------------------------------- data


def trajectory_folders(data, workdir: str, field: str = "sft.data") -> list[str]:
    """The trajectory folders the config field `field` names, default every DIR/regenerate/<source>/."""
    folders = [resolve_path(p, workdir) for p in data] if data else sorted(
        os.path.dirname(p) for p in glob.glob(os.path.join(workdir, "regenerate", "*", "shard-00000.jsonl")))
    if not folders:
        raise FileNotFoundError(f"no trajectories: run the `regenerate` stage first (nothing in {workdir}/regenerate/*/) "
                                f"or list trajectory folders in config.{field}")
    for f in folders:
        try:
            trajectory_shards(f)  # *.jsonl or *.jsonl.gz (shipped data)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config.{field}: {e}") from None
    return folders


def response_token_counts(folders, vocab_size: int, repeats=()) -> np.ndarray:
    """Frequencies of the trained (response) tokens (e.g. what an EAGLE-3 draft vocabulary keeps),
    each folder's counted `repeats[i]` times (as often as an epoch reads it; () = once)."""
    counts = np.zeros(vocab_size, np.int64)
    for f, times in zip(folders, repeats or [1] * len(folders)):
        for r in read_trajectory_shards(f):
            ids = np.asarray(r["response_ids"], np.int64)
            if ids.size and ids.max() >= vocab_size:
                raise ValueError(f"{f}: token id {ids.max()} >= the target's vocabulary size {vocab_size} "
                                 "(trajectories of another target?)")
            counts += int(times) * np.bincount(ids, minlength=vocab_size)
    return counts


# ----------------------------------------------------------------------------- the run directory


def check_run(stage_dir: str, fingerprint: dict) -> None:
    """Writes `stage_dir/run.json`, or refuses a fingerprint that differs from the one there."""
    run_json = os.path.join(stage_dir, "run.json")
    fp = json.loads(json.dumps(fingerprint, default=str))
    if os.path.isfile(run_json):
        with open(run_json) as f:
            old = json.load(f)
        if old != fp:
            raise CheckpointError(
                f"{stage_dir} was started with {json.dumps(old)}, but this config gives {json.dumps(fp)}: the "
                "checkpoints there belong to another target or drafter. Use another --workdir.")
    elif shd.is_main_process():
        write_json(run_json, fp)  # atomic: another process may be reading it now
    shd.barrier("check_run")


def fingerprint(target_path: str, target, drafter: dict) -> dict:
    """What a run's checkpoints depend on: the target and the drafter it starts from."""
    tc = target.config
    return {"target": {"path": str(target_path), "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size,
                       "num_layers": tc.num_layers}, "drafter": drafter}


def initial_drafter(stage_dir: str, fp: dict, target, *, kind: str, init: str, overrides: dict, seed: int,
                    param_dtype: str, workdir: str, folders=(), repeats=()):
    """The step-0 drafter: read from `stage_dir/init` when it exists (resume), else built (a
    fresh `kind` drafter, or loaded from `init`) and written there. Checks `fp` (`check_run`)."""
    init_dir = os.path.join(stage_dir, "init")
    # Every process decides before the barrier in check_run: after it, process 0 may already
    # be writing init_dir, and a process that looked then would skip the barrier below.
    resume = os.path.isfile(os.path.join(init_dir, "config.json"))
    check_run(stage_dir, fp)
    if resume:
        drafter = registry.load_drafter(init_dir, target)  # refuses another target's vocabulary / sizes
    else:
        plugin = registry.get_kind(kind)
        if init:
            drafter = registry.load_drafter(resolve_path(init, workdir), target)
            if drafter.kind != kind:
                raise CheckpointError(f"{init} holds a {drafter.kind} drafter, but config.drafter.kind is {kind!r}")
            logging.info("%s: fine-tuning %s (its frozen parts, e.g. a draft vocabulary, are kept)", stage_dir, init)
        else:
            extra = {"token_counts": response_token_counts(folders, target.config.vocab_size, repeats)} \
                if plugin.uses_token_counts else {}
            drafter = plugin.init(target, seed=int(seed), **extra, **dict(overrides))
        if shd.is_main_process():  # every process built the same drafter (same data and seed)
            tmp = init_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            registry.export_drafter(drafter, tmp)
            os.replace(tmp, init_dir)
        shd.barrier("initial_drafter")
        drafter = registry.load_drafter(init_dir, target)  # what every later resume sees, bit for bit
    if drafter.kind != kind:
        raise CheckpointError(f"{init_dir} holds a {drafter.kind} drafter but config.drafter.kind is {kind!r}; "
                              "use another --workdir")
    return drafter.with_param_dtype(param_dtype)


class NoCheckpointRestores(CheckpointError, Stopped):
    """Checkpoints exist but none restores: the message names the newest, why, and what to do."""


def restore_state(manager, run):
    """(state, data_state) of the newest good checkpoint onto `run`'s shardings, or None
    (`checkpoint.restore_latest`: verified, falling back past damaged steps with a warning).

    Raises:
      NoCheckpointRestores: not one step restores (the launcher prints one line, no traceback).
    """
    try:
        return ckpt.restore_latest(manager, run.abstract_state())
    except ckpt.CorruptCheckpoint as e:
        raise NoCheckpointRestores(str(e)) from e


# Settings a resume may change freely: they say how long, how often, where and how fast, not
# what a step computes. `num_steps` (and `match_flops`, which sets it) may grow to continue a
# run; with a decaying learning rate (optimizer.end_lr_ratio < 1) that stretches the schedule's
# remaining steps, which is logged. Every other setting (optimizer, loss, data, batch and
# sequence shape, packing, probe prompts, seed, ...) alters the run and must match.
FREE_SETTINGS = ("num_steps", "match_flops", "log_every", "save_every", "keep_checkpoints", "tensorboard", "mesh",
                 "target_features", "feature_cache_dtype", "feature_cache_dir", "save_rollouts", "probe.every",
                 "probe.batch_size", "vocab_chunk")


class ResumeRefused(Stopped):
    """A resume under changed settings that alter what the run computes."""


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _named(key: str, entries) -> bool:
    """Whether `config.resume_override` entries (dotted keys, a block, "*"; comma-separated
    entries allowed) name `key`."""
    names = [n.strip() for e in entries for n in str(e).split(",") if n.strip()]
    return any(n == "*" or key == n or key.startswith(n + ".") for n in names)


def check_settings(stage_dir: str, block: str, settings: dict, seed: int, step, override=()) -> None:
    """Refuses to resume (`step` is the checkpoint's; None: a new run) the run of `stage_dir`
    under `config.<block>` settings that alter what it computes (`FREE_SETTINGS` may change),
    naming each and the override; then records this launch (`launches.jsonl`) and its settings
    (`<block>_config.json`). Settings the recorded run lacks (written by an earlier version)
    are not compared."""
    settings = json.loads(json.dumps(settings, default=str))
    current, history = os.path.join(stage_dir, f"{block}_config.json"), os.path.join(stage_dir, "launches.jsonl")
    launches = read_jsonl(history)
    recorded = {}
    if os.path.isfile(current):
        with open(current) as f:
            recorded = json.load(f)
    old = _flat(recorded, f"{block}.")
    if launches and "seed" in launches[-1]:
        old["seed"] = launches[-1]["seed"]
    new = {**_flat(settings, f"{block}."), "seed": int(seed)}
    changed = {} if step is None else {k: (old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]}
    free = [f"{block}.{k}" for k in FREE_SETTINGS]
    refused = {k: v for k, v in changed.items() if not _named(k, free) and not _named(k, override)}
    if refused:
        first, (was, now) = next(iter(refused.items()))
        more = f" (and {', '.join(list(refused)[1:])})" if len(refused) > 1 else ""
        raise ResumeRefused(
            f"{block}: {stage_dir} is at step {step} with {first} = {was!r}; this launch sets {now!r}{more}. That "
            f"changes what the run computes mid-way. To continue with the new value anyway, add "
            f"--config.resume_override={','.join(refused)}; to start a new run, use another --workdir or "
            f"config.{block}.name.")
    for k, (was, now) in changed.items():
        logging.info("%s: resuming at step %s with %s changed: %r -> %r", block, step, k, was, now)
    if f"{block}.num_steps" in changed and float(new.get(f"{block}.optimizer.end_lr_ratio", 1.0)) < 1.0:
        logging.warning("%s: num_steps %s -> %s stretches the decaying learning-rate schedule from step %s on",
                        block, *changed[f"{block}.num_steps"], step)
    if not shd.is_main_process():
        return
    if not launches and recorded:  # a run recorded before launches.jsonl: keep its settings first
        append_jsonl(history, [{"step": None, "settings": recorded, "note": "the settings of earlier launches"}])
    append_jsonl(history, [{"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step, "seed": int(seed),
                            "changed": {k: list(v) for k, v in changed.items()},
                            "override": [str(e) for e in override], "settings": settings}])
    write_json(current, settings)


def init_flops(path: str) -> int:
    """Cumulative training FLOPs of an exported drafter (its export.json), else 0."""
    meta = os.path.join(path, "export.json")
    if not os.path.isfile(meta):
        return 0
    with open(meta) as f:
        return int(json.load(f).get("flops", 0))


def start_or_resume(what: str, manager, run, trainable, batches, stage_dir: str, *, seed: int, new_counters: dict,
                    tensorboard: bool = False):
    """A stage's training run, resumed from its latest checkpoint or new: (state, counters, writer,
    resumed). A resumed run takes back its data order (`batches.set_state`) and counters, and its
    metrics keep their lines up to the restored step. A new run (`new_counters`) starts its metrics
    anew, so a run killed before its first checkpoint leaves no second step-0 row behind."""
    restored = restore_state(manager, run)
    if restored is None:
        state, counters = run.init_state(trainable, seed=seed), dict(new_counters)
    else:
        state, data = restored
        batches.set_state(data["iterator"])
        counters = dict(data.get("counters", {}))
        logging.info("%s: resumed at step %d from %s", what, int(state.step), manager.directory)
    writer = MetricsWriter(stage_dir, tensorboard=tensorboard)
    writer.truncate_after(int(state.step) if restored is not None else -1)
    return state, counters, writer, restored is not None


def final_flops(run: str) -> float:
    """The cumulative training FLOPs a finished run ended at: the last row of its metrics.jsonl
    (`run` its stage dir) or of a metrics JSONL file (`run` the file, e.g. a probe curve kept with
    the results, whose last row is the final step's)."""
    path = run if os.path.isfile(run) else os.path.join(run, "metrics.jsonl")
    rows = [r for r in read_jsonl(path) if r.get("flops") is not None] if os.path.isfile(path) else []
    if not rows:
        raise FileNotFoundError(f"config.sft.match_flops: no finished run at {run} (no metrics JSONL with "
                                "FLOPs); run that stage first")
    return float(rows[-1]["flops"])


def trained_drafter(workdir: str, target, kind: str, source: str = "sft", step=None, param_dtype: str = ""):
    """(drafter, info): `DIR/<source>/<kind>/init` with the trainable params of its latest (or
    `step`) checkpoint, in `param_dtype` ("" = the init's); info = {"source", "step", "flops"}."""
    stage_dir = os.path.join(workdir, source, kind)
    init_dir = os.path.join(stage_dir, "init")
    if not os.path.isfile(os.path.join(init_dir, "config.json")):
        raise FileNotFoundError(f"no {source} {kind} run in {workdir}: {init_dir} is missing (run the `{source}` stage)")
    drafter = registry.load_drafter(init_dir, target).with_param_dtype(param_dtype)
    manager = ckpt.make_manager(os.path.join(stage_dir, "checkpoints"), async_save=False)
    if manager.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    # The optimizer and batch only shape the run; the restored state needs just its shapes.
    run = run_mod.sft_run(drafter.spec, drafter.split()[1], target.config,
                          mesh=run_mod.make_mesh(-1, 1, 1, jax.device_count(), "export"),
                          optimizer=optim.make_optimizer(optim.OptimConfig()), loss_config=None, batch_size=jax.device_count(),
                          seq_len=1)
    if step is None:
        state, data = restore_state(manager, run)
    else:
        state, data = ckpt.restore(manager, run.abstract_state(), step)
    info = {"source": source, "step": int(state.step), "flops": int(data.get("counters", {}).get("flops", 0))}
    return drafter.with_trainable(shd.to_host(state.params)), info


def check_finite(drafter, what: str) -> None:
    """Refuses a drafter whose trainable parameters hold NaN / inf (e.g. a float16 overflow)."""
    finite = {jax.tree_util.keystr(path): np.isfinite(np.asarray(x, np.float32))
              for path, x in jax.tree_util.tree_leaves_with_path(jax.device_get(drafter.split()[0]))
              if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)}
    bad = [(k, int(f.size - f.sum())) for k, f in finite.items() if not f.all()]
    if bad:
        raise CheckpointError(f"{what}: parameter {bad[0][0]} holds {bad[0][1]} non-finite values ({len(bad)} arrays "
                              "affected; after the conversion to param_dtype, if any); nothing exported")


def export_run(workdir: str, target, kind: str, source: str, param_dtype: str = "") -> str:
    """Writes the latest checkpoint of run `source` to DIR/export/<source>_<kind>/ (HF layout +
    export.json: source, step, cumulative FLOPs); a no-op when that step is already there."""
    out = os.path.join(workdir, "export", f"{source}_{kind}")
    meta = os.path.join(out, "export.json")
    drafter, info = trained_drafter(workdir, target, kind, source, param_dtype=param_dtype)  # every process
    check_finite(drafter, f"export: {source} {kind} step {info['step']}")
    done = False
    if os.path.isfile(meta):
        with open(meta) as f:
            done = json.load(f) == info
    shd.barrier("export: checked")  # before process 0 writes
    if done:
        logging.info("export: %s step %d already in %s", source, info["step"], out)
        return out
    if not shd.is_main_process():
        return out
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    registry.export_drafter(drafter, tmp)
    with open(os.path.join(tmp, "export.json"), "w") as f:
        json.dump(info, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    logging.info("export: %s step %d -> %s", source, info["step"], out)
    return out


# ----------------------------------------------------------------------------- probe


def probe_prompts(p) -> list:
    """The fixed held-out probe prompts of a `probe` block: the *last* `num_prompts` of the
    prompt set (AlpacaEval: its held-out split), so they are not the first-N prompts the eval
    stage reports."""
    if int(p.num_prompts) == 0:
        return []
    _, records = load_eval_records(str(p.prompt_set))
    if int(p.num_prompts) > len(records):
        raise ValueError(f"probe.num_prompts = {p.num_prompts} but {p.prompt_set!r} has {len(records)} prompts")
    return [list(r["prompt_ids"]) if "prompt_ids" in r else r["turns"][0] for r in records[-int(p.num_prompts):]]


def probe_hooks(target, drafter, p, num_draft_tokens: int, seed: int, state, counters: dict, writer) -> list:
    """The held-out probe of a `probe` block as train-loop hooks (none without probe prompts):
    probe τ every `p.every` steps; a run at step 0 is probed there first (its curve's start)."""
    prompts = probe_prompts(p)
    if not prompts:
        return []

    def probe(done, st):
        return probe_tau(target, drafter.with_trainable(shd.to_host(st.params)), prompts, p, num_draft_tokens, seed=seed)

    if int(state.step) == 0:
        writer.write(0, {**probe(0, state), "flops": float(counters["flops"])})
    return [(int(p.every), probe)]


def probe_tau(target, drafter, prompts, p, num_draft_tokens: int, seed: int = 0) -> dict:
    """Speculative decoding of the probe prompts (a `probe` block) with K drafts at
    `p.temperature` (fixed seed): {"probe_tau", "probe_acceptance"}."""
    out = speculative_generate(target, drafter, prompts, max_new_tokens=int(p.max_new_tokens),
                               num_draft_tokens=int(num_draft_tokens), temperature=float(p.temperature),
                               batch_size=int(p.batch_size), seed=seed)
    return {"probe_tau": float(out.stats["tau"]),
            "probe_acceptance": np.asarray(out.stats["acceptance_by_offset"], np.float64)}
