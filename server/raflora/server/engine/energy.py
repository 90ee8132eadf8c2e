"""Rank-energy analysis: the collapse indicator, from the spectrum of the published ΔW.

Partition energy ``E_k = Σ_{j∈P_k} σ_j² / Σ_j σ_j²``; ``E_min`` is the energy in the top ρ_1
directions (→ 1 means collapse); effective rank is ``exp(entropy(σ²/Σσ²))``. Spectra come from
the factors (O((d_out+d_in)k²)), never from a dense matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .lowrank import singular_values_of_product
from .types import FactorPair, GlobalState, LowRank, ModuleState
from .weights import rank_partitions


@dataclass(frozen=True)
class RankEnergy:
    """Energy shares of one spectrum (or of a whole adapter, energy-weighted)."""

    boundaries: tuple[int, ...]  # ρ_1 < … < ρ_K
    partition_energy: tuple[float, ...]  # E_1 … E_K
    tail_energy: float  # share beyond ρ_K (a state of higher rank than any participant)
    e_min: float  # E_1; NaN when there is no energy or no partition
    effective_rank: float
    total_energy: float  # Σ σ² (absolute)


@dataclass(frozen=True)
class AdapterEnergy:
    per_module: Mapping[str, RankEnergy]
    overall: RankEnergy


def module_spectrum(module: ModuleState) -> Tensor:
    if isinstance(module, LowRank):
        return module.S
    assert isinstance(module, FactorPair)
    return singular_values_of_product(module.B, module.A)


def spectrum_energy(sigma: Tensor, boundaries: Sequence[int]) -> RankEnergy:
    sq = sigma.detach().to(torch.float64).cpu() ** 2
    sq = torch.sort(sq, descending=True).values
    total = float(sq.sum())
    bounds = tuple(boundaries)
    if total <= 0:
        nan = math.nan
        return RankEnergy(bounds, tuple(nan for _ in bounds), nan, nan, 0.0, 0.0)
    shares = sq / total
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(shares, 0)])

    def upto(j: int) -> float:
        return float(cumulative[min(j, len(shares))])

    parts, prev = [], 0
    for rho in bounds:
        parts.append(upto(rho) - upto(prev))
        prev = rho
    tail = 1.0 - upto(prev) if bounds else 1.0
    nz = shares[shares > 0]
    eff = math.exp(float(-(nz * nz.log()).sum()))
    e_min = parts[0] if parts else math.nan
    return RankEnergy(bounds, tuple(parts), max(tail, 0.0), e_min, eff, total)


def _energy_weighted(per_module: Mapping[str, RankEnergy], bounds: tuple[int, ...]) -> RankEnergy:
    totals = {n: e.total_energy for n, e in per_module.items() if e.total_energy > 0}
    grand = sum(totals.values())
    if grand <= 0:
        nan = math.nan
        return RankEnergy(bounds, tuple(nan for _ in bounds), nan, nan, 0.0, 0.0)

    def mix(values: Mapping[str, float]) -> float:
        return sum(totals[n] * values[n] for n in totals) / grand

    parts = tuple(
        mix({n: per_module[n].partition_energy[k] for n in totals}) for k in range(len(bounds))
    )
    return RankEnergy(
        boundaries=bounds,
        partition_energy=parts,
        tail_energy=mix({n: per_module[n].tail_energy for n in totals}),
        e_min=parts[0] if parts else math.nan,
        effective_rank=mix({n: per_module[n].effective_rank for n in totals}),
        total_energy=grand,
    )


def adapter_energy(state: GlobalState, boundaries: Sequence[int] | None = None) -> AdapterEnergy:
    """Per-module and energy-weighted rank energy; partitions default to the round's ranks."""
    bounds = rank_partitions(state.participant_ranks if boundaries is None else boundaries)
    per_module = {
        name: spectrum_energy(module_spectrum(m), bounds) for name, m in state.modules.items()
    }
    return AdapterEnergy(per_module=per_module, overall=_energy_weighted(per_module, bounds))
