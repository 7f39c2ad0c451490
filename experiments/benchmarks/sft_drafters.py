"""SFT-trained EAGLE-3 and DFlash drafters for SmolLM2-135M-Instruct: τ and wall-clock speed-up.

Reads the drafters that `experiments/sft_smollm2.py` trained and exported into `--workdir`
(`export/sft_<kind>/`, plus `sft/<kind>/init/`, the same drafter untrained) and measures,
through `opd.eval.evaluate` (speculative and autoregressive decoding of the same prompts in
the same process, compile excluded), on MT-Bench (turn 1), HumanEval and the AlpacaEval
held-out split, at each batch size and temperature: τ (tokens committed per target forward),
acceptance by draft offset and the speed-up over our autoregressive decoding. Also plots the
SFT training curves (loss, per-offset accuracy against cumulative training FLOPs) from
`sft/<kind>/metrics.jsonl`.

  python -m opd.main --config=experiments/sft_smollm2.py:eagle3 --workdir=workdirs/smollm2   # train
  python -m opd.main --config=experiments/sft_smollm2.py:dflash --workdir=workdirs/smollm2
  python experiments/benchmarks/sft_drafters.py --workdir=workdirs/smollm2   # -> experiments/results/sft/
"""

import json
import os

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/smollm2", "workdir of the sft_smollm2 runs")
_KINDS = flags.DEFINE_list("drafters", ["eagle3", "dflash"], "drafter kinds to measure")
_SETS = flags.DEFINE_list("prompt_sets", ["alpacaeval", "mtbench", "humaneval"], "prompt sets")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "4"], "batch sizes")
_TEMPS = flags.DEFINE_list("temperatures", ["0", "1"], "sampling temperatures")
_N = flags.DEFINE_integer("num_prompts", 4, "first N prompts of each set")
_NEW = flags.DEFINE_integer("max_new_tokens", 96, "max new tokens per prompt")
_K = flags.DEFINE_list("num_draft_tokens", ["eagle3:4", "dflash:7"], "K per drafter kind")
_UNTRAINED = flags.DEFINE_bool("untrained", True, "also measure the untrained drafters (T=0, batch 1)")
_OUT = flags.DEFINE_string("out_dir", None, "default: experiments/results/sft")

COLUMNS = ("drafter", "training", "prompt_set", "temperature", "batch_size", "num_draft_tokens", "tau", "speedup",
           "tokens_per_second", "ar_tokens_per_second", "greedy_matches_ar")


def _curves(workdir: str, kinds, out_dir: str) -> dict:
    """SFT loss and per-offset accuracy against cumulative FLOPs, one panel per drafter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from opd.training.metrics import read_jsonl

    curves = {}
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7), squeeze=False)
    for j, kind in enumerate(kinds):
        rows = [r for r in read_jsonl(os.path.join(workdir, "sft", kind, "metrics.jsonl")) if "loss" in r]
        if not rows:
            continue
        x = [r["flops"] / 1e15 for r in rows]
        curves[kind] = rows
        axes[0, j].plot(x, [r["loss"] for r in rows])
        axes[0, j].set(title=f"{kind} SFT", xlabel="cumulative training PFLOPs", ylabel="loss")
        offsets = sorted(int(k.split("/")[1]) for k in rows[0] if k.startswith("accuracy/"))
        for k in offsets[:7]:
            axes[1, j].plot(x, [r[f"accuracy/{k}"] for r in rows], label=f"offset {k}")
        axes[1, j].set(xlabel="cumulative training PFLOPs", ylabel="train accuracy (top-1 = target)")
        axes[1, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sft_curves.png"), dpi=120)
    plt.close(fig)
    return {k: [{"step": r["step"], "flops": r["flops"], "loss": r["loss"], "accuracy/1": r.get("accuracy/1")}
                for r in v] for k, v in curves.items()}


def _plot_tau(rows, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["temperature"], r["batch_size"]) for r in rows if r["training"] != "none"})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, (t, b) in zip(axes[0], keys):
        sel = [r for r in rows if r["temperature"] == t and r["batch_size"] == b and r["training"] != "none"]
        sets = sorted({r["prompt_set"] for r in sel})
        kinds = sorted({r["drafter"] for r in sel})
        w = 0.8 / max(len(kinds), 1)
        for i, kind in enumerate(kinds):
            vals = [next((r["tau"] for r in sel if r["drafter"] == kind and r["prompt_set"] == s), 0) for s in sets]
            ax.bar([x + i * w for x in range(len(sets))], vals, width=w, label=kind)
        ax.set_xticks([x + w * (len(kinds) - 1) / 2 for x in range(len(sets))], sets)
        ax.set(title=f"T={t:g}, batch {b}", ylabel="τ (tokens / target forward)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sft_tau.png"), dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    from opd.drafters import load_drafter
    from opd.eval.harness import evaluate, write_eval
    from opd.eval.report import RESULTS_ROOT, markdown_table, write_results
    from opd.pipeline import drafter_training
    from opd.target import load_target
    from opd.data.assets import asset_path

    workdir = _WORKDIR.value
    out_dir = _OUT.value or os.path.join(RESULTS_ROOT, "sft")
    os.makedirs(out_dir, exist_ok=True)
    K = {k: int(v) for k, v in (kv.split(":") for kv in _K.value)}
    target = load_target(asset_path("smollm2_gguf"))
    rows = []

    def run(kind, path, prompt_set, temperature, batch_size):
        drafter = load_drafter(path, target)
        training = drafter_training({"drafter_path": path}, workdir)
        m = evaluate(target, drafter, prompt_set, num_prompts=_N.value, temperature=temperature,
                     num_draft_tokens=K[kind], batch_size=batch_size, max_new_tokens=_NEW.value, seed=0,
                     drafter_name=kind, training=training["source"], training_flops=training["flops"])
        name = f"{kind}_{'sft' if training['source'] != 'none' else 'untrained'}_{prompt_set}_T{temperature:g}_b{batch_size}"
        write_eval(m, os.path.join(out_dir, name))
        rows.append({c: m.get(c) for c in COLUMNS} | {"acceptance_by_offset": m.get("acceptance_by_offset"),
                                                        "training_flops": m.get("training_flops")})
        logging.info("%s: tau %.2f speedup %.2f", name, m["tau"], m["speedup"])

    for kind in _KINDS.value:
        trained = os.path.join(workdir, "export", f"sft_{kind}")
        if not os.path.isdir(trained):
            logging.warning("no trained %s drafter in %s: skipped", kind, trained)
            continue
        for ps in _SETS.value:
            if _UNTRAINED.value:
                run(kind, os.path.join(workdir, "sft", kind, "init"), ps, 0.0, 1)
            for t in (float(x) for x in _TEMPS.value):
                for b in (int(x) for x in _BATCHES.value):
                    run(kind, trained, ps, t, b)

    curves = _curves(workdir, _KINDS.value, out_dir)
    _plot_tau(rows, out_dir)
    table = markdown_table(rows, COLUMNS)
    write_results("sft", {"rows": rows, "curves": curves, "num_prompts": _N.value, "max_new_tokens": _NEW.value,
                          "workdir_config": _read_configs(workdir)}, table, out_dir)
    print(table)


def _read_configs(workdir: str) -> dict:
    out = {}
    for kind in ("eagle3", "dflash"):
        for name in ("run.json", "sft_config.json"):
            p = os.path.join(workdir, "sft", kind, name)
            if os.path.isfile(p):
                with open(p) as f:
                    out.setdefault(kind, {})[name[:-5]] = json.load(f)
    return out


if __name__ == "__main__":
    app.run(main)
