"""How many clients client-level DP needs: the noise a private round adds, against the signal.

For the evaluation's adapter (MiniLM-L6: 6 layers × query, value = 12 modules of 384 × 384) and
clip bound C, prints the noise multiplier z for (ε, δ = 1e-5) over the given rounds, the noise
std per adapter entry σ = z·2C/m for m clients per round, and the expected spectral norm of
one module's noise, σ(√d_out + √d_in) (Gaussian matrix), to compare with the signal: a whole
adapter of norm ‖ΔW‖ ≈ 1.2 (docs/evaluation.md), ≈ 0.35 per module.

    python eval/dp_noise_table.py --rounds 5
"""

from __future__ import annotations

import argparse
import math

from raflora.server.engine.accountant import noise_multiplier_for


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clip-norm", type=float, default=2.0)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--epsilons", default="8,2")
    p.add_argument("--clients", default="6,100,1000,10000")
    args = p.parse_args()
    print(
        f"| ε (δ = 1e-5, {args.rounds} rounds, everyone) | z | m clients | σ per entry "
        "| noise ‖·‖₂ per module |"
    )
    print("|---|---|---|---|---|")
    for eps in (float(e) for e in args.epsilons.split(",")):
        z = noise_multiplier_for(eps, 1e-5, args.rounds)
        for m in (int(c) for c in args.clients.split(",")):
            sigma = z * 2 * args.clip_norm / m
            print(
                f"| {eps:g} | {z:.3f} | {m} | {sigma:.3g} | {sigma * 2 * math.sqrt(args.dim):.3g} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
