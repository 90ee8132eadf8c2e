"""The privacy spent by a federation's rounds, from Google's ``dp-accounting`` RDP accountant.

Neighbouring federations differ in one client's training data (replace-one; the roster, the
declared ranks and who was selected are public: every manifest names them). A round is one
Gaussian mechanism of noise multiplier z applied to a sample of the roster:

* drawn uniformly without replacement (a participation policy without stratification that
  drew ``sample`` of ``roster`` candidates): ``SampledWithoutReplacementDpEvent`` (Wang,
  Balle & Kasiviswanathan 2019, Theorem 27), which is where partial participation amplifies
  privacy;
* anything else — everyone, first come first served, a stratified draw — is accounted as if
  every client took part (q = 1, no amplification): safe, never optimistic.

A federation's history is a histogram of such rounds, so it stays a few numbers however long
the federation runs, and ε(δ) is recomposed from it. Pure; ``dp_accounting`` (and SciPy) are
imported on first use, so a server without private federations never loads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class DpRound:
    """One round's mechanism, as the accountant sees it."""

    noise_multiplier: float
    sample: int  # clients the round's draw selected (== roster: no amplification)
    roster: int  # candidates the draw was made from

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 1 <= self.sample <= self.roster:
            raise ValueError(f"need 1 <= sample <= roster, got {self.sample} of {self.roster}")

    @classmethod
    def unamplified(cls, noise_multiplier: float) -> DpRound:
        return cls(noise_multiplier, 1, 1)


History = Mapping[DpRound, int]  # how many rounds ran with each mechanism


def add_round(history: History, event: DpRound) -> dict[DpRound, int]:
    out = dict(history)
    out[event] = out.get(event, 0) + 1
    return out


def _event(event: DpRound) -> Any:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
    if event.sample == event.roster:
        return gaussian
    return dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=event.roster, sample_size=event.sample, event=gaussian
    )


def epsilon_spent(history: History, delta: float) -> float:
    """ε at ``delta`` after every round of ``history`` (0 for none), by RDP composition."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    rounds = {e: c for e, c in history.items() if c > 0}
    if not rounds:
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    for event, count in sorted(rounds.items()):
        accountant.compose(_event(event), count)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    epsilon: float, delta: float, rounds: int, sample: int = 1, roster: int = 1
) -> float:
    """The smallest z whose ``rounds`` rounds of (sample of roster) spend at most ε at δ."""
    if not epsilon > 0 or rounds < 1:
        raise ValueError("need epsilon > 0 and rounds >= 1")
    low, high = 1e-2, 1.0
    while epsilon_spent({DpRound(high, sample, roster): rounds}, delta) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon={epsilon}")
    while high / low > 1 + 1e-4:  # bisection on a monotone ε(z), in log scale
        mid = math.sqrt(low * high)
        if epsilon_spent({DpRound(mid, sample, roster): rounds}, delta) > epsilon:
            low = mid
        else:
            high = mid
    return high


def history_to_json(history: History) -> list[list[float | int]]:
    return [[e.noise_multiplier, e.sample, e.roster, c] for e, c in sorted(history.items())]


def history_from_json(raw: Iterable[Any]) -> dict[DpRound, int]:
    """Hostile input (a manifest read back from disk): every entry checked."""
    out: dict[DpRound, int] = {}
    for entry in raw:
        if not isinstance(entry, list | tuple) or len(entry) != 4:
            raise ValueError("privacy history entries are [z, sample, roster, count]")
        z, sample, roster, count = entry
        for value in (sample, roster, count):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("privacy history counts are non-negative integers")
        if isinstance(z, bool) or not isinstance(z, int | float):
            raise ValueError("privacy history noise multipliers are numbers")
        event = DpRound(float(z), sample, roster)
        out[event] = out.get(event, 0) + count
    return out
