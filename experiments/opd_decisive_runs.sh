#!/usr/bin/env bash
# Issue 16's decisive experiment and its ablations: every run, in the order that answers the
# question soonest, then the summary (experiments/results/opd_decisive/).
#
#   bash experiments/opd_decisive_runs.sh [DIR]        # DIR: the plateau run's (default workdirs/smollm2_scale)
#   SEEDS="s0" KINDS="eagle3" bash experiments/opd_decisive_runs.sh
#
# Each run resumes from DIR (a finished stage is not redone), so a stopped script continues where
# it stopped when started again. The order answers the question soonest (~1 h per run on 2 CPU
# cores): the goal's pair (Draft-OPD with the reference preset, continued SFT at its fairly priced
# FLOPs) for both drafters at the first seed; our default Draft-OPD and the EAGLE-3 ablations (one
# reference difference each, probe curves only); the pair at the other seeds; the other methods
# (SFT on the rollouts, EAGLE-3's TTT-on-rollouts recipe, our default) at the first seed and seed
# s0's main table of every method (experiments/results/main_table_decisive_s0/); the other methods
# at the other seeds. After every run the summaries are rewritten; they keep each run's probe curve
# in experiments/results/<summary>/runs/, so commit that folder as runs finish: a later session on a
# machine without DIR summarises from there (DIR's data is rebuilt by the next run's stages).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-workdirs/smollm2_scale}
SEEDS=${SEEDS:-"s0 s1 s2"}
KINDS=${KINDS:-"eagle3 dflash"}
ABLATIONS=$(python -c "from experiments.opd_smollm2 import ABLATIONS; print(*ABLATIONS)")

summaries() {  # the decisive summary; the ablations' against our default
  python experiments/benchmarks/opd_decisive.py --workdir="$DIR" --drafters="${KINDS// /,}" --seeds="${SEEDS// /,}"
  if [[ " $SEEDS " == *" s0 "* ]] && [[ " $KINDS " == *" eagle3 "* ]]; then
    abl=opd_plateau; for a in $ABLATIONS; do abl="$abl,opd_plateau_$a"; done
    python experiments/benchmarks/opd_decisive.py --workdir="$DIR" --drafters=eagle3 --seeds=s0 --methods="$abl" \
        --baseline=opd_plateau --name=opd_ablations_plateau
  fi
}

run() {
  echo "=== $(date -u +%FT%TZ) opd_smollm2.py:$1"
  python -m opd.main --config="experiments/opd_smollm2.py:$1" --workdir="$DIR"
  summaries || echo "(a summary has no runs yet)"
}

pair() {  # the goal's ratio: Draft-OPD (reference preset) and continued SFT at its fairly priced FLOPs
  for k in $KINDS; do run "$k,plateau,reference,$1"; run "$k,plateau,reference,sft_cont,$1"; done
}
others() {  # SFT on the rollouts, EAGLE-3's TTT-on-rollouts recipe, our default Draft-OPD
  for k in $KINDS; do
    run "$k,plateau,reference,sft_rollouts,$1"
    if [ "$k" = eagle3 ]; then run "eagle3,plateau,reference,ttt_rollouts,$1"; fi
    run "$k,plateau,$1"
  done
}
read -r first rest <<< "$SEEDS"
pair "$first"
if [ "$first" = s0 ] && [[ " $KINDS " == *" eagle3 "* ]]; then  # the ablations, against our default
  run "eagle3,plateau,s0"
  for a in $ABLATIONS; do run "eagle3,plateau,$a,s0"; done
fi
for s in $rest; do pair "$s"; done
others "$first"
if [ "$first" = s0 ] && [ "$KINDS" = "eagle3 dflash" ]; then  # seed s0's main table (all methods, both kinds)
  echo "=== $(date -u +%FT%TZ) main_table_smollm2.py:decisive,s0"
  python -m opd.main --config=experiments/main_table_smollm2.py:decisive,s0 --workdir="$DIR"
fi
for s in $rest; do others "$s"; done
summaries
