"""Server-side client sampling: which joined clients take part in a round.

Pure and reproducible: the same policy, round and candidates give the same selection (a
generator seeded by the policy's seed and the round). Stratified sampling first gives every
rank present one seat (when the quota allows), then fills the rest proportionally to each
rank's share of the candidates, so that every rank partition keeps holders.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import ParticipationConfig
from ..storage import ClientRecord


@dataclass(frozen=True)
class Selection:
    round: int
    quota: int  # uploads that close the round
    seats: int  # clients selected (quota plus over-selection)
    selected: frozenset[str]

    def with_client(self, client_id: str) -> Selection:
        """A client that joined after the round opened takes a free seat, if any."""
        if client_id in self.selected or len(self.selected) >= self.seats:
            return self
        return Selection(self.round, self.quota, self.seats, self.selected | {client_id})


def quota(policy: ParticipationConfig, joined: int) -> int:
    if policy.clients_per_round:
        return policy.clients_per_round
    return max(1, math.ceil(policy.fraction * joined))


def select(
    policy: ParticipationConfig, round_: int, candidates: Sequence[ClientRecord]
) -> Selection:
    k = quota(policy, len(candidates))
    seats = math.ceil(k * (1 + policy.over_selection))
    pool = sorted(candidates, key=lambda c: c.client_id)
    rng = random.Random(f"raflora-participation:{policy.seed}:{round_}")
    if len(pool) <= seats:
        chosen = [c.client_id for c in pool]
    elif policy.stratify_by_rank:
        chosen = _stratified(pool, seats, rng)
    else:
        chosen = [c.client_id for c in rng.sample(pool, seats)]
    return Selection(round_, k, seats, frozenset(chosen))


def _stratified(pool: list[ClientRecord], seats: int, rng: random.Random) -> list[str]:
    groups: dict[int, list[str]] = {}
    for c in pool:
        groups.setdefault(c.rank, []).append(c.client_id)
    for ids in groups.values():
        rng.shuffle(ids)
    ranks = sorted(groups, reverse=True)  # with too few seats, the high (rare) ranks first
    take = {r: 0 for r in ranks}
    for r in ranks[:seats]:
        take[r] = 1
    left = seats - sum(take.values())
    if left > 0:  # largest remainders over what each group can still give
        room = {r: len(groups[r]) - take[r] for r in ranks}
        total = sum(room.values())
        shares = {r: left * room[r] / total for r in ranks}
        for r in ranks:
            take[r] += min(room[r], math.floor(shares[r]))
        order = sorted(ranks, key=lambda r: shares[r] - math.floor(shares[r]), reverse=True)
        while sum(take.values()) < seats:
            for r in order:
                if take[r] < len(groups[r]) and sum(take.values()) < seats:
                    take[r] += 1
    return [cid for r in ranks for cid in groups[r][: take[r]]]
