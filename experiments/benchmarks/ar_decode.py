"""Autoregressive greedy decoding speed: `opd.generate` vs `transformers.generate`, side by side.

Same model (SmolLM2-135M-Instruct, the Q4_1 GGUF dequantised to float32 by both), same
MT-Bench prompts (chat template applied), same machine and process; every row generates
exactly `--new_tokens` tokens (EOS ignored) so tokens/s are comparable; the decode-only rate subtracts a 1-token run (prefill). Compile time of
our jitted loop is measured separately (first call) and excluded from tokens/s.

  python experiments/benchmarks/ar_decode.py            # writes experiments/results/ar_decode/
"""

import os
import statistics
import time

from absl import app, flags
import numpy as np

_NEW = flags.DEFINE_integer("new_tokens", 64, "tokens generated per prompt")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repetitions (median reported)")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes to measure")
_PROMPTS_B1 = flags.DEFINE_integer("batch1_prompts", 4, "prompts decoded one by one at batch 1")
_OUT = flags.DEFINE_string("out_dir", None, "default: experiments/results/ar_decode")


def main(_):
    import torch
    import transformers

    import opd
    from opd.data.assets import asset_path, load_prompt_set
    from opd.eval.report import markdown_table, write_results

    torch.set_num_threads(os.cpu_count())
    path = asset_path("smollm2_gguf")
    target = opd.load_target(path)
    tok = target.tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    N = _NEW.value
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}])) for r in load_prompt_set("mtbench")[:8]]

    def ours(batch, n=N):
        out = opd.generate(target, batch, max_new_tokens=n, eos_token_ids=())
        return out.tokens

    def theirs(batch, n=N):
        L = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (L - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return [r[L:].tolist() for r in out]

    def timed(fn, batches, n=N):
        times = []
        for _ in range(_REPEATS.value):
            t0 = time.perf_counter()
            outs = [fn(b, n) for b in batches]
            times.append(time.perf_counter() - t0)
        return statistics.median(times), outs

    rows, payload = [], {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> float32)", "new_tokens": N, "prompt_set": "mtbench turn 1", "runs": []}
    for bs in [int(b) for b in _BATCHES.value]:
        batches = [[p] for p in prompts[: _PROMPTS_B1.value]] if bs == 1 else [prompts[:bs]]
        total = N * sum(len(b) for b in batches)
        t0 = time.perf_counter()
        for b in batches:  # compile every prompt-length bucket once (also for n=1)
            ours(b)
            ours(b, 1)
        compile_s = time.perf_counter() - t0
        theirs(batches[0])  # torch warm-up
        t_ours, out_ours = timed(ours, batches)
        t_hf, out_hf = timed(theirs, batches)
        # Prefill + first token alone, to report the decode loop's own rate as well.
        p_ours, _ = timed(ours, batches, 1)
        p_hf, _ = timed(theirs, batches, 1)
        decode_tokens = total - sum(len(b) for b in batches)
        flat_o = [r for o in out_ours for r in o]
        flat_h = [r for o in out_hf for r in o]
        same = sum(a == b for a, b in zip(flat_o, flat_h)) / len(flat_o)
        for impl, t, p in (("opd.generate (JAX)", t_ours, p_ours), ("transformers.generate (PyTorch)", t_hf, p_hf)):
            rows.append({"batch": bs, "impl": impl, "tokens": total, "seconds": t, "tokens_per_second": total / t,
                         "prefill_seconds": p, "decode_tokens_per_second": decode_tokens / (t - p)})
        rows.append({"batch": bs, "impl": "ratio ours / transformers", "tokens_per_second": t_hf / t_ours,
                     "decode_tokens_per_second": (t_hf - p_hf) / (t_ours - p_ours)})
        payload["runs"].append({
            "batch_size": bs, "tokens": total, "opd_seconds": t_ours, "hf_seconds": t_hf,
            "opd_tokens_per_second": total / t_ours, "hf_tokens_per_second": total / t_hf,
            "speed_ratio": t_hf / t_ours, "opd_first_call_seconds_incl_compile": compile_s,
            "opd_prefill_seconds": p_ours, "hf_prefill_seconds": p_hf,
            "opd_decode_tokens_per_second": decode_tokens / (t_ours - p_ours),
            "hf_decode_tokens_per_second": decode_tokens / (t_hf - p_hf),
            "decode_speed_ratio": (t_hf - p_hf) / (t_ours - p_ours),
            "identical_greedy_outputs_fraction": same,
        })
        print(rows[-3:], f"identical outputs: {same:.2f}")
    table = markdown_table(rows, ["batch", "impl", "tokens", "seconds", "tokens_per_second", "prefill_seconds", "decode_tokens_per_second"])
    out_dir = write_results("ar_decode", payload, table, _OUT.value)
    _plot(payload, os.path.join(out_dir, "tokens_per_second.png"))
    print(table)


def _plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    x = np.arange(len(runs))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(x - 0.2, [r["opd_tokens_per_second"] for r in runs], 0.4, label="opd.generate (JAX)")
    ax.bar(x + 0.2, [r["hf_tokens_per_second"] for r in runs], 0.4, label="transformers.generate")
    ax.set_xticks(x, [f"batch {r['batch_size']}" for r in runs])
    ax.set_ylabel("tokens / s")
    ax.set_title("SmolLM2-135M greedy decode, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app.run(main)
