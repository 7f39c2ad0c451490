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
# A run in the ledger is skipped; continued SFT matches a Draft-OPD run's FLOPs from its kept curve
# when DIR lacks the run; SFT on the rollouts reruns its Draft-OPD run when DIR lacks the rollouts;
# the main table needs every s0 export in DIR and says which are missing otherwise.
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
}

pair() {  # the goal's ratio: Draft-OPD (reference preset) and continued SFT at its fairly priced FLOPs
  for k in $KINDS; do
    run "$k,plateau,reference,$1"
    local opd="opd_plateau_reference_$1" match=()
    local kept="$RESULTS/opd_decisive/runs/$k/$opd.jsonl"
    if [ ! -f "$DIR/$opd/$k/metrics.jsonl" ] && [ -f "$kept" ]; then match=("--config.sft.match_flops=$(realpath "$kept")"); fi
    run "$k,plateau,reference,sft_cont,$1" "${match[@]}"
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
others() {  # SFT on the rollouts, EAGLE-3's TTT-on-rollouts recipe, our default Draft-OPD
  for k in $KINDS; do
    local todo=("$k,plateau,reference,sft_rollouts,$1")
    if [ "$k" = eagle3 ]; then todo+=("eagle3,plateau,reference,ttt_rollouts,$1"); fi
    for v in "${todo[@]}"; do
      if ! finished "$v" && [ ! -d "$DIR/opd_plateau_reference_$1/$k/rollouts" ]; then
        echo "=== $(date -u +%FT%TZ) opd_smollm2.py:$k,plateau,reference,$1 again: $v trains on its rollouts, not in $DIR"
        python -m opd.main --config="experiments/opd_smollm2.py:$k,plateau,reference,$1" --workdir="$DIR"
      fi
      run "$v"
    done
    run "$k,plateau,$1"
  done
}
main_table() {  # seed s0's main table of every method: their exports in DIR
  local missing
  missing=$(python -c "
import os
from experiments.main_table_smollm2 import DECISIVE
print(*[f'{r}_s0_{k}' for k, r, _ in DECISIVE if not os.path.isdir(os.path.join('$DIR', 'export', f'{r}_s0_{k}'))])")
  if [ -n "$missing" ]; then
    echo "=== main_table_smollm2.py:decisive,s0 skipped: $DIR/export/ lacks $missing (run them again in one DIR)"
  elif ! finished "main_table:decisive,s0"; then
    echo "=== $(date -u +%FT%TZ) main_table_smollm2.py:decisive,s0"
    python -m opd.main --config=experiments/main_table_smollm2.py:decisive,s0 --workdir="$DIR"
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
