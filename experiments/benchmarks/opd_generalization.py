"""Where a Draft-OPD gain lands: τ on the prompts Draft-OPD trained on vs the held-out probe, for
the plateaued drafter it started from, the Draft-OPD run and continued SFT at its FLOPs.

  python experiments/benchmarks/opd_generalization.py --workdir=workdirs/smollm2_scale --drafter=eagle3 \
      --runs=opd_plateau_reference_s0,sft_cont_plateau_reference_s0   # -> experiments/results/opd_generalization_eagle3/

The decisive runs (`experiments/opd_smollm2.py:<kind>,plateau,...`) roll out and train on
AlpacaEval's training prompts (`data:smollm2_alpacaeval_answers`, the SFT data's prompts too)
and are judged on the held-out probe (the last 64 of the held-out split). A method whose gain
stays on its training prompts fits them without generalising; one whose gain transfers does not.
Both sets are decoded as the runs' probe decodes (its block in `opd_smollm2.py:<kind>,plateau,
reference`: greedy, its K, prompts, tokens per prompt and batch); the training set is as many
prompts spread evenly over those the runs rolled out (their data, prompts <= their prompt_len).
For each run: τ and acceptance by offset on both sets, its gain over the start with a paired bootstrap 95 % interval over prompts, and the ratio of every run to the
last one (`--runs`' order; continued SFT last gives Draft-OPD / SFT). Drafters are read from
DIR/export/<run>_<kind>/ (the runs' exports). Writes JSON + table + plot.
"""

import os

import numpy as np
from absl import app, flags

import opd
from opd.configs import sibling_config
from opd.data.assets import asset_path
from opd.data.builders import read_trajectory_shards
from opd.eval.report import markdown_table, write_results
from opd.paths import resolve_path
from opd.training import stage_common

BOOTSTRAP = 2000


def spread(records: list, n: int) -> list:
    """`n` records at evenly spaced indices (all when fewer)."""
    if len(records) <= n:
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, n).round().astype(int)]


def tau_of(rounds, committed) -> float:
    return float(np.sum(committed) / np.sum(rounds))


def paired_ratio(a: dict, b: dict, rng) -> dict:
    """τ_a / τ_b over the same prompts, with a paired bootstrap 95 % interval (prompts resampled)."""
    ra, ca, rb, cb = (np.asarray(x, np.float64) for x in (a["rounds"], a["committed"], b["rounds"], b["committed"]))
    idx = rng.integers(0, len(ra), size=(BOOTSTRAP, len(ra)))
    boot = (ca[idx].sum(1) / ra[idx].sum(1)) / (cb[idx].sum(1) / rb[idx].sum(1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"ratio": tau_of(ra, ca) / tau_of(rb, cb), "lo": float(lo), "hi": float(hi)}


def decode(target, drafter, prompts, K: int, p) -> dict:
    """The prompts decoded as the probe block `p` decodes them: τ, acceptance, per-prompt counts."""
    out = opd.speculative_generate(target, drafter, prompts, max_new_tokens=int(p.max_new_tokens), num_draft_tokens=K,
                                   temperature=float(p.temperature), batch_size=int(p.batch_size))
    s = out.stats
    return {"tau": float(s["tau"]), "acceptance_by_offset": s["acceptance_by_offset"],
            "rounds": s["prompt_rounds"], "committed": s["prompt_committed"]}


def summarise(results: dict, runs: list, rng) -> list:
    """One row per drafter and prompt set: τ, gain over the start, ratio to the last run."""
    rows = []
    for name in ["start"] + runs:
        for pset, r in results[name].items():
            gain = paired_ratio(r, results["start"][pset], rng)
            row = {"drafter": name, "prompts": pset, "tau": r["tau"],
                   "gain_over_start": gain["ratio"] - 1, "gain_lo": gain["lo"] - 1, "gain_hi": gain["hi"] - 1,
                   **{f"acc{k + 1}": a for k, a in enumerate(r["acceptance_by_offset"])}}
            if name != runs[-1] and name != "start":
                vs = paired_ratio(r, results[runs[-1]][pset], rng)
                row.update({f"ratio_to_{runs[-1]}": vs["ratio"], "ratio_lo": vs["lo"], "ratio_hi": vs["hi"]})
            rows.append(row)
    return rows


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["drafter"] for r in rows))
    sets = list(dict.fromkeys(r["prompts"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        taus = [next(r["tau"] for r in rows if r["drafter"] == n and r["prompts"] == s) for s in sets]
        ax.bar(np.arange(len(sets)) + i * w, taus, w, label=n)
    ax.set_xticks(np.arange(len(sets)) + w * (len(names) - 1) / 2, sets)
    ax.set_ylabel("τ (greedy)")
    ax.set_ylim(1.0, None)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    F = flags.FLAGS
    kind, runs = F.drafter, list(F.runs)
    o = sibling_config(__file__, "../opd_smollm2.py", f"{kind},plateau,reference").opd  # the decisive runs'
    probe, K = o.probe, int(o.num_draft_tokens)
    target = opd.load_target(asset_path("smollm2_gguf"))
    train = [r for r in read_trajectory_shards(resolve_path(o.data[0])) if len(r["prompt_ids"]) <= o.prompt_len]
    sets = {"train": [list(r["prompt_ids"]) for r in spread(train, int(probe.num_prompts))],
            "heldout": stage_common.probe_prompts(probe)}
    paths = {"start": resolve_path(f"shipped:smollm2_{kind}"),
             **{n: os.path.join(F.workdir, "export", f"{n}_{kind}") for n in runs}}
    results = {}
    for name, path in paths.items():
        drafter = opd.load_drafter(path, target)
        results[name] = {}
        for pset, prompts in sets.items():
            results[name][pset] = decode(target, drafter, prompts, K, probe)
            print(f"{name} {pset}: τ {results[name][pset]['tau']:.3f}", flush=True)
    rows = summarise(results, runs, np.random.default_rng(0))
    cols = ["drafter", "prompts", "tau", "gain_over_start", "gain_lo", "gain_hi", f"ratio_to_{runs[-1]}", "ratio_lo",
            "ratio_hi"] + [f"acc{k + 1}" for k in range(K)]
    md = markdown_table(rows, cols, "{:.3f}")
    md += (f"\n{kind}, K = {K}, T = {probe.temperature}, {probe.max_new_tokens} new tokens per prompt; train: "
           f"{len(sets['train'])} of the {len(train)} training prompts <= {o.prompt_len} tokens ({o.data[0]}); heldout: the probe's "
           f"{len(sets['heldout'])} prompts. Intervals: paired bootstrap over prompts, 95 %.\n")
    out = write_results(F.name or f"opd_generalization_{kind}", {"drafter": kind, "runs": runs, "rows": rows,
                                                                  "per_prompt": results}, md, F.out_dir)
    plot(rows, os.path.join(out, "tau.png"))
    print(md)
    print(f"wrote {out}")


if __name__ == "__main__":  # flags defined here: tests load this module next to other scripts
    flags.DEFINE_string("workdir", "workdirs/smollm2_scale", "DIR holding DIR/export/<run>_<kind>/")
    flags.DEFINE_string("drafter", "eagle3", "drafter kind (eagle3 | dflash)")
    flags.DEFINE_list("runs", ["opd_plateau_reference_s0", "sft_cont_plateau_reference_s0"],
                      "exported runs; the last is the one the others are compared with")
    flags.DEFINE_string("name", "", "results name (default opd_generalization_<kind>)")
    flags.DEFINE_string("out_dir", None, "results folder (default experiments/results/<name>)")
    app.run(main)
