"""docs/design.md §2.5 theory: pass-through rounds (each client pushes back exactly what it pulled).

Ranks {2, 4, 8} with R = 8, unequal examples and unequal LoRA alphas.
raFLoRA keeps ΔW a fixed point; FlexLoRA multiplies partition k's singular values by
c_k = Σ_{i∈S_k} p_i every round, so E_min rises.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    GlobalState,
    LowRank,
    ScalingRule,
    Strategy,
    StrategyConfig,
    adapter_energy,
    lora_scaling,
    make_strategy,
)
from raflora.server.engine.distribution import FactorSplit

from .conftest import CLIENTS, random_updates, rel_err

R = 8
ROUNDS = 4


def pass_through(strategy: Strategy, state: GlobalState, rule: ScalingRule) -> GlobalState:
    updates = []
    for cid, r, n, alpha in CLIENTS:
        s = lora_scaling(alpha, r, rule)
        pulled = strategy.distribute(state, r, s)
        updates.append(ClientUpdate(cid, r, n, s, pulled.factors))
    return strategy.aggregate(state, updates)


def expected_c_k() -> dict[int, float]:
    """c_k for each partition's upper rank, from the client table directly."""
    n = np.array([c[2] for c in CLIENTS], dtype=float)
    p = n / n.sum()
    ranks = np.array([c[1] for c in CLIENTS])
    return {int(rho): float(p[ranks >= rho].sum()) for rho in sorted(set(ranks))}


def start(name: str, schema: AdapterSchema, split: FactorSplit) -> tuple[Strategy, GlobalState]:
    cfg = StrategyConfig(schema=schema, max_rank=R, compute_dtype=torch.float64, split=split)
    strategy = make_strategy(name, cfg)
    state = strategy.aggregate(strategy.initial_state(), random_updates(schema, CLIENTS, seed=11))
    return strategy, state


@pytest.mark.parametrize("split", list(FactorSplit))
@pytest.mark.parametrize("rule", list(ScalingRule))
def test_raflora_is_a_fixed_point(
    schema: AdapterSchema, split: FactorSplit, rule: ScalingRule
) -> None:
    strategy, state = start("raflora", schema, split)
    e0 = adapter_energy(state).overall.e_min
    for _ in range(ROUNDS):
        new = pass_through(strategy, state, rule)
        for m in schema:
            assert rel_err(new.dense(m), state.dense(m)) < 1e-6
        assert abs(adapter_energy(new).overall.e_min - e0) < 1e-9
        state = new


@pytest.mark.parametrize("split", list(FactorSplit))
@pytest.mark.parametrize("rule", list(ScalingRule))
def test_flexlora_scales_partitions_by_c_k(
    schema: AdapterSchema, split: FactorSplit, rule: ScalingRule
) -> None:
    strategy, state = start("flexlora", schema, split)
    c = expected_c_k()
    bounds = sorted(c)
    assert c[bounds[0]] == pytest.approx(1.0) and c[bounds[-1]] < c[bounds[1]] < 1.0
    e_mins = [adapter_energy(state).overall.e_min]
    for _ in range(ROUNDS):
        new = pass_through(strategy, state, rule)
        for m in schema:
            before, after = state.modules[m], new.modules[m]
            assert isinstance(before, LowRank) and isinstance(after, LowRank)
            prev = 0
            for rho in bounds:
                expected = before.S[prev:rho] * c[rho]
                assert rel_err(after.S[prev:rho], expected) < 1e-6
                prev = rho
        e_mins.append(adapter_energy(new).overall.e_min)
        state = new
    assert all(b > a + 1e-4 for a, b in itertools.pairwise(e_mins))


def test_raflora_keeps_energy_flat_while_flexlora_collapses(schema: AdapterSchema) -> None:
    results = {}
    for name in ("raflora", "flexlora"):
        strategy, state = start(name, schema, FactorSplit.ORTHONORMAL_A)
        series = [adapter_energy(state).overall]
        for _ in range(ROUNDS):
            state = pass_through(strategy, state, ScalingRule.STANDARD)
            series.append(adapter_energy(state).overall)
        results[name] = series
    ra, fl = results["raflora"], results["flexlora"]
    assert max(e.e_min for e in ra) - min(e.e_min for e in ra) < 1e-9
    assert fl[-1].e_min > fl[0].e_min + 0.05
    assert fl[-1].effective_rank < ra[-1].effective_rank
