"""Launcher stages. `run(config, workdir)` executes `config.stages` in order.

Every stage writes only under `workdir/<stage>/` and skips work whose outputs are already
there, so an interrupted launch resumes by running the same command again.
"""

from __future__ import annotations

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
    return os.path.expanduser(spec)


def load_target_from_config(config: ml_collections.ConfigDict):
    from opd.target import load_target

    t = config.target
    return load_target(resolve_path(t.path), dtype=t.dtype, scan_layers=t.scan_layers)


def stage_fetch_assets(config, workdir: str) -> dict:
    """Fetches (or finds cached) every asset the config names; writes their paths."""
    from opd.data.assets import asset_path

    paths = {name: asset_path(name) for name in config.assets}
    _write_json(os.path.join(workdir, "fetch_assets", "paths.json"), paths)
    for name, p in paths.items():
        logging.info("asset %s: %s (%.1f MB)", name, p, os.path.getsize(p) / 1e6)
    return paths


def stage_chat(config, workdir: str) -> list:
    """Answers `config.chat.prompts` (strings) or the first turns of a prompt set with the target."""
    from opd.data.assets import load_prompt_set
    from opd.decoding.generate import generate

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


STAGES: dict[str, Callable] = {
    "fetch_assets": stage_fetch_assets,
    "chat": stage_chat,
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks config values before any work starts; raises ValueError naming the field."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in config.stages; available: {sorted(STAGES)}")
    if config.target.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.target.dtype must be float32 or bfloat16, got {config.target.dtype!r}")
    if "chat" in config.stages:
        c = config.chat
        for field in ("num_prompts", "batch_size", "max_new_tokens"):
            if int(c[field]) < 1:
                raise ValueError(f"config.chat.{field} must be >= 1, got {c[field]}")
        if not c.temperature >= 0:
            raise ValueError(f"config.chat.temperature must be >= 0, got {c.temperature}")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    for name in config.stages:
        logging.info("=== stage %s ===", name)
        STAGES[name](config, workdir)


def _print_chat(records) -> None:
    for r in records:
        print(f"\n>>> {r['prompt']}\n{r['response']}")


def _write_json(path: str, obj) -> None:
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
