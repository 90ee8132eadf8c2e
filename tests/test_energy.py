"""Rank-energy metrics against the definitions applied to a dense NumPy SVD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raflora.server.engine import (
    AdapterSchema,
    GlobalState,
    StrategyConfig,
    adapter_energy,
    make_strategy,
    spectrum_energy,
)

from . import reference as ref
from .conftest import CLIENTS, random_updates


@pytest.mark.parametrize("name", ["raflora", "flexlora", "hetlora", "rbla", "flora"])
def test_per_module_and_weighted_energy(schema: AdapterSchema, name: str) -> None:
    strategy = make_strategy(
        name, StrategyConfig(schema=schema, max_rank=8, compute_dtype=torch.float64)
    )
    state = strategy.aggregate(strategy.initial_state(), random_updates(schema, CLIENTS, seed=21))
    energy = adapter_energy(state)
    bounds = sorted({c[1] for c in CLIENTS})
    assert energy.overall.boundaries == tuple(bounds)
    totals, parts_by_module, eff_by_module = {}, {}, {}
    for m in schema:
        sigma = np.linalg.svd(state.dense(m).numpy(), compute_uv=False)
        parts, eff = ref.energy(sigma, bounds)
        e = energy.per_module[m]
        assert e.partition_energy == pytest.approx(parts, abs=1e-10)
        assert e.e_min == pytest.approx(parts[0], abs=1e-10)
        assert e.effective_rank == pytest.approx(eff, rel=1e-8)
        assert e.total_energy == pytest.approx((sigma**2).sum(), rel=1e-10)
        totals[m], parts_by_module[m], eff_by_module[m] = (sigma**2).sum(), parts, eff
    grand = sum(totals.values())
    for k in range(len(bounds)):
        pooled = sum(totals[m] * parts_by_module[m][k] for m in schema) / grand
        assert energy.overall.partition_energy[k] == pytest.approx(pooled, abs=1e-10)
    pooled_eff = sum(totals[m] * eff_by_module[m] for m in schema) / grand
    assert energy.overall.effective_rank == pytest.approx(pooled_eff, rel=1e-8)


def test_known_spectra() -> None:
    flat = spectrum_energy(torch.ones(8), [2, 8])
    assert flat.partition_energy == pytest.approx((0.25, 0.75))
    assert flat.effective_rank == pytest.approx(8.0)
    one = spectrum_energy(torch.tensor([3.0, 0.0, 0.0]), [1, 3])
    assert one.e_min == pytest.approx(1.0) and one.effective_rank == pytest.approx(1.0)
    tail = spectrum_energy(torch.tensor([2.0, 1.0, 1.0]), [1])
    assert tail.tail_energy == pytest.approx(2 / 6)


def test_zero_state_has_no_energy(schema: AdapterSchema) -> None:
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=8))
    state: GlobalState = strategy.initial_state()
    e = adapter_energy(state, [2, 4]).overall
    assert math.isnan(e.e_min) and e.total_energy == 0.0 and e.effective_rank == 0.0
