"""Regenerate training data: the target answers training prompts; answers go to JSONL shards.

Shards hold the trajectory records that `opd.data.builders.TrajectoryBuilder` reads (format
in its module docstring). Shard i covers prompts [i * shard_size, (i + 1) * shard_size) of
the (deterministically ordered) prompt list; process p of P writes the shards with
i % P == p, so data-parallel hosts split the work without talking to each other. A shard is
written to a temporary name and renamed when complete: an interrupted run resumes by
skipping the shards that exist. Each shard written appends its generation speed (tokens,
seconds, tokens/s, target forwards) to `<out_dir>.metrics.jsonl`.

Greedy decoding with the n-gram drafter is lossless (same tokens as autoregressive decoding)
and faster on code; at T > 0 the output distribution is still exactly the target's.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from absl import logging

from opd.data import splits, text_sources
from opd.decoding.generate import generate
from opd.decoding.speculative import speculative_generate

SOURCES = ("alpacaeval", "stdlib_code", "pydocs")


def training_prompts(source: str, num_prompts: Optional[int] = None) -> list[dict]:
    """Records (`id`, `turns`) of a training prompt source; evaluation prompts are removed.

    source: "alpacaeval" (its train split), "stdlib_code", "pydocs" (opd.data.text_sources)
    or a local .jsonl file.
    """
    if source == "stdlib_code":
        records = text_sources.stdlib_code_prompts(max_prompts=num_prompts)
    elif source == "pydocs":
        records = text_sources.pydocs_prompts(max_prompts=num_prompts)
    elif source == "alpacaeval" or source.endswith(".jsonl") or source in splits.EVAL_ONLY_SETS:
        records = splits.training_records(source)  # refuses the evaluation-only sets
    else:
        raise ValueError(f"unknown training prompt source {source!r}; use one of {SOURCES} or a .jsonl file")
    records = splits.drop_eval_prompts(records)
    return records[:num_prompts] if num_prompts is not None else records


def metrics_path(out_dir: str) -> str:
    """Per-shard generation metrics, next to (not inside) the shard folder: `<out_dir>.metrics.jsonl`."""
    return os.path.normpath(out_dir) + ".metrics.jsonl"


def shard_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"shard-{index:05d}.jsonl")


def write_shard(path: str, rows: Sequence[dict]) -> None:
    """Writes trajectory records (one JSON object a line) atomically: to `path + ".tmp"`, synced,
    then renamed, so a shard that exists is complete (how a resumed run knows what to skip)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """A trajectory's `prompt_ids`: one user turn in the target's chat template, generation
    header included (the prompt the target answers)."""
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def regenerate(
    target,
    records: Sequence[dict],
    out_dir: str,
    *,
    prompt_set: str,
    target_name: str,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 4,
    shard_size: int = 64,
    seed: int = 0,
    drafter=None,
    num_draft_tokens: int = 4,
    process_index: int = 0,
    process_count: int = 1,
) -> list[str]:
    """Writes this process's missing shards; returns the paths of all of its shards."""
    from tqdm import tqdm

    if shard_size < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"shard_size, batch_size and max_new_tokens must be >= 1, got {shard_size}, {batch_size}, {max_new_tokens}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    if target.tokenizer is None:
        raise ValueError("regenerate needs a target with a tokenizer and chat template")
    os.makedirs(out_dir, exist_ok=True)
    tok = target.tokenizer
    eos = tuple(target.eos_token_ids)
    mine = [i for i in range(-(-len(records) // shard_size)) if i % process_count == process_index]
    todo = [i for i in mine if not os.path.exists(shard_path(out_dir, i))]
    logging.info("regenerate: %d of this process's %d shards to write into %s", len(todo), len(mine), out_dir)
    bar = tqdm(todo, desc="regenerate shards", unit="shard")
    for i in bar:
        t0 = time.perf_counter()
        part = records[i * shard_size : (i + 1) * shard_size]
        prompt_ids = [chat_prompt_ids(tok, r["turns"][0]) for r in part]
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i, batch_size=batch_size)
        if drafter is None:
            out = generate(target, prompt_ids, **kw)
        else:
            out = speculative_generate(target, drafter, prompt_ids, num_draft_tokens=num_draft_tokens, **kw)
        # Outputs are cut before EOS; a row that stopped early ended with the primary EOS.
        write_shard(shard_path(out_dir, i), [
            {"prompt_id": str(r["id"]), "prompt_set": prompt_set, "target": target_name, "prompt_ids": ids,
             "response_ids": list(resp) + ([eos[0]] if len(resp) < max_new_tokens and eos else [])}
            for r, ids, resp in zip(part, prompt_ids, out.tokens)])
        seconds = time.perf_counter() - t0
        tokens = int(out.stats["generated_tokens"])
        bar.set_postfix(tok_s=f"{tokens / seconds:.1f}")
        with open(metrics_path(out_dir), "a") as f:  # one line per shard written
            f.write(json.dumps({"shard": i, "prompts": len(part), "generated_tokens": tokens, "seconds": seconds,
                                "tokens_per_s": tokens / seconds, "target_forwards": out.stats.get("target_forwards"),
                                "tau": out.stats.get("tau")}) + "\n")
    return [shard_path(out_dir, i) for i in mine]
