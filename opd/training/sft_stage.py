"""Launcher stage `sft`: train a drafter (any trainable kind) on trajectories.

Layout under `DIR/sft/<kind>/` (one workdir holds every kind's drafter trained on the
same trajectories; `config.sft.name` replaces "sft" for other branches, e.g.
continued SFT from a warm-up; every piece is written once, then only read back):
  run.json        what the run was started with (target, drafter kind and config); a resume
                  under another target / drafter config is refused;
  sft_config.json, launches.jsonl   the training settings, and every launch's: a resume that
                  changes one that alters the run is refused (`stage_common.check_settings`);
  init/           the step-0 drafter in its public HF layout (`stage_common.initial_drafter`:
                  e.g. a fresh EAGLE-3 drafter's draft vocabulary is built here, once, from the
                  training tokens; a fine-tuned one keeps its own). Every resume and export
                  starts from this directory;
  checkpoints/    orbax steps: train state + data-iterator position + cumulative counters;
  metrics.jsonl, tb/   training metrics (JSONL, TensorBoard; `tokens`, `tokens_per_s`: answer
                  tokens, i.e. loss-masked, trained on); with `config.sft.probe` also the
                  OPD stage's held-out `probe_tau` (same prompts and settings), so baselines
                  and Draft-OPD share one curve.
`export` writes the latest checkpoint's drafter to `DIR/export/sft_<kind>/` (HF layout) with
`export.json` (which step) inside. `eval` runs can load `workdir:sft/<kind>/init` (the
untrained drafter) and `workdir:export/sft_<kind>`.

Data: every trajectory folder under `DIR/regenerate/` (or `config.sft.data`), read as TFDS
array_record sources through the grain pipeline: one padded sequence per row, or with
`config.sft.packing` several per row (segment masks keep each sequence to itself, in the
target's online forward and in the drafter; cached features are looked up per token).
"""

from __future__ import annotations

import os

from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from opd import sharding as shd
from opd.configs import optim_config, probe_num_draft_tokens, stage_mesh
from opd.data import builders
from opd.data import pipeline as dp
from opd.drafters import registry
from opd.paths import resolve_path
from opd.target import load_target_from_config
from opd.training import checkpoint as ckpt
from opd.training import feature_cache, flops, optim
from opd.training import run as run_mod
from opd.training import stage_common as common
from opd.training.loop import train_loop


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


def training_source(folders, workdir: str, repeats=()):
    """Every folder's trajectories, one after another, folder i `repeats[i]` times (() = once)."""
    data_dir = os.path.join(workdir, "tfds")
    sources = [builders.load_source(f"trajectories:{os.path.abspath(f)}", data_dir) for f in folders]
    return _Concat([src for src, times in zip(sources, repeats or [1] * len(sources)) for _ in range(int(times))])


def matched_steps(run_dir: str, start_flops: int, flops_per_step: int) -> int:
    """Steps that bring a run's cumulative FLOPs from `start_flops` to `run_dir`'s final ones."""
    want = common.final_flops(run_dir)
    n = max(1, int(-(-(want - start_flops) // flops_per_step)))
    logging.info("sft: %d steps of %.3g FLOPs match %s (%.3g -> %.3g cumulative FLOPs)", n, flops_per_step,
                 run_dir, start_flops, want)
    return n


def build_run(config: ml_collections.ConfigDict, spec, drafter_frozen, target_config, num_steps=None,
              devices=None) -> run_mod.TrainRun:
    """The SFT step of `config.sft` (the stage and the AOT check build it here) on `devices`
    (default: the devices present)."""
    s = config.sft
    ocfg = optim_config(s, s.num_steps if num_steps is None else num_steps)
    return run_mod.sft_run(spec, drafter_frozen, target_config, mesh=stage_mesh(s, "sft", devices),
                           optimizer=optim.make_optimizer(ocfg),
                           loss_config=registry.get_kind(config.drafter.kind).loss_config(s.loss),
                           batch_size=int(s.batch_size), seq_len=int(s.seq_len),
                           cached_features=s.target_features == "cache", packed=bool(s.packing))


def stage_sft(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains the drafter to `config.sft.num_steps` (or `match_flops`), resuming from its checkpoints."""
    s, d = config.sft, config.drafter
    stage_dir = os.path.join(workdir, str(s.name), d.kind)
    os.makedirs(stage_dir, exist_ok=True)
    target = load_target_from_config(config)
    fp = common.fingerprint(config.target.path, target, d.to_dict())
    common.check_run(stage_dir, fp)
    manager = ckpt.make_manager(os.path.join(stage_dir, "checkpoints"), max_to_keep=int(s.keep_checkpoints))
    if not s.match_flops and manager.latest_step() is not None and manager.latest_step() >= int(s.num_steps):
        logging.info("sft: already at step %d (config.sft.num_steps = %d)", manager.latest_step(), s.num_steps)
        return os.path.join(stage_dir, "checkpoints")
    # a resume under settings that change what the run computes is refused before any work
    common.check_settings(stage_dir, "sft", s.to_dict(), int(config.seed), manager.latest_step(),
                          config.get("resume_override", ()))
    folders = common.trajectory_folders(s.data, workdir, "sft.data")
    vocab_folders, vocab_repeats = (common.trajectory_folders(d.vocab_data, workdir, "drafter.vocab_data"), ()) \
        if d.vocab_data else (folders, tuple(s.data_repeats))
    drafter = common.initial_drafter(stage_dir, fp, target, kind=d.kind, init=d.init, overrides=dict(d.overrides),
                                     seed=int(config.seed), param_dtype=d.param_dtype, workdir=workdir,
                                     folders=vocab_folders, repeats=vocab_repeats)
    spec = drafter.spec
    loss_cfg = registry.get_kind(d.kind).loss_config(s.loss)
    cached = s.target_features == "cache"
    B, T = int(s.batch_size), int(s.seq_len)
    # fair accounting (flops module docstring): every step is charged the target forward over its
    # rows, cached features or not (a cache saves wall-clock, not the FLOPs a comparison prices)
    step_flops = flops.sft_step_flops(spec, target.config, B, T, loss_cfg)

    source = training_source(folders, workdir, tuple(s.data_repeats))
    if cached:
        # a shared cache (e.g. the warm-up's, `workdir:sft/<kind>/features`) is reused when it matches
        cache_dir = resolve_path(s.feature_cache_dir, workdir) if s.feature_cache_dir else os.path.join(stage_dir, "features")
        feature_cache.build(target, spec, source, folders, T, cache_dir, dtype=s.feature_cache_dtype, batch_size=B)
        source = dp.IndexedSource(source)
    # fine-tuning an exported drafter continues its FLOP count (one cumulative axis for every
    # branch from a warm-up)
    start_flops = common.init_flops(resolve_path(d.init, workdir)) if d.init else 0
    num_steps = int(s.num_steps)
    if s.match_flops:  # a baseline trained to the cumulative FLOPs another run ended at
        num_steps = matched_steps(resolve_path(s.match_flops, workdir), start_flops, step_flops)
    ocfg = optim_config(s, num_steps)
    trainable, frozen = drafter.split()
    run = build_run(config, spec, frozen, target.config, num_steps)

    pcfg = dp.PipelineConfig(seq_len=T, batch_size=B // jax.process_count(), packing=bool(s.packing),
                             seed=int(config.seed), pad_id=0)
    dataset = dp.make_dataset(source, pcfg, shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True))
    if cached:
        dataset = dataset.map(feature_cache.AttachFeatures(cache_dir))
    batches = iter(dataset)
    state, counters, writer, resumed = common.start_or_resume(
        "sft", manager, run, trainable, batches, stage_dir, seed=int(config.seed), new_counters={"flops": start_flops},
        tensorboard=bool(s.tensorboard))
    try:  # the writer is closed however the run ends, the step-0 probe included
        if not resumed:
            logging.info("sft: new run: %d trajectories from %s", len(source), folders)
            if int(s.skip_batches):  # the batches an earlier leg of the same data order trained on
                for _ in range(int(s.skip_batches)):
                    next(batches)
                logging.info("sft: skipped the first %d batches of the data order (config.sft.skip_batches)",
                             int(s.skip_batches))
        target_params, frozen_dev = run.place_frozen(target.params, frozen)

        def place(batch):  # this process's rows (grain shards the data by process) -> the global batch
            return shd.put_process_rows({k: np.asarray(batch[k]) for k in run.batch}, run.shardings.batch)

        # the OPD stage's held-out tau, for one curve axis
        hooks = common.probe_hooks(target, drafter, s.probe, probe_num_draft_tokens(config, "sft"), int(config.seed),
                                   state, counters, writer)
        state = train_loop(
            run, state, (target_params, frozen_dev), batches, num_steps=num_steps, manager=manager,
            place_batch=place, step_flops=lambda batch: step_flops, counters=counters,
            step_tokens=lambda batch, _: int(np.asarray(batch["loss_mask"]).sum()),  # answer tokens trained on
            data_state=lambda: {"iterator": batches.get_state()}, writer=writer,
            lr_fn=optim.learning_rate_schedule(ocfg), log_every=int(s.log_every), save_every=int(s.save_every),
            hooks=hooks, desc=f"sft {spec.kind}")
    finally:
        writer.close()
    logging.info("sft: done at step %d; %.3g training FLOPs", int(state.step), counters["flops"])
    return os.path.join(stage_dir, "checkpoints")
