"""Choose a private federation's noise multiplier for a privacy budget (docs/design.md §2.9).

    python -m raflora.server.calibrate --epsilon 8 --delta 1e-5 --rounds 50 \\
        --clip-norm 2 --clients 1000

prints the smallest z whose rounds spend at most ε as the server accounts them (every round
a Gaussian mechanism, no amplification by sampling: the draw is reproducible from the spec),
and the noise it puts on each adapter entry for a clip bound and m clients per round.
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
    p.add_argument("--clip-norm", type=float, help="C, to print the noise per adapter entry")
    p.add_argument("--clients", type=int, help="m: the round's quota (expected_clients)")
    args = p.parse_args(argv)
    try:
        z = noise_multiplier_for(args.epsilon, args.delta, args.rounds)
    except ValueError as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 2
    spent = epsilon_spent({DpRound.unamplified(z): args.rounds}, args.delta)
    print(
        f"noise_multiplier = {z:.6g}  (epsilon {spent:.4g} at delta {args.delta:g} after "
        f"{args.rounds} rounds)"
    )
    if args.clip_norm and args.clients:
        sigma = z * 2 * args.clip_norm / args.clients
        print(f"noise std per adapter entry = z * 2C / m = {sigma:.6g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
