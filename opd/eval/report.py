"""Result files for benchmarks: JSON + markdown table + provenance (command, commit, machine)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Sequence

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
