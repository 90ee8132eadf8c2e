"""A push in flight (its header accepted, its payload flowing into a sink) and its outcome."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from raflora.v1.wire import ErrorReason

from ..errors import DataLossError
from ..storage import UploadSink


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
    sha256: str
    sink: UploadSink
    duplicate: bool = False  # identical to an upload that was already counted

    async def write(self, chunk: bytes) -> None:
        """Append one chunk (in a thread: hashing and disk writes stay off the event loop)."""
        if self.sink.received + len(chunk) > self.total_bytes:
            raise DataLossError(
                "total_bytes",
                f"stream carries more than the declared {self.total_bytes} bytes",
                ErrorReason.SIZE_MISMATCH,
            )
        await asyncio.to_thread(self.sink.write, chunk)


@dataclass(frozen=True)
class PushOutcome:
    round: int
    duplicate: bool
    size: int
    uploads_in_round: int
