"""Typed errors of the aggregation engine.

Every error carries the name of the offending field so that the service layer can map it to a
gRPC status whose details name the problem (docs/design.md §6) without parsing strings.
"""

from __future__ import annotations


class AggregationError(ValueError):
    """Base class: an input the engine refuses. ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def __reduce__(self) -> tuple[type[AggregationError], tuple[str, str]]:
        # Pickled whole, so that a refusal raised in another process (a Ray worker) arrives
        # as the same typed error with its field.
        return type(self), (self.field, self.detail)


class ShapeMismatchError(AggregationError):
    """A factor's shape does not match the schema or the declared rank."""


class RankError(AggregationError):
    """A rank outside 1..max_rank or outside the federation's allowed ranks."""


class UnknownModuleError(AggregationError):
    """An upload names a module that the schema does not declare."""


class MissingModuleError(AggregationError):
    """An upload lacks a module that the schema declares."""


class NonFiniteError(AggregationError):
    """A tensor holds NaN or Inf."""


class DtypeError(AggregationError):
    """A tensor's dtype is not one of fp32, fp16, bf16 (or fp64)."""


class EmptyRoundError(AggregationError):
    """A round was aggregated with no uploads."""


class ZeroWeightError(AggregationError):
    """The participants' weights sum to zero, so no average exists."""


class InvalidUpdateError(AggregationError):
    """Any other invalid upload metadata (examples, scaling, duplicate client ids)."""


class UnknownStrategyError(AggregationError):
    """A strategy name that is not registered."""


class ConfigError(AggregationError):
    """A federation configuration that cannot work (bad schema, ranks, options)."""
