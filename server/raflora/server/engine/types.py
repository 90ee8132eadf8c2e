"""Value types shared by every strategy: schema, scalings, factors and global state.

All are immutable dataclasses over torch tensors. Naming follows PEFT: ``A`` is ``lora_A``
(r × d_in) and ``B`` is ``lora_B`` (d_out × r); a client's effective update is ``s · B @ A``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import ConfigError

if TYPE_CHECKING:
    from .privacy import PrivacyOutcome

ACCEPTED_DTYPES: frozenset[torch.dtype] = frozenset(
    {torch.float32, torch.float16, torch.bfloat16, torch.float64}
)


class ScalingRule(str, Enum):
    """How PEFT turns ``lora_alpha`` into the scaling ``s`` for a rank ``r``."""

    STANDARD = "standard"  # alpha / r
    RSLORA = "rslora"  # alpha / sqrt(r)


def lora_scaling(alpha: float, rank: int, rule: ScalingRule = ScalingRule.STANDARD) -> float:
    """PEFT's scaling for one adapter; clients of different ranks get different scalings."""
    if rank < 1:
        raise ConfigError("rank", f"must be >= 1, got {rank}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError("lora_alpha", f"must be a positive finite number, got {alpha}")
    if rule is ScalingRule.RSLORA:
        return alpha / math.sqrt(rank)
    return alpha / rank


@dataclass(frozen=True)
class ModuleShape:
    """Shape of the frozen weight an adapter targets: ``(d_out, d_in)``."""

    d_out: int
    d_in: int


@dataclass(frozen=True)
class AdapterSchema:
    """The adapted modules of a federation, in a fixed order."""

    modules: Mapping[str, ModuleShape]

    def __post_init__(self) -> None:
        if not self.modules:
            raise ConfigError("schema.modules", "at least one module is required")
        for name, shape in self.modules.items():
            if not name:
                raise ConfigError("schema.modules", "module names must be non-empty")
            if shape.d_out < 1 or shape.d_in < 1:
                raise ConfigError(f"schema.modules[{name}]", f"bad shape {shape}")

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, int]]) -> AdapterSchema:
        return cls({name: ModuleShape(int(o), int(i)) for name, (o, i) in shapes.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


@dataclass(frozen=True)
class FactorPair:
    """A product ``B @ A`` (B: d_out × k, A: k × d_in); no scaling is implied."""

    B: Tensor
    A: Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> Tensor:
        return self.B @ self.A


@dataclass(frozen=True)
class LowRank:
    """A truncated SVD ``U diag(S) Vᵀ`` with S sorted in descending order."""

    U: Tensor
    S: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def dense(self) -> Tensor:
        return (self.U * self.S) @ self.V.T


ModuleState = LowRank | FactorPair


@dataclass(frozen=True)
class ClientUpdate:
    """One client's upload for a round: raw LoRA factors plus what is needed to weigh them."""

    client_id: str
    rank: int
    num_examples: int
    scale: float
    factors: Mapping[str, FactorPair]


@dataclass(frozen=True)
class GlobalState:
    """The federation's global adapter after ``round`` aggregations (round 0: ΔW = 0)."""

    round: int
    modules: Mapping[str, ModuleState]
    # Ranks of the clients that produced this state; the partitions of the rank-energy metrics.
    participant_ranks: tuple[int, ...] = ()
    # The participants' final weights p_i (their order), and per participant the factor its
    # update was clipped by and the trust its weight was multiplied by (docs/design.md §2.8).
    weights: tuple[float, ...] = ()
    clip: tuple[float, ...] = ()
    trust: tuple[float, ...] = ()
    # What client-level DP did to the round (docs/design.md §2.9); None: not private.
    privacy: PrivacyOutcome | None = None

    def dense(self, name: str) -> Tensor:
        return self.modules[name].dense()


@dataclass(frozen=True)
class ClientAdapter:
    """What a client of rank ``rank`` and scaling ``scale`` loads before training.

    ``factors`` are raw LoRA factors: ``scale * B @ A`` is the client's view of the global
    update. ``merge`` is set only by stacking strategies (FLoRA): add ``B @ A`` of each entry
    into the frozen base weight first, then restart LoRA from ``factors``.
    """

    rank: int
    scale: float
    factors: Mapping[str, FactorPair]
    merge: Mapping[str, FactorPair] | None = field(default=None)
