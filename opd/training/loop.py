"""The host-side training loop shared by the SFT and Draft-OPD stages.

`train_loop` steps a jitted `step_fn(state, *frozen, batch) -> (state, metrics)` from the
state's step to `num_steps` and owns everything around it:
  * checkpoints (orbax, `opd.training.checkpoint`): every `save_every` steps, at the end, and
    on SIGTERM; each holds the train state and a JSON "data" item with the data iterator's
    position and the cumulative counters (FLOPs, tokens), so a resumed run continues exactly;
  * faults: a non-finite loss raises `FloatingPointError` before anything of that step is
    saved (the last good checkpoint stays the latest); SIGTERM finishes the current step,
    saves, waits for the write and raises `Preempted`;
  * metrics: means over the last `log_every` steps plus tokens/s, learning rate and
    cumulative FLOPs, written by a `MetricsWriter` (JSONL + TensorBoard); `hooks` add
    periodic evaluations (e.g. tau on a probe set);
  * a tqdm progress bar.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from opd import remote
from opd import sharding as shd
from opd.training import checkpoint as ckpt


class Preempted(Exception):
    """SIGTERM arrived; the state was saved. Run the same command again to resume."""


@contextlib.contextmanager
def sigterm_flag():
    """Yields a dict whose "set" turns True when SIGTERM arrives (handler restored after)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        flag["set"] = True

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, old)


def _mean_metrics(rows: Sequence[dict]) -> dict:
    rows = jax.device_get(list(rows))
    return {k: np.mean(np.stack([np.asarray(r[k], np.float64) for r in rows]), axis=0) for k in rows[0]}


def train_loop(
    step_fn: Callable,
    state,
    frozen: tuple,
    batches: Iterator[dict],
    *,
    num_steps: int,
    manager,
    place_batch: Callable[[dict], dict],
    step_flops: Callable[[dict], int],
    counters: Optional[dict] = None,
    data_state: Callable[[], dict] = lambda: {},
    writer=None,
    lr_fn: Optional[Callable[[int], float]] = None,
    log_every: int = 10,
    save_every: int = 100,
    hooks: Sequence[tuple[int, Callable]] = (),
    step_tokens: Optional[Callable[[dict, dict], int]] = None,
    on_step: Optional[Callable[[int, dict, dict], None]] = None,
    desc: str = "train",
):
    """Runs steps int(state.step) .. num_steps - 1; returns the final state.

    Args:
      step_fn: jitted step; donates its state argument.
      frozen: the step's other arguments before the batch (target params, frozen drafter parts).
      batches: host batches (dicts of numpy arrays), positioned at the state's step.
      manager: an orbax CheckpointManager (`checkpoint.make_manager`).
      place_batch: host batch -> device batch with the step's input shardings.
      step_flops: host batch -> training FLOPs of one step on it.
      counters: cumulative {"flops", "tokens"} restored from the checkpoint (default zeros);
        updated in place.
      data_state: () -> the data iterator's JSON state *after* the batches consumed so far.
      writer: a `metrics.MetricsWriter` (or None).
      lr_fn: step -> learning rate, logged.
      hooks: (every, fn(step, state) -> dict of metrics) run after every `every`-th step.
      step_tokens: (host batch, host metrics) -> tokens processed (for tokens/s); default the
        batch's token count. Draft-OPD counts the rollout's committed tokens.
      on_step: fn(step, host batch, private metrics) after each step, before its checkpoint;
        gets the metrics whose keys start with "_" (kept out of the means), e.g. rollout text.
    Raises:
      FloatingPointError: non-finite loss (nothing of that step saved).
      Preempted: SIGTERM (the state after the current step is saved).
    """
    from tqdm import tqdm

    if log_every < 1 or save_every < 1:
        raise ValueError(f"log_every and save_every must be >= 1, got {log_every}, {save_every}")
    counters = counters if counters is not None else {}
    counters.setdefault("flops", 0)
    counters.setdefault("tokens", 0)
    start = int(jax.device_get(state.step))
    pending, t_log = [], time.perf_counter()
    tokens_since = 0

    def save(force=True):
        ckpt.save(manager, state, {**data_state(), "counters": dict(counters)}, force=force)
        rw = remote.current()
        if rw is not None:  # a URL workdir: the metrics and rollouts so far go up with the checkpoint
            rw.push()

    bar = tqdm(total=num_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
               disable=not shd.is_main_process())
    try:
        with sigterm_flag() as flag:
            for step in range(start, num_steps):
                batch = next(batches)
                state, metrics = step_fn(state, *frozen, place_batch(batch))
                private = {k: metrics.pop(k) for k in [k for k in metrics if k.startswith("_")]}
                loss = float(jax.device_get(metrics["loss"]))
                done = step + 1
                if not math.isfinite(loss):
                    last = manager.latest_step()
                    raise FloatingPointError(
                        f"{desc}: non-finite loss {loss} at step {done}; stopped without saving it. The last good "
                        f"checkpoint is step {last} in {manager.directory} (try a lower learning rate)."
                    )
                counters["flops"] += int(step_flops(batch))
                n_tok = (int(np.asarray(batch["tokens"]).size) if step_tokens is None
                         else int(step_tokens(batch, jax.device_get(metrics))))
                counters["tokens"] += n_tok
                tokens_since += n_tok
                if on_step is not None:
                    on_step(done, batch, shd.to_host(private))
                pending.append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if writer is not None and (done % log_every == 0 or done == num_steps):
                    now = time.perf_counter()
                    row = _mean_metrics(pending)
                    row.update(tokens_per_s=tokens_since / max(now - t_log, 1e-9),
                               flops=float(counters["flops"]), tokens=float(counters["tokens"]))
                    if lr_fn is not None:
                        row["learning_rate"] = float(lr_fn(step))
                    writer.write(done, row)
                    pending, t_log, tokens_since = [], now, 0
                for every, hook in hooks:
                    if done % every == 0 or done == num_steps:
                        out = hook(done, state)
                        if writer is not None and out:
                            writer.write(done, {**out, "flops": float(counters["flops"])})
                stop = shd.any_process(flag["set"])  # multi-host: every host stops at this step
                if done % save_every == 0 or done == num_steps or stop:
                    save()
                if stop:
                    manager.wait_until_finished()
                    raise Preempted(f"{desc}: SIGTERM at step {done} (on this host or another); saved to {manager.directory}. "
                                    "Run the same command again to resume.")
    finally:
        bar.close()
        manager.wait_until_finished()
    return state
