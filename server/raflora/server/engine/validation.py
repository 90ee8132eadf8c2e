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
from .types import ACCEPTED_DTYPES, AdapterSchema, ClientUpdate


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
) -> None:
    """Raise a typed :class:`AggregationError` naming the first problem found."""
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
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(field, "holds NaN or Inf values")


def validate_round(updates: Collection[ClientUpdate]) -> None:
    seen: set[str] = set()
    for u in updates:
        if u.client_id in seen:
            raise InvalidUpdateError("client_id", f"{u.client_id!r} uploaded twice in one round")
        seen.add(u.client_id)
