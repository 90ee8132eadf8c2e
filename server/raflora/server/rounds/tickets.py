"""A push in flight (its header accepted, its payload flowing into a sink) and its outcome."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from raflora.v1.wire import ErrorReason

from ..errors import DataLossError
from ..storage import ClientRecord
from ..storage.tensorio import StreamingUploadCheck
from .intake import UploadIntake


@dataclass(frozen=True)
class HeaderVerdict:
    """A push header that passed every check, and how its payload is to be checked."""

    client_id: str
    round: int
    rank: int
    num_examples: int
    joined: ClientRecord
    total_bytes: int
    sha256: str
    check: StreamingUploadCheck | None  # None: only hashed (a possible duplicate)
    duplicate: bool


@dataclass
class PushTicket:
    """A push whose header passed every check; its payload flows into ``sink``."""

    client_id: str
    round: int
    rank: int
    num_examples: int
    lora_alpha: float
    scale: float
    total_bytes: int
    sha256: str  # from the header; empty: the stream's trailer carries it
    intake: UploadIntake
    duplicate: bool = False  # identical to an upload that was already counted

    async def write(self, chunk: bytes | memoryview) -> None:
        """Append one chunk; it is written, hashed and checked in worker threads."""
        if self.intake.received + len(chunk) > self.total_bytes:
            raise DataLossError(
                "total_bytes",
                f"stream carries more than the declared {self.total_bytes} bytes",
                ErrorReason.SIZE_MISMATCH,
            )
        await self.intake.put(chunk)


@dataclass(frozen=True)
class PushOutcome:
    round: int
    duplicate: bool
    size: int
    uploads_in_round: int


def retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shielded task's exception as seen (its caller may have gone away)."""
    if not task.cancelled():
        task.exception()
