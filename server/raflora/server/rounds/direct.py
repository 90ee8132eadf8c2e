"""Direct transfers (docs/design.md §5.3): the rounds side of a push or pull whose bytes move
between the client and the bucket. A direct push passes the same header checks as a Push, and
its payload the same streaming checks, digest and commit: only the route of the bytes differs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator

from raflora.v1.wire import ErrorReason

from ..errors import DataLossError, FailedPreconditionError, InvalidArgumentError
from ..storage.s3_direct import (
    UPLOAD_ID,
    DamagedViewError,
    DirectStore,
    DownloadGrant,
    StagedSizeError,
    StagedUploadMissingError,
    UploadGrant,
)
from .runtime import FederationRuntime
from .tickets import PushOutcome
from .views import View

log = logging.getLogger("raflora.server")


def _store(runtime: FederationRuntime) -> DirectStore:
    if runtime.config.data_plane != "direct" or runtime.direct is None:
        raise FailedPreconditionError(
            "data_plane",
            f"federation {runtime.id!r} moves payloads through Push and Pull "
            f"(data_plane {runtime.config.data_plane}); direct transfers are off",
            ErrorReason.DIRECT_DISABLED,
        )
    return runtime.direct


def begin_push(
    runtime: FederationRuntime,
    ttl: float,
    client_id: str,
    round_: int,
    rank: int,
    num_examples: int,
    lora_alpha: float,
    total_bytes: int,
) -> UploadGrant:
    """A POST policy for one payload, once its header passed a Push's checks (one attempt
    counted). Signing is local: no request reaches the bucket."""
    store = _store(runtime)
    runtime.check_push_header(client_id, round_, rank, num_examples, lora_alpha, total_bytes, "")
    return store.direct.grant_upload(round_, client_id, total_bytes, ttl)


async def commit_push(
    runtime: FederationRuntime,
    upload_id: str,
    client_id: str,
    round_: int,
    rank: int,
    num_examples: int,
    lora_alpha: float,
    total_bytes: int,
    sha256: str,
) -> PushOutcome:
    """Adopt a posted payload, read it back through the push checks, and acknowledge it."""
    store = _store(runtime)
    if not sha256:
        raise InvalidArgumentError("header.sha256", "CommitDirectPush needs the payload's digest")
    if not UPLOAD_ID.fullmatch(upload_id):
        raise InvalidArgumentError("upload_id", "not an upload id this server issued")
    verdict = runtime.check_push_header(
        client_id, round_, rank, num_examples, lora_alpha, total_bytes, sha256, count_attempt=False
    )
    if verdict.duplicate:  # an ack-lost retry: the bytes were checked and counted before
        await asyncio.to_thread(store.direct.forget_staged, round_, client_id, upload_id)
        return PushOutcome(round_, True, total_bytes, runtime.uploads_in(round_))
    try:
        sink, blocks = await asyncio.to_thread(
            store.adopt_direct_upload, round_, client_id, upload_id, total_bytes
        )
    except StagedUploadMissingError:
        raise DataLossError(
            "upload_id",
            f"no payload was posted for upload {upload_id} (or it was removed): begin again",
            ErrorReason.UPLOAD_MISSING,
        ) from None
    except StagedSizeError as exc:
        raise DataLossError("total_bytes", str(exc), ErrorReason.SIZE_MISMATCH) from None
    ticket = runtime.ticket(verdict, sink)
    try:
        await _feed(ticket.write, blocks, ticket.intake.raise_error)
    except BaseException:
        runtime.abort_push(ticket)  # the sink deletes the copy
        raise
    finally:
        await asyncio.to_thread(_close, blocks)
    return await runtime.finish_push(ticket)


async def _feed(
    write: Callable[[bytes], Awaitable[None]],
    blocks: Iterator[bytes],
    raise_error: Callable[[], None],
) -> None:
    """Each block read in a worker thread, then handed to the ticket (which checks it)."""
    while (block := await asyncio.to_thread(next, blocks, None)) is not None:
        raise_error()  # a bad chunk stops the read at once
        await write(block)


def _close(blocks: Iterator[bytes]) -> None:
    close = getattr(blocks, "close", None)
    if close is not None:
        close()


async def pull(
    runtime: FederationRuntime, ttl: float, client_id: str, round_: int | None
) -> tuple[View, DownloadGrant]:
    """A GET URL of the client's view (put into the bucket on first use). A local view found
    damaged on the way up is discarded and built again once."""
    plane = _store(runtime).direct
    for attempt in range(2):
        view, reader = await runtime.open_view(client_id, round_)
        with reader:  # pins the round against retention while it is copied up
            try:
                grant = await asyncio.to_thread(plane.grant_download, view.stored, reader, ttl)
            except DamagedViewError:
                if attempt:
                    raise DataLossError(
                        "view", "the pull view was damaged twice on the server's disk"
                    ) from None
                await runtime.discard_view(view)
                continue
        return view, grant
    raise AssertionError("unreachable")
