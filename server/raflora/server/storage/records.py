"""What the store keeps about clients and uploads besides their payloads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ClientRecord:
    """A joined client: its rank, alpha and scale and its declared examples, fixed at join.

    An ``observer`` (evaluator, auditor) pulls but never pushes and is never selected.
    """

    client_id: str
    rank: int
    num_examples: int
    lora_alpha: float
    scale: float
    observer: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ClientRecord:
        return cls(
            client_id=_typed(raw["client_id"], str),
            rank=_typed(raw["rank"], int),
            num_examples=_typed(raw["num_examples"], int),
            lora_alpha=float(_typed(raw["lora_alpha"], (int, float))),
            scale=float(_typed(raw["scale"], (int, float))),
            observer=_flag(raw.get("observer", False)),
        )


@dataclass(frozen=True)
class UploadRecord:
    """Metadata of an acknowledged upload; ``sha256`` and ``size`` are checked on every read."""

    client_id: str
    round: int
    rank: int
    num_examples: int
    lora_alpha: float
    scale: float
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> UploadRecord:
        return cls(
            client_id=_typed(raw["client_id"], str),
            round=_typed(raw["round"], int),
            rank=_typed(raw["rank"], int),
            num_examples=_typed(raw["num_examples"], int),
            lora_alpha=float(_typed(raw["lora_alpha"], (int, float))),
            scale=float(_typed(raw["scale"], (int, float))),
            sha256=_typed(raw["sha256"], str),
            size=_typed(raw["size"], int),
        )


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a bool, got {type(value).__name__}")
    return value


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"expected {kind}, got {type(value).__name__}")
    return value
