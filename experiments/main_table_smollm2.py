"""The main table: τ and wall-clock speed-up of every drafter on SmolLM2-135M-Instruct, at batch
1 and 4, greedy and T = 1, on MT-Bench, HumanEval and AlpacaEval's held-out split.

  python -m opd.main --config=experiments/main_table_smollm2.py --workdir=workdirs/smollm2
      # -> DIR/eval/main_*/ (one run each, resumable) and experiments/results/main_table/

Needs the drafters of `experiments/opd_smollm2.py` in the same DIR: for EAGLE-3 and DFlash the
Draft-OPD run (`export/opd_<kind>`) and continued SFT to the same cumulative training FLOPs
(`export/sft_cont_<kind>`), both from one SFT warm-up. The "no drafter" rows are the
autoregressive throughput measured inside the same runs: the drafters of one prompt set,
temperature and batch size decode side by side against one autoregressive timing
(`config.eval.side_by_side`; runs already written are skipped, so a table can span sessions).

`shipped`: the drafters shipped in the repo (`experiments/drafters/`, issue 15's plateau runs)
on every prompt of each set (MT-Bench 80, HumanEval 164; AlpacaEval: the 87 held-out prompts the
training probes do not use)
at 128 new tokens (~5 hours on this CPU; n-gram's own table is `experiments/results/ngram_spec/`);
`shipped,t0` / `shipped,t1`: one temperature's half of it (the same runs, reported alone, e.g.
while the other half is still running), `b1` / `b4` likewise one batch size's; `shipped,quick`: the shipped drafters alone on the first
16 prompts of each set at T = 0, batch 1.

  python -m opd.main --config=experiments/main_table_smollm2.py:shipped --workdir=workdirs/main_shipped

`decisive[,sN]` (issue 16): every method of the decisive experiment (`experiments/opd_smollm2.py`
`:plateau`, seed sN, default s0) next to the shipped drafter it started from, in that experiment's
DIR (its exports are there), on the first 16 prompts of each set at 128 new tokens (~2-3 hours).

  python -m opd.main --config=experiments/main_table_smollm2.py:decisive,s0 --workdir=workdirs/smollm2_scale

`decisive,sN,<kind>/<run>[,...]`: only those rows (`<kind>/shipped`: the start), eval only (no
report): each method's rows while its export is in DIR, e.g. right after its run, on a machine
that may lose DIR before the last run; their `eval/<run>/metrics.json` kept and put back, the
full `decisive,sN` then reports without decoding them again (experiments/opd_decisive_runs.sh).
`decisive,sN,sofar`: the report of the rows decoded so far in DIR, naming the others (nothing is
decoded); on a machine without them, first put the kept rows back in DIR:

  python -c "from experiments.main_table_smollm2 import decisive_rows as d; d('s0', 'workdirs/t', 'experiments/results/main_table_decisive_s0/runs')"
  python -m opd.main --config=experiments/main_table_smollm2.py:decisive,s0,sofar --workdir=workdirs/t

Every field and its default: `opd.configs.default_config`.
"""

import os
import shutil

import ml_collections

from opd.configs import default_config, variant_parts

PROMPT_SETS = ("mtbench", "humaneval", "alpacaeval")
# every prompt; AlpacaEval: the first 87 of its 151 held-out prompts (the training probes use the last 64)
SET_SIZES = {"mtbench": 80, "humaneval": 164, "alpacaeval": 87}
SHIPPED = (  # (drafter, shipped name, K)
    ("eagle3", "smollm2_eagle3", 4),
    ("dflash", "smollm2_dflash", 7),
)
DRAFTERS = (  # (drafter, exported run or "" for n-gram, K)
    ("ngram", "", 4),
    ("eagle3", "sft_cont", 4),
    ("eagle3", "opd", 4),
    ("dflash", "sft_cont", 7),
    ("dflash", "opd", 7),
)
# issue 16's methods from the shipped drafters (run names of experiments/opd_smollm2.py without the seed)
DECISIVE = tuple((kind, run, K) for kind, K, runs in (
    ("eagle3", 4, ("opd_plateau_reference", "opd_plateau", "sft_cont_plateau_reference", "sft_rollouts_plateau_reference",
                   "ttt_rollouts_plateau_reference")),
    ("dflash", 7, ("opd_plateau_reference", "opd_plateau", "sft_cont_plateau_reference",
                   "sft_rollouts_plateau_reference"))) for run in runs)
SEEDS = ("s0", "s1", "s2")
# the decisive table's rows, as variant parts: <kind>/shipped (the start) and <kind>/<run>
ROWS = tuple(f"{kind}/shipped" for kind, _, _ in SHIPPED) + tuple(f"{kind}/{run}" for kind, run, _ in DECISIVE)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    parts = variant_parts(variant, ("shipped", "quick", "t0", "t1", "b1", "b4", "decisive", "sofar") + SEEDS + ROWS,
                          "experiments/main_table_smollm2.py")
    rows = [p for p in parts if p in ROWS]
    if "sofar" in parts and ("decisive" not in parts or rows):
        raise ValueError("experiments/main_table_smollm2.py: `sofar` reports the whole `decisive` table's rows "
                         "decoded so far: name `decisive` and no rows")
    if rows and "decisive" not in parts:
        raise ValueError("experiments/main_table_smollm2.py: rows (<kind>/<run>) are parts of the `decisive` table")
    seeds = [p for p in parts if p in SEEDS]
    if seeds and ("decisive" not in parts or len(seeds) > 1):
        raise ValueError("experiments/main_table_smollm2.py: a seed (s0, s1, s2) goes with `decisive`, one at a time")
    if "decisive" in parts and "shipped" in parts:
        raise ValueError("experiments/main_table_smollm2.py: `decisive` and `shipped` are two tables: name one")
    if {"quick", "t0", "t1", "b1", "b4"} & set(parts) and "shipped" not in parts:
        raise ValueError("experiments/main_table_smollm2.py: `quick`, `t0`, `t1`, `b1` and `b4` are parts of the "
                         "`shipped` table")
    if "t0" in parts and "t1" in parts or "b1" in parts and "b4" in parts:
        raise ValueError("experiments/main_table_smollm2.py: `t0` and `t1` (`b1` and `b4`) are halves of one table: "
                         "name one (or neither)")
    c = default_config()
    c.stages = ("fetch_assets", "eval", "report")
    c.assets = ("smollm2_gguf", "alpacaeval", "mtbench", "humaneval")
    c.target.path = "asset:smollm2_gguf"
    c.eval.side_by_side = True  # one AR pass per (prompt set, T, batch), shared by every drafter

    # Budget (2 CPU cores): 60 runs of 4 prompts x 64 new tokens, autoregressive + speculative each.
    c.eval.num_prompts = 4  # the first prompts of each set (AlpacaEval: of its held-out split)
    c.eval.max_new_tokens = 64
    drafters, temperatures, batches = DRAFTERS, (0.0, 1.0), (1, 4)
    if "shipped" in parts:
        c.eval.max_new_tokens = 128
        drafters = SHIPPED
        if "quick" in parts:  # ~10 minutes
            temperatures, batches = (0.0,), (1,)
        else:  # one temperature's / batch size's part (its runs are the full table's)
            if "t0" in parts or "t1" in parts:
                temperatures = (0.0,) if "t0" in parts else (1.0,)
            if "b1" in parts or "b4" in parts:
                batches = (1,) if "b1" in parts else (4,)
    # (drafter, run label in the eval run's name, K, drafter_path or None for n-gram)
    if "shipped" in parts:
        entries = [(kind, run, K, f"shipped:{run}") for kind, run, K in drafters]
    else:
        entries = [(kind, run, K, f"workdir:export/{run}_{kind}" if run else None) for kind, run, K in drafters]
    seed = seeds[0] if seeds else "s0"
    if "decisive" in parts:
        c.eval.max_new_tokens = 128
        c.eval.num_prompts = 16
        entries = ([(kind, f"shipped_{run}", K, f"shipped:{run}") for kind, run, K in SHIPPED  # the start
                    if not rows or f"{kind}/shipped" in rows]
                   + [(kind, f"{run}_{seed}", K, f"workdir:export/{run}_{seed}_{kind}") for kind, run, K in DECISIVE
                      if not rows or f"{kind}/{run}" in rows])
        if rows:  # some rows: decoded now, reported with the full table
            c.stages = ("fetch_assets", "eval")
        if "sofar" in parts:  # the rows decoded so far, the others named; nothing decoded
            c.stages = ("report",)
            c.report.partial = True
    for temperature in temperatures:
        for batch in batches:
            for drafter, run, K, path in entries:
                for ps in PROMPT_SETS:
                    r = dict(name=f"main_{drafter}{'_' + run if run else ''}_{ps}_t{temperature:g}_b{batch}",
                             drafter=drafter, prompt_set=ps, temperature=temperature, batch_size=batch,
                             num_draft_tokens=K)
                    if path:
                        r["drafter_path"] = path
                    if "shipped" in parts:
                        r["num_prompts"] = 16 if "quick" in parts else SET_SIZES[ps]
                    c.eval.runs.append(r)

    c.report.results_name = "main_table"  # (the curves are experiments/benchmarks/opd_curves.py's figure)
    if "shipped" in parts:
        c.report.results_name = "main_table_shipped" + "".join(f"_{p}" for p in ("quick", "t0", "t1", "b1", "b4") if p in parts)
    if "decisive" in parts:
        c.report.results_name = f"main_table_decisive_{seed}"
    return c


def row_variant(row: str, seed: str) -> str:
    """The `experiments/opd_smollm2.py` variant whose run exports row `<kind>/<run>` of seed `seed`'s
    decisive table (the runner retrains it when a machine lost the export before its rows were decoded)."""
    if row not in ROWS or row.endswith("/shipped"):
        raise ValueError(f"experiments/main_table_smollm2.py: {row!r} is no trained row of the decisive table "
                         f"(one of {', '.join(r for r in ROWS if not r.endswith('/shipped'))})")
    kind, run = row.split("/")
    method, ref = run.split("_plateau")  # e.g. "sft_cont", "_reference"
    return ",".join([kind, "plateau"] + (["reference"] if ref else []) + ([] if method == "opd" else [method]) + [seed])


def decisive_rows(seed: str, workdir: str, kept: str) -> tuple[list, list]:
    """The decisive table of seed `seed` across machines that lose `workdir` (the runner's helper):
    puts each row's kept `<kept>/<eval run>.json` back as `workdir/eval/<eval run>/metrics.json` and
    keeps every one `workdir` has, then returns (the rows left to decode whose drafter is there:
    shipped or exported in `workdir`; the rows left whose export is not)."""
    os.makedirs(kept, exist_ok=True)
    pending, missing = [], []
    for row in ROWS:
        runs = get_config(f"decisive,{seed},{row}").eval.runs
        left = False
        for r in runs:
            metrics, copy = os.path.join(workdir, "eval", r["name"], "metrics.json"), os.path.join(kept, f"{r['name']}.json")
            if os.path.isfile(metrics) and not os.path.isfile(copy):
                shutil.copyfile(metrics, copy + ".tmp")
                os.replace(copy + ".tmp", copy)
            elif os.path.isfile(copy) and not os.path.isfile(metrics):
                os.makedirs(os.path.dirname(metrics), exist_ok=True)
                shutil.copyfile(copy, metrics)
            left |= not os.path.isfile(metrics)
        path = runs[0]["drafter_path"]
        if left:
            there = path.startswith("shipped:") or os.path.isdir(os.path.join(workdir, path.removeprefix("workdir:")))
            (pending if there else missing).append(row)
    return pending, missing
