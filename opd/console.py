"""What the launcher prints: opd's own INFO lines (one per stage start and end, progress notes)
and tqdm bars, while other libraries (orbax, jax, ...) log at WARNING and above unless
`--verbosity=1` (`-v 1`) asks for their INFO / DEBUG lines too.

Orbax logs through absl's one logger, so the libraries are told apart from opd by the file a
record comes from (a filter on absl's handler), not by logger name. Orbax's ERROR records are
off the console too unless `-v 1`: a failed save or restore logs a traceback from each of its
worker threads (~270 lines on a full disk), and every such failure reaches opd as an exception
that opd reports in one line (`opd.training.loop.save_failed`, `opd.training.checkpoint`).
"""

from __future__ import annotations

import importlib.util
import logging as pylogging
import os
import time
from typing import Any, Callable

from absl import logging

_OPD_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    return os.path.dirname(os.path.abspath(spec.origin)) + os.sep if spec and spec.origin else "\0"


_ORBAX_DIR = _package_dir("orbax.checkpoint")


class OpdInfoOnly(pylogging.Filter):
    """Passes WARNING and above from anywhere (but orbax's ERROR records: module docstring), lower
    levels only from opd's own files."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        path = os.path.abspath(record.pathname)
        if path.startswith(_ORBAX_DIR):
            return record.levelno == pylogging.WARNING
        return record.levelno >= pylogging.WARNING or path.startswith(_OPD_DIR)


def setup(verbosity: int = -1) -> None:
    """Log levels of a launch: opd at INFO (DEBUG from `verbosity` 1); other libraries at WARNING
    below `verbosity` 1, else at the same level as opd. `verbosity` is absl's --verbosity flag."""
    logging.set_verbosity(max(int(verbosity), logging.INFO))  # absl levels: WARNING -1, INFO 0, DEBUG 1
    handler = logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, OpdInfoOnly)]:
        handler.removeFilter(f)
    if verbosity < 1:
        handler.addFilter(OpdInfoOnly())


def run_stage(name: str, fn: Callable[..., Any], *args) -> Any:
    """`fn(*args)` between a start line and an end line with the elapsed time and the key
    numbers of what the stage returned (`stage_summary`)."""
    logging.info("stage %s: start", name)
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except BaseException:
        logging.error("stage %s: failed after %s", name, elapsed(time.perf_counter() - t0))
        raise
    summary = stage_summary(name.partition(":")[0].partition("@")[0], result)  # <stage>[@<branch>][:<run>]
    logging.info("stage %s: done in %s%s", name, elapsed(time.perf_counter() - t0), f" ({summary})" if summary else "")
    return result


def elapsed(seconds: float) -> str:
    """`4.2 s`, `3 min 05 s`, `2 h 07 min`."""
    s = int(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _eval_summary(results: list) -> str:
    if len(results) <= 4:
        runs = ", ".join(f"{r['run']} tau {_num(r.get('tau'))} speedup {_num(r.get('speedup'))}" for r in results)
        return f"{len(results)} runs: {runs}"
    taus = [r["tau"] for r in results if r.get("tau") is not None]
    return f"{len(results)} runs, tau {_num(min(taus, default=None))}-{_num(max(taus, default=None))}"


_SUMMARIES: dict[str, Callable[[Any], str]] = {
    "fetch_assets": lambda paths: f"{len(paths)} assets",
    "chat": lambda records: f"{len(records)} responses",
    "regenerate": lambda shards: ", ".join(f"{src}: {len(paths)} shards" for src, paths in shards.items()),
    "text_corpus": lambda s: ", ".join(f"{src}: {c['records']} records, {c['response_tokens']} response tokens"
                                       for src, c in s.get("sources", {}).items()),
    "eval": _eval_summary,
    "report": lambda payload: f"{len(payload['rows'])} rows" if payload else "",
}


def stage_summary(stage: str, result) -> str:
    """A few key numbers of a stage's return value ("" when there are none); a returned path as is."""
    if not result:
        return ""
    if isinstance(result, str):
        return result
    fmt = _SUMMARIES.get(stage)
    return fmt(result) if fmt else ""
