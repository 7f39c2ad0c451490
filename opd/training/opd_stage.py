"""Launcher stage `opd`: Draft-OPD training of an SFT-warmed drafter (any trainable kind).

Layout under `DIR/<config.opd.name>/<kind>/` (name "opd" by default; ablations use their own):
  run.json        the target, the drafter kind and the warm-up drafter (`config.opd.init`); a
                  resume under another target / warm-up is refused;
  init/           a copy of the warm-up drafter (HF layout): every resume and export starts here;
  opd_config.json, launches.jsonl   the training settings, and every launch's: a resume that
                  changes one that alters the run is refused (`stage_common.check_settings`);
  checkpoints/    orbax steps: train state + prompt-iterator position + cumulative counters;
  metrics.jsonl, tb/   every `log_every` steps the means of the loss and its streams (accepted,
                  rejected, post-rejection, error anchors), the divergence and acceptance by
                  offset, the rollout's tau, rollout tokens/s and cumulative FLOPs; every
                  `probe.every` steps (and at step 0) `probe_tau` and `probe_acceptance` of
                  speculative decoding (at `probe.temperature`, fixed seed) on a fixed
                  held-out probe set;
  rollouts/       with `save_rollouts`: every step's committed text as trajectory shards
                  (`shard-<step>.jsonl`), the data of the "SFT on OPD rollouts" baseline.
The FLOP counter starts at the warm-up's (its export.json), so every branch from one warm-up
shares one cumulative-FLOPs axis. `export` with `config.export.source = <name>` writes
`DIR/export/<name>_<kind>/`.

Prompts: the trajectories' prompts (`config.opd.data`, default every `DIR/regenerate/*/`), each
extended by a random-length prefix of the target's own answer (`prefix = "random"`; "prompt":
the bare prompt), so rollouts visit states all along the answers, not only their first tokens.
Rows longer than `prompt_len` are dropped (counted in the log). The order is a seeded
permutation per epoch; the iterator position is checkpointed. A step takes `batch_size` x
`accumulate` prompts (`OPDConfig.accumulate` micro-batches per optimizer update).
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from opd import sharding as shd
from opd.configs import opd_config, optim_config, probe_num_draft_tokens, stage_mesh
from opd.data.builders import read_trajectory_shards
from opd.decoding import batching
from opd.paths import resolve_path
from opd.target import load_target_from_config
from opd.training import checkpoint as ckpt
from opd.training import flops, optim
from opd.training import run as run_mod
from opd.training import stage_common as common
from opd.training.loop import train_loop

# ----------------------------------------------------------------------------- prompts


class PromptBatches:
    """Left-aligned prompt batches {"tokens" [B, P], "lengths", "valid", "index"} over
    trajectory records (module docstring); `get_state` / `set_state` for checkpoints."""

    def __init__(self, records, prompt_len: int, batch_size: int, seed: int, prefix: str = "random"):
        self.P, self.B, self.seed, self.prefix = int(prompt_len), int(batch_size), int(seed), prefix
        keep = [r for r in records if len(r["prompt_ids"]) + 1 <= self.P]
        self.dropped = len(records) - len(keep)
        if not keep:
            raise ValueError(f"config.opd.prompt_len = {prompt_len}: every prompt is longer (the shortest has "
                             f"{min(len(r['prompt_ids']) for r in records)} tokens)")
        self.records = keep
        self.position = 0  # rows served so far

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])

    def __iter__(self):
        return self

    def _row(self, i: int):
        n = len(self.records)
        epoch, j = divmod(i, n)
        rec = self.records[int(np.random.default_rng([self.seed, epoch]).permutation(n)[j])]
        prompt = np.asarray(rec["prompt_ids"], np.int32)
        answer = np.asarray(rec["response_ids"], np.int32)
        cut = 0
        if self.prefix == "random" and answer.size:
            room = min(answer.size - 1, self.P - prompt.size)
            cut = int(np.random.default_rng([self.seed, epoch, j, 1]).integers(0, room + 1))
        return np.concatenate([prompt, answer[:cut]]), rec

    def __next__(self) -> dict:
        rows = [self._row(self.position + b) for b in range(self.B)]
        self.position += self.B
        tokens = np.zeros((self.B, self.P), np.int32)
        for b, (ids, _) in enumerate(rows):
            tokens[b, :ids.size] = ids
        return {"tokens": tokens, "lengths": np.asarray([ids.size for ids, _ in rows], np.int32),
                "valid": np.ones((self.B,), bool), "records": [r for _, r in rows]}


def prompt_records(folders) -> list[dict]:
    return [{"prompt_ids": list(map(int, r["prompt_ids"])), "response_ids": list(map(int, r["response_ids"])),
             "prompt_set": r["prompt_set"], "prompt_id": r["prompt_id"]}
            for f in folders for r in read_trajectory_shards(f)]


def _write_rollouts(out_dir: str, step: int, batch: dict, private: dict, target_name: str) -> None:
    seq, seq_len = np.asarray(private["_seq"]), np.asarray(private["_seq_len"])
    rows = []
    for b, rec in enumerate(batch["records"]):
        n0, n1 = int(batch["lengths"][b]), int(seq_len[b])
        if not batch["valid"][b] or n1 <= n0:
            continue
        rows.append({"prompt_id": f"{rec['prompt_id']}@opd{step}.{b}", "prompt_set": rec["prompt_set"],
                     "target": target_name, "prompt_ids": seq[b, :n0].tolist(), "response_ids": seq[b, n0:n1].tolist()})
    if not shd.is_main_process():
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"shard-{step:06d}.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def build_run(config: ml_collections.ConfigDict, spec, drafter_frozen, target_config, num_eos: int,
              devices=None) -> run_mod.TrainRun:
    """The Draft-OPD step of `config.opd` (the stage and the AOT check build it here) on `devices`
    (default: the devices present)."""
    o = config.opd
    return run_mod.opd_run(spec, drafter_frozen, target_config, mesh=stage_mesh(o, "opd", devices),
                           optimizer=optim.make_optimizer(optim_config(o, o.num_steps)), opd_config=opd_config(o),
                           batch_size=int(o.batch_size), prompt_len=int(o.prompt_len), num_eos=num_eos)


def stage_opd(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains the warm-up drafter with Draft-OPD to `config.opd.num_steps`, resuming."""
    o = config.opd
    kind = config.drafter.kind
    stage_dir = os.path.join(workdir, str(o.name), kind)
    os.makedirs(stage_dir, exist_ok=True)
    target = load_target_from_config(config)
    fp = common.fingerprint(config.target.path, target, {"kind": kind, "init": str(o.init)})  # + the warm-up
    manager = ckpt.make_manager(os.path.join(stage_dir, "checkpoints"), max_to_keep=int(o.keep_checkpoints))
    common.check_run(stage_dir, fp)
    if manager.latest_step() is not None and manager.latest_step() >= int(o.num_steps):
        logging.info("opd: already at step %d (config.opd.num_steps = %d)", manager.latest_step(), o.num_steps)
        return os.path.join(stage_dir, "checkpoints")
    # a resume under settings that change what the run computes is refused before any work
    common.check_settings(stage_dir, "opd", o.to_dict(), int(config.seed), manager.latest_step(),
                          config.get("resume_override", ()))
    folders = common.trajectory_folders(o.data, workdir, "opd.data")
    drafter = common.initial_drafter(stage_dir, fp, target, kind=kind, init=str(o.init), overrides={},
                                     seed=int(config.seed), param_dtype=config.drafter.param_dtype, workdir=workdir)
    spec, cfg = drafter.spec, opd_config(o)
    B, P = int(o.batch_size), int(o.prompt_len)
    ocfg = optim_config(o, o.num_steps)
    eos_ids = batching.resolve_eos(target, None)
    trainable, frozen = drafter.split()
    run = build_run(config, spec, frozen, target.config, len(eos_ids))

    batches = PromptBatches(prompt_records(folders), P, B * cfg.accumulate, int(config.seed), o.prefix)  # A x B a step
    if batches.dropped:
        logging.warning("opd: %d of %d trajectories have prompts longer than prompt_len %d; skipped",
                        batches.dropped, batches.dropped + len(batches.records), P)
    state, counters, writer, resumed = common.start_or_resume(
        "opd", manager, run, trainable, batches, stage_dir, seed=int(config.seed),
        new_counters={"flops": common.init_flops(resolve_path(str(o.init), workdir))},  # the warm-up's FLOPs
        tensorboard=bool(o.tensorboard))
    try:  # the writer is closed however the run ends, the step-0 probe included
        if not resumed:
            logging.info("opd: new run from %s (%.3g FLOPs so far) on %d prompts", o.init, counters["flops"],
                         len(batches.records))
        target_params, frozen_dev = run.place_frozen(target.params, frozen)
        eos = jax.device_put(batching.eos_array(eos_ids), shd.replicated(run.mesh))
        step_fn = lambda st, tp, fr, b: run(st, tp, fr, b, eos)
        place = lambda b: jax.device_put({k: jnp.asarray(b[k]) for k in run.batch}, run.shardings.batch)
        step_flops = flops.opd_step_flops(spec, target.config, B, P, cfg.num_rounds, cfg.num_draft_tokens,
                                          cfg.cache_len(P), cfg.loss.error_anchor_weight > 0, cfg.accumulate)
        hooks = common.probe_hooks(target, drafter, o.probe, probe_num_draft_tokens(config, "opd"), int(config.seed),
                                   state, counters, writer)
        on_step = None
        if o.save_rollouts:  # every process gathers the rows (a collective); process 0 writes them
            out = os.path.join(stage_dir, "rollouts")
            on_step = lambda done, b, private: _write_rollouts(out, done, b, private, str(config.target.path))
        state = train_loop(
            step_fn, state, (target_params, frozen_dev), batches, num_steps=int(o.num_steps), manager=manager,
            place_batch=place, step_flops=lambda b: step_flops, counters=counters,
            data_state=lambda: {"iterator": batches.get_state()}, writer=writer,
            lr_fn=optim.learning_rate_schedule(ocfg), log_every=int(o.log_every), save_every=int(o.save_every),
            hooks=hooks, step_tokens=lambda b, m: int(m["committed_tokens"]), on_step=on_step,
            desc=f"opd {kind}")
    finally:
        writer.close()
    logging.info("opd: done at step %d; %.3g cumulative training FLOPs", int(state.step), counters["flops"])
    return os.path.join(stage_dir, "checkpoints")
