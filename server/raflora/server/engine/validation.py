"""End-to-end checks of one upload against the federation, before it may be aggregated."""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from .errors import (
    DtypeError,
    InvalidUpdateError,
    MissingModuleError,
    NonFiniteError,
    RankError,
    ShapeMismatchError,
    UnknownModuleError,
)
from .types import ACCEPTED_DTYPES, AdapterSchema, ClientUpdate, FactorPair


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf, from one vectorised min/max pass (NaN propagates into both ends);
    several times faster than ``isfinite(t).all()``, which materialises a boolean tensor."""
    if not tensor.numel():
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def validate_rank(rank: int, max_rank: int, allowed_ranks: Collection[int] | None) -> None:
    if rank < 1 or rank > max_rank:
        raise RankError("rank", f"{rank} is outside 1..{max_rank} (the federation's max rank)")
    if allowed_ranks is not None and rank not in allowed_ranks:
        raise RankError("rank", f"{rank} is not one of the allowed ranks {sorted(allowed_ranks)}")


def validate_update(
    update: ClientUpdate,
    schema: AdapterSchema,
    max_rank: int,
    allowed_ranks: Collection[int] | None = None,
    *,
    check_finite: bool = True,
) -> None:
    """Raise a typed :class:`AggregationError` naming the first problem found.

    ``check_finite=False`` leaves NaN/Inf to the caller (the service's
    :func:`validate_effective_update` finds them in the same pass as the magnitudes).
    """
    if not update.client_id:
        raise InvalidUpdateError("client_id", "must be non-empty")
    validate_rank(update.rank, max_rank, allowed_ranks)
    if update.num_examples < 0:
        raise InvalidUpdateError("num_examples", f"must be >= 0, got {update.num_examples}")
    if not math.isfinite(update.scale) or update.scale <= 0:
        raise InvalidUpdateError("scale", f"must be a positive finite number, got {update.scale}")
    unknown = sorted(set(update.factors) - set(schema.modules))
    if unknown:
        raise UnknownModuleError(unknown[0], "module is not in the federation's schema")
    missing = [name for name in schema.modules if name not in update.factors]
    if missing:
        raise MissingModuleError(missing[0], "module of the schema is missing from the upload")
    r = update.rank
    for name, shape in schema.modules.items():
        pair = update.factors[name]
        for label, tensor, expected in (
            ("lora_A", pair.A, (r, shape.d_in)),
            ("lora_B", pair.B, (shape.d_out, r)),
        ):
            field = f"{name}.{label}.weight"
            if tensor.dtype not in ACCEPTED_DTYPES:
                raise DtypeError(field, f"dtype {tensor.dtype} is not fp32, fp16, bf16 or fp64")
            if tuple(tensor.shape) != expected:
                raise ShapeMismatchError(
                    field, f"shape {tuple(tensor.shape)} != expected {expected} for rank {r}"
                )
            if check_finite and not all_finite(tensor):
                raise NonFiniteError(field, "holds NaN or Inf values")


def validate_round(updates: Collection[ClientUpdate]) -> None:
    seen: set[str] = set()
    for u in updates:
        if u.client_id in seen:
            raise InvalidUpdateError("client_id", f"{u.client_id!r} uploaded twice in one round")
        seen.add(u.client_id)


# Largest |element| of s·B or A the service admits: far above any trained LoRA factor, and low
# enough that Gram products of rank-r factors cannot overflow fp32 (r·d·(1e15)² ≪ 3.4e38 only
# up to d·r ~ 1e8; the Frobenius bound below is the tighter, operator-set limit).
MAX_FACTOR_ELEMENT = 1e15


def factor_gram(tensor: torch.Tensor, *, rows: bool) -> torch.Tensor:
    """The r×r Gram of one factor (``rows``: A·Aᵀ of an r×d_in A; else Bᵀ·B of a d_out×r B).

    Formed at (at least) fp32 in one pass; only if it overflows is it formed again in float64.
    Each factor's Gram is decided on its own, so a factor can be checked as soon as its bytes
    have arrived, before its partner's.
    """
    work = torch.promote_types(tensor.dtype, torch.float32)
    t = tensor.to(work)
    gram = t @ t.T if rows else t.T @ t
    if not all_finite(gram):
        t = tensor.double()
        gram = t @ t.T if rows else t.T @ t
    return gram


def norm_from_grams(gram_B: torch.Tensor, gram_A: torch.Tensor, scale: float) -> float:
    """‖s·B·A‖_F = √tr((BᵀB)(AAᵀ)) = √Σ_jk (BᵀB)_jk (AAᵀ)_jk, never the dense d_out×d_in."""
    total = float((gram_B.double() * gram_A.double()).sum().clamp_min(0.0))
    return math.sqrt(total) * abs(scale)


def effective_update_norm(pair: FactorPair, scale: float) -> float:
    """‖s·B·A‖_F from the r×r Gram products, without the dense d_out×d_in matrix."""
    return norm_from_grams(factor_gram(pair.B, rows=False), factor_gram(pair.A, rows=True), scale)


def check_factor_magnitude(
    name: str, tensor: torch.Tensor, factor: float, compute_dtype: torch.dtype
) -> None:
    """NaN, Inf, and elements of factor·tensor past MAX_FACTOR_ELEMENT (one max-abs pass)."""
    if tensor.numel():
        # aminmax is one vectorised pass (several times faster than an abs-max norm) and
        # propagates NaN; each end is checked, as Python's max() would drop a NaN.
        lo, hi = (float(x) for x in torch.aminmax(tensor))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteError(name, "holds NaN or Inf values")
        largest = max(-lo, hi)
    else:
        largest = 0.0
    peak = largest * abs(factor)
    if not math.isfinite(peak) or peak > MAX_FACTOR_ELEMENT:
        raise InvalidUpdateError(
            name,
            f"an element of magnitude {peak:.3g} (after scaling) exceeds "
            f"{MAX_FACTOR_ELEMENT:g}, which would overflow aggregation at {compute_dtype}",
        )


def check_compute_dtype(compute_dtype: torch.dtype) -> None:
    if compute_dtype not in (torch.float32, torch.float64):
        raise InvalidUpdateError(
            "compute_dtype", f"aggregation runs in fp32 or fp64, not {compute_dtype}"
        )


def check_update_norm(field: str, norm: float, max_norm: float) -> None:
    if not math.isfinite(norm) or norm > max_norm:
        raise InvalidUpdateError(
            field,
            f"effective update norm ‖s·B·A‖_F = {norm:.3g} exceeds the federation's bound "
            f"{max_norm:g}",
        )


def validate_effective_update(
    field: str,
    pair: FactorPair,
    scale: float,
    compute_dtype: torch.dtype,
    max_norm: float,
) -> float:
    """Check one module of an upload exactly as aggregation will use it; returns ‖s·B·A‖_F.

    NaN and Inf are found here (the max-abs pass sees them). Finite in its own dtype is not
    enough, though: fp64 1e300 overflows once cast to
    the compute dtype, and a finite B overflows once multiplied by a huge scale. Every element
    of s·B and A must be at most MAX_FACTOR_ELEMENT, far inside the range of the compute dtypes
    (fp32 or fp64), so the cast cannot overflow; the norm bound is the operator's. An upload
    that passes here cannot make the round's aggregation fail on its numbers.
    """
    check_compute_dtype(compute_dtype)
    for label, tensor, factor in (("lora_B", pair.B, scale), ("lora_A", pair.A, 1.0)):
        check_factor_magnitude(f"{field}.{label}.weight", tensor, factor, compute_dtype)
    norm = effective_update_norm(pair, scale)
    check_update_norm(field, norm, max_norm)
    return norm
