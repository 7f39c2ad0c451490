#!/usr/bin/env bash
# Issue 16's decisive experiment and its ablations: every run, in the order that answers the
# question soonest, then the summary (experiments/results/opd_decisive/).
#
#   bash experiments/opd_decisive_runs.sh [DIR]        # DIR: the plateau run's (default workdirs/smollm2_scale)
#   SEEDS="s0" KINDS="eagle3" bash experiments/opd_decisive_runs.sh
#
# Each run resumes from DIR (a finished stage is not redone), so a stopped script continues where
# it stopped when started again. Per seed and drafter: Draft-OPD (the reference preset) and
# continued SFT at its fairly priced FLOPs first (the goal's ratio), then SFT on the rollouts,
# EAGLE-3's TTT-on-rollouts recipe and our default Draft-OPD; after seed s0, the EAGLE-3 ablations
# (one reference difference each, probe curves only) and seed s0's main table of every method
# (experiments/results/main_table_decisive_s0/). ~1 h per EAGLE-3 run on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-workdirs/smollm2_scale}
SEEDS=${SEEDS:-"s0 s1 s2"}
KINDS=${KINDS:-"eagle3 dflash"}
ABLATIONS=$(python -c "from experiments.opd_smollm2 import ABLATIONS; print(*ABLATIONS)")

run() {
  echo "=== $(date -u +%FT%TZ) opd_smollm2.py:$1"
  python -m opd.main --config="experiments/opd_smollm2.py:$1" --workdir="$DIR"
}

for s in $SEEDS; do
  for k in $KINDS; do
    run "$k,plateau,reference,$s"
    run "$k,plateau,reference,sft_cont,$s"
  done
  for k in $KINDS; do
    run "$k,plateau,reference,sft_rollouts,$s"
    if [ "$k" = eagle3 ]; then run "eagle3,plateau,reference,ttt_rollouts,$s"; fi
    run "$k,plateau,$s"
  done
  if [ "$s" = s0 ] && [[ " $KINDS " == *" eagle3 "* ]]; then
    for a in $ABLATIONS; do run "eagle3,plateau,$a,s0"; done
  fi
  if [ "$s" = s0 ] && [ "$KINDS" = "eagle3 dflash" ]; then  # seed s0's main table (all methods, both kinds)
    echo "=== $(date -u +%FT%TZ) main_table_smollm2.py:decisive,s0"
    python -m opd.main --config=experiments/main_table_smollm2.py:decisive,s0 --workdir="$DIR"
  fi
done

python experiments/benchmarks/opd_decisive.py --workdir="$DIR" --drafters="${KINDS// /,}" --seeds="${SEEDS// /,}"
if [[ " $SEEDS " == *" s0 "* ]] && [[ " $KINDS " == *" eagle3 "* ]]; then  # the ablations against our default
  abl=opd_plateau; for a in $ABLATIONS; do abl="$abl,opd_plateau_$a"; done
  python experiments/benchmarks/opd_decisive.py --workdir="$DIR" --drafters=eagle3 --seeds=s0 --methods="$abl" \
      --baseline=opd_plateau --name=opd_ablations_plateau
fi
