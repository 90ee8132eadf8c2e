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
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

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
# The first sketch's Ω is public and fixed (the result is deterministic); the certificate's
# probes are not (residual_norm_bound).
SKETCH_SEED = 0x5EED


def sketch_start(d_in: int, k: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The Ω of the randomized path's first sketch of width ``k``: a caller that holds ΔW Ω
    already (a round's sums, engine/sums.py) hands it in as :class:`Sketched`."""
    gen = torch.Generator(device="cpu").manual_seed(SKETCH_SEED)
    return torch.randn(d_in, k, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


@dataclass(frozen=True)
class Sketched:
    """Products with ΔW a caller accumulated as its terms arrived (they are linear in ΔW):
    ``start`` = ΔW · :func:`sketch_start` (d_out × k) and ``probes`` = ΔW G for G standard
    Gaussian, drawn from the OS's CSPRNG before any term was known and never revealed, so that
    no term can be built orthogonal to it. ``rounding``: what fp rounding in accumulating
    ``probes`` can hide of ‖(I − QQᵀ)ΔW‖ (added to the operator's own allowance)."""

    start: Tensor
    probes: Tensor
    rounding: float


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


class _Operator(Protocol):
    """ΔW as the randomized path uses it: products with it and the two certificate pieces
    whose cheapest form depends on how ΔW is held."""

    d_out: int
    d_in: int
    width: int  # an upper bound on rank(ΔW)
    dtype: torch.dtype
    device: torch.device

    def times(self, X: Tensor) -> Tensor: ...  # ΔW X

    def t_times(self, Y: Tensor) -> Tensor: ...  # ΔWᵀ Y

    def project(self, Q: Tensor) -> Tensor: ...  # QᵀΔW

    def missed(self, Q: Tensor, QtW: Tensor) -> float: ...  # a bound on ‖(I − QQᵀ)ΔW‖₂

    def rounding(self) -> float: ...  # what fp rounding can hide of ‖(I − QQᵀ)ΔW‖


class _Factored:
    """ΔW = B A, never formed: every product costs O((d_out + d_in)·N·k)."""

    def __init__(self, B: Tensor, A: Tensor) -> None:
        self.B, self.A = B, A
        self.d_out, self.width = int(B.shape[0]), int(B.shape[1])
        self.d_in = int(A.shape[1])
        self.dtype, self.device = B.dtype, B.device

    def times(self, X: Tensor) -> Tensor:
        return self.B @ (self.A @ X)

    def t_times(self, Y: Tensor) -> Tensor:
        return self.A.T @ (self.B.T @ Y)

    def project(self, Q: Tensor) -> Tensor:
        return (Q.T @ self.B) @ self.A

    def missed(self, Q: Tensor, QtW: Tensor) -> float:
        # (randomized_svd hands every close its probes as ``given``: this is the operator's
        # own bound, for a caller of _randomized without them.)
        return residual_norm_bound(self.B - Q @ (Q.T @ self.B), self.A)

    def rounding(self) -> float:
        # C = B − Q QᵀB in the compute dtype can hide up to ~eps·‖B‖·‖A‖ of ‖(I − P)ΔW‖.
        eps = torch.finfo(self.dtype).eps
        return 8 * eps * float(torch.linalg.norm(self.B)) * float(torch.linalg.norm(self.A))


class _Dense:
    """ΔW = W + B A: a matrix (a round's sums, engine/sums.py) and, optionally, columns not
    added to it yet. A product with W costs O(d_out·d_in·k), cheaper than the factors' once
    N > d_out·d_in / (d_out + d_in); the extra columns cost what factors cost."""

    def __init__(
        self, W: Tensor, rank_bound: int | None = None, plus: FactorPair | None = None
    ) -> None:
        self.W = W
        self.plus = plus if plus is not None and plus.rank else None
        self.d_out, self.d_in = int(W.shape[0]), int(W.shape[1])
        self.width = min(self.d_out, self.d_in, rank_bound or self.d_out)
        self.dtype, self.device = W.dtype, W.device

    def times(self, X: Tensor) -> Tensor:
        if self.plus is None:
            return self.W @ X
        return torch.addmm(self.W @ X, self.plus.B, self.plus.A @ X)

    def t_times(self, Y: Tensor) -> Tensor:
        if self.plus is None:
            return self.W.T @ Y
        return torch.addmm(self.W.T @ Y, self.plus.A.T, self.plus.B.T @ Y)

    def project(self, Q: Tensor) -> Tensor:
        if self.plus is None:
            return Q.T @ self.W
        return torch.addmm(Q.T @ self.W, Q.T @ self.plus.B, self.plus.A)

    def missed(self, Q: Tensor, QtW: Tensor) -> float:
        # (I − QQᵀ)ΔW ω = ΔWω − Q(QᵀΔWω): one product of the probes' width, never ΔW − QQᵀΔW.
        return residual_norm_bound(self.W, deflate=Q, plus=self.plus)

    def rounding(self) -> float:
        # Forming (I − QQᵀ)ΔWω rounds each entry to ~k·eps of its size; a GEMM of inner size d
        # adds ~√d·eps: ‖W‖_F·√max(d) covers both, as ‖B‖·‖A‖ does for the factors.
        eps = torch.finfo(self.dtype).eps
        total = float(torch.linalg.norm(self.W)) * math.sqrt(max(self.d_out, self.d_in))
        if self.plus is not None:
            total += float(torch.linalg.norm(self.plus.B)) * float(torch.linalg.norm(self.plus.A))
        return 8 * eps * total


def randomized_svd(
    terms: Sequence[FactorPair],
    max_rank: int,
    *,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    tolerance: float = CERTIFY_TOLERANCE,
    widen: bool = True,
    given: Sketched | None = None,
) -> LowRank | None:
    """Top-``max_rank`` SVD by a randomized range finder on the factored operator, certified.

    Every product goes through the stacked factors, so the cost is linear in N = Σ r_i:
    O((d_out + d_in)·N·k) per power iteration with k = max_rank + oversample. The result is
    returned only if every kept triplet satisfies ‖ΔW v_j − σ_j u_j‖ ≤ tolerance·σ_1 (and
    ΔWᵀu_j = σ_j v_j holds by construction) and no singular value left out can exceed the
    smallest kept one (a probabilistic bound on what the sketch missed, from secret probes
    drawn once for every try; it fails with probability 1e-10); otherwise None, and callers use
    an exact path.
    The certificate is tried after 1, 2 and ``power_iterations`` power iterations: a round with
    a clear gap at R stops early. If none certifies, one sketch of twice the width is tried
    (``widen``) after 1 and 2 iterations: a round whose gap at R is small but whose rank is
    not much above k (few distinct directions, a flat top) is certified there, at a fraction
    of an exact SVD. The random starts are seeded, so the result is deterministic. ``given``:
    the first sketch's product and the probes, accumulated already (they are not recomputed);
    without it both are taken here, in one product.
    """
    B = torch.cat([t.B for t in terms], dim=1)
    A = torch.cat([t.A for t in terms], dim=0)
    op = _Factored(B, A)
    if given is None:
        given = _sketched_at_once(op, max_rank + oversample)
    return _randomized(op, max_rank, oversample, power_iterations, tolerance, widen, given)


def sketch_basis(d_in: int, k: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """[Ω G] (d_in × (k + PROBES)): the first sketch's public Ω beside fresh secret probes,
    so that one product takes both (the G of :class:`Sketched`)."""
    omega = sketch_start(d_in, k, dtype, device)
    return torch.cat([omega, secret_probes(d_in, dtype, device)], dim=1)


def probe_rounding(dtype: torch.dtype, magnitude: float, *inner: int) -> float:
    """What rounding in probes ΔW G can hide of the probe bound: GEMMs of these inner sizes
    round each entry to ~√(inner)·eps of ``magnitude`` (Σ ‖B‖_F·‖A‖_F of the terms)."""
    eps = torch.finfo(dtype).eps
    return 8 * eps * PROBE_FACTOR * math.sqrt(max(inner)) * magnitude


def _sketched_at_once(op: _Factored, k: int) -> Sketched:
    """ΔW [Ω G] in one product through the factors: the first sketch and the certificate's
    secret probes, as a round's sums hold them (§2.11). One draw of G serves every try of
    the certificate (Q never depends on it), and (I − QQᵀ)ΔW G is then ΔW G − Q(QᵀΔW G),
    where fresh probes per try cost a product each and formed B − QQᵀB (d_out × N)."""
    k = min(k, op.width, op.d_out, op.d_in)
    Y = op.times(sketch_basis(op.d_in, k, op.dtype, op.device))
    size = float(torch.linalg.norm(op.B)) * float(torch.linalg.norm(op.A))
    rounding = probe_rounding(op.dtype, size, op.d_out, op.d_in, op.width)  # inner: d_in, N
    return Sketched(Y[:, :k], Y[:, k:], rounding)


def randomized_svd_dense(
    W: Tensor,
    max_rank: int,
    *,
    rank_bound: int | None = None,
    plus: FactorPair | None = None,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    tolerance: float = CERTIFY_TOLERANCE,
    widen: bool = True,
    given: Sketched | None = None,
) -> LowRank | None:
    """:func:`randomized_svd` of a matrix held densely, plus ``plus``'s B A if given (of rank
    at most ``rank_bound``, if known): the same sketch and certificate."""
    return _randomized(
        _Dense(W, rank_bound, plus), max_rank, oversample, power_iterations, tolerance, widen, given
    )


def _randomized(
    op: _Operator,
    max_rank: int,
    oversample: int,
    power_iterations: int,
    tolerance: float,
    widen: bool,
    given: Sketched | None = None,
) -> LowRank | None:
    gen = torch.Generator(device="cpu").manual_seed(SKETCH_SEED)
    f32 = torch.float32  # drawn in float32 whatever the default dtype: as sketch_start draws
    limit = min(op.width, op.d_out, op.d_in)
    k = min(max_rank + oversample, limit)
    # Drawn even when ``given`` holds its product: the wide Ω is the generator's next draw.
    omega = torch.randn(op.d_in, k, generator=gen, dtype=f32)
    start = given.start if given is not None and int(given.start.shape[1]) == k else None
    found = _sketch(op, k, power_iterations, max_rank, tolerance, omega, start, given)
    wide = min(2 * k, limit)
    if found is None and widen and wide > k:
        omega = torch.randn(op.d_in, wide, generator=gen, dtype=f32)
        found = _sketch(op, wide, min(2, power_iterations), max_rank, tolerance, omega, None, given)
    return found


def _sketch(
    op: _Operator,
    k: int,
    power_iterations: int,
    max_rank: int,
    tolerance: float,
    omega: Tensor,
    start: Tensor | None,
    given: Sketched | None,
) -> LowRank | None:
    """A range finder of width ``k`` from ΔW Ω (``start``, or computed from ``omega``),
    certified after 1, 2 and ``power_iterations`` power iterations."""
    checkpoints = {min(1, power_iterations), min(2, power_iterations), power_iterations}
    if start is None:
        start = op.times(omega.to(dtype=op.dtype, device=op.device))
    Q, _ = torch.linalg.qr(start)
    for done in range(power_iterations + 1):
        if done:
            Z, _ = torch.linalg.qr(op.t_times(Q))
            Q, _ = torch.linalg.qr(op.times(Z))
        if done in checkpoints:
            certified = _certified(op, Q, max_rank, tolerance, given)
            if certified is not None:
                return certified
    return None


def _certified(
    op: _Operator, Q: Tensor, max_rank: int, tolerance: float, given: Sketched | None = None
) -> LowRank | None:
    """The SVD of ΔW restricted to range(Q), if it is certified to be ΔW's top ``max_rank``.
    With ``given``, what the sketch missed is bounded from its probes (Q never depended on
    them, so one set serves every try: the failure probabilities add up, as with fresh ones)."""
    QtW = op.project(Q)
    r = min(max_rank, op.width, *QtW.shape)
    Uc, S_all, Vc = _svd_of_wide(QtW, keep=r)
    U, S, V = Q @ Uc[:, :r], S_all[:r], Vc[:, :r]
    top = float(S[0]) if r else 0.0
    if top == 0.0 or not math.isfinite(top):
        return None
    residual = torch.linalg.vector_norm(op.times(V) - U * S, dim=0)
    worst = float(residual.max())
    if not worst <= tolerance * top:  # NaN included
        return None
    # The kept triplets are singular triplets of ΔW; are they the top ones? Any singular value
    # not kept is at most ‖PΔW(I − VVᵀ)‖ + ‖(I − P)ΔW‖ = σ̃_{r+1} + ‖(I − P)ΔW‖ (P = QQᵀ), and
    # the last term is bounded from secret probes, which see whatever the sketch missed
    # (a top direction orthogonal to the fixed Ω included): docs/design.md §2.4.
    if given is None:
        missed, rounding = op.missed(Q, QtW), op.rounding()
    else:
        missed, rounding = deflated_probe_bound(given.probes, Q), op.rounding() + given.rounding
    below = float(S_all[r]) if int(S_all.shape[0]) > r else 0.0
    # Each kept σ̃_j is known to within its triplet residual; rounding in the compute dtype
    # counts against the gap as well.
    if not below + missed + rounding + worst < float(S[r - 1]):  # NaN included
        return None
    return LowRank(U.contiguous(), S.contiguous(), V.contiguous())


def _svd_of_wide(M: Tensor, keep: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, V) of a k × d matrix with k ≤ d through the QR of Mᵀ and the SVD of its k × k R:
    M = Rᵀ Qᵀ = U S (Q V_R)ᵀ. LAPACK's SVD of the wide matrix itself took about twice as long
    here (2.7 vs 1.4 ms at 48 × 1024), and a certificate runs one per checkpoint and module;
    the certificate checks the triplets against the operator either way. Below float64 the
    eigendecomposition of the k × k Gram M Mᵀ, formed in float64, is cheaper still and as
    accurate as the dtype: σ_j² carries an error of ~1e-16·σ₁², far under fp32's. Its V_j
    lose orthogonality as ~1e-16·(σ₁/σ_j)², so it is kept only if the first ``keep`` σ_j (the
    ones a caller keeps; all if None) are above 1e-3·σ₁: ~1e-10 there."""
    if M.shape[0] > M.shape[1]:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U, S, Vh.T
    if M.dtype != torch.float64:
        U, S, V = _svd_of_wide_by_gram(M)
        last = int(S.shape[0] if keep is None else min(keep, int(S.shape[0])))
        if last == 0 or float(S[last - 1]) >= 1e-3 * float(S[0]):
            return U, S, V
    Qm, Rm = torch.linalg.qr(M.T)
    Ur, S, Vrh = torch.linalg.svd(Rm.T)
    return Ur, S, Qm @ Vrh.T


def _svd_of_wide_by_gram(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    M64 = M.double()
    lam, U = torch.linalg.eigh(M64 @ M64.T)  # ascending
    lam, U = lam.flip(0).clamp_min(0.0), U.flip(1)
    S = lam.sqrt()
    V = M64.T @ U
    V = V / torch.linalg.vector_norm(V, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    return U.to(M.dtype), S.to(M.dtype), V.to(M.dtype)


# A posteriori probes (Halko, Martinsson & Tropp 2011, Lemma 4.1): ‖M‖₂ ≤ α √(2/π) max_i
# ‖M ω_i‖ except with probability α^-PROBES. α = 2 with 36 probes fails with probability
# 1.5e-11 per certificate (at most four tries per round: < 1e-10); α = 10 with 10 probes was as safe
# but 5× looser, too loose to certify rounds whose tail is small but wide (docs/benchmarks.md).
PROBES = 36
PROBE_ALPHA = 2.0
PROBE_FACTOR = PROBE_ALPHA * math.sqrt(2 / math.pi)


def residual_norm_bound(
    C: Tensor,
    A: Tensor | None = None,
    probes: int = PROBES,
    *,
    deflate: Tensor | None = None,
    plus: FactorPair | None = None,
) -> float:
    """An upper bound on ‖M‖₂ for M = C A (``A`` None: C, plus ``plus``'s B A if given), or
    on (I − QQᵀ)M with ``deflate`` = Q (orthonormal columns), that holds except with
    probability PROBE_ALPHA^-probes.

    The probes come from the OS's CSPRNG, so no upload can be built orthogonal to them (the
    sketch's Ω is fixed and public); the cost is one product of width ``probes`` through the
    factors, O((d_out + d_in)·N·probes): linear in the round's size.
    """
    like = C if A is None else A
    omega = secret_probes(int(like.shape[1]), like.dtype, like.device, probes)
    Y = C @ omega if A is None else C @ (A @ omega)
    if plus is not None:
        Y = torch.addmm(Y, plus.B, plus.A @ omega)
    return deflated_probe_bound(Y, deflate)


def deflated_probe_bound(probed: Tensor, Q: Tensor | None) -> float:
    """:func:`residual_norm_bound` from probes M G already taken, of (I − QQᵀ)M if ``Q``."""
    Y = probed if Q is None else probed - Q @ (Q.T @ probed)
    return PROBE_FACTOR * float(torch.linalg.vector_norm(Y, dim=0).max())


def secret_probes(
    d_in: int, dtype: torch.dtype, device: torch.device | str, count: int = PROBES
) -> Tensor:
    """``count`` standard Gaussian columns from a CSPRNG seed: the certificate's probes, so
    that no upload can be built orthogonal to them (the G of :class:`Sketched`)."""
    gen = torch.Generator(device="cpu").manual_seed(secrets.randbits(63))
    return torch.randn(d_in, count, generator=gen, dtype=torch.float32).to(
        dtype=dtype, device=device
    )


def randomized_cost(
    d_out: int, d_in: int, n: int, max_rank: int, iterations: int, sketched: bool = False
) -> float:
    """GEMM-equivalent flops of the sketch up to ``iterations`` power iterations and one
    certificate (its residual products and the probes); ``sketched``: the first product and
    the probes are :class:`Sketched` already."""
    k = max_rank + OVERSAMPLE
    if sketched:
        return 2.0 * (d_out + d_in) * n * (2 * iterations + 2) * k
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


def dense_randomized_cost(
    d_out: int, d_in: int, max_rank: int, iterations: int, sketched: bool = False
) -> float:
    """:func:`randomized_cost` for a matrix held densely (its products cost d_out·d_in per
    column)."""
    k = max_rank + OVERSAMPLE
    if sketched:
        return 2.0 * d_out * d_in * (2 * iterations + 2) * k
    return 2.0 * d_out * d_in * ((2 * iterations + 3) * k + PROBES)


def dense_svd_cost(d_out: int, d_in: int) -> float:
    small, large = min(d_out, d_in), max(d_out, d_in)
    return _SVD_FLOP_FACTOR * large * small**2


def worth_randomizing_dense(d_out: int, d_in: int, max_rank: int) -> bool:
    k = max_rank + OVERSAMPLE
    return 4 * k <= min(d_out, d_in) and 3 * dense_randomized_cost(
        d_out, d_in, max_rank, 1
    ) < dense_svd_cost(d_out, d_in)


def close_cost(d_out: int, d_in: int, n: int, max_rank: int) -> float:
    """GEMM-equivalent flops :func:`truncated_svd_of_sum` (AUTO) expects for N = ``n``."""
    if worth_randomizing(d_out, d_in, n, max_rank):
        return randomized_cost(d_out, d_in, n, max_rank, 1)
    return exact_cost(d_out, d_in, n)


def sketched_close_cost(d_out: int, d_in: int, n: int, max_rank: int) -> float:
    """:func:`close_cost` when the terms' :class:`Sketched` products are held already."""
    if worth_randomizing(d_out, d_in, n, max_rank):
        return randomized_cost(d_out, d_in, n, max_rank, 1, sketched=True)
    return exact_cost(d_out, d_in, n)


def dense_close_cost(
    d_out: int, d_in: int, max_rank: int, plus: int = 0, sketched: bool = False
) -> float:
    """GEMM-equivalent flops :func:`truncated_svd_of_dense` (AUTO) expects, with ``plus``
    columns not yet added to the matrix (and its :class:`Sketched` products, if held)."""
    if worth_randomizing_dense(d_out, d_in, max_rank):
        return dense_randomized_cost(d_out, d_in, max_rank, 1, sketched) + randomized_cost(
            d_out, d_in, plus, max_rank, 1, sketched
        )
    return dense_svd_cost(d_out, d_in) + 2.0 * d_out * d_in * plus


def truncated_svd_of_dense(
    W: Tensor,
    max_rank: int,
    method: SvdMethod = SvdMethod.AUTO,
    rank_bound: int | None = None,
    plus: FactorPair | None = None,
    given: Sketched | None = None,
) -> LowRank:
    """Top-``max_rank`` SVD of W (+ ``plus``'s B A): certified randomized where it pays (or
    is asked for), else, and whenever the sketch is not certified, LAPACK's full SVD. With
    ``rank_bound`` (the N = Σ r_i it was summed from) no more components are kept than
    :func:`truncated_svd_of_sum` would keep."""
    d_out, d_in = int(W.shape[0]), int(W.shape[1])
    if method is SvdMethod.RANDOMIZED or (
        method is SvdMethod.AUTO and worth_randomizing_dense(d_out, d_in, max_rank)
    ):
        certified = randomized_svd_dense(W, max_rank, rank_bound=rank_bound, plus=plus, given=given)
        if certified is not None:
            return canonical_signs(certified)
    if plus is not None:
        W = torch.addmm(W, plus.B, plus.A)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    keep = max_rank if rank_bound is None else min(max_rank, rank_bound)
    return canonical_signs(_truncate(U, S, Vh.T, keep))


def truncated_svd_of_sum(
    terms: Sequence[FactorPair],
    max_rank: int,
    method: SvdMethod = SvdMethod.AUTO,
    given: Sketched | None = None,
) -> LowRank:
    """Top-``max_rank`` SVD of ``Σ B_i A_i``; every term must share dtype and device.
    ``given``: the randomized path's first product and probes, held already."""
    if not terms:
        raise EmptyRoundError("updates", "cannot aggregate an empty set of factor terms")
    d_out, d_in = int(terms[0].B.shape[0]), int(terms[0].A.shape[1])
    n = sum(t.rank for t in terms)
    if method is SvdMethod.RANDOMIZED or (
        method is SvdMethod.AUTO and worth_randomizing(d_out, d_in, n, max_rank)
    ):
        certified = randomized_svd(terms, max_rank, given=given)
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
