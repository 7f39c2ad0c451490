#!/usr/bin/env bash
# Issue 16's decisive experiment and its ablations: every run, in the order that answers the
# question soonest, then the summary (experiments/results/opd_decisive/).
#
#   bash experiments/opd_decisive_runs.sh [DIR]        # DIR: the plateau run's (default workdirs/smollm2_scale)
#   SEEDS="s0" KINDS="eagle3" bash experiments/opd_decisive_runs.sh   # KINDS: taken in the order given
#
# Each run resumes from DIR (a finished stage is not redone), so a stopped script continues where
# it stopped when started again. The order answers the question soonest (~1 h per run on 2 CPU
# cores): the goal's pair (Draft-OPD with the reference preset, continued SFT at its fairly priced
# FLOPs) for both drafters at each seed, each pair's τ on its training prompts vs held-out
# (opd_generalization.py); our default Draft-OPD and the EAGLE-3 ablations (one
# reference difference each, probe curves only); the other methods
# (SFT on the rollouts, EAGLE-3's TTT-on-rollouts recipe, our default) at the first seed and seed
# s0's main table of every method (experiments/results/main_table_decisive_s0/); the other methods
# at the other seeds.
#
# Across machines that lose DIR: after every run the summaries are rewritten and keep each run's
# probe curve in experiments/results/<summary>/runs/, and the run is added to the ledger
# ($RESULTS/opd_decisive/finished.txt; RESULTS defaults to experiments/results); commit both as runs finish.
# A run in the ledger is skipped; continued SFT and SFT on the rollouts match a Draft-OPD run's
# FLOPs from its kept curve when DIR lacks the run; a finished reference Draft-OPD run's rollouts
# are kept ($RESULTS/opd_decisive/rollouts/, gzipped) and put back for SFT on them (the run is
# redone only when neither has them); seed s0's main table is decoded a row at a time, each
# method's right after its run (its export is in DIR then), its eval metrics kept
# ($RESULTS/main_table_decisive_s0/runs/) and put back, the table so far reported after each batch of
# rows and in full once every row has them ($RESULTS/main_table_decisive_s0/; a method whose export
# DIR lost before its rows were decoded is run again for them).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-workdirs/smollm2_scale}
SEEDS=${SEEDS:-"s0 s1 s2"}
KINDS=${KINDS:-"eagle3 dflash"}
RESULTS=${RESULTS:-experiments/results}
ABLATIONS=$(python -c "from experiments.opd_smollm2 import ABLATIONS; print(*ABLATIONS)")

summaries() {  # the decisive summary; the ablations' against our default
  python experiments/benchmarks/opd_decisive.py --workdir="$DIR" --drafters="${KINDS// /,}" --seeds="${SEEDS// /,}" \
      --out_dir="$RESULTS/opd_decisive"
  if [[ " $SEEDS " == *" s0 "* ]] && [[ " $KINDS " == *" eagle3 "* ]]; then
    abl=opd_plateau; for a in $ABLATIONS; do abl="$abl,opd_plateau_$a"; done
    python experiments/benchmarks/opd_decisive.py --workdir="$DIR" --drafters=eagle3 --seeds=s0 --methods="$abl" \
        --baseline=opd_plateau --name=opd_ablations_plateau --out_dir="$RESULTS/opd_ablations_plateau"
  fi
}

LEDGER="$RESULTS/opd_decisive/finished.txt"
mkdir -p "$(dirname "$LEDGER")" && touch "$LEDGER"
finished() { grep -qx "$1" <(cut -f1 "$LEDGER"); }  # finished NAME: is it in the ledger?
record() { printf '%s\t%s\t%s\n' "$1" "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo -)" >> "$LEDGER"; }

run() {  # run VARIANT [--config.x=y ...]: once (the ledger), then the summaries
  if finished "$1"; then echo "=== opd_smollm2.py:$1: finished (in $LEDGER)"; return; fi
  echo "=== $(date -u +%FT%TZ) opd_smollm2.py:$1"
  python -m opd.main --config="experiments/opd_smollm2.py:$1" --workdir="$DIR" "${@:2}"
  summaries || echo "(a summary has no runs yet)"
  record "$1"
  if [[ "$1" == *,s0 && "$1" != *,abl_* ]]; then table_rows s0; fi  # its main-table rows
}
match_flops() {  # match_flops KIND SEED: the reference Draft-OPD run's kept curve, when DIR lacks the run
  local opd="opd_plateau_reference_$2"
  local kept="$RESULTS/opd_decisive/runs/$1/$opd.jsonl"
  if [ ! -f "$DIR/$opd/$1/metrics.jsonl" ] && [ -f "$kept" ]; then echo "--config.sft.match_flops=$(realpath "$kept")"; fi
}
keep_rollouts() {  # keep_rollouts KIND SEED: a finished reference run's rollouts kept from DIR, or put back in it
  local d="$DIR/opd_plateau_reference_$2/$1/rollouts" kept="$RESULTS/opd_decisive/rollouts/$1/opd_plateau_reference_$2"
  local f
  if [ -d "$DIR/export/opd_plateau_reference_$2_$1" ] && compgen -G "$d/shard-*.jsonl" > /dev/null && [ ! -d "$kept" ]; then
    rm -rf "$kept.tmp" && mkdir -p "$kept.tmp"
    for f in "$d"/shard-*.jsonl; do gzip -9 -c "$f" > "$kept.tmp/$(basename "$f").gz"; done
    mv "$kept.tmp" "$kept"
  elif [ ! -d "$d" ] && compgen -G "$kept/shard-*.jsonl.gz" > /dev/null; then  # as the run wrote them (a rerun overwrites, never duplicates)
    mkdir -p "$d.tmp"
    for f in "$kept"/shard-*.jsonl.gz; do gunzip -c "$f" > "$d.tmp/$(basename "$f" .gz)"; done
    mv "$d.tmp" "$d"
  fi
}
rows_left() {  # rows_left SEED 0|1: seed SEED's main-table rows left to decode whose drafter is in DIR (0) / is not (1)
  python -c "from experiments.main_table_smollm2 import decisive_rows
print(*decisive_rows('$1', '$DIR', '$RESULTS/main_table_decisive_$1/runs')[$2])"
}
table_rows() {  # table_rows SEED: the main table's rows whose drafters are in DIR, decoded once (kept in RESULTS)
  local rows
  rows=$(rows_left "$1" 0)
  if [ -z "$rows" ]; then return; fi
  echo "=== $(date -u +%FT%TZ) main_table_smollm2.py:decisive,$1 rows ${rows// /,}"
  python -m opd.main --config="experiments/main_table_smollm2.py:decisive,$1,${rows// /,}" --workdir="$DIR"
  local f n kept="$RESULTS/main_table_decisive_$1/runs"  # kept at once (decisive_rows would at its next call)
  for f in "$DIR"/eval/main_*_shipped_*/metrics.json "$DIR"/eval/main_*_"$1"_*/metrics.json; do
    n=$(basename "$(dirname "$f")")
    if [ -f "$f" ] && [ ! -f "$kept/$n.json" ]; then cp "$f" "$kept/$n.json.tmp" && mv "$kept/$n.json.tmp" "$kept/$n.json"; fi
  done
  report_table "$1" sofar || echo "(the table so far: not reported)"
}
report_table() {  # report_table SEED [sofar]: seed SEED's main table (so far: the rows decoded, the rest named)
  echo "=== $(date -u +%FT%TZ) main_table_smollm2.py:decisive,$1${2:+,$2}"
  python -m opd.main --config="experiments/main_table_smollm2.py:decisive,$1${2:+,$2}" --workdir="$DIR" \
      --config.report.results_root="$(realpath "$RESULTS")"
}

pair() {  # the goal's ratio: Draft-OPD (reference preset) and continued SFT at its fairly priced FLOPs
  for k in $KINDS; do
    run "$k,plateau,reference,$1"
    keep_rollouts "$k" "$1"
    run "$k,plateau,reference,sft_cont,$1" $(match_flops "$k" "$1")
    generalization "$k" "$1"
  done
}
generalization() {  # generalization KIND SEED: where the pair's gains land (its training prompts vs held-out)
  local runs="opd_plateau_reference_$2,sft_cont_plateau_reference_$2" name="opd_generalization_$1_$2"
  if finished "generalization:$1,$2" || [ ! -d "$DIR/export/opd_plateau_reference_$2_$1" ] \
      || [ ! -d "$DIR/export/sft_cont_plateau_reference_$2_$1" ]; then return; fi
  echo "=== $(date -u +%FT%TZ) opd_generalization.py: $1 $2"
  python experiments/benchmarks/opd_generalization.py --workdir="$DIR" --drafter="$1" --runs="$runs" \
      --name="$name" --out_dir="$RESULTS/$name"
  record "generalization:$1,$2"
}
need_rollouts() {  # need_rollouts KIND SEED: the reference Draft-OPD run's rollouts in DIR (kept ones, else the run again)
  keep_rollouts "$1" "$2"
  if [ ! -d "$DIR/opd_plateau_reference_$2/$1/rollouts" ]; then
    echo "=== $(date -u +%FT%TZ) opd_smollm2.py:$1,plateau,reference,$2 again: its rollouts are not in $DIR"
    python -m opd.main --config="experiments/opd_smollm2.py:$1,plateau,reference,$2" --workdir="$DIR"
    keep_rollouts "$1" "$2"
  fi
}
others() {  # SFT on the rollouts, EAGLE-3's TTT-on-rollouts recipe, our default Draft-OPD
  for k in $KINDS; do
    local todo=("$k,plateau,reference,sft_rollouts,$1")
    if [ "$k" = eagle3 ]; then todo+=("eagle3,plateau,reference,ttt_rollouts,$1"); fi
    for v in "${todo[@]}"; do
      keep_rollouts "$k" "$1"
      if ! finished "$v"; then need_rollouts "$k" "$1"; fi
      run "$v" $(match_flops "$k" "$1")
    done
    run "$k,plateau,$1"
  done
}
main_table() {  # seed s0's main table of every method: each row decoded (table_rows), then the report
  local missing row v flops
  table_rows s0
  for row in $(rows_left s0 1); do  # DIR lost its export before its rows were decoded: the run again
    v=$(python -c "from experiments.main_table_smollm2 import row_variant; print(row_variant('$row', 's0'))")
    if [[ "$v" == *_rollouts,s0 ]]; then need_rollouts "${row%/*}" s0; fi
    flops=""  # the SFT baselines match the reference Draft-OPD run's FLOPs; a Draft-OPD run has its own steps
    if [[ "$row" != */opd_* ]]; then flops=$(match_flops "${row%/*}" s0); fi
    echo "=== $(date -u +%FT%TZ) opd_smollm2.py:$v again: the main table's row $row, its export not in $DIR"
    python -m opd.main --config="experiments/opd_smollm2.py:$v" --workdir="$DIR" $flops
    summaries || echo "(a summary has no runs yet)"
    table_rows s0
  done
  missing=$(rows_left s0 1)
  if [ -n "$missing" ]; then
    echo "=== main_table_smollm2.py:decisive,s0 not reported: no metrics for $missing, and no export in $DIR/export/"
  elif ! finished "main_table:decisive,s0"; then
    report_table s0
    record "main_table:decisive,s0"
  fi
}
read -r first rest <<< "$SEEDS"
for s in $SEEDS; do pair "$s"; done  # the goal's ratio with its seeds first
if [ "$first" = s0 ] && [[ " $KINDS " == *" eagle3 "* ]]; then  # the ablations, against our default
  run "eagle3,plateau,s0"
  for a in $ABLATIONS; do run "eagle3,plateau,$a,s0"; done
fi
others "$first"
if [ "$first" = s0 ] && [[ " $KINDS " == *" eagle3 "* && " $KINDS " == *" dflash "* ]]; then main_table; fi  # all methods, both kinds
for s in $rest; do others "$s"; done
summaries
