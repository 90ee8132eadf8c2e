#!/usr/bin/env bash
# The robustness and privacy grid of docs/robustness.md, seed by seed (resumable: rerun it).
#   attacks: raflora_ha (the reference) vs its robust variants, 0 / 1 / 2 attackers of 6
#   (two attackers for the strongest attack, sign-flip: the grid's 2-core budget);
#   lone: the lone rank-16 client of the "lone" layout attacks;
#   privacy: raflora_ha with uniform weights (the reference) vs client-level DP at eps 8 and 2.
set -euo pipefail
out=${1:-out/eval-robustness}
py=${PYTHON:-.venv/bin/python}
common=(--datasets rotten_tomatoes --skews 0.5 --rounds 5 --local-steps 4 --test-size 150)
robust=(--variants ha-shrink2,ha-robust,ha-trimmed --reference ha-shrink2)
private=(--variants ha-uniform,ha-dp8,ha-dp2 --reference ha-uniform)
for seed in ${SEEDS:-0 1 2}; do
  "$py" eval/eval_grid.py "${common[@]}" "${robust[@]}" --seeds "$seed" --layouts independent \
    --attacks none,signflip:1,signflip:2,noise:1,labelflip:1 --out "$out/attacks"
  "$py" eval/eval_grid.py "${common[@]}" "${robust[@]}" --seeds "$seed" --layouts lone \
    --attacks none,lone-signflip --out "$out/attacks"
  "$py" eval/eval_grid.py "${common[@]}" "${private[@]}" --seeds "$seed" --layouts independent \
    --out "$out/privacy"
done
"$py" eval/eval_grid.py --report-only "${robust[@]}" --out "$out/attacks"
"$py" eval/eval_grid.py --report-only "${private[@]}" --out "$out/privacy"
