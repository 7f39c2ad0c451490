"""Launcher stages `sft` and `export`: train an EAGLE-3 / DFlash drafter on trajectories.

Layout under `DIR/sft/<kind>/` (kind = eagle3 | dflash, so one workdir holds both drafters
trained on the same trajectories; `config.sft.name` replaces "sft" for other branches, e.g.
continued SFT from a warm-up; every piece is written once, then only read back):
  run.json        what the run was started with (target, drafter kind and config); a resume
                  under another target / drafter config is refused;
  init/           the step-0 drafter in its public HF layout: a fresh drafter whose EAGLE-3
                  draft vocabulary (d2t/t2d) is built here, once, from the training tokens,
                  or a copy of `config.drafter.init` when fine-tuning (its d2t is kept, never
                  rebuilt). Every resume and export starts from this directory;
  checkpoints/    orbax steps: train state + data-iterator position + cumulative counters;
  metrics.jsonl, tb/   training metrics (JSONL, TensorBoard); with `config.sft.probe` also the
                  OPD stage's held-out `probe_tau` (same prompts and settings), so baselines
                  and Draft-OPD share one curve.
`export` writes the latest checkpoint's drafter to `DIR/export/sft_<kind>/` (HF layout) with
`export.json` (which step) inside. `eval` runs can load `workdir:sft/<kind>/init` (the
untrained drafter) and `workdir:export/sft_<kind>`.

Data: every trajectory folder under `DIR/regenerate/` (or `config.sft.data`), read as TFDS
array_record sources through the grain pipeline (padded rows: the train step has no
segment masking, so packing would let sequences attend to each other).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

from absl import logging
import jax
import ml_collections
import numpy as np

from opd import sharding as shd
from opd.checkpoints.errors import CheckpointError

DRAFTER_KINDS = ("eagle3", "dflash")
TARGET_FEATURES = ("online", "cache")  # target hidden states: in every step, or once to disk (feature_cache.py)


# ----------------------------------------------------------------------------- config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the `drafter` and `sft` blocks; raises ValueError naming the field."""
    from opd.training.optim import OptimConfig
    from opd.training.sft import SFTLossConfig

    for block in ("drafter", "sft"):
        if block not in config:
            raise ValueError(f"config.stages has 'sft' but the config has no `{block}` block (see experiments/sft_smollm2.py)")
    d, s = config.drafter, config.sft
    if d.kind not in DRAFTER_KINDS:
        raise ValueError(f"config.drafter.kind must be one of {DRAFTER_KINDS}, got {d.kind!r}")
    from opd.pipeline import path_exists

    if d.init and not path_exists(d.init):
        raise ValueError(f"config.drafter.init: no drafter directory at {d.init!r}")
    if d.get("param_dtype", "") not in ("", "float32", "bfloat16"):
        raise ValueError(f"config.drafter.param_dtype must be '', 'float32' or 'bfloat16', got {d.param_dtype!r}")
    for field in ("seq_len", "batch_size", "num_steps", "log_every", "save_every", "keep_checkpoints"):
        if int(s[field]) < 1:
            raise ValueError(f"config.sft.{field} must be >= 1, got {s[field]}")
    if not str(s.get("name", "sft")) or "/" in str(s.get("name", "sft")):
        raise ValueError(f"config.sft.name must be a plain directory name, got {s.name!r}")
    if s.target_features not in TARGET_FEATURES:
        raise ValueError(f"config.sft.target_features must be one of {TARGET_FEATURES}, got {s.target_features!r}")
    from opd.training.feature_cache import DTYPES

    if s.get("feature_cache_dtype", "float16") not in DTYPES:
        raise ValueError(f"config.sft.feature_cache_dtype must be one of {DTYPES}, got {s.feature_cache_dtype!r}")
    OptimConfig.from_config({"total_steps": int(s.num_steps), **dict(s.optimizer)})
    SFTLossConfig(**dict(s.loss))
    m = s.mesh
    sizes = [int(m.data), int(m.fsdp), int(m.tensor)]
    if sizes[1] < 1 or sizes[2] < 1 or (sizes[0] < 1 and sizes[0] != -1):
        raise ValueError(f"config.sft.mesh: data must be -1 (all remaining devices) or >= 1, fsdp and tensor >= 1; got {sizes}")


def mesh_from_config(m: ml_collections.ConfigDict):
    from opd import sharding as shd

    n = jax.device_count()
    data, fsdp, tensor = int(m.data), int(m.fsdp), int(m.tensor)
    if data == -1:
        if n % (fsdp * tensor):
            raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n} devices")
        data = n // (fsdp * tensor)
    return shd.make_mesh(data, fsdp, tensor)


def stage_mesh(block: ml_collections.ConfigDict, what: str):
    """The mesh of a training stage (`config.<what>.mesh` over the devices present), checked
    against `config.<what>.batch_size` (rows divide over data x fsdp); ValueErrors name the field."""
    try:
        mesh = mesh_from_config(block.mesh)
    except ValueError as e:
        raise ValueError(f"config.{what}.mesh {dict(block.mesh)} on {jax.device_count()} devices: {e}") from None
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if int(block.batch_size) % n:
        raise ValueError(f"config.{what}.batch_size {block.batch_size} must be divisible by the mesh's data x fsdp = {n}")
    return mesh


def resolve(spec: str, workdir: str) -> str:
    """`workdir:<rel>` -> DIR/<rel>; `asset:<name>` -> the cached asset; else the path."""
    if spec.startswith("workdir:"):
        return os.path.join(workdir, spec[len("workdir:"):])
    from opd.pipeline import resolve_path

    return resolve_path(spec)


# ----------------------------------------------------------------------------- data


class _Concat:
    """Random access over several sources, one after another."""

    def __init__(self, sources):
        self.sources = [s for s in sources if len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.sources[j][i - int(self.offsets[j])]


def trajectory_folders(config, workdir: str) -> list[str]:
    folders = [resolve(p, workdir) for p in config.sft.data] if config.sft.data else sorted(
        os.path.dirname(p) for p in glob.glob(os.path.join(workdir, "regenerate", "*", "shard-00000.jsonl")))
    if not folders:
        raise FileNotFoundError(f"no trajectories: run the `regenerate` stage first (nothing in {workdir}/regenerate/*/) "
                                "or list trajectory folders in config.sft.data")
    for f in folders:
        if not glob.glob(os.path.join(f, "shard-*.jsonl")):
            raise FileNotFoundError(f"config.sft.data: {f} holds no shard-*.jsonl trajectory files")
    return folders


def training_source(folders, workdir: str):
    from opd.data import builders

    data_dir = os.path.join(workdir, "tfds")
    return _Concat([builders.load_source(f"trajectories:{os.path.abspath(f)}", data_dir) for f in folders])


def response_token_counts(folders, vocab_size: int) -> np.ndarray:
    """Frequencies of the trained (response) tokens: what the EAGLE-3 draft vocabulary keeps."""
    from opd.data.builders import read_trajectory_shards

    counts = np.zeros(vocab_size, np.int64)
    for f in folders:
        for r in read_trajectory_shards(f):
            ids = np.asarray(r["response_ids"], np.int64)
            if ids.size and ids.max() >= vocab_size:
                raise ValueError(f"{f}: token id {ids.max()} >= the target's vocabulary size {vocab_size} "
                                 "(trajectories of another target?)")
            counts += np.bincount(ids, minlength=vocab_size)
    return counts


# ----------------------------------------------------------------------------- drafter


def _fingerprint(config, target) -> dict:
    """What a run's checkpoints depend on: the target and the drafter block of the config."""
    tc = target.config
    return {
        "target": {"path": str(config.target.path), "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size,
                   "num_layers": tc.num_layers},
        "drafter": json.loads(json.dumps(config.drafter.to_dict(), default=str)),
    }


def check_run(config, target, stage_dir: str) -> None:
    """Writes `stage_dir/run.json`, or refuses a config that differs from the one there."""
    run_json = os.path.join(stage_dir, "run.json")
    fp = _fingerprint(config, target)
    if os.path.isfile(run_json):
        with open(run_json) as f:
            old = json.load(f)
        if old != fp:
            raise CheckpointError(
                f"{stage_dir} was started with {json.dumps(old)}, but this config gives {json.dumps(fp)}: the "
                "checkpoints there belong to another target or drafter. Use another --workdir.")
    elif shd.is_main_process():
        from opd.pipeline import write_json

        write_json(run_json, fp)  # atomic: another process may be reading it now
    shd.barrier("check_run")


def initial_drafter(config, workdir: str, target, folders, stage_dir: str):
    """The step-0 drafter: read from `stage_dir/init` when it exists (resume), else built
    (fresh, or loaded from `config.drafter.init`) and written there."""
    from opd.checkpoints.drafters import export_drafter, load_drafter
    from opd.drafters import init_drafter

    init_dir = os.path.join(stage_dir, "init")
    # Every process decides before the barrier in check_run: after it, process 0 may already
    # be writing init_dir, and a process that looked then would skip the barrier below.
    resume = os.path.isfile(os.path.join(init_dir, "config.json"))
    check_run(config, target, stage_dir)
    if resume:
        drafter = load_drafter(init_dir, target)  # refuses another target's vocabulary / sizes
    else:
        d = config.drafter
        overrides = dict(d.overrides) if "overrides" in d else {}
        if d.init:
            drafter = load_drafter(resolve(d.init, workdir), target)
            if drafter.kind != d.kind:
                raise CheckpointError(f"config.drafter.init {d.init} holds a {drafter.kind} drafter, "
                                      f"but config.drafter.kind is {d.kind!r}")
            logging.info("sft: fine-tuning %s (its draft vocabulary is kept)", d.init)
        elif d.kind == "eagle3":
            counts = response_token_counts(folders, target.config.vocab_size)
            drafter = init_drafter("eagle3", target, seed=int(config.seed), token_counts=counts, **overrides)
        else:
            drafter = init_drafter("dflash", target, seed=int(config.seed), **overrides)
        if shd.is_main_process():  # every process built the same drafter (same data and seed)
            tmp = init_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            export_drafter(drafter, tmp)
            os.replace(tmp, init_dir)
        shd.barrier("initial_drafter")
        drafter = load_drafter(init_dir, target)  # what every later resume sees, bit for bit
    if drafter.kind != config.drafter.kind:
        raise CheckpointError(f"{init_dir} holds a {drafter.kind} drafter but config.drafter.kind is "
                              f"{config.drafter.kind!r}; use another --workdir")
    return with_param_dtype(drafter, config.drafter.get("param_dtype", ""))


def with_trainable(drafter, trainable):
    """The drafter with its trainable subtree replaced (inverse of `sft.split_drafter_params`)."""
    key = "eagle" if drafter.kind == "eagle3" else "dflash"
    return dataclasses.replace(drafter, params={**drafter.params, key: trainable})


def with_param_dtype(drafter, dtype: str):
    """The drafter with its trainable parameters stored in `dtype` (e.g. float32 master weights,
    and so float32 AdamW moments, next to a bf16 target); the computation keeps the config's
    `dtype` (the modules cast their parameters to it). "" keeps them as they are."""
    import jax.numpy as jnp

    from opd.training.sft import split_drafter_params

    if not dtype or drafter.spec.config.param_dtype == dtype:
        return drafter
    trainable, _ = split_drafter_params(drafter)
    cast = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, trainable)
    spec = dataclasses.replace(drafter.spec, config=dataclasses.replace(drafter.spec.config, param_dtype=dtype))
    return with_trainable(dataclasses.replace(drafter, spec=spec), cast)


def restore_state(manager, abstract, directory: str):
    """(state, data_state) of the latest checkpoint, or None; a clear error if unreadable."""
    from opd.training import checkpoint as ckpt

    step = manager.latest_step()
    if step is None:
        return None
    try:
        return ckpt.restore(manager, abstract, step)
    except Exception as e:  # orbax raises many kinds (missing files, shape/dtype mismatch, bad metadata)
        raise CheckpointError(
            f"cannot restore step {step} from {directory}: {type(e).__name__}: {e}. The checkpoint is corrupt or "
            "was written for another drafter / target; move that step directory away to resume from an older "
            "one, or use another --workdir.") from e


# ----------------------------------------------------------------------------- stages


def stage_sft(config, workdir: str):
    """Trains the drafter to `config.sft.num_steps`, resuming from `DIR/sft/checkpoints`."""
    from opd.data import pipeline as dp
    from opd.pipeline import load_target_from_config
    from opd.training import checkpoint as ckpt
    from opd.training import flops, optim, sft
    from opd.training.loop import train_loop
    from opd.training.metrics import MetricsWriter

    s = config.sft
    stage_dir = os.path.join(workdir, str(s.get("name", "sft")), config.drafter.kind)
    os.makedirs(stage_dir, exist_ok=True)
    target = load_target_from_config(config)
    check_run(config, target, stage_dir)
    manager = ckpt.make_manager(os.path.join(stage_dir, "checkpoints"), max_to_keep=int(s.keep_checkpoints))
    if (not s.get("match_flops", "") and manager.latest_step() is not None
            and manager.latest_step() >= int(s.num_steps)):
        logging.info("sft: already at step %d (config.sft.num_steps = %d)", manager.latest_step(), s.num_steps)
        return os.path.join(stage_dir, "checkpoints")
    folders = trajectory_folders(config, workdir)
    drafter = initial_drafter(config, workdir, target, folders, stage_dir)
    spec = drafter.spec

    mesh = stage_mesh(s, "sft")
    loss_cfg = sft.SFTLossConfig(**dict(s.loss))
    cached = s.target_features == "cache"

    def step_flops(batch):
        B, T = batch["tokens"].shape
        return flops.sft_step_flops(spec, target.config, B * jax.process_count(), T, loss_cfg.ttt_steps,
                                    loss_cfg.num_anchors, cached_features=cached)

    import grain

    source = training_source(folders, workdir)
    cache_flops = 0
    if cached:
        from opd.training import feature_cache

        # a shared cache (e.g. the warm-up's, `workdir:sft/<kind>/features`) is reused when it
        # matches (its FLOPs were counted by the run that built it)
        cache_dir = (resolve(s.feature_cache_dir, workdir) if s.get("feature_cache_dir", "")
                     else os.path.join(stage_dir, "features"))
        info = feature_cache.build(target, spec, source, folders, int(s.seq_len), cache_dir,
                                   dtype=s.get("feature_cache_dtype", "float16"), batch_size=int(s.batch_size))
        cache_flops = info["flops"]
        source = dp.IndexedSource(source)
    num_steps = int(s.num_steps)
    if s.get("match_flops", ""):  # a baseline trained to the cumulative FLOPs another run ended at
        # this run's own cache is part of its budget, whether built now or before a restart
        own_cache = (flops.target_forward_flops(target.config, len(source), int(s.seq_len))
                     if cached and not s.get("feature_cache_dir", "") else 0)
        num_steps = matched_steps(resolve(s.match_flops, workdir), config, workdir,
                                  step_flops({"tokens": np.zeros((int(s.batch_size) // jax.process_count(), int(s.seq_len)))}),
                                  own_cache)
    ocfg = optim.OptimConfig.from_config({"total_steps": num_steps, **dict(s.optimizer)})
    optimizer = optim.make_optimizer(ocfg)
    shardings = sft.make_shardings(mesh, spec, target.config, optimizer, cached_features=cached)
    trainable, frozen = sft.split_drafter_params(drafter)
    abstract = ckpt.abstract_state(spec, optimizer, shardings)

    pcfg = dp.PipelineConfig(seq_len=int(s.seq_len), batch_size=int(s.batch_size) // jax.process_count(),
                             packing=False, seed=int(config.seed), pad_id=0)
    dataset = dp.make_dataset(source, pcfg, shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True))
    if cached:
        dataset = dataset.map(feature_cache.AttachFeatures(cache_dir))
    batches = iter(dataset)
    restored = restore_state(manager, abstract, manager.directory)
    if restored is None:
        state = sft.init_train_state(trainable, optimizer, shardings, seed=int(config.seed))
        from opd.training.opd_stage import init_flops

        # building the feature cache is training compute too; fine-tuning an exported drafter
        # continues its FLOP count (one cumulative axis for every branch from a warm-up)
        counters = {"flops": cache_flops + (init_flops(resolve(config.drafter.init, workdir)) if config.drafter.init else 0)}
        logging.info("sft: new run: %d trajectories from %s", len(source), folders)
    else:
        state, data = restored
        batches.set_state(data["iterator"])
        counters = dict(data.get("counters", {}))
        logging.info("sft: resumed at step %d from %s", int(state.step), manager.directory)

    if shd.is_main_process():
        with open(os.path.join(stage_dir, "sft_config.json"), "w") as f:  # this launch's training settings
            json.dump(json.loads(s.to_json_best_effort()), f, indent=2)
    writer = MetricsWriter(stage_dir, tensorboard=bool(s.tensorboard))
    writer.truncate_after(int(state.step))
    step_fn = sft.make_train_step(spec, target.config, optimizer, shardings, loss_cfg)
    frozen_dev = jax.device_put(frozen, shardings.drafter_frozen)
    target_params = jax.device_put(target.params, shardings.target)

    def place(batch):  # this process's rows (grain shards the data by process) -> the global batch
        return shd.put_process_rows({k: np.asarray(batch[k]) for k in shardings.batch}, shardings.batch)

    hooks = []
    if "probe" in s and int(s.probe.num_prompts) > 0:  # the OPD stage's held-out tau, for one curve axis
        from opd.training.opd_stage import probe_prompts, probe_tau

        prompts, K = probe_prompts(s.probe), int(s.probe.num_draft)

        def probe(done, st):
            return probe_tau(target, with_trainable(drafter, shd.to_host(st.params)), prompts, s.probe, K,
                             seed=int(config.seed))

        hooks.append((int(s.probe.every), probe))
        if int(state.step) == 0:
            writer.write(0, {**probe(0, state), "flops": float(counters["flops"])})
    try:
        state = train_loop(
            step_fn, state, (target_params, frozen_dev), batches, num_steps=num_steps, manager=manager,
            place_batch=place, step_flops=step_flops, counters=counters,
            data_state=lambda: {"iterator": batches.get_state()}, writer=writer,
            lr_fn=optim.learning_rate_schedule(ocfg), log_every=int(s.log_every), save_every=int(s.save_every),
            hooks=hooks, desc=f"sft {spec.kind}")
    finally:
        writer.close()
    logging.info("sft: done at step %d; %.3g training FLOPs", int(state.step), counters["flops"])
    return os.path.join(stage_dir, "checkpoints")


def final_flops(stage_dir: str) -> float:
    """The cumulative training FLOPs a finished run ended at (last row of its metrics.jsonl)."""
    from opd.training.metrics import read_jsonl

    path = os.path.join(stage_dir, "metrics.jsonl")
    rows = [r for r in read_jsonl(path) if r.get("flops") is not None] if os.path.isfile(path) else []
    if not rows:
        raise FileNotFoundError(f"config.sft.match_flops: no finished run in {stage_dir} (no metrics.jsonl with "
                                "FLOPs); run that stage first")
    return float(rows[-1]["flops"])


def matched_steps(run_dir: str, config, workdir: str, flops_per_step: int, cache_flops: int = 0) -> int:
    """Steps of this SFT run that bring its cumulative FLOPs (from its init, plus building its
    feature cache) to `run_dir`'s."""
    from opd.training.opd_stage import init_flops

    start = (init_flops(resolve(config.drafter.init, workdir)) if config.drafter.init else 0) + cache_flops
    want = final_flops(run_dir)
    n = max(1, int(-(-(want - start) // flops_per_step)))
    logging.info("sft: %d steps of %.3g FLOPs match %s (%.3g -> %.3g cumulative FLOPs)", n, flops_per_step,
                 run_dir, start, want)
    return n


def trained_drafter(workdir: str, target, kind: str, source: str = "sft", step=None, param_dtype: str = ""):
    """(drafter, info): `DIR/<source>/<kind>/init` with the trainable params of its latest (or
    `step`) checkpoint, in `param_dtype` ("" = the init's, as the run trained them when its
    config set none); info = {"source", "step", "flops" (cumulative training FLOPs)}."""
    from opd.checkpoints.drafters import load_drafter
    from opd.training import checkpoint as ckpt
    from opd.training import optim, sft

    stage_dir = os.path.join(workdir, source, kind)
    init_dir = os.path.join(stage_dir, "init")
    if not os.path.isfile(os.path.join(init_dir, "config.json")):
        raise FileNotFoundError(f"no {source} {kind} run in {workdir}: {init_dir} is missing (run the `{source}` stage)")
    drafter = with_param_dtype(load_drafter(init_dir, target), param_dtype)
    manager = ckpt.make_manager(os.path.join(stage_dir, "checkpoints"), async_save=False)
    if manager.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    # The optimizer only shapes the restored state; its hyperparameters do not matter here.
    optimizer = optim.make_optimizer(optim.OptimConfig())
    mesh = mesh_from_config(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
    shardings = sft.make_shardings(mesh, drafter.spec, target.config, optimizer)
    abstract = ckpt.abstract_state(drafter.spec, optimizer, shardings)
    state, data = restore_state(manager, abstract, manager.directory) if step is None else ckpt.restore(manager, abstract, step)
    info = {"source": source, "step": int(state.step), "flops": int(data.get("counters", {}).get("flops", 0))}
    return with_trainable(drafter, shd.to_host(state.params)), info


def stage_export(config, workdir: str) -> str:
    """Writes the latest `config.export.source` checkpoint's drafter to DIR/export/<source>_<kind>/."""
    from opd.checkpoints.drafters import export_drafter
    from opd.pipeline import load_target_from_config

    source = config.export.source if "export" in config else "sft"
    kind = config.drafter.kind
    out = os.path.join(workdir, "export", f"{source}_{kind}")
    meta = os.path.join(out, "export.json")
    target = load_target_from_config(config)
    drafter, info = trained_drafter(workdir, target, kind, source,  # every process (a collective restore)
                                    param_dtype=config.drafter.get("param_dtype", ""))
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
    export_drafter(drafter, tmp)
    with open(os.path.join(tmp, "export.json"), "w") as f:
        json.dump(info, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    logging.info("export: %s step %d -> %s", source, info["step"], out)
    return out


def with_export_source(config, source: str):
    """A copy of `config` whose export stage writes run `source` (stage name "export:<source>")."""
    import copy

    c = copy.deepcopy(config)
    with c.unlocked():
        c.export.source = source
    return c
