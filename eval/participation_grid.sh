#!/usr/bin/env bash
# The participation grid of docs/evaluation.md, seed by seed (resumable: rerun to continue).
#   full and stratified participation keep a rank-16 client in every round, where carry-over is
#   a no-op by construction: three strategies; unstratified fractions: all six variants.
set -euo pipefail
out=${1:-out/eval-participation}
py=${PYTHON:-.venv/bin/python}
common=(--skews 0.5 --layouts independent --rounds 5 --local-steps 4 --test-size 150 --out "$out")
all=flexlora,flexlora-co,raflora,raflora-co,ha-shrink2,ha-shrink2-noco
for seed in ${SEEDS:-0 1 2}; do
  "$py" eval/eval_grid.py "${common[@]}" --seeds "$seed" --datasets rotten_tomatoes \
    --participations 0.5,0.33 --variants "$all"
  "$py" eval/eval_grid.py "${common[@]}" --seeds "$seed" --datasets rotten_tomatoes \
    --participations 1,0.5s,0.33s --variants flexlora,raflora,ha-shrink2
done
"$py" eval/eval_grid.py --report-only --out "$out" --variants "$all"
