"""Byzantine-robust weighing of client updates in the factored domain (docs/design.md §2.8).

Everything here works on the n × n Gram matrix of the clients' effective updates
ΔW_i = s_i B_i A_i (summed over modules), ``G_ij = Σ_m s_i s_j tr((B_iᵀ B_j)(A_j A_iᵀ))``, formed
from r_i × r_j products: no dense d_out × d_in matrix is ever built. Any point in the span of
the updates, z = Σ_i α_i ΔW_i, then has ‖ΔW_i − z‖_F² = G_ii − 2 (Gα)_i + αᵀGα.

Two defences, each a factor per client. Clipping multiplies client i's update by
c_i = min(1, C / ‖ΔW_i‖) (C fixed, or a quantile of the round's norms). The robust combinations
turn distances to the geometric median into trust factors t_i ∈ [0, 1] that multiply the
client's *weight* p_i before the strategy's own per-index weighting (a reweighting of clients,
not a median per partition: a partition held by one or two clients has no meaningful median,
and the clients' deviation is best seen over their whole update). Under raFLoRA a partition's
weights are normalised over its holders, so trust alone cannot shrink a lone holder: clipping
is what bounds that client's partition, and the two are meant to be used together.
Pure functions, float64, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from .types import FactorPair

Factors = Mapping[str, FactorPair]


def update_gram(factors: Sequence[Factors], scales: Sequence[float]) -> Tensor:
    """G_ij = ⟨ΔW_i, ΔW_j⟩_F over all modules, in float64, from the stacked factors.

    Per module, with B = [s_1 B_1 … s_n B_n] and A = [A_1; …; A_n], the (i, j) block of
    (BᵀB) ∘ (A Aᵀ) sums to the inner product: one pass of O(d · (Σ r_i)²) per module.
    """
    n = len(factors)
    G = torch.zeros(n, n, dtype=torch.float64)
    if n == 0:
        return G
    for name in factors[0]:
        Bs = [f[name].B.double() * float(s) for f, s in zip(factors, scales, strict=True)]
        As = [f[name].A.double() for f in factors]
        B, A = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
        # E (Σ r_i × n) marks which client owns each stacked column: Eᵀ P E sums the blocks.
        owner = torch.repeat_interleave(
            torch.arange(n, device=B.device),
            torch.tensor([b.shape[1] for b in Bs], device=B.device),
        )
        E = torch.nn.functional.one_hot(owner, n).to(torch.float64)
        G += (E.T @ ((B.T @ B) * (A @ A.T)) @ E).cpu()
    return G


def norms_from_gram(G: Tensor) -> Tensor:
    return torch.sqrt(torch.clamp(torch.diagonal(G), min=0.0))


def distances_to_combination(G: Tensor, alpha: Tensor) -> Tensor:
    """‖ΔW_i − Σ_k α_k ΔW_k‖_F for every i."""
    Ga = G @ alpha
    squared = torch.diagonal(G) - 2 * Ga + alpha @ Ga
    return torch.sqrt(torch.clamp(squared, min=0.0))


def clip_factors(norms: Tensor, bound: float) -> Tensor:
    """min(1, C / ‖ΔW_i‖): the factor that brings each update inside the ball of radius C."""
    if not bound > 0:
        raise ValueError(f"clip bound must be > 0, got {bound}")
    return torch.clamp(bound / torch.clamp(norms, min=1e-300), max=1.0)


def adaptive_bound(norms: Tensor, quantile: float) -> float:
    """The ``quantile`` of the round's update norms: a bound no minority of clients can raise."""
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    return float(torch.quantile(norms, quantile))


def geometric_median_weights(
    G: Tensor, p: Tensor, *, max_iter: int = 200, tol: float = 1e-10
) -> Tensor:
    """Weiszfeld's iteration for argmin_z Σ_i p_i ‖ΔW_i − z‖_F over z = Σ α_i ΔW_i.

    Returns α (sums to 1). Each step sets α_i ∝ p_i / max(d_i, ε), where d_i is the distance
    of update i to the current iterate, computed from G alone; ε (a tiny fraction of the
    updates' scale) keeps an iterate that lands on a client finite, as in RFA.
    """
    p = p.double() / p.double().sum()
    scale = math.sqrt(max(float(torch.diagonal(G).mean()), 0.0)) or 1.0
    eps = 1e-12 * scale
    alpha = p.clone()
    for _ in range(max_iter):
        d = distances_to_combination(G, alpha)
        beta = p / torch.clamp(d, min=eps)
        updated = beta / beta.sum()
        if float((updated - alpha).abs().sum()) < tol:
            return updated
        alpha = updated
    return alpha


def distances_to_median(G: Tensor, p: Tensor) -> Tensor:
    """‖ΔW_i − z‖_F, z the weighted geometric median of the updates (from G alone)."""
    return distances_to_combination(G, geometric_median_weights(G, p))


def median_ratios(d: Tensor) -> Tensor:
    """d_i / median_k d_k (the midpoint of the two middle values for an even count, so a block
    of identical sybils cannot pull it). When most clients agree exactly (median 0) the others
    are infinitely far: ratio 0 for d_i = 0, ∞ otherwise."""
    typical = float(torch.quantile(d, 0.5))
    if typical > 0:
        return d / typical
    return torch.where(d > 0, torch.full_like(d, math.inf), torch.zeros_like(d))


def trust_of_ratios(ratios: Tensor) -> Tensor:
    """min(1, 1 / ratio): full weight up to the median distance, then lost in proportion."""
    return torch.where(ratios > 1, 1 / ratios, torch.ones_like(ratios))


def median_trust(G: Tensor, p: Tensor) -> Tensor:
    """t_i = min(1, median_k d_k / d_i), d = distances to the geometric median.

    Clients no farther than the median distance keep their weight; one farther loses weight in
    proportion, so that t_i · d_i ≤ median(d). With weights renormalised (w = t·p / Σ t·p), a
    FlexLoRA-style aggregate differs from the honest clients' by at most
    w_a (‖ΔW_a‖ + ‖ΔW_honest‖) + (1 − w_a) ‖ΔW_honest,t − ΔW_honest‖: the attacker's weight
    times its reach, plus what reweighting the honest costs (paid without attackers too).
    """
    return trust_of_ratios(median_ratios(distances_to_median(G, p)))


def trimmed_trust(G: Tensor, p: Tensor, trim: int) -> Tensor:
    """0 for the ``trim`` clients farthest from the geometric median, 1 for the others."""
    n = G.shape[0]
    if not 0 <= trim < n:
        raise ValueError(f"trim must be in 0..{n - 1} for {n} clients, got {trim}")
    d = distances_to_median(G, p)
    trust = torch.ones(n, dtype=torch.float64)
    if trim:
        trust[torch.argsort(d, descending=True)[:trim]] = 0.0
    return trust


class Combine(str, Enum):
    MEAN = "mean"  # the strategy's own weights
    MEDIAN_TRUST = "median_trust"  # weights × min(1, median distance / distance)
    TRIMMED = "trimmed"  # the ``trim`` clients farthest from the geometric median weigh 0


@dataclass(frozen=True)
class RobustPolicy:
    """A federation's defences; the default changes nothing."""

    clip_norm: float = 0.0  # > 0: clip every ‖ΔW_i‖_F (all modules) to this
    clip_quantile: float = 0.0  # > 0: clip to this quantile of the round's norms
    combine: Combine = Combine.MEAN
    trim: int = 1
    max_weight_share: float = 1.0  # the federation's cap, kept after reweighting

    @property
    def active(self) -> bool:
        return bool(self.clip_norm or self.clip_quantile) or self.combine is not Combine.MEAN


@dataclass(frozen=True)
class RobustOutcome:
    """What the defences did to one round: per client, in the order of the updates."""

    norms: tuple[float, ...]  # ‖ΔW_i‖_F before clipping
    clip_bound: float  # 0: no clipping
    clip: tuple[float, ...]  # the factor each update was multiplied by
    trust: tuple[float, ...]  # the factor each weight was multiplied by (before renormalising)


MIN_HOLDERS_FOR_MEDIAN = 3  # a median of one or two points says nothing about either


def partition_scores(
    factors: Sequence[Factors],
    scales: Sequence[float],
    ranks: Sequence[int],
    p: Tensor,
) -> Tensor:
    """Each client's outlier score: its largest d_i / median(d) over the partitions it holds.

    Updates of different ranks differ by construction (a rank-4 client has no components
    5…8), so distances to the geometric median are taken per partition — indices
    ρ_{k-1}+1…ρ_k, which every holder trained from the same distributed components — among
    its holders only. A partition with fewer than MIN_HOLDERS_FOR_MEDIAN holders gives no
    evidence (clipping bounds those). One combined score per client, so that a defence acts
    once per client and not once per partition: high-rank clients hold more partitions, and
    testing them more often would bias the defence against the very clients raFLoRA serves.
    0 means "no evidence" (and is never trimmed before a client with evidence).
    """
    n = len(factors)
    score = torch.zeros(n, dtype=torch.float64)
    edges = [0, *sorted(set(ranks))]
    for lo, hi in itertools.pairwise(edges):
        holders = [i for i, r in enumerate(ranks) if r >= hi]
        if len(holders) < MIN_HOLDERS_FOR_MEDIAN:
            continue
        sliced = [
            {m: FactorPair(B=f.B[:, lo:hi], A=f.A[lo:hi]) for m, f in factors[i].items()}
            for i in holders
        ]
        G = update_gram(sliced, [scales[i] for i in holders])
        ratios = median_ratios(distances_to_median(G, p[holders]))
        for k, i in enumerate(holders):
            score[i] = max(float(score[i]), float(ratios[k]))
    return score


def trust_from_scores(score: Tensor, policy: RobustPolicy) -> Tensor:
    """median_trust: t_i = min(1, 1 / score_i); trimmed: 0 for the ``trim`` highest scores."""
    if policy.combine is Combine.MEDIAN_TRUST:
        return trust_of_ratios(score)
    trust = torch.ones_like(score)
    k = min(policy.trim, int((score > 0).sum()) - 1)  # never all the clients with evidence
    if k > 0:
        trust[torch.argsort(score, descending=True)[:k]] = 0.0
    return trust


def cap_weights(p: Tensor, cap: float) -> Tensor:
    """Water-filling over the clients that carry weight: none above ``cap``, the excess spread
    over the others in proportion to their weights, so a defence never lifts anyone over the
    federation's max_weight_share. Clients at weight 0 (trimmed) stay at 0; when the others
    are too few for the cap (k · cap < 1) they share equally, as the publisher's cap does."""
    p = p.double() / p.double().sum()
    support = p > 0
    k = int(support.sum())
    if cap >= 1:
        return p
    if k * cap < 1:
        return torch.where(support, torch.full_like(p, 1 / k), torch.zeros_like(p))
    fixed = torch.zeros(len(p), dtype=torch.bool)
    while True:
        free = support & ~fixed
        room = 1 - cap * int(fixed.sum())
        scaled = torch.where(free, p / p[free].sum() * room, torch.zeros_like(p))
        scaled = torch.where(fixed, torch.full_like(p, cap), scaled)
        over = free & (scaled > cap)
        if not bool(over.any()):
            return scaled
        fixed |= over


def defend(
    factors: Sequence[Factors],
    scales: Sequence[float],
    ranks: Sequence[int],
    p: Tensor,
    policy: RobustPolicy,
) -> tuple[list[float], Tensor, RobustOutcome]:
    """The round's scales after clipping, its weights after trust, and what was done.

    Clipping comes first, so that medians are taken over bounded updates. If trust leaves
    no weight at all the round keeps its weights: there is nothing to prefer.
    """
    n = len(factors)
    norms = norms_from_gram(update_gram(factors, scales))
    bound = policy.clip_norm
    nonzero = norms[norms > 0]
    if policy.clip_quantile and len(nonzero):  # zero uploads cannot drag the bound to 0
        quantile_bound = adaptive_bound(nonzero, policy.clip_quantile)
        bound = min(bound, quantile_bound) if bound else quantile_bound
    clip = clip_factors(norms, bound) if bound else torch.ones(n, dtype=torch.float64)
    clipped = [float(s) * float(c) for s, c in zip(scales, clip, strict=True)]
    p = p.double()
    if policy.combine is Combine.MEAN:
        trust = torch.ones(n, dtype=torch.float64)
    else:
        trust = trust_from_scores(partition_scores(factors, clipped, ranks, p), policy)
    weighted = p * trust
    new_p = weighted / weighted.sum() if float(weighted.sum()) > 0 else p
    new_p = cap_weights(new_p, policy.max_weight_share)
    new_scales = clipped
    outcome = RobustOutcome(
        norms=tuple(float(x) for x in norms),
        clip_bound=float(bound),
        clip=tuple(float(c) for c in clip),
        trust=tuple(float(t) for t in trust),
    )
    return new_scales, new_p, outcome
