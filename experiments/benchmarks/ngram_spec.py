"""N-gram (prompt-lookup) speculative decoding of SmolLM2-135M-Instruct on CPU.

For HumanEval and MT-Bench (turn 1, first `--num_prompts`), greedy, K = `--num_draft_tokens`,
at each of `--batch_sizes`, through `opd.eval.evaluate`: τ, acceptance by offset, speed-up
over our own autoregressive decoding (same prompts, same process, compile excluded) and the
greedy-equality check. Side by side at batch 1: transformers' prompt-lookup decoding
(`generate(prompt_lookup_num_tokens=K, max_matching_ngram_size=3, do_sample=False)`) and
its plain greedy `generate`, on the same model (the Q4_1 GGUF dequantised to float32) and
the same token ids. transformers supports prompt lookup only at batch 1 (assisted decoding
is batch-1 only), so it has no batch-4 row.

Engine overhead per verify round (goal ≤ 10 %): round time = (speculative call seconds −
prefill alone) / loop iterations; minus the target verify forward over K + 1 positions
(+ LM head) with a cache buffer of the same size, timed alone in a jitted loop; minus the
drafter's `propose` timed alone in a jitted loop. The rest (acceptance, cache and sequence
bookkeeping, loop control, host transfers) is the engine's overhead.

  python experiments/benchmarks/ngram_spec.py        # writes experiments/results/ngram_spec/
  python experiments/benchmarks/ngram_spec.py --num_prompts=2 --max_new_tokens=32 --out_dir=/tmp/x   # smoke run
"""

import functools
import os
import statistics
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

_N = flags.DEFINE_integer("num_prompts", 8, "first N prompts of each set")
_NEW = flags.DEFINE_integer("max_new_tokens", 128, "max new tokens per prompt (EOS stops earlier)")
_K = flags.DEFINE_integer("num_draft_tokens", 4, "K drafts per verify round")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "4"], "batch sizes to measure")
_SETS = flags.DEFINE_list("prompt_sets", ["humaneval", "mtbench"], "prompt sets")
_REPEATS = flags.DEFINE_integer("repeats", 1, "timed repetitions per batch (median)")
_ITERS = flags.DEFINE_integer("overhead_iters", 32, "iterations of the jitted loops that time forward / propose alone")
_HF = flags.DEFINE_bool("hf", True, "also time transformers (prompt lookup and plain greedy) at batch 1")
_OUT = flags.DEFINE_string("out_dir", None, "default: experiments/results/ngram_spec")


# ----------------------------------------------------------------------------- engine overhead


def _median_seconds(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.partial(jax.jit, static_argnames=("config", "cache_len"))
def _prefill_alone(params, tokens_BP, lengths_B, *, config, cache_len):
    from opd.decoding.generate import prefill
    from opd.models import transformer as tfm

    _, last_BD, _ = prefill(params, config, tokens_BP, lengths_B, cache_len)
    return jnp.argmax(tfm.lm_head(params, config, last_BD), axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "num_tokens", "cache_len", "iters"))
def _verify_forward_loop(params, tok_B, lengths_B, *, config, num_tokens, cache_len, iters):
    """`iters` target forwards over [B, K + 1] tokens at a fixed cache length (+ LM head)."""
    from opd.models import transformer as tfm

    B = tok_B.shape[0]
    cache = tfm.init_cache(config, B, cache_len)._replace(lengths=lengths_B)

    def body(_, carry):
        cache, tok_B = carry
        inp_BK1 = jnp.broadcast_to(tok_B[:, None], (B, num_tokens))
        o = tfm.forward(params, config, inp_BK1, cache=cache)
        logits_BK1V = tfm.lm_head(params, config, o.hidden_BTD)
        return o.cache._replace(lengths=lengths_B), jnp.argmax(logits_BK1V[:, -1], axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, iters, body, (cache, tok_B))[1]


@functools.partial(jax.jit, static_argnames=("spec", "num_draft_tokens", "iters"))
def _propose_loop(dparams, seq_BS, seq_len_B, key, *, spec, num_draft_tokens, iters):
    """`iters` drafter proposals on a committed text of the engine's buffer size."""
    from opd.decoding.sampling import SamplingParams
    from opd.drafters.base import DraftContext
    from opd.models import transformer as tfm

    sp = SamplingParams(0.0, 0, 1.0)
    state = spec.prefill(dparams, DraftContext(seq_BS, seq_len_B), (), seq_BS.shape[1])

    def body(_, carry):
        seq_BS, state = carry
        d_BK, _, state = spec.propose(dparams, state, DraftContext(seq_BS, seq_len_B), key, num_draft_tokens, sp)
        return tfm.update_rows(seq_BS, d_BK[:, :1], seq_len_B - 1, axis=1), state  # feed back: no hoisting

    return jax.lax.fori_loop(0, iters, body, (seq_BS, state))[0]


def engine_overhead(target, drafter, metrics, K: int, max_new_tokens: int, iters: int, cache: dict) -> dict:
    """Splits the speculative calls of one `evaluate` run into prefill, verify forward, propose and overhead."""
    from opd.decoding import batching

    totals = dict(seconds=0.0, prefill=0.0, rounds=0, forward=0.0, propose=0.0)
    for b in metrics["per_batch"]:
        lens = b["prompt_lengths"]
        B, P = batching.next_pow2(len(lens)), batching.bucket_length(max(lens))
        cache_len = batching.round_up(P + max_new_tokens + 2 * (K + 1), 128)  # as in opd/decoding/speculative.py
        key = (B, P, cache_len)
        if key not in cache:
            toks = jnp.ones((B, P), jnp.int32)
            lengths = jnp.full((B,), max(lens), jnp.int32)
            mid = jnp.full((B,), min(max(lens) + max_new_tokens // 2, cache_len - K - 1), jnp.int32)
            seq = jax.random.randint(jax.random.PRNGKey(0), (B, cache_len), 0, 200, jnp.int32)
            t_pre = _median_seconds(functools.partial(_prefill_alone, config=target.config, cache_len=cache_len),
                                    target.params, toks, lengths)
            t_fwd = _median_seconds(functools.partial(_verify_forward_loop, config=target.config, num_tokens=K + 1,
                                                      cache_len=cache_len, iters=iters), target.params, toks[:, 0], mid) / iters
            t_prop = _median_seconds(functools.partial(_propose_loop, spec=drafter.spec, num_draft_tokens=K, iters=iters),
                                     drafter.params, seq, mid, jax.random.PRNGKey(1)) / iters
            cache[key] = (t_pre, t_fwd, t_prop)
        t_pre, t_fwd, t_prop = cache[key]
        loop_iters = b["target_forwards"] - 1  # one forward is the prefill
        totals["seconds"] += b["seconds"]
        totals["prefill"] += t_pre
        totals["rounds"] += loop_iters
        totals["forward"] += loop_iters * t_fwd
        totals["propose"] += loop_iters * t_prop
    loop_s = totals["seconds"] - totals["prefill"]
    over = loop_s - totals["forward"] - totals["propose"]
    r = max(totals["rounds"], 1)
    return {
        "loop_iterations": totals["rounds"],
        "round_ms": 1e3 * loop_s / r,
        "verify_forward_ms": 1e3 * totals["forward"] / r,
        "propose_ms": 1e3 * totals["propose"] / r,
        "overhead_ms": 1e3 * over / r,
        "overhead_fraction": over / loop_s if loop_s > 0 else None,
        "prefill_seconds": totals["prefill"],
    }


# ----------------------------------------------------------------------------- transformers


def hf_generate(hf, prompts, K, max_new_tokens, eos_ids, prompt_lookup: bool):
    """transformers at batch 1 (one prompt at a time); returns (tokens per prompt, seconds)."""
    import torch

    kw = dict(prompt_lookup_num_tokens=K, max_matching_ngram_size=3) if prompt_lookup else {}
    outs, t0 = [], time.perf_counter()
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos_ids),
                              pad_token_id=eos_ids[0], **kw)
        gen = out[0, len(p):].tolist()
        outs.append(gen[: next((i for i, t in enumerate(gen) if t in eos_ids), len(gen))])
    return outs, time.perf_counter() - t0


# ----------------------------------------------------------------------------- main


def main(_):
    import torch
    import transformers

    import opd
    from opd.data.assets import asset_path
    from opd.decoding import batching
    from opd.eval.harness import evaluate, load_eval_records, write_eval
    from opd.eval.report import RESULTS_ROOT, markdown_table, write_results

    torch.set_num_threads(os.cpu_count())
    K, N = _K.value, _NEW.value
    out_dir = _OUT.value or os.path.join(RESULTS_ROOT, "ngram_spec")
    path = asset_path("smollm2_gguf")
    target = opd.load_target(path)
    drafter = opd.init_drafter("ngram", target)
    eos = tuple(target.eos_token_ids)
    hf = None
    if _HF.value:
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               dtype=torch.float32).eval()
    rows, runs, shapes = [], [], {}
    for ps in _SETS.value:
        _, records = load_eval_records(ps, _N.value)
        ids = batching.encode_prompts(target, [r["turns"][0] for r in records])
        ours_b1 = None  # our batch-1 speculative tokens, compared with transformers'
        for bs in [int(b) for b in _BATCHES.value]:
            t0 = time.perf_counter()
            m = evaluate(target, drafter, ids, num_draft_tokens=K, batch_size=bs, max_new_tokens=N,
                         repeats=_REPEATS.value, return_tokens=True)
            m["prompt_set"], m["prompt_ids"] = ps, [r["id"] for r in records]
            tokens = m.pop("tokens")
            ours_b1 = tokens if bs == 1 else ours_b1
            ov = engine_overhead(target, drafter, m, K, N, _ITERS.value, shapes)
            write_eval(m, os.path.join(out_dir, f"{ps}_batch{bs}"))
            logging.info("%s batch %d done in %.0f s", ps, bs, time.perf_counter() - t0)
            runs.append({"prompt_set": ps, "batch_size": bs, "metrics": m, "engine_overhead": ov})
            rows.append({"prompt_set": ps, "batch": bs, "impl": "opd speculative (n-gram)", "tau": m["tau"],
                         "tokens_per_second": m["tokens_per_second"], "speedup_vs_own_AR": m["speedup"],
                         "greedy_equal": m["greedy_matches_ar"], "round_ms": ov["round_ms"],
                         "verify_fwd_ms": ov["verify_forward_ms"], "propose_ms": ov["propose_ms"],
                         "overhead_%": None if ov["overhead_fraction"] is None else 100 * ov["overhead_fraction"]})
            rows.append({"prompt_set": ps, "batch": bs, "impl": "opd autoregressive", "tau": 1.0,
                         "tokens_per_second": m["ar_tokens_per_second"]})
            print(rows[-2:], "acceptance by offset", m["acceptance_by_offset"])
        if hf is None:
            continue
        hf_generate(hf, ids[:1], K, 8, eos, prompt_lookup=True)  # torch warm-up
        pld, t_pld = hf_generate(hf, ids, K, N, eos, prompt_lookup=True)
        greedy, t_greedy = hf_generate(hf, ids, K, N, eos, prompt_lookup=False)
        hf_run = {"prompt_set": ps, "batch_size": 1, "transformers": {
            "tokens_per_second_prompt_lookup": sum(map(len, pld)) / t_pld,
            "tokens_per_second_greedy": sum(map(len, greedy)) / t_greedy,
            "prompt_lookup_equals_greedy": pld == greedy,
            "identical_to_opd_fraction": None if ours_b1 is None else sum(a == b for a, b in zip(ours_b1, pld)) / len(pld),
        }}
        t = hf_run["transformers"]
        t["prompt_lookup_speedup"] = t["tokens_per_second_prompt_lookup"] / t["tokens_per_second_greedy"]
        runs.append(hf_run)
        rows.append({"prompt_set": ps, "batch": 1, "impl": "transformers prompt lookup", "tokens_per_second": t["tokens_per_second_prompt_lookup"],
                     "speedup_vs_own_AR": t["prompt_lookup_speedup"], "greedy_equal": t["prompt_lookup_equals_greedy"]})
        rows.append({"prompt_set": ps, "batch": 1, "impl": "transformers greedy", "tau": 1.0, "tokens_per_second": t["tokens_per_second_greedy"]})
        print(rows[-2:], t)
    payload = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> float32)", "drafter": "ngram (max_ngram=3, min_ngram=1)",
        "num_draft_tokens": K, "max_new_tokens": N, "num_prompts": _N.value, "temperature": 0.0,
        "notes": ["transformers supports prompt lookup (assisted decoding) only at batch 1: no transformers row at batch > 1.",
                  "transformers' prompt lookup takes the first (leftmost) n-gram match and drafts nothing when none is found; "
                  "ours takes the latest match and always drafts K tokens.",
                  "speedup = speculative tokens/s over our autoregressive tokens/s, measured alternately on the same prompts "
                  "after a warm-up that compiles both.",
                  "overhead = round time - verify forward alone - propose alone (jitted loops, same shapes)."],
        "runs": runs,
    }
    cols = ["prompt_set", "batch", "impl", "tau", "tokens_per_second", "speedup_vs_own_AR", "greedy_equal", "round_ms",
            "verify_fwd_ms", "propose_ms", "overhead_%"]
    table = markdown_table(rows, cols)
    write_results("ngram_spec", payload, table, out_dir)
    _plot(runs, os.path.join(out_dir, "ngram_spec.png"))
    print(table)


def _plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hf = {r["prompt_set"]: r["transformers"] for r in runs if "transformers" in r}
    runs = [r for r in runs if "metrics" in r]
    labels = [f"{r['prompt_set']}\nbatch {r['batch_size']}" for r in runs]
    x = np.arange(len(runs))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    series = [("opd AR", [r["metrics"]["ar_tokens_per_second"] for r in runs]),
              ("opd n-gram spec.", [r["metrics"]["tokens_per_second"] for r in runs]),
              ("HF greedy", [hf.get(r["prompt_set"], {}).get("tokens_per_second_greedy", 0) if r["batch_size"] == 1 else 0 for r in runs]),
              ("HF prompt lookup", [hf.get(r["prompt_set"], {}).get("tokens_per_second_prompt_lookup", 0) if r["batch_size"] == 1 else 0 for r in runs])]
    w = 0.2
    for i, (name, vals) in enumerate(series):
        a.bar(x + (i - 1.5) * w, vals, w, label=name)
    a.set_xticks(x, labels)
    a.set_ylabel("tokens / s")
    a.set_title("SmolLM2-135M greedy, CPU (HF: batch 1 only)", fontsize=9)
    a.set_ylim(0, 1.3 * max(max(v) for _, v in series))
    a.legend(fontsize=7, ncol=2, loc="upper left")
    ov = [r["engine_overhead"] for r in runs]
    fwd = np.array([o["verify_forward_ms"] for o in ov])
    prop = np.array([o["propose_ms"] for o in ov])
    b.bar(x, fwd, 0.5, label="verify forward alone")
    b.bar(x, prop, 0.5, bottom=fwd, label="n-gram propose alone")
    b.plot(x, [o["round_ms"] for o in ov], "k_", markersize=30, mew=2, label="measured round")
    for xi, o in zip(x, ov):
        if o["overhead_fraction"] is not None:
            b.annotate(f"overhead {100 * o['overhead_fraction']:+.1f} %", (xi, o["round_ms"]), textcoords="offset points",
                       xytext=(0, 6), ha="center", fontsize=7)
    b.set_ylim(0, 1.25 * max(max(o["round_ms"] for o in ov), float(np.max(fwd + prop))))
    b.set_xticks(x, labels)
    b.set_ylabel("ms per verify round")
    b.set_title("where a verify round's time goes", fontsize=9)
    b.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
