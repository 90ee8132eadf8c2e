"""Direct transfers (docs/design.md §5.3): the rounds side of a push or pull whose bytes move
between the client and the bucket. A direct push passes the same header checks as a Push, and
its payload the same streaming checks, digest and commit: only the route of the bytes differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from raflora.v1.wire import ErrorReason

from ..config import echo_id
from ..errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
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
from .tickets import PushOutcome, retrieve
from .views import View, ViewReader

log = logging.getLogger("raflora.server")
# Copies, read-backs and view uploads of direct transfers: bounded, and off the default
# executor that commits, joins and view builds of every federation share.
_BUCKET = ThreadPoolExecutor(
    max_workers=min(8, (os.cpu_count() or 1) + 2), thread_name_prefix="raflora-direct"
)


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


@dataclass(frozen=True)
class DirectCommit:
    """What a CommitDirectPush asks for: a retry of a running commit names the same."""

    upload_id: str
    client_id: str
    round: int
    rank: int
    num_examples: int
    lora_alpha: float
    total_bytes: int
    sha256: str


async def commit_push(runtime: FederationRuntime, commit: DirectCommit) -> PushOutcome:
    """Adopt a posted payload, read it back through the push checks, and acknowledge it.

    One commit per client at a time, each a push attempt of the round: a client cannot make
    the server copy and read its upload over and over, or many times at once. The commit runs
    shielded: a client that hangs up does not interrupt it half-way."""
    store = _store(runtime)
    if not commit.sha256:
        raise InvalidArgumentError("header.sha256", "CommitDirectPush needs the payload's digest")
    if not UPLOAD_ID.fullmatch(commit.upload_id):
        raise InvalidArgumentError("upload_id", "not an upload id this server issued")
    client_id = commit.client_id
    running = runtime.direct_commits.get(client_id)
    if running is not None:
        if running[0] != commit:
            raise ResourceExhaustedError(
                "upload_id",
                f"a commit of client {echo_id(client_id)} is already running; wait for its answer",
                ErrorReason.TOO_MANY_STREAMS,
            )
        return await asyncio.shield(running[1])  # a retry of it (a lost answer): its outcome
    task = asyncio.ensure_future(_commit(runtime, store, commit))
    runtime.direct_commits[client_id] = (commit, task)
    task.add_done_callback(lambda _: runtime.direct_commits.pop(client_id, None))
    task.add_done_callback(retrieve)
    return await asyncio.shield(task)


async def _commit(runtime: FederationRuntime, store: DirectStore, c: DirectCommit) -> PushOutcome:
    loop = asyncio.get_running_loop()
    verdict = runtime.check_push_header(
        c.client_id, c.round, c.rank, c.num_examples, c.lora_alpha, c.total_bytes, c.sha256
    )
    forget = functools.partial(store.direct.forget_staged, c.round, c.client_id, c.upload_id)
    if verdict.duplicate:  # an ack-lost retry: the bytes were checked and counted before
        await loop.run_in_executor(_BUCKET, forget)
        return PushOutcome(c.round, True, c.total_bytes, runtime.uploads_in(c.round))
    runtime.refuse_if_counted(c.client_id, c.round)  # before a byte is read, not after
    decided = True  # the staged object is dropped unless the bucket did not answer
    try:
        try:
            sink, blocks = await loop.run_in_executor(
                _BUCKET,
                store.adopt_direct_upload,
                c.round,
                c.client_id,
                c.upload_id,
                c.total_bytes,
            )
        except StagedUploadMissingError:
            raise DataLossError(
                "upload_id",
                f"no payload was posted for upload {c.upload_id} (or it was removed): begin again",
                ErrorReason.UPLOAD_MISSING,
            ) from None
        except StagedSizeError as exc:
            raise DataLossError("total_bytes", str(exc), ErrorReason.SIZE_MISMATCH) from None
        ticket = runtime.ticket(verdict, sink)
        try:
            while (block := await loop.run_in_executor(_BUCKET, next, blocks, None)) is not None:
                ticket.intake.raise_error()  # a bad chunk stops the read at once
                await ticket.write(block)
        except Exception:
            await runtime.refuse_push(ticket)  # the sink deletes the copy
            raise
        except BaseException:  # cancelled: no waiting here
            runtime.abort_push(ticket)
            raise
        finally:
            await loop.run_in_executor(_BUCKET, _close, blocks)
        return await runtime.finish_push(ticket)
    except (OSError, asyncio.CancelledError):  # the bucket did not answer, or a shutdown:
        decided = False  # the client may commit the same object again
        runtime.check_live()  # deleted meanwhile: NOT_FOUND, not the I/O error it caused
        raise
    except Exception:
        runtime.check_live()
        raise
    finally:
        if decided:
            await loop.run_in_executor(_BUCKET, forget)


def _close(blocks: Generator[bytes, None, None]) -> None:
    with contextlib.suppress(ValueError):  # still running in a thread (loop shutdown)
        blocks.close()


async def pull(
    runtime: FederationRuntime, ttl: float, client_id: str, round_: int | None
) -> tuple[View, DownloadGrant]:
    """A GET URL of the client's view (put into the bucket on first use). A local view found
    damaged on the way up is discarded and built again once."""
    plane = _store(runtime).direct
    loop = asyncio.get_running_loop()
    for attempt in range(2):
        # A direct federation holds no hot views (runtime.py): this reader reads the file.
        view, reader = await runtime.open_view(client_id, round_)
        if plane.published(view.stored):  # the usual case: a signature, no I/O
            reader.close()
            return view, plane.sign_download(view.stored, ttl)
        key = plane.view_key(view.stored)
        gate = runtime.view_uploads.setdefault(key, asyncio.Lock())

        async def publish(
            reader: ViewReader = reader,
            view: View = view,
            gate: asyncio.Lock = gate,
            key: str = key,
        ) -> DownloadGrant:
            try:
                with reader:  # pins the round against retention until the copy is up
                    async with gate:  # pulls of a view on its way up wait here, no thread
                        return await loop.run_in_executor(
                            _BUCKET, plane.grant_download, view.stored, reader, ttl
                        )
            finally:
                if runtime.view_uploads.get(key) is gate and not gate.locked():
                    del runtime.view_uploads[key]  # nobody took it after us

        task = asyncio.ensure_future(publish())
        task.add_done_callback(retrieve)
        try:  # a caller that goes away does not close the reader under the thread reading it
            grant = await asyncio.shield(task)
        except DamagedViewError:
            if attempt:
                raise DataLossError(
                    "view", "the pull view was damaged twice on the server's disk"
                ) from None
            await runtime.discard_view(view)
            continue
        return view, grant
    raise AssertionError("unreachable")
