"""Client-level differential privacy for the spectral strategies (docs/design.md §2.9).

DP-FedAvg's Gaussian mechanism with a fixed denominator, in the factored domain up to the
noise. Per round, with the strategy's per-index multipliers m_j computed from the round's
*ranks* (uniform client weights), client i's boosted update is
u_i = Σ_{j ≤ r_i} m_j s_i B_i[:, j] A_i[j, :]; its norm over all modules comes from r_i × r_i
Gram products. The released aggregate is

    ΔW' = top-R SVD( Σ_i min(1, C / ‖u_i‖) u_i / m̄  +  N(0, σ²)^{d_out × d_in}  [+ carried] )
    σ   = z · 2C / m̄

with m̄ the round's quota (fixed before any upload: the participation policy's quota, else
expected_clients, or min_clients when that is 0). Replacing one client's data moves the sum
by at most 2C / m̄ — its clipped term is all it owns, because no weight depends on another
client's data — so σ = z times the replace-one sensitivity, which is what the accountant's
noise multiplier means. The SVD, the rank truncation and carry-over of earlier (already
released) states are post-processing.

Pure functions of their inputs; the noise comes from a generator seeded by the caller, who
must draw the seed secretly per round and never store it (a known seed removes the noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import ConfigError
from .types import FactorPair, LowRank

Factors = Mapping[str, FactorPair]


@dataclass(frozen=True)
class PrivacyPolicy:
    """A federation's client-level DP; the default (z = 0) is off."""

    noise_multiplier: float = 0.0  # z: noise std over the replace-one sensitivity
    clip_norm: float = 0.0  # C: bound on each client's boosted update ‖u_i‖_F (all modules)
    delta: float = 1e-5  # δ of the (ε, δ) the accountant reports

    def __post_init__(self) -> None:
        if self.noise_multiplier or self.clip_norm:
            if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
                raise ConfigError("privacy.noise_multiplier", "must be > 0 with privacy on")
            if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
                raise ConfigError("privacy.clip_norm", "must be > 0 with privacy on")
            if not 0 < self.delta < 1:
                raise ConfigError("privacy.delta", f"must be in (0, 1), got {self.delta}")

    @property
    def active(self) -> bool:
        return self.noise_multiplier > 0


@dataclass(frozen=True)
class PrivateRound:
    """What one round's mechanism needs beyond the uploads."""

    denominator: int  # m̄: the round's quota, fixed before any upload arrived
    noise_seed: int = field(repr=False)  # secret and fresh per round; never logged or stored

    def __post_init__(self) -> None:
        if self.denominator < 1:
            raise ConfigError("privacy.denominator", f"must be >= 1, got {self.denominator}")


@dataclass(frozen=True)
class PrivacyOutcome:
    """What the mechanism did to one round (recorded in the manifest)."""

    noise_multiplier: float
    clip_norm: float
    denominator: int
    noise_std: float  # σ per entry of every module's aggregate
    norms: tuple[float, ...]  # ‖u_i‖_F before clipping, in the order of the updates
    clip: tuple[float, ...]  # min(1, C / ‖u_i‖)


def noise_std(policy: PrivacyPolicy, denominator: int) -> float:
    """σ = z · Δ with Δ = 2C / m̄, the replace-one sensitivity of Σ clip(u_i) / m̄."""
    return policy.noise_multiplier * 2.0 * policy.clip_norm / denominator


def boosted_norms(factors: Sequence[Factors], columns: Sequence[Tensor]) -> Tensor:
    """‖u_i‖_F over all modules, u_i = (B_i · diag(col_i)) A_i per module, from r × r Grams.

    In float64 from the factors up: a float32 Gram sum cancels when ‖B A‖ ≪ ‖B‖ ‖A‖, and an
    underestimated norm would let a crafted update past the clip. A non-finite norm reads as
    infinite (its client then contributes nothing).
    """
    out = []
    for f, col in zip(factors, columns, strict=True):
        squared = 0.0
        for m in f:
            B, A = f[m].B.double() * col.double(), f[m].A.double()
            squared += float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0))
        out.append(math.sqrt(squared) if math.isfinite(squared) else math.inf)
    return torch.tensor(out, dtype=torch.float64)


def contribution_gains(norms: Tensor, policy: PrivacyPolicy, denominator: int) -> Tensor:
    """Per client: min(1, C / ‖u_i‖) / m̄, the factor that turns u_i into its released share."""
    clip = torch.clamp(policy.clip_norm / torch.clamp(norms, min=1e-300), max=1.0)
    clip = torch.where(torch.isfinite(norms), clip, torch.zeros_like(clip))
    return clip / denominator


def noisy_truncated_svd(
    terms: Sequence[FactorPair],
    shape: tuple[int, int],
    std: float,
    max_rank: int,
    generator: torch.Generator,
    carried: FactorPair | None = None,
) -> LowRank:
    """Top-``max_rank`` SVD of Σ B_t A_t + N(0, std²) (+ carried): the dense d_out × d_in
    accumulator is the price of the noise, one module at a time."""
    like = terms[0].B  # a round has at least one upload (Strategy.prepare)
    dtype, device = like.dtype, like.device
    acc = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    acc.mul_(std)
    for t in terms:
        acc.addmm_(t.B, t.A)
    if carried is not None:
        acc.addmm_(carried.B.to(dtype), carried.A.to(dtype))
    U, S, Vh = torch.linalg.svd(acc, full_matrices=False)
    k = min(max_rank, int(S.shape[0]))
    return LowRank(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous())
