"""Result files for benchmarks: JSON + markdown table + provenance (command, commit, machine)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from typing import Sequence

from opd.drafters import registry
from opd.paths import read_jsonl

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments", "results")


def provenance() -> dict:
    """Exact command, git commit (+dirty flag), machine and library versions."""
    import jax

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=os.path.dirname(RESULTS_ROOT), timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()],
        },
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str], floatfmt: str = "{:.2f}") -> str:
    def fmt(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, payload: dict, table_md: str, out_dir: str | None = None) -> str:
    """Writes `results.json` (payload + provenance) and `results.md` under experiments/results/<name>/."""
    out_dir = out_dir or os.path.join(RESULTS_ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    prov = provenance()
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**payload, "provenance": prov}, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# {name}\n\n{table_md}\n")
        f.write(f"Command: `{prov['command']}`  \nCommit: `{prov['git_commit']}`{' (dirty)' if prov['git_dirty'] else ''}  \n")
        m = prov["machine"]
        f.write(f"Machine: {m['platform']}, {m['cpu_count']} CPUs, jax {m['jax']} on {', '.join(m['jax_devices'])}  \nDate: {prov['date_utc']}\n")
    return out_dir


# ----------------------------------------------------------------------------- experiment reports

SUMMARY_ROW_FIELDS = ("run", "drafter", "method", "training_flops", "tau", "speedup", "prompt_set", "temperature",
                      "batch_size", "num_draft_tokens", "num_prompts", "max_new_tokens", "seed", "tokens_per_second",
                      "ar_tokens_per_second", "greedy_matches_ar", "acceptance_by_offset")


def summary_row(run: str, metrics: dict) -> dict:
    """One row of an experiment's summary from an eval run's metrics.json: `method` is the
    training stage that made the drafter ("sft", "opd", "sft_cont", ...; "untrained" for a
    fresh one, "-" for drafters that are not trained)."""
    source = str(metrics.get("training", "none")).split(" (")[0]
    method = source if source != "none" else ("untrained" if metrics["drafter"] in registry.names(trainable=True) else "-")
    row = {k: metrics.get(k) for k in SUMMARY_ROW_FIELDS if k not in ("run", "method")}
    sem = tau_standard_error(metrics)
    ci = None if sem is None or row["tau"] is None else [row["tau"] - 1.96 * sem, row["tau"] + 1.96 * sem]
    return {"run": run, "method": method, **row, "tau_sem": sem, "tau_ci95": ci}


def tau_standard_error(metrics: dict):
    """Standard error of τ = Σ committed / Σ rounds over the run's batches (prompts at batch 1),
    each batch a cluster: the ratio estimator's linearised variance,
    Σ (c_i − τ r_i)² / (n (n − 1) r̄²). Batches without rounds recorded count equally
    (then it is the standard error of the mean of the per-batch τ). None below 2 batches."""
    taus = metrics.get("tau_per_batch") or []
    per = metrics.get("per_batch") or []
    rounds = [b.get("verify_rounds") for b in per] if len(per) == len(taus) else [1] * len(taus)
    pairs = [(t * r, r) for t, r in zip(taus, rounds) if t is not None and r]
    n = len(pairs)
    if n < 2:
        return None
    c_sum, r_sum = sum(c for c, _ in pairs), sum(r for _, r in pairs)
    tau = c_sum / r_sum
    var = sum((c - tau * r) ** 2 for c, r in pairs) / (n * (n - 1)) / (r_sum / n) ** 2
    return math.sqrt(var)


def autoregressive_rows(rows: Sequence[dict]) -> list[dict]:
    """The "no drafter" rows: for each (prompt set, temperature, batch) the autoregressive
    throughput measured in the same runs (the reference each speed-up divides by): their mean,
    and in `ar_timings` the distinct timings (more than one when rows were timed in separate
    runs, e.g. a table that spans sessions, whose speed-ups are then not side by side)."""
    groups: dict = {}
    for r in rows:
        if r.get("ar_tokens_per_second"):
            groups.setdefault((r["prompt_set"], r["temperature"], r["batch_size"]), []).append(r["ar_tokens_per_second"])
    return [{"run": "ar", "drafter": "none", "method": "-", "training_flops": 0.0, "tau": 1.0, "speedup": 1.0,
             "prompt_set": ps, "temperature": t, "batch_size": b, "tokens_per_second": sum(v) / len(v),
             "ar_tokens_per_second": sum(v) / len(v), "ar_timings": sorted(set(v))}
            for (ps, t, b), v in sorted(groups.items())]


def main_tables(rows: Sequence[dict]) -> str:
    """Markdown: one table per (temperature, batch size); a row per (drafter, method), a column
    per prompt set holding "τ / speed-up×"."""
    out = []
    settings = sorted({(r["temperature"], r["batch_size"]) for r in rows})
    sets = list(dict.fromkeys([r["prompt_set"] for r in rows if r["drafter"] != "none"] + [r["prompt_set"] for r in rows]))
    for t, b in settings:
        sub = [r for r in rows if (r["temperature"], r["batch_size"]) == (t, b)]
        keys = list(dict.fromkeys((r["drafter"], r["method"]) for r in sub))
        table = []
        for d, m in keys:
            line = {"drafter": d, "method": m}
            for r in sub:
                if (r["drafter"], r["method"]) == (d, m):
                    line["train PFLOPs"] = f"{(r.get('training_flops') or 0) / 1e15:.3f}"
                    tau, sp = r.get("tau"), r.get("speedup")
                    ci = r.get("tau_ci95")
                    pm = f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
                    if d == "none":  # the reference: its measured throughput
                        line[r["prompt_set"]] = f"{r['tokens_per_second']:.1f} tok/s"
                        timings = r.get("ar_timings") or []
                        if len(timings) > 1:
                            line[r["prompt_set"]] += f" ({len(timings)} timings, {timings[0]:.1f}–{timings[-1]:.1f})"
                    elif tau is not None and sp is not None:
                        line[r["prompt_set"]] = f"{tau:.2f}{pm} / {sp:.2f}×"
                    else:
                        line[r["prompt_set"]] = "n/a"
            table.append(line)
        out.append(f"**T = {t:g}, batch {b}** (τ (its 95 % interval over the batches) / wall-clock speed-up over "
                   "autoregressive decoding; the `none` row: autoregressive tokens/s)\n\n")
        out.append(markdown_table(table, ("drafter", "method", "train PFLOPs", *sets)) + "\n")
        apart = [r["prompt_set"] for r in sub if r["drafter"] == "none" and len(r.get("ar_timings") or []) > 1]
        if apart:
            out.append(f"\nTimed apart: {', '.join(apart)} hold rows timed in separate runs (`eval.side_by_side` "
                       "off, or rows from another session or machine), each speed-up over its own run's "
                       "autoregressive timing: compare speed-ups only "
                       "between rows with the same `ar_tokens_per_second` (results.json); τ compares across all.\n")
        acc = [r for r in sub if r.get("acceptance_by_offset")]
        if acc:
            K = max(len(r["acceptance_by_offset"]) for r in acc)
            cols = [f"d{i + 1}" for i in range(K)]
            lines = [{"drafter": r["drafter"], "method": r["method"], "prompt_set": r["prompt_set"],
                      **{c: ("-" if a is None else f"{a:.3f}") for c, a in zip(cols, r["acceptance_by_offset"])}}
                     for r in acc]
            out.append("\nAcceptance by offset, P(d_i accepted | d_<i accepted):\n\n")
            out.append(markdown_table(lines, ("drafter", "method", "prompt_set", *cols)) + "\n")
        greedy = [r for r in sub if r["drafter"] != "none" and r.get("greedy_matches_ar") is not None]
        if greedy:
            bad = [f"{r['drafter']} on {r['prompt_set']}" for r in greedy if not r["greedy_matches_ar"]]
            n = sum(r.get("num_prompts") or 0 for r in greedy)
            out.append(f"\nGreedy output identical to autoregressive output: {'no, in ' + ', '.join(bad) if bad else 'yes'} "
                       f"({len(greedy) - len(bad)} of {len(greedy)} runs, {n} prompts decoded).\n")
        out.append("\n")
    return "".join(out)


def probe_curves(workdir: str, runs: Sequence[str], kinds: Sequence[str]) -> dict:
    """{kind: {run: [{"step", "flops", "probe_tau"}, ...]}} from DIR/<run>/<kind>/metrics.jsonl
    (the `probe_tau` rows the sft and opd stages log), for the runs that exist."""
    out: dict = {}
    for kind in kinds:
        for run in runs:
            path = os.path.join(workdir, run, kind, "metrics.jsonl")
            if not os.path.isfile(path):
                continue
            rows = [{"step": r["step"], "flops": r["flops"], "probe_tau": r["probe_tau"]}
                    for r in read_jsonl(path) if r.get("probe_tau") is not None]
            if rows:
                out.setdefault(kind, {})[run] = rows
    return out


def _curve_groups(runs: dict) -> list[list[str]]:
    """The runs of one drafter kind in groups that share an x range: a run joins the group of a
    run it starts where that run starts or ends (branches from one drafter, a continuation)."""
    groups: list[list[str]] = []
    for run, rows in runs.items():
        start = rows[0]["flops"]
        near = [g for g in groups if any(math.isclose(start, runs[r][i]["flops"], rel_tol=1e-9) for r in g for i in (0, -1))]
        if near:
            near[0].append(run)
        else:
            groups.append([run])
    return groups


def plot_curves(data: dict, path: str) -> list[dict]:
    """The training-curve figure (probe τ against cumulative training FLOPs; a panel per drafter
    kind and per group of runs that start from one drafter, so branches from a shipped drafter
    are not squeezed next to a small run from scratch); returns a row per curve (start/end τ
    and FLOPs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(kind, {r: runs[r] for r in group}) for kind, runs in data.items() for group in _curve_groups(runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    names = list(dict.fromkeys(run for runs in data.values() for run in runs))
    color = {run: plt.get_cmap("tab10" if len(names) <= 10 else "tab20")(i) for i, run in enumerate(names)}  # one per run
    table = []
    for ax, (kind, runs) in zip(axes[0], panels):
        for run, rows in runs.items():
            ax.plot([r["flops"] / 1e15 for r in rows], [r["probe_tau"] for r in rows], marker="o", label=run,
                    color=color[run])
            table.append({"drafter": kind, "run": run, "start_tau": rows[0]["probe_tau"], "end_tau": rows[-1]["probe_tau"],
                          "end_step": rows[-1]["step"], "start_pflops": rows[0]["flops"] / 1e15,
                          "end_pflops": rows[-1]["flops"] / 1e15})
        ax.set(title=f"{kind}: held-out probe τ", xlabel="cumulative training PFLOPs", ylabel="τ")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return table


CURVE_COLUMNS = ("drafter", "run", "start_tau", "end_tau", "end_step", "start_pflops", "end_pflops")
