"""Client weights and the per-rank-index weights that distinguish raFLoRA from FlexLoRA."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from .errors import ZeroWeightError


class Weighting(str, Enum):
    EXAMPLES = "examples"  # p_i ∝ n_i
    UNIFORM = "uniform"


def client_weights(num_examples: Sequence[int], weighting: Weighting) -> Tensor:
    """Normalised p_i over the round's participants (float64)."""
    if weighting is Weighting.UNIFORM:
        raw = torch.ones(len(num_examples), dtype=torch.float64)
    else:
        raw = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    total = float(raw.sum())
    if total <= 0:
        raise ZeroWeightError(
            "num_examples", f"participants' weights sum to {total}; at least one must be > 0"
        )
    return raw / total


def rank_partitions(ranks: Sequence[int]) -> tuple[int, ...]:
    """The distinct ranks ρ_1 < … < ρ_K; partition k covers indices ρ_{k-1}+1 … ρ_k."""
    return tuple(sorted(set(ranks)))


def holder_weight_per_index(ranks: Sequence[int], p: Tensor) -> Tensor:
    """W_j = Σ_{l : r_l ≥ j} p_l for j = 1 … max(r) (returned 0-indexed)."""
    top = max(ranks)
    r = torch.tensor(list(ranks), dtype=torch.long)
    j = torch.arange(1, top + 1)
    covers = (r[:, None] >= j[None, :]).to(p.dtype)
    return (p[:, None] * covers).sum(dim=0)


def uniform_index_weights(ranks: Sequence[int], p: Tensor) -> list[Tensor]:
    """FlexLoRA: every rank index of client i carries p_i."""
    return [p[i].expand(r).clone() for i, r in enumerate(ranks)]


def holder_normalized_index_weights(ranks: Sequence[int], p: Tensor) -> list[Tensor]:
    """raFLoRA: index j of client i carries p_i / Σ_{l : r_l ≥ j} p_l.

    An index whose holders all weigh zero gets weight zero: nobody with data trained it.
    """
    W = holder_weight_per_index(ranks, p)
    safe = torch.where(W > 0, W, torch.ones_like(W))
    out = []
    for i, r in enumerate(ranks):
        w = p[i] / safe[:r]
        out.append(torch.where(W[:r] > 0, w, torch.zeros_like(w)))
    return out


def holder_aware_index_weights(
    ranks: Sequence[int],
    p: Tensor,
    *,
    gamma: float = 1.0,
    shrinkage: float = 0.0,
    max_boost: float = float("inf"),
) -> list[Tensor]:
    """Interpolations between FlexLoRA and raFLoRA: w_ij = p_i · m_j.

    With W_j the holders' weight share of index j, the raw boost is ``W_j^-gamma`` (gamma = 1:
    raFLoRA, gamma = 0: FlexLoRA). ``shrinkage`` κ pulls the boost toward 1 (rank-agnostic)
    when the holders' Kish effective sample size ESS_j = W_j² / Σ_{holders} p_l² is small:
    m_j = λ_j W_j^-gamma + (1 - λ_j) with λ_j = ESS_j / (ESS_j + κ). ``max_boost`` caps m_j,
    damping how much a sparsely held partition can be amplified. Indices whose holders all
    weigh zero get weight zero.
    """
    if gamma < 0 or shrinkage < 0 or max_boost < 1:
        raise ValueError("need gamma >= 0, shrinkage >= 0 and max_boost >= 1")
    W = holder_weight_per_index(ranks, p)
    top = W.shape[0]
    r = torch.tensor(list(ranks), dtype=torch.long)
    covers = (r[:, None] >= torch.arange(1, top + 1)[None, :]).to(p.dtype)
    sq = (p[:, None] ** 2 * covers).sum(dim=0)
    live = W > 0
    safe_W = torch.where(live, W, torch.ones_like(W))
    boost = safe_W ** (-gamma)
    if shrinkage > 0:
        ess = safe_W**2 / torch.where(live, sq, torch.ones_like(sq))
        lam = ess / (ess + shrinkage)
        boost = lam * boost + (1 - lam)
    boost = torch.clamp(boost, max=max_boost)
    m = torch.where(live, boost, torch.zeros_like(boost))
    return [p[i] * m[:rank] for i, rank in enumerate(ranks)]


def partition_holders(ranks: Sequence[int], p: Tensor) -> list[tuple[int, int, float]]:
    """(upper rank ρ_k, number of holders, holders' weight share W_k) per rank partition.

    Operators watch these: a partition held by one or two clients is amplified by raFLoRA
    from very little data (docs/evaluation.md).
    """
    return [
        (
            rho,
            sum(1 for r in ranks if r >= rho),
            float(sum(float(p[i]) for i, r in enumerate(ranks) if r >= rho)),
        )
        for rho in rank_partitions(ranks)
    ]
