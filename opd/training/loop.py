"""The host-side training loop shared by the SFT and Draft-OPD stages.

`train_loop` steps a jitted `step_fn(state, *frozen, batch) -> (state, metrics)` from the
state's step to `num_steps` and owns everything around it:
  * checkpoints (orbax, `opd.training.checkpoint`): every `save_every` steps, at the end, and
    on SIGTERM / SIGINT; each holds the train state and a JSON "data" item with the data iterator's
    position and the cumulative counters (FLOPs, tokens, seconds in steps), so a resumed run
    continues exactly;
  * faults: a non-finite loss raises `FloatingPointError` before anything of that step is
    saved (the last good checkpoint stays the latest); SIGTERM or SIGINT (Ctrl-C; a second
    one aborts at once) finishes the current step, saves, waits for the write and raises
    `Preempted`; a checkpoint write that fails (e.g. a full disk, in orbax's background
    thread) is noticed at the next step and raises `SaveFailed` naming the error and the
    path, while the previous checkpoint is still the latest complete one;
  * metrics: means over the last `log_every` steps plus tokens/s, learning rate, cumulative
    FLOPs and seconds spent in steps (a hook's time, e.g. a probe's, is its row's `hook_seconds`), written by a `MetricsWriter` (JSONL + TensorBoard); `hooks` add
    periodic evaluations (e.g. tau on a probe set);
  * a tqdm progress bar.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

from absl import logging
import jax
import numpy as np

from opd import remote
from opd import sharding as shd
from opd.training import checkpoint as ckpt


class Stopped(Exception):
    """A launch stopped for a reason its message states in full (what happened, what was kept,
    what to do): the launcher prints the message as one line, without a traceback, and exits
    non-zero."""


class Preempted(Stopped):
    """SIGTERM or SIGINT arrived; the state was saved. Run the same command again to resume."""


class SaveFailed(Stopped):
    """Writing a checkpoint failed (e.g. the disk is full); the previous one is intact."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals():
    """Yields a dict whose "set" becomes the signal's name ("SIGTERM", "SIGINT") when one of
    `STOP_SIGNALS` arrives (handlers restored after). A second SIGINT raises KeyboardInterrupt
    at once (Ctrl-C twice: do not wait for the save)."""
    flag = {"set": ""}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and flag["set"] == "SIGINT":
            raise KeyboardInterrupt
        flag["set"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _chain(e: BaseException) -> list:
    """`e` and every exception behind it (causes, contexts, exception groups)."""
    seen, out, todo = set(), [], [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return out


def _join_orbax_writers(timeout: float = 120.0) -> None:
    """Waits for orbax's writer threads still running after a failed save (e.g. the state's
    arrays while the data item failed): left running, they fail at interpreter exit and log
    tracebacks after the one-line message."""
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax.") and not t.daemon:
            try:
                t.join(timeout)
            except Exception:  # noqa: BLE001 - orbax's threads re-raise their own failure in join()
                pass


def save_failed(e: BaseException, desc: str, step, manager) -> SaveFailed:
    """One line on a failed checkpoint write: the OS error (e.g. ENOSPC) and path, the last
    complete checkpoint, and what to do."""
    _join_orbax_writers()
    chain = _chain(e)
    os_err = next((x for x in chain if isinstance(x, OSError) and x.errno), None)
    full = os.strerror(errno.ENOSPC)
    if os_err is not None:
        name = errno.errorcode.get(os_err.errno, str(os_err.errno))
        cause = f"{os_err.strerror or os_err} ({name}) writing {os_err.filename or f'{manager.directory}/{step}'}"
    elif any(full in str(x) for x in chain):  # tensorstore's errors carry the OS error as text
        os_err, cause = OSError(errno.ENOSPC, full), f"{full} (ENOSPC) writing {manager.directory}/{step}"
    else:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:200]
        cause = f"{type(e).__name__}: {first}"
    hint = "Free disk space" if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT) else "Fix that"
    try:
        manager.reload()  # orbax's view of which steps are complete
        last = manager.latest_step()
    except Exception:  # noqa: BLE001 - the message must not fail too
        last = None
    kept = f"step {last} is the last complete checkpoint" if last is not None else "no complete checkpoint yet"
    return SaveFailed(f"{desc}: saving the checkpoint of step {step} failed: {cause}. Training stopped; {kept} in "
                      f"{manager.directory}. {hint}, then run the same command again to resume.")


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
      counters: cumulative {"flops", "tokens", "seconds"} restored from the checkpoint (default zeros);
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
      Preempted: SIGTERM or SIGINT (the state after the current step is saved).
      SaveFailed: a checkpoint could not be written (the previous one is intact).
    """
    from tqdm import tqdm

    if log_every < 1 or save_every < 1:
        raise ValueError(f"log_every and save_every must be >= 1, got {log_every}, {save_every}")
    counters = counters if counters is not None else {}
    counters.setdefault("flops", 0)
    counters.setdefault("tokens", 0)
    counters.setdefault("seconds", 0.0)  # wall time in steps (hooks such as probes excluded), across resumes
    start = int(jax.device_get(state.step))
    pending, t_log = [], time.perf_counter()
    tokens_since = 0

    in_flight = {"step": None}  # the step whose checkpoint orbax is still writing

    def save():
        finish_save(block=True)  # the previous write first, so a failure names its own step
        try:
            ckpt.save(manager, state, {**data_state(), "counters": dict(counters)}, force=True)
        except Exception as e:  # e.g. the disk is full before the write even starts
            raise save_failed(e, desc, done, manager) from e
        in_flight["step"] = done
        rw = remote.current()
        if rw is not None:  # a URL workdir: the metrics and rollouts so far go up with the checkpoint
            rw.push()

    def finish_save(block: bool) -> None:
        """Raises `SaveFailed` once the checkpoint in flight failed to write; `block`: wait for
        it. A collective: multi-host, every host stops at the same step."""
        step_, error = in_flight["step"], None
        if step_ is not None and (block or not manager.is_saving_in_progress()):
            try:
                manager.wait_until_finished()  # orbax re-raises its background thread's error here
                in_flight["step"] = None
            except Exception as e:  # noqa: BLE001
                error = e
        if error is not None:
            shd.any_process(True)
            raise save_failed(error, desc, step_, manager) from error
        if shd.any_process(False):
            raise SaveFailed(f"{desc}: saving the checkpoint of step {step_} failed on another host (its log names the "
                             "error); training stopped. Fix it, then run the same command again to resume.")

    bar = tqdm(total=num_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
               disable=not shd.is_main_process())
    try:
        with stop_signals() as flag:
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
                    counters["seconds"] = float(counters["seconds"]) + (now - t_log)
                    row.update(tokens_per_s=tokens_since / max(now - t_log, 1e-9), seconds=counters["seconds"],
                               flops=float(counters["flops"]), tokens=float(counters["tokens"]))
                    if lr_fn is not None:
                        row["learning_rate"] = float(lr_fn(step))
                    writer.write(done, row)
                    pending, t_log, tokens_since = [], now, 0
                for every, hook in hooks:
                    if done % every == 0 or done == num_steps:
                        t_hook = time.perf_counter()
                        out = hook(done, state)
                        spent = time.perf_counter() - t_hook
                        t_log += spent  # not training time: the next row's tokens/s and seconds exclude it
                        if writer is not None and out:
                            writer.write(done, {**out, "flops": float(counters["flops"]), "hook_seconds": spent})
                finish_save(block=False)  # an earlier checkpoint's write failed: stop here
                stop = shd.any_process(bool(flag["set"]))  # multi-host: every host stops at this step
                if done % save_every == 0 or done == num_steps or stop:
                    save()
                if stop:
                    finish_save(block=True)
                    raise Preempted(f"{desc}: {flag['set'] or 'a stop signal'} at step {done} (on this host or "
                                    f"another); saved to {manager.directory}. Run the same command again to resume.")
            finish_save(block=True)
    except SaveFailed:
        bar.close()
        raise
    except BaseException:
        bar.close()
        try:  # let a write in flight finish; its own failure is only logged under the error at hand
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            logging.warning("%s: the checkpoint write in flight failed too: %s", desc,
                            save_failed(e, desc, in_flight["step"], manager))
        raise
    bar.close()
    return state
