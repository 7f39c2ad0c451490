"""The Pallas verify kernel against the jnp reference: same decisions, and (on a device) time and
achieved HBM bandwidth at the pod shapes.

On a CPU host (what CI and this repository's results have) it
  1. runs both kernel formulations ("grid", TPU; "split", GPU) in the Pallas interpreter beside
     `verify_reference` at small shapes and counts rows whose decisions (num_accepted,
     next_token, accepted) differ: the agreement check, not a speed measurement;
  2. lowers (`jax.export`, no compile, nothing run) the kernel for TPU and CUDA at every pod
     shape (experiments/pod.py) and records the kernel calls found in the lowered module;
  3. with libtpu installed (`jax[tpu]`), compiles the TPU kernel with the TPU compiler (Mosaic
     included: VMEM limits, tiling) for one chip of each pod generation (v5p, v6e; libtpu's
     topology descriptions, no TPU attached) at every pod shape: compiled, not run.
  No bandwidth is reported: nothing ran on a device.

On a TPU or GPU it compiles the kernel (the formulation the platform picks) and the reference
at the pod shapes, checks their decisions agree, and times both beside a read roofline (`jnp.max`
over the logits): each timed program is `--inner` verify calls unrolled in one jit on as many
distinct copies of the inputs (no call can be merged with another, none finds its input in L2;
no host dispatch between them), median of `--repeats` runs.  Achieved bandwidth =
bytes the round must read from HBM / time per call:
  greedy    B (K+1) V x itemsize                 (every target logit once)
  sampling  B (K+1) V x itemsize + 2 B V x itemsize   (+ row n of the logits and of log q)
against the device's peak HBM bandwidth (`PEAK_GBPS` by `device_kind`, or --peak_gbps).
Goal: >= 80 % of peak for the kernel.  At small B (K+1) V a call is a few microseconds and
launch latency dominates; the larger batches show the streaming rate.

Run (results land in experiments/results/verify_kernel/, or --out_dir):

  # CPU (any machine): interpreter agreement + TPU / CUDA lowering
  python experiments/benchmarks/verify_kernel.py
  # a TPU VM (e.g. v5p / v6e, `pip install -e . "jax[tpu]"`), or a GPU host
  # (`pip install -e . "jax[cuda12]"`): compile + time at the pod shapes
  python experiments/benchmarks/verify_kernel.py --out_dir=experiments/results/verify_kernel_$(hostname)
  # other shapes / tiles: --shapes=8x15x151936,32x15x151936 --block_v=2048 --chunk_v=16384
"""

import functools
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags  # noqa: E402


MODES = {"greedy": (0.0, 0, 1.0), "sampling": (0.7, 0, 1.0), "top_k_top_p": (0.7, 50, 0.9)}
# Peak HBM bandwidth, GB/s (1e9 B/s), from the vendors' data sheets; matched as a substring of
# jax's device_kind, longest key first.
PEAK_GBPS = {
    "H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "B200": 8000, "GH200": 4000,
    "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935, "A100-PCIE-40GB": 1555, "L4": 300,
    "TPU v4": 1200, "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765, "TPU v5": 2765, "TPU v6 lite": 1640,
    "TPU v6e": 1640, "TPU7x": 7380,
}


def peak_gbps(device_kind: str):
    for key in sorted(PEAK_GBPS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return PEAK_GBPS[key]
    return None


def pod_shapes() -> dict:
    """{(B, K, V): [variants]} of experiments/pod.py (B = eval.batch_size)."""
    from opd.configs import load_config
    from opd.models.presets import preset_config

    pod = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pod.py")
    shapes = {}
    for model in ("qwen3_4b", "qwen3_8b", "llama31_8b"):
        for kind in ("dflash", "eagle3"):
            c = load_config(f"{pod}:{model},{kind}")
            s = (int(c.eval.batch_size), int(c.opd.num_draft_tokens), preset_config(c.target.preset).vocab_size)
            shapes.setdefault(s, []).append(f"{model},{kind}")
    return shapes


def round_inputs(key, b: int, k: int, v: int, mode: str, dtype: str):
    """Target logits, a correlated drafter's log q and its drafts (greedy: the target argmax
    with random corruptions, so that every accept count occurs)."""
    import jax
    import jax.numpy as jnp

    from opd.decoding.sampling import SamplingParams, process_logits

    temperature, top_k, top_p = MODES[mode]
    k_t, k_d, k_s, k_c = jax.random.split(key, 4)
    target = (2.0 * jax.random.normal(k_t, (b, k + 1, v))).astype(dtype)
    if temperature == 0.0:
        corrupt = jax.random.bernoulli(k_c, 1.0 / (k + 1), (b, k))
        d = jnp.where(corrupt, jax.random.randint(k_s, (b, k), 0, v), jnp.argmax(target[:, :k], -1))
        return target, d.astype(jnp.int32), None
    logq = process_logits(target[:, :k] + jax.random.normal(k_d, (b, k, v)), SamplingParams(temperature, top_k, top_p))
    d = jax.random.categorical(k_s, logq).astype(jnp.int32)
    return target, d, logq.astype(dtype)


def bytes_read(b: int, k: int, v: int, mode: str, itemsize: int) -> int:
    """What a round must read from HBM (module docstring)."""
    rows = b * (k + 1) + (0 if mode == "greedy" else 2 * b)
    return rows * v * itemsize


def _mismatched_rows(got, want) -> int:
    import numpy as np

    bad = np.zeros(np.asarray(want.num_accepted).shape, bool)
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        bad |= (g != w).reshape(bad.shape[0], -1).any(axis=1)
    return int(bad.sum())


def agreement(shapes, dtypes, modes, formulations, interpret: bool, seeds: int = 4, **sizes) -> list:
    """Rows: decisions of each formulation vs the reference over `seeds` keys."""
    import jax

    from pallas_kernels.verify import verify, verify_reference

    rows = []
    for (b, k, v) in shapes:
        for dtype in dtypes:
            for mode in modes:
                temperature, top_k, top_p = MODES[mode]
                sp = dict(temperature=temperature, top_k=top_k, top_p=top_p)
                ref = jax.jit(functools.partial(verify_reference, **sp))
                gen = jax.jit(functools.partial(round_inputs, b=b, k=k, v=v, mode=mode, dtype=dtype))
                for f in formulations:
                    kern = functools.partial(verify, **sp, formulation=f, interpret=interpret, **sizes)
                    bad, n_hist, t0 = 0, set(), time.perf_counter()
                    for seed in range(seeds):
                        k_data, key = jax.random.split(jax.random.key(1000 + seed))
                        x, d, lq = gen(k_data)
                        want, got = ref(x, d, lq, key), kern(x, d, lq, key)
                        bad += _mismatched_rows(got, want)
                        n_hist |= set(int(n) for n in jax.device_get(want.num_accepted))
                    rows.append({"shape": f"{b}x{k}x{v}", "dtype": dtype, "mode": mode, "formulation": f,
                                 "interpret": interpret, "rows": b * seeds, "mismatched_rows": bad,
                                 "accept_counts_seen": sorted(n_hist), "seconds": time.perf_counter() - t0})
                    print(rows[-1], flush=True)
    return rows


def verify_args(b: int, k: int, v: int, mode: str, dtype: str, sharding=None):
    """(the jitted `verify` of `mode`, its abstract inputs: logits, drafts, log q, key)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.verify import verify

    temperature, top_k, top_p = MODES[mode]
    sds = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
    x = sds((b, k + 1, v), jnp.dtype(dtype))
    d = sds((b, k), jnp.int32)
    lq = sds((b, k, v), jnp.dtype(dtype)) if temperature else None
    key = sds((), jax.random.key(0).dtype) if temperature else None
    return jax.jit(functools.partial(verify, temperature=temperature, top_k=top_k, top_p=top_p)), (x, d, lq, key)


# one chip of each pod slice's generation (experiments/pod.py), as libtpu describes it
TPU_CHIPS = {"v5p": "v5p:2x2x1", "v6e": "v6e:2x4"}


def tpu_compile(shapes: dict, dtypes, modes) -> list:
    """Rows: the TPU kernel compiled by libtpu's compiler for one chip of each `TPU_CHIPS`
    generation at each pod shape (not run); [] without libtpu."""
    import jax

    from opd.training.aot import tpu_devices

    try:
        chips = {g: tpu_devices(t)[0] for g, t in TPU_CHIPS.items()}
    except RuntimeError as e:
        print(f"TPU compile skipped: {e}", flush=True)
        return []
    rows = []
    for (b, k, v), variants in shapes.items():
        for gen, dev in chips.items():
            for dtype in dtypes:
                for mode in modes:
                    fn, args = verify_args(b, k, v, mode, dtype, jax.sharding.SingleDeviceSharding(dev))
                    t0 = time.perf_counter()
                    try:
                        compiled = fn.lower(*args).compile()
                        text = compiled.as_text()
                        row = {"compiled": "yes (not run)", "kernels": ", ".join(sorted(set(re.findall(r"verify_grid_\w+", text)))),
                               "hbm_temp_MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20}
                    except Exception as e:  # a kernel Mosaic rejects (VMEM, tiling) is the finding
                        row = {"compiled": f"NO: {type(e).__name__}: {str(e)[:200]}", "kernels": "", "hbm_temp_MiB": float("nan")}
                    rows.append({"shape": f"{b}x{k}x{v}", "pod": " ".join(variants), "chip": dev.device_kind, "dtype": dtype,
                                 "mode": mode, **row, "compile_seconds": time.perf_counter() - t0})
                    print(rows[-1], flush=True)
    return rows


def lowering(shapes: dict, dtypes, modes) -> list:
    """Rows: the kernel lowered (not compiled, not run) for TPU and CUDA at each pod shape."""
    from jax import export

    calls_re = re.compile(r'stablehlo\.custom_call @([\w$.]+).*?name = "(verify_\w+)"')
    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]  # Triton IR: no compat guarantee
    rows = []
    for (b, k, v), variants in shapes.items():
        for platform in ("tpu", "cuda"):
            for dtype in dtypes:
                for mode in modes:
                    fn, args = verify_args(b, k, v, mode, dtype)
                    t0 = time.perf_counter()
                    exported = export.export(fn, platforms=[platform], disabled_checks=disabled)(*args)
                    text = exported.mlir_module()
                    calls = [f"{t}:{n}" for t, n in calls_re.findall(text)]
                    rows.append({"shape": f"{b}x{k}x{v}", "pod": " ".join(variants), "platform": platform, "dtype": dtype,
                                 "mode": mode, "lowered": "yes (not compiled, not run)", "kernel_calls": ", ".join(calls),
                                 "lower_seconds": time.perf_counter() - t0})
                    print(rows[-1], flush=True)
    return rows


def timing(shapes, dtypes, modes, peak, inner: int = 10, repeats: int = 5, **sizes) -> list:
    """Rows: compiled kernel, reference and a read roofline; time per call and achieved HBM bandwidth.

    Each timed program makes `inner` calls on `inner` distinct copies of the round's inputs
    (generated from different keys, so no call can be merged with another and no input stays
    in L2 between calls), keeping every output. `roofline` is `jnp.max` over the target logits
    alone: what a plain XLA reduction that reads the same bytes achieves on this device."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.verify import verify, verify_reference

    def roofline(x, d, lq, key):
        return verify_result_like(jnp.max(x, axis=-1))

    rows = []
    for (b, k, v) in shapes:
        for dtype in dtypes:
            for mode in modes:
                temperature, top_k, top_p = MODES[mode]
                sp = dict(temperature=temperature, top_k=top_k, top_p=top_p)
                head = {"shape": f"{b}x{k}x{v}", "dtype": dtype, "mode": mode}
                xs, ds, lqs, keys = _distinct_inputs(b, k, v, mode, dtype, inner)
                kern = functools.partial(verify, **sp, **sizes)
                ref = functools.partial(verify_reference, **sp)
                try:
                    bad = _mismatched_rows(jax.jit(kern)(xs[0], ds[0], lqs and lqs[0], keys and keys[0]),
                                           jax.jit(ref)(xs[0], ds[0], lqs and lqs[0], keys and keys[0]))
                except Exception as e:  # a device run reports every shape it could not compile, then goes on
                    rows.append({**head, "impl": "kernel", "error": f"{type(e).__name__}: {e}"[:400]})
                    print(rows[-1], flush=True)
                    continue
                itemsize = jnp.dtype(dtype).itemsize
                for impl, fn, nbytes in (("kernel", kern, bytes_read(b, k, v, mode, itemsize)),
                                         ("reference", ref, bytes_read(b, k, v, mode, itemsize)),
                                         ("roofline", roofline, b * (k + 1) * v * itemsize)):
                    t = _seconds_per_call(fn, xs, ds, lqs, keys, repeats)
                    gbps = nbytes / t / 1e9
                    rows.append({**head, "impl": impl, "mismatched_rows": bad if impl != "roofline" else "-",
                                 "us_per_call": t * 1e6, "bytes_read_MB": nbytes / 1e6, "GB_per_s": gbps,
                                 "peak_fraction": gbps / peak if peak else float("nan")})
                    print(rows[-1], flush=True)
                del xs, ds, lqs
    return rows


def _distinct_inputs(b: int, k: int, v: int, mode: str, dtype: str, inner: int):
    """`inner` distinct rounds (logits, drafts, log q or None, key or None), each a list."""
    import jax

    gen = jax.jit(functools.partial(round_inputs, b=b, k=k, v=v, mode=mode, dtype=dtype))
    inputs = [gen(jax.random.key(100 + i)) for i in range(inner)]
    xs, ds, lqs = ([t[j] for t in inputs] for j in range(3))
    keys = [jax.random.key(200 + i) for i in range(inner)] if MODES[mode][0] else None
    return xs, ds, (None if lqs[0] is None else lqs), keys


def _seconds_per_call(fn, xs, ds, lqs, keys, repeats: int) -> float:
    """Median (over `repeats`) seconds per call of fn(x, d, lq, key) -> VerifyResult-like, in
    one jitted program that calls it once on each of the distinct inputs, keeping every output."""
    import jax

    n = len(xs)

    @jax.jit
    def many(xs, ds, lqs, keys):
        out = []
        for i in range(n):
            r = fn(xs[i], ds[i], None if lqs is None else lqs[i], None if keys is None else keys[i])
            out += [r.num_accepted, r.next_token]
        return out

    jax.block_until_ready(many(xs, ds, lqs, keys))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(many(xs, ds, lqs, keys))
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def breakdown(shapes, dtypes, peak, inner: int = 10, repeats: int = 5, **sizes) -> list:
    """Rows: the sampling round's two split-kernel passes timed alone (`--breakdown`): the
    log-sum-exp over every row (reads B (K+1) V) and the draw on row n (reads 2 B V)."""
    import jax.numpy as jnp

    from pallas_kernels.verify import split

    chunk_v = sizes.get("chunk_v")
    temperature = MODES["sampling"][0]
    rows = []
    for (b, k, v) in shapes:
        for dtype in dtypes:
            xs, ds, lqs, keys = _distinct_inputs(b, k, v, "sampling", dtype, inner)
            itemsize = jnp.dtype(dtype).itemsize
            block_v = sizes.get("block_v", split.default_block_v(dtype))  # what `verify` would use
            n_B = jnp.arange(b, dtype=jnp.int32) % (k + 1)  # every row index, the bonus row too

            def lse(x, d, lq, key):
                return verify_result_like(split.logsumexp(x, temperature=temperature, block_v=block_v,
                                                          chunk_v=chunk_v, interpret=False)[0])

            def draw(x, d, lq, key):
                zero = jnp.zeros((b,), jnp.float32)
                return verify_result_like(split.draw(x, lq, n_B, zero, zero, n_B, temperature=temperature,
                                                     block_v=block_v, chunk_v=chunk_v, interpret=False)[0])

            for part, fn, nbytes in (("logsumexp", lse, b * (k + 1) * v * itemsize), ("draw", draw, 2 * b * v * itemsize)):
                t = _seconds_per_call(fn, xs, ds, lqs, keys, repeats)
                gbps = nbytes / t / 1e9
                rows.append({"shape": f"{b}x{k}x{v}", "dtype": dtype, "mode": "sampling", "impl": f"split.{part}",
                             "us_per_call": t * 1e6, "bytes_read_MB": nbytes / 1e6, "GB_per_s": gbps,
                             "peak_fraction": gbps / peak if peak else float("nan")})
                print(rows[-1], flush=True)
    return rows


def verify_result_like(m_BK1):
    """A VerifyResult-shaped stand-in for the roofline (its fields hold the row maxima)."""
    from pallas_kernels.verify import VerifyResult

    return VerifyResult(**{f: m_BK1 for f in VerifyResult._fields})


def main(_):
    import jax

    F = flags.FLAGS

    from opd.eval.report import markdown_table, write_results

    backend = jax.default_backend()
    dev = jax.devices()[0]
    sizes = {k: F[k].value for k in ("block_v", "chunk_v") if F[k].value is not None}
    parse = lambda s: tuple(int(n) for n in s.lower().split("x"))  # noqa: E731
    pods = pod_shapes()
    payload = {"backend": backend, "device_kind": dev.device_kind, "block_sizes": sizes}
    if backend == "cpu":
        shapes = [parse(s) for s in (F.shapes or ["3x4x1000"])]
        agree = agreement(shapes, F.dtypes, F.modes, ("grid", "split"), interpret=True, seeds=F.seeds,
                          block_v=F.cpu_block_v, chunk_v=F.cpu_chunk_v)
        low = lowering(pods, F.dtypes, [m for m in F.modes if m != "top_k_top_p"])
        tpu = tpu_compile(pods, F.dtypes, [m for m in F.modes if m != "top_k_top_p"]) if F.tpu_compile else []
        payload.update(agreement=agree, lowering=low, tpu_compile=tpu, note=(
            "CPU only: both formulations ran in the Pallas interpreter beside the reference (agreement, not speed); "
            "for TPU and CUDA the kernel was lowered (jax.export); "
            + ("the TPU kernel was compiled by libtpu's compiler for TPU chips (no TPU attached), not run; " if tpu else
               "nothing was compiled for a device; ") + "no bandwidth was measured"))
        table = ("## Agreement: interpreted kernel vs reference (CPU; not a speed measurement)\n\n"
                 + markdown_table(agree, ["shape", "dtype", "mode", "formulation", "interpret", "rows", "mismatched_rows",
                                          "accept_counts_seen", "seconds"])
                 + "\n## Lowering for TPU / CUDA at the pod shapes (lowered only: not compiled, not run on a device)\n\n"
                 + markdown_table(low, ["shape", "pod", "platform", "dtype", "mode", "lowered", "kernel_calls", "lower_seconds"])
                 + ("\n## Compiled for TPU chips by libtpu's compiler, Mosaic included (compiled, not run)\n\n"
                    + markdown_table(tpu, ["shape", "pod", "chip", "dtype", "mode", "compiled", "kernels", "hbm_temp_MiB",
                                           "compile_seconds"]) if tpu else "")
                 + f"\n{payload['note']}.\n")
    else:
        peak = F.peak_gbps or peak_gbps(dev.device_kind)
        shapes = ([parse(s) for s in F.shapes] if F.shapes
                  else sorted({s for s in pods} | {(4 * b, k, v) for (b, k, v) in pods}))
        rows = timing(shapes, F.dtypes, F.modes, peak, F.inner, F.repeats, **sizes)
        if F.breakdown:
            rows += breakdown(shapes, F.dtypes, peak, F.inner, F.repeats, **sizes)
        payload.update(peak_gbps=peak, timing=rows, goal="kernel >= 80 % of peak HBM bandwidth")
        table = (f"## {dev.device_kind} ({backend}): time per verify call, achieved HBM bandwidth (peak {peak} GB/s)\n\n"
                 + markdown_table(rows, ["shape", "dtype", "mode", "impl", "mismatched_rows", "us_per_call", "bytes_read_MB",
                                         "GB_per_s", "peak_fraction"] + (["error"] if any("error" in r for r in rows) else [])))
    out = write_results("verify_kernel", payload, table, F.out_dir)
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":  # flags defined here: tests import this module next to other scripts
    flags.DEFINE_list("shapes", None, "BxKxV shapes (default: CPU 3x4x1000; device: the pod shapes at "
                      "B = eval.batch_size and 4x that)")
    flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "logit dtypes")
    flags.DEFINE_list("modes", ["greedy", "sampling", "top_k_top_p"], "greedy | sampling | top_k_top_p")
    flags.DEFINE_integer("seeds", 4, "keys per shape for the agreement check")
    flags.DEFINE_integer("repeats", 5, "timed runs (median reported)")
    flags.DEFINE_integer("inner", 10, "verify calls (on as many distinct inputs) in one timed program")
    flags.DEFINE_integer("block_v", None, "vocabulary tile (default: the formulation's)")
    flags.DEFINE_integer("chunk_v", None, "split: entries per grid program (default: from the shapes)")
    flags.DEFINE_integer("cpu_block_v", 256, "CPU agreement check: tile (small, so V spans several)")
    flags.DEFINE_integer("cpu_chunk_v", 768, "CPU agreement check: split chunk (3 tiles of 256)")
    flags.DEFINE_float("peak_gbps", None, "peak HBM GB/s of the device (default: PEAK_GBPS by device_kind)")
    flags.DEFINE_string("out_dir", None, "default: experiments/results/verify_kernel")
    flags.DEFINE_bool("tpu_compile", True, "CPU: also compile the TPU kernel with libtpu for v5p / v6e chips "
                      "(skipped without libtpu)")
    flags.DEFINE_bool("breakdown", False, "device: also time the sampling round's two kernel passes alone")
    app.run(main)
