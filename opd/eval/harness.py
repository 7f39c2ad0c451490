"""Evaluation harness: speculative decoding vs autoregressive decoding on a prompt set.

`evaluate` runs `opd.speculative_generate` and `opd.generate` side by side in this process on
the same prompts (chunk by chunk, alternating, after a warm-up that compiles every shape both
of them will use, so compile time is excluded), and returns the metrics of DESIGN §3:
τ, acceptance by offset, speed-up, tokens/s, target forwards, and, at temperature 0, whether
the speculative tokens equal the autoregressive ones for every prompt. `write_eval` writes
`metrics.json`, `metrics.md` and the τ / acceptance plots.

Prompt sources: "mtbench" (turn 1; `both_turns=True` adds turn 2 built from the model's own
first answer through the chat template), "humaneval" (`prompt` as the user message),
"alpacaeval" (held-out split by default, see `opd.data.splits`), a `.jsonl` path (records
with `turns` / `prompt` / `instruction` text, or pre-tokenised `prompt_ids`), or a list of
records / strings / token-id lists.

Axis letters: K draft tokens.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, NamedTuple, Optional, Sequence, Union

from absl import logging
import numpy as np

from opd.data.assets import load_prompt_set
from opd.data.splits import alpaca_split
from opd.decoding import batching
from opd.decoding.generate import GenerateOutput, generate
from opd.decoding.speculative import speculative_generate
from opd.drafters import registry
from opd.eval.report import markdown_table, provenance
PromptSet = Union[str, Sequence[Any]]


# ----------------------------------------------------------------------------- prompts


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_eval_records(prompt_set: PromptSet, num_prompts: Optional[int] = None, heldout_split: bool = True) -> tuple[str, list[dict]]:
    """Resolves a prompt source to (name, records); each record has `id` and either
    `prompt_ids` (token ids) or `turns` (user messages).

    AlpacaEval is restricted to its held-out split unless `heldout_split=False`.
    """
    if isinstance(prompt_set, str):
        name = prompt_set
        if prompt_set.endswith(".jsonl") and os.path.isfile(prompt_set):
            rows = _read_jsonl(prompt_set)
            if rows and all("prompt_ids" in r for r in rows):
                records = [{**r, "id": str(r.get("id", i))} for i, r in enumerate(rows)]
            else:
                records = load_prompt_set(prompt_set)
        else:
            records = load_prompt_set(prompt_set)
            if prompt_set == "alpacaeval" and heldout_split:
                records = alpaca_split(records, "heldout")
    else:
        name = "custom"
        records = []
        for i, p in enumerate(prompt_set):
            if isinstance(p, dict):
                records.append({**p, "id": str(p.get("id", i))})
            elif isinstance(p, str):
                records.append({"id": str(i), "turns": [p]})
            else:
                records.append({"id": str(i), "prompt_ids": [int(t) for t in p]})
    if num_prompts is not None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if num_prompts > len(records):
            raise ValueError(f"num_prompts={num_prompts} but prompt set {name!r} has only {len(records)} prompts")
        records = records[:num_prompts]
    for r in records:
        if "prompt_ids" not in r and not r.get("turns"):
            raise ValueError(f"prompt record {r['id']!r} of {name!r} has neither 'prompt_ids' nor 'turns'")
    return name, records


def _first_turn_prompt(r: dict):
    return list(r["prompt_ids"]) if "prompt_ids" in r else r["turns"][0]


def _second_turn_ids(target, record: dict, first_answer_ids: Sequence[int]) -> list[int]:
    tok = target.tokenizer
    if tok is None:
        raise ValueError("both_turns needs the target's tokenizer and chat template (this target has none)")
    messages = [
        {"role": "user", "content": record["turns"][0]},
        {"role": "assistant", "content": tok.decode(first_answer_ids)},
        {"role": "user", "content": record["turns"][1]},
    ]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


# ----------------------------------------------------------------------------- measurement


def _accept_hist(stats: dict, K: int) -> np.ndarray:
    """Rounds that accepted exactly n drafts, n = 0..K (zeros for autoregressive stats)."""
    return np.asarray(stats.get("accept_hist") or [0] * (K + 1), np.int64)


def _shape_key(chunk) -> tuple:
    return batching.next_pow2(len(chunk)), batching.bucket_length(max(len(p) for p in chunk))


class Side(NamedTuple):
    """One drafter of an evaluation: decoded on the same prompts, in the same run, as the
    shared autoregressive timing (and every other side)."""

    drafter: Any  # an opd.Drafter
    name: str  # a registry kind, recorded as `drafter`
    num_draft_tokens: int  # K
    training: str = "none"  # how the drafter was trained (recorded as given)
    training_flops: float = 0.0


class _BatchResult(NamedTuple):
    """One decoding call of each method on the same prompts (seconds: median over repeats)."""

    prompts: list
    ar: Any  # GenerateOutput
    ar_seconds: float
    spec: list  # per side: GenerateOutput
    spec_seconds: list  # per side

    def summary(self, side: Optional[int] = None) -> dict:
        out = self.ar if side is None else self.spec[side]
        return {"prompt_lengths": [len(p) for p in self.prompts], "ar_seconds": self.ar_seconds,
                "ar_target_forwards": self.ar.stats["target_forwards"],
                "seconds": self.ar_seconds if side is None else self.spec_seconds[side],
                "generated_tokens": out.stats["generated_tokens"], "target_forwards": out.stats["target_forwards"],
                "verify_rounds": out.stats.get("verify_rounds", 0)}


class _Runner:
    """Runs AR and each side's speculative decoding chunk by chunk with shared settings."""

    def __init__(self, target, sides: Sequence[Side], *, temperature, top_k, top_p, max_new_tokens, seed,
                 eos_token_ids, repeats, desc="eval"):
        self.target, self.sides, self.desc = target, list(sides), desc
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_ids=eos_token_ids)
        self.seed, self.repeats = seed, repeats
        self.compiled: set = set()
        self.warmup_seconds = 0.0

    def ar(self, chunk, ci):
        return generate(self.target, chunk, seed=self.seed + ci, batch_size=len(chunk), **self.kw)

    def spec(self, chunk, ci, side: int = 0):
        d = self.sides[side]
        return speculative_generate(self.target, d.drafter, chunk, num_draft_tokens=d.num_draft_tokens,
                                    seed=self.seed + ci, batch_size=len(chunk), **self.kw)

    def run(self, chunks, journal: Optional["_Journal"] = None, tag: str = "") -> list["_BatchResult"]:
        """Progress: a bar over the warm-up's new shapes, then one over the timed batches with the
        tokens/s of every method so far. With a `journal`, chunks it holds (under `tag`) are
        read back instead of decoded, and every new chunk is appended to it once timed."""
        from tqdm import tqdm

        done = journal.done(tag, chunks) if journal is not None else {}
        if done:
            logging.info("%s: %d of %d batches read back from %s", self.desc, len(done), len(chunks), journal.path)
        new = {}  # warm-up: compile every (batch, prompt-length) bucket once for every method
        for ci, chunk in enumerate(chunks):
            if ci not in done:
                new.setdefault(_shape_key(chunk), chunk)
        new = {k: c for k, c in new.items() if k not in self.compiled}
        for key, chunk in tqdm(new.items(), desc=f"{self.desc}: compiling", unit="shape", disable=not new):
            self.compiled.add(key)
            self.warmup_seconds += self.ar(chunk, 0).stats["seconds"]
            for i in range(len(self.sides)):
                self.warmup_seconds += self.spec(chunk, 0, i).stats["seconds"]
        labels = ["ar"] + [d.name for d in self.sides]
        results, tokens, seconds = [], [0] * len(labels), [0.0] * len(labels)
        bar = tqdm(total=len(chunks), desc=self.desc, unit="batch", disable=not chunks)
        for ci, chunk in enumerate(chunks):
            if ci in done:
                res = done[ci]
            else:
                runs = [[] for _ in labels]
                for _ in range(self.repeats):  # alternate so machine-load drift hits every method alike
                    runs[0].append(self.ar(chunk, ci))
                    for i in range(len(self.sides)):
                        runs[i + 1].append(self.spec(chunk, ci, i))
                med = [statistics.median(o.stats["seconds"] for o in r) for r in runs]
                res = _BatchResult(chunk, runs[0][0], med[0], [r[0] for r in runs[1:]], med[1:])
                if journal is not None:
                    journal.append(tag, ci, res)
            results.append(res)
            for j, (out, sec) in enumerate(zip([res.ar] + res.spec, [res.ar_seconds] + res.spec_seconds)):
                tokens[j] += out.stats["generated_tokens"]
                seconds[j] += sec
            bar.set_postfix_str(", ".join(f"{label} {tokens[j] / seconds[j]:.1f} tok/s"
                                          for j, label in enumerate(labels) if seconds[j] > 0))
            bar.update()
        bar.close()
        return results


class _Journal:
    """Append-only JSON lines of finished batches, so an interrupted evaluation resumes at its
    next batch (each batch's methods were timed side by side in one process, so batches from
    different sessions still give fair ratios). The first line holds the settings; a journal
    written with other settings is moved aside (`.stale`) and the run starts over."""

    def __init__(self, path: str, settings: dict):
        self.path = path
        self.batches: dict = {}
        header = {"settings": settings}
        if os.path.exists(path):
            lines = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        lines.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut short by a kill: that batch is redone
                        break
            if lines and lines[0] == header:
                self.batches = {(r["tag"], r["ci"]): r for r in lines[1:]}
                with open(path, "w", encoding="utf-8") as f:  # drop a torn last line
                    f.writelines(json.dumps(r) + "\n" for r in lines)
                return
            logging.warning("eval journal %s was written with other settings; moved to %s.stale", path, path)
            os.replace(path, path + ".stale")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")

    def done(self, tag: str, chunks) -> dict:
        """{chunk index: _BatchResult} for the journal's batches of these exact prompts."""
        out = {}
        for ci, chunk in enumerate(chunks):
            r = self.batches.get((tag, ci))
            if r is not None and r["prompts"] == [list(map(int, p)) for p in chunk]:
                out[ci] = _BatchResult(chunk, GenerateOutput(r["ar"]["tokens"], r["ar"]["stats"]), r["ar_seconds"],
                                       [GenerateOutput(o["tokens"], o["stats"]) for o in r["spec"]], r["spec_seconds"])
        return out

    def append(self, tag: str, ci: int, res: "_BatchResult") -> None:
        def out(o):
            return {"tokens": [[int(t) for t in seq] for seq in o.tokens], "stats": o.stats}

        rec = {"tag": tag, "ci": ci, "prompts": [list(map(int, p)) for p in res.prompts], "ar": out(res.ar),
               "ar_seconds": res.ar_seconds, "spec": [out(o) for o in res.spec], "spec_seconds": res.spec_seconds}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _none_if_nan(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def evaluate(
    target,
    drafter=None,
    prompt_set: PromptSet = "mtbench",
    *,
    num_draft_tokens: int = 4,
    drafter_name: Optional[str] = None,
    training: str = "none",
    training_flops: float = 0,
    **kw,
) -> dict:
    """Speculative vs autoregressive decoding of a prompt set; returns the metrics dict.

    Args:
      target: an `opd.Target`.
      drafter: an `opd.Drafter`, or None to measure autoregressive decoding alone
        (then tau = speedup = 1 and num_draft_tokens = 0).
      prompt_set: a set name, a `.jsonl` path, or a list of records / strings / token-id lists.
      num_draft_tokens: K.
      drafter_name: recorded as `drafter` (default: the drafter's kind, or "none").
      training, training_flops: how the drafter was trained (recorded as given).
      **kw: `evaluate_side_by_side`'s settings (num_prompts, temperature, batch_size, ...).

    Returns:
      A JSON-able dict: tau, acceptance_by_offset, speedup (speculative tokens/s over
      autoregressive tokens/s; at T = 0 both produce the same tokens so it is also the
      wall-time ratio), tokens_per_second, target_forwards, generated_tokens, temperature,
      num_draft_tokens, batch_size, prompt_set, num_prompts, drafter, training,
      training_flops, greedy_matches_ar (bool at T = 0, None at T > 0), greedy_mismatches,
      round_accept_hist (verify rounds by accepted drafts 0..K), tau_per_batch (per chunk;
      per prompt at batch 1), per_batch (lengths, seconds, forwards of each decoding call) and
      the autoregressive side (ar_tokens_per_second, ...).
    """
    name = drafter_name or (drafter.kind if drafter is not None else "none")
    if (drafter is None) != (name == "none"):
        raise ValueError(f"drafter_name={name!r} does not match the drafter passed ({drafter!r})")
    sides = [] if drafter is None else [Side(drafter, name, int(num_draft_tokens), training, training_flops)]
    return evaluate_side_by_side(target, sides, prompt_set, **kw)[0]


def evaluate_side_by_side(
    target,
    sides: Sequence[Side],
    prompt_set: PromptSet = "mtbench",
    *,
    num_prompts: Optional[int] = None,
    temperature: float = 0.0,
    batch_size: int = 1,
    max_new_tokens: int = 128,
    seed: int = 0,
    both_turns: bool = False,
    heldout_split: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Optional[Sequence[int]] = None,
    repeats: int = 1,
    return_tokens: bool = False,
    journal: Optional[str] = None,
) -> list[dict]:
    """Every side's speculative decoding and one autoregressive decoding of a prompt set, chunk
    by chunk, alternating (after a warm-up that compiles every shape, so compile time is
    excluded); returns one metrics dict per side (`evaluate`'s), each with the same
    autoregressive measurement and `side_by_side` (the drafters timed in the run), or the
    autoregressive metrics alone (one dict) without sides.

    Args:
      sides: the drafters (`Side`): each is timed against the same autoregressive runs.
      num_prompts: first N prompts of the set (default: all).
      batch_size: prompts per decoding call, for every method.
      both_turns: also decode each record's second turn (MT-Bench), its prompt built from the
        model's own (autoregressive) first answer through the chat template.
      heldout_split: restrict AlpacaEval to its held-out split (default True).
      repeats: timed repetitions per chunk (median seconds is used).
      return_tokens: also return `tokens` (per sequence: the speculative output, or the
        autoregressive one without a drafter).
      journal: a `.jsonl` path: finished batches are appended to it and, on a rerun with the
        same settings, read back instead of decoded (resume after a kill or a session's end).
    """
    if batch_size < 1 or max_new_tokens < 1 or repeats < 1:
        raise ValueError(f"batch_size, max_new_tokens and repeats must be >= 1, got {batch_size}, {max_new_tokens}, {repeats}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    for d in sides:
        if d.name == "none" or d.name not in registry.names():
            raise ValueError(f"drafter name must be one of {registry.names()}, got {d.name!r}")
        if d.drafter is None:
            raise ValueError(f"side {d.name!r} has no drafter (evaluate autoregressive decoding with no sides)")
    greedy = temperature == 0.0
    set_name, records = load_eval_records(prompt_set, num_prompts, heldout_split)
    names = [d.name for d in sides] or ["none"]
    runner = _Runner(target, sides, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                     seed=seed, eos_token_ids=eos_token_ids, repeats=repeats,
                     desc=f"eval {'+'.join(names)} on {set_name}")

    def chunked(ids):
        return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]

    seq_ids = batching.encode_prompts(target, [_first_turn_prompt(r) for r in records])
    seq_names = [f"{r['id']}" for r in records]
    jr = None
    if journal is not None:
        jr = _Journal(journal, {"sides": [[d.name, d.num_draft_tokens, d.training] for d in sides],
                                "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p),
                                "batch_size": int(batch_size), "max_new_tokens": int(max_new_tokens),
                                "seed": int(seed), "repeats": int(repeats), "prompt_ids": seq_names,
                                "eos_token_ids": None if eos_token_ids is None else [int(t) for t in eos_token_ids]})
    results = runner.run(chunked(seq_ids), jr, "turn1")
    if both_turns:
        ar_first = [t for b in results for t in b.ar.tokens]
        two = [(r, a) for r, a in zip(records, ar_first) if len(r.get("turns", [])) >= 2]
        turn2 = [_second_turn_ids(target, r, a) for r, a in two]
        seq_ids += turn2
        seq_names += [f"{r['id']}/turn2" for r, _ in two]
        results += runner.run(chunked(turn2), jr, "turn2")

    ar_tokens = [t for b in results for t in b.ar.tokens]
    ar_seconds = sum(b.ar_seconds for b in results)
    ar_generated = sum(len(t) for t in ar_tokens)
    ar_forwards = sum(b.ar.stats["target_forwards"] for b in results)
    base: dict[str, Any] = {
        "prompt_set": set_name, "num_prompts": len(records), "num_sequences": len(seq_ids),
        "turns": 2 if both_turns else 1, "prompt_ids": seq_names,
        "heldout_split": bool(heldout_split) if set_name == "alpacaeval" else None,
        "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p),
        "batch_size": int(batch_size), "max_new_tokens": int(max_new_tokens),
        "seed": int(seed), "repeats": int(repeats), "model": getattr(target, "source", None),
        "ar_seconds": ar_seconds, "ar_generated_tokens": ar_generated, "ar_target_forwards": ar_forwards,
        "ar_tokens_per_second": ar_generated / ar_seconds if ar_seconds > 0 else None,
        "warmup_seconds": runner.warmup_seconds, "side_by_side": names,
    }
    if not sides:
        m = {"drafter": "none", "training": "none", "training_flops": 0.0, **base, "num_draft_tokens": 0,
             "per_batch": [b.summary() for b in results]}
        m.update(tau=1.0, acceptance_by_offset=[], speedup=1.0, tokens_per_second=m["ar_tokens_per_second"],
                 target_forwards=ar_forwards, generated_tokens=ar_generated, seconds=ar_seconds, verify_rounds=0,
                 round_accept_hist=[], tau_per_batch=[1.0] * len(results),
                 greedy_matches_ar=True if greedy else None, greedy_mismatches=[])
        if return_tokens:
            m["tokens"] = ar_tokens
        return [m]
    return [_side_metrics(i, d, base, results, ar_tokens, seq_names, greedy, return_tokens)
            for i, d in enumerate(sides)]


def _side_metrics(i: int, d: Side, base: dict, results, ar_tokens, seq_names, greedy: bool, return_tokens: bool) -> dict:
    """The metrics of side `i` (its speculative runs) against the shared autoregressive ones."""
    K = d.num_draft_tokens
    m = {"drafter": d.name, "training": d.training, "training_flops": float(d.training_flops), **base,
         "num_draft_tokens": K, "per_batch": [b.summary(i) for b in results]}
    spec = [b.spec[i] for b in results]
    spec_tokens = [t for o in spec for t in o.tokens]
    spec_seconds = sum(b.spec_seconds[i] for b in results)
    hist = sum(_accept_hist(o.stats, K) for o in spec)
    rounds = int(hist.sum())
    committed = sum(int(o.stats.get("committed_tokens", 0)) for o in spec)
    reached = hist[::-1].cumsum()[::-1]
    generated = sum(len(t) for t in spec_tokens)
    tps = generated / spec_seconds if spec_seconds > 0 else None
    mismatches = []
    if greedy:
        for j, (s, a) in enumerate(zip(spec_tokens, ar_tokens)):
            if s != a:
                pos = next((k for k, (x, y) in enumerate(zip(s, a)) if x != y), min(len(s), len(a)))
                mismatches.append({"prompt_index": j, "id": seq_names[j], "position": pos,
                                   "speculative": s[pos] if pos < len(s) else None, "ar": a[pos] if pos < len(a) else None})
        if mismatches:
            first = mismatches[0]
            logging.error(
                "GREEDY MISMATCH: speculative output differs from autoregressive output for %d of %d sequences "
                "(%s, %s); first: prompt %d (id %s) at position %d: speculative %s vs autoregressive %s",
                len(mismatches), len(spec_tokens), d.name, m["prompt_set"], first["prompt_index"], first["id"],
                first["position"], first["speculative"], first["ar"])
    m.update(
        tau=committed / rounds if rounds else None,
        acceptance_by_offset=[float(reached[k + 1] / reached[k]) if reached[k] else None for k in range(K)],
        speedup=(tps / m["ar_tokens_per_second"]) if tps and m["ar_tokens_per_second"] else None,
        tokens_per_second=tps,
        target_forwards=sum(o.stats["target_forwards"] for o in spec),
        generated_tokens=generated, seconds=spec_seconds, verify_rounds=rounds,
        round_accept_hist=[int(x) for x in hist],
        tau_per_batch=[_none_if_nan(float(o.stats["tau"])) for o in spec],
        greedy_matches_ar=(not mismatches) if greedy else None,
        greedy_mismatches=mismatches,
    )
    if return_tokens:
        m["tokens"] = spec_tokens
    return m


# ----------------------------------------------------------------------------- files

SUMMARY_COLUMNS = ("drafter", "training", "prompt_set", "num_prompts", "temperature", "num_draft_tokens", "batch_size",
                   "tau", "speedup", "tokens_per_second", "ar_tokens_per_second", "target_forwards",
                   "generated_tokens", "greedy_matches_ar")


def write_eval(metrics: dict, out_dir: str) -> str:
    """Writes `metrics.json` (+ provenance), `metrics.md`, `tau_hist.png`, `acceptance_by_offset.png`.

    `metrics.json` is written last (atomically): its presence marks a finished run.
    """
    os.makedirs(out_dir, exist_ok=True)
    _plot_tau(metrics, os.path.join(out_dir, "tau_hist.png"))
    _plot_acceptance(metrics, os.path.join(out_dir, "acceptance_by_offset.png"))
    prov = provenance()
    K = metrics["num_draft_tokens"]
    md = [f"# eval: {metrics['drafter']} on {metrics['prompt_set']}\n", markdown_table([metrics], SUMMARY_COLUMNS)]
    if K:
        md.append("\nAcceptance by offset (P(d_i accepted | d_<i accepted)):\n\n")
        md.append(markdown_table([{f"d{i + 1}": a for i, a in enumerate(metrics["acceptance_by_offset"])}],
                                 [f"d{i + 1}" for i in range(K)], floatfmt="{:.3f}"))
    if metrics.get("greedy_mismatches"):
        md.append(f"\n**Greedy mismatch** in {len(metrics['greedy_mismatches'])} sequence(s): "
                  f"{metrics['greedy_mismatches'][:5]}\n")
    md.append(f"\nCommand: `{prov['command']}`  \nCommit: `{prov['git_commit']}`{' (dirty)' if prov['git_dirty'] else ''}  \n"
              f"Machine: {prov['machine']['platform']}, {prov['machine']['cpu_count']} CPUs, jax {prov['machine']['jax']}  \n"
              f"Date: {prov['date_utc']}\n")
    with open(os.path.join(out_dir, "metrics.md"), "w") as f:
        f.write("".join(md))
    tmp = os.path.join(out_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump({**metrics, "provenance": prov}, f, indent=2, allow_nan=False)
    os.replace(tmp, os.path.join(out_dir, "metrics.json"))
    return out_dir


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(m: dict) -> str:
    return f"{m['drafter']} on {m['prompt_set']}, T={m['temperature']:g}, K={m['num_draft_tokens']}, batch {m['batch_size']}"


def _plot_tau(m: dict, path: str) -> None:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    hist = m.get("round_accept_hist") or []
    if hist:
        a.bar(np.arange(1, len(hist) + 1), hist)
        a.set_xticks(np.arange(1, len(hist) + 1))
    a.set_xlabel("tokens committed in a verify round (accepted + 1)")
    a.set_ylabel("verify rounds")
    taus = [t for t in m.get("tau_per_batch") or [] if t is not None]
    if taus:
        b.hist(taus, bins=min(20, max(1, len(taus))), edgecolor="white")
    b.set_xlabel("τ per prompt" if m["batch_size"] == 1 else f"τ per batch of {m['batch_size']}")
    b.set_ylabel("count")
    fig.suptitle(f"τ = {m['tau'] if m['tau'] is None else round(m['tau'], 3)}; {_title(m)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_acceptance(m: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    acc = [np.nan if a is None else a for a in m.get("acceptance_by_offset") or []]
    if acc:
        ax.plot(np.arange(1, len(acc) + 1), acc, "o-")
        ax.set_xticks(np.arange(1, len(acc) + 1))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("draft offset i")
    ax.set_ylabel("P(d_i accepted | d_<i accepted)")
    ax.set_title(_title(m), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
