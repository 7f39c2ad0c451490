"""Launcher stage `opd`: Draft-OPD training of an SFT-warmed EAGLE-3 / DFlash drafter.

Layout under `DIR/<config.opd.name>/<kind>/` (name "opd" by default; ablations use their own):
  run.json        the target, the drafter kind and the warm-up drafter (`config.opd.init`); a
                  resume under another target / warm-up is refused;
  init/           a copy of the warm-up drafter (HF layout): every resume and export starts here;
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
permutation per epoch; the iterator position is checkpointed.
"""

from __future__ import annotations

import copy
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from opd import sharding as shd
from opd.training import sft_stage

PREFIXES = ("random", "prompt")


# ----------------------------------------------------------------------------- config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the `drafter` and `opd` blocks; raises ValueError naming the field."""
    from opd.training.opd_loss import OPDLossConfig
    from opd.training.opd_step import OPDConfig
    from opd.training.optim import OptimConfig

    for block in ("drafter", "opd"):
        if block not in config:
            raise ValueError(f"config.stages has 'opd' but the config has no `{block}` block (see experiments/opd_smollm2.py)")
    o = config.opd
    if config.drafter.kind not in sft_stage.DRAFTER_KINDS:
        raise ValueError(f"config.drafter.kind must be one of {sft_stage.DRAFTER_KINDS}, got {config.drafter.kind!r}")
    if not o.init:
        raise ValueError("config.opd.init must name the drafter Draft-OPD starts from: an HF-layout drafter "
                         "directory (the pod configs take it from config.drafter.init) or an SFT warm-up "
                         "('workdir:export/sft_eagle3')")
    if not str(o.name) or "/" in str(o.name):
        raise ValueError(f"config.opd.name must be a plain directory name, got {o.name!r}")
    if o.prefix not in PREFIXES:
        raise ValueError(f"config.opd.prefix must be one of {PREFIXES}, got {o.prefix!r}")
    for field in ("prompt_len", "batch_size", "num_steps", "log_every", "save_every", "keep_checkpoints"):
        if int(o[field]) < 1:
            raise ValueError(f"config.opd.{field} must be >= 1, got {o[field]}")
    OPDConfig(num_rounds=int(o.num_rounds), num_draft=int(o.num_draft),
              rollout_temperature=float(o.rollout_temperature), loss=OPDLossConfig(**dict(o.loss)))
    OptimConfig.from_config({"total_steps": int(o.num_steps), **dict(o.optimizer)})
    p = o.probe
    for field in ("num_prompts", "max_new_tokens", "every", "batch_size"):
        if int(p[field]) < 0 or (field != "num_prompts" and int(p[field]) < 1):
            raise ValueError(f"config.opd.probe.{field} must be >= 1 (num_prompts >= 0), got {p[field]}")
    if not float(p.get("temperature", 0.0)) >= 0:
        raise ValueError(f"config.opd.probe.temperature must be >= 0, got {p.temperature}")
    m = o.mesh
    sizes = [int(m.data), int(m.fsdp), int(m.tensor)]
    if sizes[1] < 1 or sizes[2] < 1 or (sizes[0] < 1 and sizes[0] != -1):
        raise ValueError(f"config.opd.mesh: data must be -1 or >= 1, fsdp and tensor >= 1; got {sizes}")


def opd_config(o: ml_collections.ConfigDict):
    from opd.training.opd_loss import OPDLossConfig
    from opd.training.opd_step import OPDConfig

    return OPDConfig(num_rounds=int(o.num_rounds), num_draft=int(o.num_draft),
                     rollout_temperature=float(o.rollout_temperature), loss=OPDLossConfig(**dict(o.loss)))


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
    from opd.data.builders import read_trajectory_shards

    return [{"prompt_ids": list(map(int, r["prompt_ids"])), "response_ids": list(map(int, r["response_ids"])),
             "prompt_set": r["prompt_set"], "prompt_id": r["prompt_id"]}
            for f in folders for r in read_trajectory_shards(f)]


def probe_prompts(p: ml_collections.ConfigDict) -> list:
    """The fixed held-out probe prompts: the *last* `num_prompts` of the prompt set (AlpacaEval:
    its held-out split), so they are not the first-N prompts the eval stage reports."""
    from opd.eval.harness import load_eval_records

    if int(p.num_prompts) == 0:
        return []
    _, records = load_eval_records(str(p.prompt_set))
    if int(p.num_prompts) > len(records):
        raise ValueError(f"config.opd.probe.num_prompts = {p.num_prompts} but {p.prompt_set!r} has {len(records)}")
    return [list(r["prompt_ids"]) if "prompt_ids" in r else r["turns"][0] for r in records[-int(p.num_prompts):]]


def probe_tau(target, drafter, prompts, p: ml_collections.ConfigDict, num_draft: int, seed: int = 0) -> dict:
    """Speculative decoding of the probe prompts at `p.temperature` (fixed seed):
    {"probe_tau", "probe_acceptance"}."""
    from opd.decoding.speculative import speculative_generate

    out = speculative_generate(target, drafter, prompts, max_new_tokens=int(p.max_new_tokens),
                               num_draft_tokens=num_draft, temperature=float(p.get("temperature", 0.0)),
                               batch_size=int(p.batch_size), seed=seed)
    return {"probe_tau": float(out.stats["tau"]),
            "probe_acceptance": np.asarray(out.stats["acceptance_by_offset"], np.float64)}


# ----------------------------------------------------------------------------- stage


def init_flops(path: str) -> int:
    """Cumulative training FLOPs of an exported drafter (its export.json), else 0."""
    meta = os.path.join(path, "export.json")
    if not os.path.isfile(meta):
        return 0
    with open(meta) as f:
        return int(json.load(f).get("flops", 0))


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


def stage_opd(config, workdir: str):
    """Trains the warm-up drafter with Draft-OPD to `config.opd.num_steps`, resuming."""
    from opd.decoding import batching
    from opd.pipeline import load_target_from_config
    from opd.training import checkpoint as ckpt
    from opd.training import flops, optim, sft
    from opd.training.loop import train_loop
    from opd.training.metrics import MetricsWriter
    from opd.training.opd_step import batch_shardings, make_opd_step

    o = config.opd
    kind = config.drafter.kind
    stage_dir = os.path.join(workdir, str(o.name), kind)
    os.makedirs(stage_dir, exist_ok=True)
    target = load_target_from_config(config)
    run_config = copy.deepcopy(config)  # the fingerprint: drafter kind + the warm-up it starts from
    with run_config.unlocked():
        run_config.drafter = ml_collections.ConfigDict({"kind": kind, "init": str(o.init)})
    manager = ckpt.make_manager(os.path.join(stage_dir, "checkpoints"), max_to_keep=int(o.keep_checkpoints))
    sft_stage.check_run(run_config, target, stage_dir)
    if manager.latest_step() is not None and manager.latest_step() >= int(o.num_steps):
        logging.info("opd: already at step %d (config.opd.num_steps = %d)", manager.latest_step(), o.num_steps)
        return os.path.join(stage_dir, "checkpoints")
    folders = sft_stage.trajectory_folders(ml_collections.ConfigDict({"sft": {"data": tuple(o.data)}}), workdir)
    drafter = sft_stage.initial_drafter(run_config, workdir, target, folders, stage_dir)
    spec, cfg = drafter.spec, opd_config(o)
    if hasattr(spec, "check_num_draft"):
        spec.check_num_draft(cfg.num_draft)

    mesh = sft_stage.stage_mesh(o, "opd")
    ocfg = optim.OptimConfig.from_config({"total_steps": int(o.num_steps), **dict(o.optimizer)})
    optimizer = optim.make_optimizer(ocfg)
    shardings = sft.make_shardings(mesh, spec, target.config, optimizer)
    trainable, frozen = sft.split_drafter_params(drafter)
    abstract = ckpt.abstract_state(spec, optimizer, shardings)

    batches = PromptBatches(prompt_records(folders), int(o.prompt_len), int(o.batch_size), int(config.seed), o.prefix)
    if batches.dropped:
        logging.warning("opd: %d of %d trajectories have prompts longer than prompt_len %d; skipped",
                        batches.dropped, batches.dropped + len(batches.records), o.prompt_len)
    restored = sft_stage.restore_state(manager, abstract, manager.directory)
    if restored is None:
        state = sft.init_train_state(trainable, optimizer, shardings, seed=int(config.seed))
        counters = {"flops": init_flops(sft_stage.resolve(str(o.init), workdir))}  # the warm-up's FLOPs
        logging.info("opd: new run from %s (%.3g FLOPs so far) on %d prompts", o.init, counters["flops"],
                     len(batches.records))
    else:
        state, data = restored
        batches.set_state(data["iterator"])
        counters = dict(data.get("counters", {}))
        logging.info("opd: resumed at step %d from %s", int(state.step), manager.directory)
    if shd.is_main_process():
        with open(os.path.join(stage_dir, "opd_config.json"), "w") as f:
            json.dump(json.loads(o.to_json_best_effort()), f, indent=2)

    writer = MetricsWriter(stage_dir, tensorboard=bool(o.tensorboard))
    writer.truncate_after(int(state.step))
    step = make_opd_step(spec, target.config, optimizer, shardings, cfg, int(o.prompt_len), mesh)
    eos = jax.device_put(batching.eos_array(batching.resolve_eos(target, None)), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    frozen_dev = jax.device_put(frozen, shardings.drafter_frozen)
    target_params = jax.device_put(target.params, shardings.target)
    step_fn = lambda st, tp, fr, b: step(st, tp, fr, b, eos)
    batch_sh = batch_shardings(mesh)
    place = lambda b: jax.device_put({k: jnp.asarray(b[k]) for k in batch_sh}, batch_sh)
    S = cfg.cache_len(int(o.prompt_len))
    step_flops = lambda b: flops.opd_step_flops(spec, target.config, int(o.batch_size), int(o.prompt_len),
                                                cfg.num_rounds, cfg.num_draft, S, cfg.loss.error_anchor_weight > 0)

    probes = probe_prompts(o.probe)
    hooks = []
    if probes:
        def probe(done, st):
            d = sft_stage.with_trainable(drafter, shd.to_host(st.params))
            return probe_tau(target, d, probes, o.probe, cfg.num_draft, seed=int(config.seed))

        hooks.append((int(o.probe.every), probe))
        if int(state.step) == 0:
            writer.write(0, {**probe(0, state), "flops": float(counters["flops"])})
    on_step = None
    if o.save_rollouts:  # every process gathers the rows (a collective); process 0 writes them
        out = os.path.join(stage_dir, "rollouts")
        on_step = lambda done, b, private: _write_rollouts(out, done, b, private, str(config.target.path))
    try:
        state = train_loop(
            step_fn, state, (target_params, frozen_dev), batches, num_steps=int(o.num_steps), manager=manager,
            place_batch=place, step_flops=step_flops, counters=counters,
            data_state=lambda: {"iterator": batches.get_state()}, writer=writer,
            lr_fn=optim.learning_rate_schedule(ocfg), log_every=int(o.log_every), save_every=int(o.save_every),
            hooks=hooks, step_tokens=lambda b, m: int(m["committed_tokens"]), on_step=on_step,
            desc=f"opd {kind}")
    finally:
        writer.close()
    logging.info("opd: done at step %d; %.3g cumulative training FLOPs", int(state.step), counters["flops"])
    return os.path.join(stage_dir, "checkpoints")
