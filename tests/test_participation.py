"""Partial participation: carry-over keeps unheld rank partitions (docs/design.md §2.7).

When only low-rank clients take part in a round, an SVD-based round sums only their factors
and every direction beyond their ranks vanishes. With ``carry_over`` the previous global state
holds those indices; with raFLoRA weights and pass-through clients ΔW is then a fixed point
under any participation pattern.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raflora.server.config import ParticipationConfig
from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    GlobalState,
    LowRank,
    Strategy,
    StrategyConfig,
    lora_scaling,
    make_strategy,
    module_spectrum,
)
from raflora.server.rounds.selection import select
from raflora.server.storage import ClientRecord

from . import reference as ref
from .conftest import random_updates, rel_err

R = 16
SCHEMA = AdapterSchema.from_shapes({"q": (40, 32), "v": (24, 32)})
# (client id, rank, examples, alpha)
CLIENTS = [
    ("a", 2, 30, 4.0),
    ("b", 2, 10, 8.0),
    ("c", 4, 20, 8.0),
    ("d", 4, 50, 16.0),
    ("e", 16, 40, 32.0),
    ("f", 16, 25, 16.0),
]


def strategy(name: str, dtype: torch.dtype, **options: object) -> Strategy:
    cfg = StrategyConfig(schema=SCHEMA, max_rank=R, compute_dtype=dtype, options=options)
    return make_strategy(name, cfg)


def full_state(s: Strategy, dtype: torch.dtype) -> GlobalState:
    """A rank-16 global state from one round in which everyone took part."""
    return s.aggregate(s.initial_state(), random_updates(SCHEMA, CLIENTS, seed=3, dtype=dtype))


def pass_through(s: Strategy, state: GlobalState, who: list[int]) -> GlobalState:
    updates = []
    for i in who:
        cid, r, n, alpha = CLIENTS[i]
        scale = lora_scaling(alpha, r)
        updates.append(ClientUpdate(cid, r, n, scale, s.distribute(state, r, scale).factors))
    return s.aggregate(state, updates)


def spectra(state: GlobalState) -> dict[str, torch.Tensor]:
    return {m: module_spectrum(state.modules[m]).double() for m in SCHEMA.modules}


@pytest.mark.parametrize("name", ["raflora", "raflora_ha"])
def test_carry_over_matches_the_independent_reference(name: str) -> None:
    options: dict[str, object] = {"carry_over": True}
    if name == "raflora_ha":
        options["shrinkage"] = 0.0  # raFLoRA weights
    s = strategy(name, torch.float64, **options)
    state = full_state(s, torch.float64)
    low = [c for c in CLIENTS if c[1] <= 4]  # nobody holds indices 5..16 this round
    updates = random_updates(SCHEMA, low, seed=8)
    new = s.aggregate(state, updates)
    for m in SCHEMA.modules:
        prev = state.modules[m]
        assert isinstance(prev, LowRank)
        clients = [
            {
                "rank": u.rank,
                "n": u.num_examples,
                "s": u.scale,
                m: (u.factors[m].B.numpy(), u.factors[m].A.numpy()),
            }
            for u in updates
        ]
        expected = ref.raflora_carry_over(
            clients, m, R, (prev.U.numpy(), prev.S.numpy(), prev.V.numpy().T)
        )
        assert rel_err(new.dense(m), expected) < 1e-10


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_pass_through_is_a_fixed_point_under_random_half_participation(
    dtype: torch.dtype, tolerance: float
) -> None:
    rng = np.random.default_rng(0)
    patterns = [sorted(rng.choice(len(CLIENTS), size=3, replace=False).tolist()) for _ in range(10)]
    assert any(max(CLIENTS[i][1] for i in who) < R for who in patterns)  # partitions go unheld
    kept = strategy("raflora_ha", dtype, shrinkage=0.0, carry_over=True)
    lost = strategy("raflora_ha", dtype, shrinkage=0.0, carry_over=False)
    start_state = full_state(kept, dtype)
    before = spectra(start_state)
    with_carry, without = start_state, start_state
    for who in patterns:
        with_carry = pass_through(kept, with_carry, who)
        without = pass_through(lost, without, who)
    after, dropped = spectra(with_carry), spectra(without)
    for m in SCHEMA.modules:
        assert after[m].shape == before[m].shape
        assert float(((after[m] - before[m]).abs() / before[m]).max()) < tolerance
        energy_kept = float((dropped[m] ** 2).sum() / (before[m] ** 2).sum())
        assert energy_kept < 0.9, energy_kept  # without carry-over the same run loses energy


def test_carry_over_is_off_by_default_for_the_published_baselines() -> None:
    assert not strategy("raflora", torch.float64).carry_over  # type: ignore[attr-defined]
    assert not strategy("flexlora", torch.float64).carry_over  # type: ignore[attr-defined]
    assert strategy("raflora_ha", torch.float64).carry_over  # type: ignore[attr-defined]


# -- server-side sampling ----------------------------------------------------------------------
def records(layout: dict[int, int]) -> list[ClientRecord]:
    out = []
    for rank, n in layout.items():
        out += [ClientRecord(f"r{rank}-{i}", rank, 10, 16.0, 16.0 / rank) for i in range(n)]
    return out


def test_selection_is_seeded_reproducible_and_varies_by_round() -> None:
    policy = ParticipationConfig(clients_per_round=3, seed=7)
    pool = records({2: 4, 4: 4, 16: 2})
    first = select(policy, 5, pool)
    assert first == select(policy, 5, list(reversed(pool)))  # order of candidates is irrelevant
    assert (first.quota, first.seats, len(first.selected)) == (3, 3, 3)
    assert len({select(policy, t, pool).selected for t in range(10)}) > 1


def test_stratified_selection_keeps_a_holder_of_every_rank() -> None:
    policy = ParticipationConfig(clients_per_round=3, stratify_by_rank=True)
    pool = records({2: 12, 4: 6, 16: 2})
    for t in range(20):
        chosen = select(policy, t, pool).selected
        assert {int(c.split("-")[0][1:]) for c in chosen} == {2, 4, 16}
    # More seats than ranks: the rest follows each rank's share of the candidates.
    wide = select(ParticipationConfig(clients_per_round=10, stratify_by_rank=True), 0, pool)
    by_rank = {r: sum(c.startswith(f"r{r}-") for c in wide.selected) for r in (2, 4, 16)}
    assert sum(by_rank.values()) == 10 and by_rank[2] > by_rank[4] >= by_rank[16] >= 1


def test_over_selection_and_fraction() -> None:
    pool = records({2: 10})
    over = select(ParticipationConfig(clients_per_round=4, over_selection=0.5), 0, pool)
    assert (over.quota, over.seats, len(over.selected)) == (4, 6, 6)
    half = select(ParticipationConfig(fraction=0.5), 0, pool)
    assert (half.quota, len(half.selected)) == (5, 5)
    few = select(ParticipationConfig(clients_per_round=4), 0, pool[:2])
    assert len(few.selected) == 2 and few.with_client("late").selected == few.selected | {"late"}
