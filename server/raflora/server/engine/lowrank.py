"""Truncated SVD of a sum of low-rank products, without the dense matrix when cheaper.

``Σ_i B_i A_i = [B_1 … B_n] · [A_1; …; A_n]``. A thin QR of both stacked factors and an SVD of
the small core give the exact SVD in O((d_out + d_in)·N² + N³) for N = Σ r_i. Once N nears
min(d_out, d_in) a dense accumulator is cheaper and its memory no longer grows with the
number of clients; :func:`choose_method` picks by a flop model calibrated on CPU LAPACK.
Both exact paths grow faster than the uploads when N is large, so for large rounds a
randomized range finder on the factored operator (linear in N) is tried first; its result is
kept only if it is certified (every triplet's residual, and a bound on what the sketch
missed), else an exact path runs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from .errors import EmptyRoundError
from .types import FactorPair, LowRank

# A full SVD with vectors costs about this many GEMM flops per m·n² (measured: MKL gesdd on
# 2500² and 4096² fp32 ran ~30x slower per n³ than a GEMM per m·n·k).
_SVD_FLOP_FACTOR = 30.0


class SvdMethod(str, Enum):
    AUTO = "auto"  # certified randomized for large rounds, else the cheaper exact path
    EXACT = "exact"  # the cheaper of FACTORED and DENSE, never randomized
    FACTORED = "factored"
    DENSE = "dense"
    RANDOMIZED = "randomized"  # certified or falls back to EXACT


# The randomized path: oversampling, power iterations and the residual it must certify.
OVERSAMPLE = 16
POWER_ITERATIONS = 2
CERTIFY_TOLERANCE = 1e-5


def canonical_signs(result: LowRank) -> LowRank:
    """Each pair (u_j, v_j) signed so that u_j's entry of largest magnitude is positive.

    An SVD fixes singular vectors only up to a joint sign; different paths (or the bases of
    folded rounds, docs/design.md §2.10) would otherwise publish the same adapter as factors
    that differ in sign, and a restarted server would not reproduce the factors it served.
    """
    if result.rank == 0:
        return result
    rows = result.U.abs().argmax(dim=0)
    signs = torch.sign(result.U.gather(0, rows[None, :])).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return LowRank((result.U * signs).contiguous(), result.S, (result.V * signs).contiguous())


def factored_cost(d_out: int, d_in: int, n: int) -> float:
    """GEMM-equivalent flops of the QR-of-stacked-factors path."""
    k_b, k_a = min(d_out, n), min(d_in, n)
    qr = 4.0 * d_out * n * k_b + 4.0 * d_in * n * k_a
    core = 2.0 * k_b * n * k_a + _SVD_FLOP_FACTOR * max(k_b, k_a) * min(k_b, k_a) ** 2
    return qr + core


def dense_cost(d_out: int, d_in: int, n: int) -> float:
    """GEMM-equivalent flops of accumulating the dense matrix and taking its SVD."""
    small, large = min(d_out, d_in), max(d_out, d_in)
    return 2.0 * d_out * d_in * n + _SVD_FLOP_FACTOR * large * small**2


def choose_method(d_out: int, d_in: int, n: int) -> SvdMethod:
    if factored_cost(d_out, d_in, n) <= dense_cost(d_out, d_in, n):
        return SvdMethod.FACTORED
    return SvdMethod.DENSE


def _truncate(U: Tensor, S: Tensor, V: Tensor, max_rank: int) -> LowRank:
    k = min(max_rank, int(S.shape[0]))
    return LowRank(U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].contiguous())


def factored_svd(terms: Sequence[FactorPair], max_rank: int) -> LowRank:
    """Exact top-``max_rank`` SVD of ``Σ B_i A_i`` from the stacked factors."""
    B = torch.cat([t.B for t in terms], dim=1)
    A = torch.cat([t.A for t in terms], dim=0)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    k = min(max_rank, int(S.shape[0]))
    return LowRank(Qb @ Uc[:, :k], S[:k].contiguous(), Qa @ Vch[:k].T)


def dense_svd(terms: Sequence[FactorPair], max_rank: int) -> LowRank:
    """Exact top-``max_rank`` SVD via one dense accumulator (memory independent of len(terms))."""
    first = terms[0]
    acc = torch.zeros(
        first.B.shape[0], first.A.shape[1], dtype=first.B.dtype, device=first.B.device
    )
    for t in terms:
        acc.addmm_(t.B, t.A)
    U, S, Vh = torch.linalg.svd(acc, full_matrices=False)
    # A sum of rank-N terms has rank <= N: keep the same width as the factored path.
    return _truncate(U, S, Vh.T, min(max_rank, sum(t.rank for t in terms)))


def randomized_svd(
    terms: Sequence[FactorPair],
    max_rank: int,
    *,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    tolerance: float = CERTIFY_TOLERANCE,
    widen: bool = True,
) -> LowRank | None:
    """Top-``max_rank`` SVD by a randomized range finder on the factored operator, certified.

    Every product goes through the stacked factors, so the cost is linear in N = Σ r_i:
    O((d_out + d_in)·N·k) per power iteration with k = max_rank + oversample. The result is
    returned only if every kept triplet satisfies ‖ΔW v_j − σ_j u_j‖ ≤ tolerance·σ_1 (and
    ΔWᵀu_j = σ_j v_j holds by construction) and no singular value left out can exceed the
    smallest kept one (a probabilistic bound on what the sketch missed, from fresh secret
    probes; it fails with probability 1e-10); otherwise None, and callers use an exact path.
    The certificate is tried after 1, 2 and ``power_iterations`` power iterations: a round with
    a clear gap at R stops early. If none certifies, one sketch of twice the width is tried
    (``widen``) after 1 and 2 iterations: a round whose gap at R is small but whose rank is
    not much above k (few distinct directions, a flat top) is certified there, at a fraction
    of an exact SVD. The random starts are seeded, so the result is deterministic.
    """
    B = torch.cat([t.B for t in terms], dim=1)
    A = torch.cat([t.A for t in terms], dim=0)
    d_out, n = int(B.shape[0]), int(B.shape[1])
    d_in = int(A.shape[1])
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    k = min(max_rank + oversample, n, d_out, d_in)
    found = _sketch(B, A, k, power_iterations, gen, max_rank, tolerance)
    wide = min(2 * k, n, d_out, d_in)
    if found is None and widen and wide > k:
        found = _sketch(B, A, wide, min(2, power_iterations), gen, max_rank, tolerance)
    return found


def _sketch(
    B: Tensor,
    A: Tensor,
    k: int,
    power_iterations: int,
    gen: torch.Generator,
    max_rank: int,
    tolerance: float,
) -> LowRank | None:
    """A range finder of width ``k``, certified after 1, 2 and ``power_iterations`` power
    iterations."""
    checkpoints = {min(1, power_iterations), min(2, power_iterations), power_iterations}
    omega = torch.randn(int(A.shape[1]), k, generator=gen, dtype=torch.float32).to(B)
    Q, _ = torch.linalg.qr(B @ (A @ omega))
    for done in range(power_iterations + 1):
        if done:
            Z, _ = torch.linalg.qr(A.T @ (B.T @ Q))
            Q, _ = torch.linalg.qr(B @ (A @ Z))
        if done in checkpoints:
            certified = _certified(B, A, Q, max_rank, tolerance)
            if certified is not None:
                return certified
    return None


def _certified(B: Tensor, A: Tensor, Q: Tensor, max_rank: int, tolerance: float) -> LowRank | None:
    """The SVD of ΔW restricted to range(Q), if it is certified to be ΔW's top ``max_rank``."""
    QtB = Q.T @ B
    Uc, S_all, Vc = _svd_of_wide(QtB @ A)
    r = min(max_rank, int(B.shape[1]), int(S_all.shape[0]))
    U, S, V = Q @ Uc[:, :r], S_all[:r], Vc[:, :r]
    top = float(S[0]) if r else 0.0
    if top == 0.0:
        return None
    residual = torch.linalg.vector_norm(B @ (A @ V) - U * S, dim=0)
    if float(residual.max()) > tolerance * top:
        return None
    # The kept triplets are singular triplets of ΔW; are they the top ones? Any singular value
    # not kept is at most ‖PΔW(I − VVᵀ)‖ + ‖(I − P)ΔW‖ = σ̃_{r+1} + ‖(I − P)ΔW‖ (P = QQᵀ), and
    # the last term is bounded from fresh secret probes, which see whatever the sketch missed
    # (a top direction orthogonal to the fixed Ω included): docs/design.md §2.4.
    missed = residual_norm_bound(B - Q @ QtB, A)
    below = float(S_all[r]) if int(S_all.shape[0]) > r else 0.0
    # Each kept σ̃_j is known to within its triplet residual; rounding of C = B − Q QᵀB in the
    # compute dtype can hide up to ~eps·‖B‖·‖A‖ of ‖(I − P)ΔW‖: both count against the gap.
    eps = torch.finfo(B.dtype).eps
    rounding = 8 * eps * float(torch.linalg.norm(B)) * float(torch.linalg.norm(A))
    if below + missed + rounding + float(residual.max()) >= float(S[r - 1]):
        return None
    return LowRank(U.contiguous(), S.contiguous(), V.contiguous())


def _svd_of_wide(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, V) of a k × d matrix with k ≤ d through the QR of Mᵀ and the SVD of its k × k R:
    M = Rᵀ Qᵀ = U S (Q V_R)ᵀ. LAPACK's SVD of the wide matrix itself took about twice as long
    here (2.7 vs 1.4 ms at 48 × 1024), and a certificate runs one per checkpoint and module;
    the certificate checks the triplets against the operator either way."""
    if M.shape[0] > M.shape[1]:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U, S, Vh.T
    Qm, Rm = torch.linalg.qr(M.T)
    Ur, S, Vrh = torch.linalg.svd(Rm.T)
    return Ur, S, Qm @ Vrh.T


# A posteriori probes (Halko, Martinsson & Tropp 2011, Lemma 4.1): ‖M‖₂ ≤ α √(2/π) max_i
# ‖M ω_i‖ except with probability α^-PROBES. α = 2 with 36 probes fails with probability
# 1.5e-11 per certificate (at most four tries per round: < 1e-10); α = 10 with 10 probes was as safe
# but 5× looser, too loose to certify rounds whose tail is small but wide (docs/benchmarks.md).
PROBES = 36
PROBE_ALPHA = 2.0
PROBE_FACTOR = PROBE_ALPHA * math.sqrt(2 / math.pi)


def residual_norm_bound(C: Tensor, A: Tensor, probes: int = PROBES) -> float:
    """An upper bound on ‖C A‖₂ that holds except with probability PROBE_ALPHA^-probes.

    The probes come from the OS's CSPRNG, so no upload can be built orthogonal to them (the
    sketch's Ω is fixed and public); the cost is one product of width ``probes`` through the
    factors, O((d_out + d_in)·N·probes): linear in the round's size.
    """
    seed = secrets.randbits(63)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(A.shape[1], probes, generator=gen, dtype=torch.float32).to(A)
    norms = torch.linalg.vector_norm(C @ (A @ omega), dim=0)
    return PROBE_FACTOR * float(norms.max())


def randomized_cost(d_out: int, d_in: int, n: int, max_rank: int, iterations: int) -> float:
    """GEMM-equivalent flops of the sketch up to ``iterations`` power iterations and one
    certificate (its residual products and the probes)."""
    k = max_rank + OVERSAMPLE
    return 2.0 * (d_out + d_in) * n * ((2 * iterations + 3) * k + 2 * PROBES)


def worth_randomizing(d_out: int, d_in: int, n: int, max_rank: int) -> bool:
    """Randomized pays off once N is several times the sketch width and its first certificate
    (after one power iteration) costs under a third of the cheaper exact path."""
    k = max_rank + OVERSAMPLE
    exact = min(factored_cost(d_out, d_in, n), dense_cost(d_out, d_in, n))
    return n >= 4 * k and 3 * randomized_cost(d_out, d_in, n, max_rank, 1) < exact


def exact_cost(d_out: int, d_in: int, n: int) -> float:
    """GEMM-equivalent flops of the cheaper exact path: what a round costs when no sketch can
    be certified (the randomized path's fallback)."""
    return min(factored_cost(d_out, d_in, n), dense_cost(d_out, d_in, n))


def truncated_svd_of_sum(
    terms: Sequence[FactorPair], max_rank: int, method: SvdMethod = SvdMethod.AUTO
) -> LowRank:
    """Top-``max_rank`` SVD of ``Σ B_i A_i``; every term must share dtype and device."""
    if not terms:
        raise EmptyRoundError("updates", "cannot aggregate an empty set of factor terms")
    d_out, d_in = int(terms[0].B.shape[0]), int(terms[0].A.shape[1])
    n = sum(t.rank for t in terms)
    if method is SvdMethod.RANDOMIZED or (
        method is SvdMethod.AUTO and worth_randomizing(d_out, d_in, n, max_rank)
    ):
        certified = randomized_svd(terms, max_rank)
        if certified is not None:
            return canonical_signs(certified)
        method = SvdMethod.EXACT
    if method in (SvdMethod.AUTO, SvdMethod.EXACT):
        method = choose_method(d_out, d_in, n)
    if method is SvdMethod.FACTORED:
        return canonical_signs(factored_svd(terms, max_rank))
    return canonical_signs(dense_svd(terms, max_rank))


def singular_values_of_product(B: Tensor, A: Tensor) -> Tensor:
    """Singular values of ``B @ A`` in O((d_out + d_in)·k²), never forming the product."""
    if B.shape[1] == 0:
        return torch.zeros(0, dtype=B.dtype, device=B.device)
    _, Rb = torch.linalg.qr(B)
    _, Ra = torch.linalg.qr(A.T)
    sigma: Tensor = torch.linalg.svdvals(Rb @ Ra.T)
    return sigma


def frobenius_norm_of_product(B: Tensor, A: Tensor) -> Tensor:
    """‖B A‖_F from the k×k Gram matrices: trace(BᵀB · AAᵀ)."""
    return ((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt()
