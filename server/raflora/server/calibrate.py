"""Choose a private federation's noise multiplier for a privacy budget (docs/design.md §2.9).

    python -m raflora.server.calibrate --epsilon 8 --delta 1e-5 --rounds 50 --sample 100 \\
        --roster 1000

prints the smallest z whose rounds spend at most ε, and the noise it puts on each adapter
entry for a given clip bound and denominator. ``--sample`` of ``--roster`` is a uniform draw
without replacement (a participation policy without stratification); leave both out when
everyone takes part (no amplification).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raflora.server.engine.accountant import DpRound, epsilon_spent, noise_multiplier_for


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m raflora.server.calibrate",
        description="The noise multiplier z of FederationSpec.privacy for an (epsilon, delta).",
    )
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--sample", type=int, default=1, help="clients drawn per round")
    p.add_argument("--roster", type=int, default=1, help="candidates they are drawn from")
    p.add_argument("--clip-norm", type=float, help="C, to print the noise per adapter entry")
    p.add_argument("--denominator", type=int, help="m: the round's quota (default: --sample)")
    args = p.parse_args(argv)
    try:
        DpRound(1.0, args.sample, args.roster)
        z = noise_multiplier_for(args.epsilon, args.delta, args.rounds, args.sample, args.roster)
    except ValueError as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 2
    spent = epsilon_spent({DpRound(z, args.sample, args.roster): args.rounds}, args.delta)
    print(
        f"noise_multiplier = {z:.6g}  (epsilon {spent:.4g} at delta {args.delta:g} after "
        f"{args.rounds} rounds of {args.sample} of {args.roster})"
    )
    if args.clip_norm:
        m = args.denominator or args.sample
        print(f"noise std per adapter entry = z * 2C / m = {z * 2 * args.clip_norm / m:.6g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
