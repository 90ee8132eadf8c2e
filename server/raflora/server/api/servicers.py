"""gRPC servicers: authenticate, parse the request, call the runtime, respond.

Errors are raised as domain errors and translated in one place (``interceptors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from raflora.v1 import aggregation_pb2 as pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.framing import encode_data
from raflora.v1.wire import DEFAULT_CHUNK_SIZE

from ..auth import Authority, check_secret_format
from ..config import check_id
from ..errors import InvalidArgumentError
from ..metrics import ServerMetrics
from ..rounds import (
    BusClosedError,
    EventType,
    FederationHub,
    FederationRuntime,
    RoundEvent,
    View,
    WatcherLaggedError,
    direct,
)
from ..rounds.preload import STREAMING, StreamingPush
from ..rounds.terms import check_sha256
from ..rounds.tickets import PushTicket, retrieve
from ..rounds.views import LivePull, ViewReader
from .interceptors import refusal_of
from .serde import (
    client_info_proto,
    config_from_proto,
    config_to_proto,
    direct_download_proto,
    direct_upload_proto,
    event_proto,
    federation_proto,
    live_pull_header,
    pull_header,
    push_response,
    status_proto,
)
from .streams import StreamClock, refuse_malformed

log = logging.getLogger("raflora.server")


@dataclass(frozen=True)
class Limits:
    chunk_size: int
    idle_stream_timeout_seconds: float = 60.0
    max_request_seconds: float = 3600.0
    header_timeout_seconds: float = 10.0  # a Push must name itself this soon
    direct_url_seconds: float = 900.0  # how long a direct transfer's pre-signed URL works


def _metadata(context: Any) -> Any:
    return context.invocation_metadata()


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        hub: FederationHub,
        metrics: ServerMetrics,
        authority: Authority | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.hub = hub
        self.metrics = metrics
        self.authority = authority or Authority(None, None, 3600.0)
        # ExportAdapter streams like Pull: the server's chunk size and stream limits.
        self.limits = limits or Limits(chunk_size=DEFAULT_CHUNK_SIZE)

    async def CreateFederation(
        self, request: pb.CreateFederationRequest, context: Any
    ) -> pb.Federation:
        self.authority.require_admin(_metadata(context))
        config = config_from_proto(request.spec)
        if not self.authority.enabled:
            if request.enrolment_secret or request.open_enrolment:
                log.warning(
                    "CreateFederation %s: enrolment settings ignored, authentication is off",
                    config.federation_id,
                )
            return federation_proto(await self.hub.create(config))
        if request.enrolment_secret:  # checked before anything is created
            if not request.open_enrolment:
                raise InvalidArgumentError(
                    "enrolment_secret",
                    "a shared secret is only for open_enrolment; without it, clients join with "
                    "their own credentials (IssueClientCredential)",
                )
            check_secret_format(request.enrolment_secret)
        runtime = await self.hub.create(config)
        secret = await asyncio.to_thread(
            self.authority.configure,
            config.federation_id,
            open_enrolment=request.open_enrolment,
            secret=request.enrolment_secret or None,
        )
        out = federation_proto(runtime)
        out.enrolment_secret = secret
        return out

    async def GetFederation(self, request: pb.GetFederationRequest, context: Any) -> pb.Federation:
        self.authority.require_admin(_metadata(context))
        return federation_proto(self.hub.get(request.federation_id))

    async def ListFederations(
        self, request: pb.ListFederationsRequest, context: Any
    ) -> pb.ListFederationsResponse:
        self.authority.require_admin(_metadata(context))
        return pb.ListFederationsResponse(
            federations=[federation_proto(r) for r in self.hub.federations.values()]
        )

    async def RotateEnrolmentSecret(
        self, request: pb.RotateEnrolmentSecretRequest, context: Any
    ) -> pb.RotateEnrolmentSecretResponse:
        self.authority.require_admin(_metadata(context))
        runtime = self.hub.get(request.federation_id)
        secret = await asyncio.to_thread(
            self.authority.set_secret, runtime.id, request.enrolment_secret or None
        )
        log.info("federation %s: enrolment secret rotated; older client tokens revoked", runtime.id)
        return pb.RotateEnrolmentSecretResponse(federation_id=runtime.id, enrolment_secret=secret)

    async def IssueClientCredential(
        self, request: pb.IssueClientCredentialRequest, context: Any
    ) -> pb.IssueClientCredentialResponse:
        self.authority.require_admin(_metadata(context))
        runtime = self.hub.get(request.federation_id)
        client_id = check_id("client_id", request.client_id)
        credential = await asyncio.to_thread(
            self.authority.issue_client_credential, runtime.id, client_id
        )
        log.info("federation %s: credential issued for client %s", runtime.id, client_id)
        return pb.IssueClientCredentialResponse(
            federation_id=runtime.id, client_id=client_id, client_credential=credential
        )

    async def DeleteFederation(
        self, request: pb.DeleteFederationRequest, context: Any
    ) -> pb.DeleteFederationResponse:
        self.authority.require_admin(_metadata(context))
        archived = await self.hub.delete(request.federation_id, archive=request.archive)
        self.authority.forget(request.federation_id)  # its tokens and credentials, now
        return pb.DeleteFederationResponse(
            federation_id=request.federation_id, archive=archived or ""
        )

    async def ListClients(
        self, request: pb.ListClientsRequest, context: Any
    ) -> pb.ListClientsResponse:
        self.authority.require_admin(_metadata(context))
        clients = self.hub.clients(request.federation_id)
        return pb.ListClientsResponse(
            federation_id=request.federation_id, clients=[client_info_proto(c) for c in clients]
        )

    async def ExportAdapter(  # type: ignore[override]  # writes with context.write, like Pull
        self, request: pb.ExportAdapterRequest, context: Any
    ) -> None:
        self.authority.require_admin(_metadata(context))
        clock = StreamClock(
            self.limits.idle_stream_timeout_seconds, self.limits.max_request_seconds
        )
        requested = request.round if request.HasField("round") else None
        export = await self.hub.open_export(request.federation_id, requested, request.rank or None)
        header = pull_header(export.view)
        header.lora_alpha = export.lora_alpha
        runtime = self.hub.get(request.federation_id)
        await stream_view(
            context, clock, runtime, export.view, export.reader, header, self.limits.chunk_size
        )
        log.info(
            "federation %s: round %d exported at rank %d",
            request.federation_id,
            export.view.round,
            export.view.rank,
        )


class AggregationService(pb_grpc.AggregationServiceServicer):
    def __init__(
        self,
        hub: FederationHub,
        metrics: ServerMetrics,
        limits: Limits | int,
        authority: Authority | None = None,
    ) -> None:
        self.hub = hub
        self.metrics = metrics
        self.limits = limits if isinstance(limits, Limits) else Limits(chunk_size=limits)
        self.chunk_size = self.limits.chunk_size
        self.authority = authority or Authority(None, None, 3600.0)
        self._first_joins = asyncio.Lock()  # open enrolment: one id claimed at a time

    def _clock(self) -> StreamClock:
        return StreamClock(self.limits.idle_stream_timeout_seconds, self.limits.max_request_seconds)

    async def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        first_join = self.authority.enrol(
            _metadata(context), request.federation_id, request.client_id
        )
        runtime = self.hub.get(request.federation_id)
        issued = ""
        if first_join:  # open enrolment: the id's terms and its credential, set once
            async with self._first_joins:
                self.authority.enrol(_metadata(context), request.federation_id, request.client_id)
                record = await runtime.join(
                    request.client_id,
                    request.rank,
                    request.num_examples,
                    request.lora_alpha,
                    request.observer,
                )
                issued = await asyncio.to_thread(
                    self.authority.claim, runtime.id, request.client_id
                )
        else:
            record = await runtime.join(
                request.client_id,
                request.rank,
                request.num_examples,
                request.lora_alpha,
                request.observer,
            )
        token, expires = self.authority.issue(runtime.id, record.client_id, record.rank)
        return pb.JoinResponse(
            spec=config_to_proto(runtime.config),
            status=status_proto(runtime.snapshot()),
            scale=record.scale,
            chunk_size=self.chunk_size,
            client_token=token,
            token_expires_unix=expires,
            client_credential=issued,
        )

    async def GetRound(self, request: pb.GetRoundRequest, context: Any) -> pb.RoundStatus:
        self.authority.client(_metadata(context), request.federation_id, request.client_id or None)
        runtime = self.hub.get(request.federation_id)
        return status_proto(runtime.snapshot(), request.client_id)

    async def Pull(  # type: ignore[override]  # writes with context.write instead of yielding
        self, request: pb.PullRequest, context: Any
    ) -> None:
        """A coroutine that writes (``context.write``), so that each write is timed."""
        started = time.perf_counter()
        clock = self._clock()
        claims = self.authority.client(_metadata(context), request.federation_id, request.client_id)
        runtime = self.hub.get(request.federation_id)
        # A token from before a re-join at another rank does not read the new rank's adapter.
        self.authority.authorize(
            claims, runtime.id, request.client_id, runtime.client(request.client_id).rank
        )
        requested = request.round if request.HasField("round") else None
        live = None
        if request.digest_last:  # the client takes the digest last: follow a build in flight
            live = await runtime.follow_view(request.client_id, requested)
        if live is not None:
            self.metrics.pulls_while_built.labels(runtime.id).inc()
            await stream_live(context, clock, live)
            rank, size = live.rank, live.facts.total_bytes
        else:
            view, reader = await runtime.open_view(request.client_id, requested)
            if reader.hot is not None:
                self.metrics.pulls_from_memory.labels(runtime.id).inc()
            header = pull_header(view)
            await stream_view(context, clock, runtime, view, reader, header, self.chunk_size)
            rank, size = view.rank, view.size
        self.metrics.download_bytes.labels(runtime.id, str(rank)).inc(size)
        self.metrics.pull_seconds.labels(runtime.id).observe(time.perf_counter() - started)

    async def WatchRounds(
        self, request: pb.WatchRoundsRequest, context: Any
    ) -> AsyncIterator[pb.RoundEvent]:
        self.authority.client(_metadata(context), request.federation_id, request.client_id or None)
        runtime = self.hub.get(request.federation_id)
        after, who = request.after_round, request.client_id
        # A watch ends cleanly after max_request_seconds (the SDK reconnects at once): no RPC
        # holds its slot forever, and a watcher's token is checked again at least that often.
        deadline = time.monotonic() + self.limits.max_request_seconds
        subscription = runtime.subscribe()
        try:
            yield event_proto(RoundEvent(EventType.STATUS, runtime.snapshot()), who)
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    event = await subscription.next(remaining)
                except WatcherLaggedError as exc:  # end the stream: the client re-reads the status
                    log.warning("WatchRounds %s for %s ended: %s", runtime.id, context.peer(), exc)
                    return
                except BusClosedError:  # deleted: the client's next call gets NOT_FOUND
                    return
                if event is None:
                    return
                if after and event.snapshot.round <= after:
                    continue
                yield event_proto(event, who)
        finally:
            subscription.close()

    async def Push(self, requests: AsyncIterator[pb.PushRequest], context: Any) -> pb.PushResponse:
        started = time.perf_counter()
        clock = self._clock()
        federation = "?"
        try:
            claims = self.authority.authenticate(_metadata(context))  # before reading anything
            stream = aiter(requests)
            first = await clock.next(stream, self.limits.header_timeout_seconds)
            refuse_malformed(first)
            if (
                first is None
                or isinstance(first, memoryview)  # a data chunk (the fast deserializer's form)
                or first.WhichOneof("payload") != "header"
            ):
                raise InvalidArgumentError("header", "the first message must be a PushHeader")
            h = first.header
            federation = h.federation_id
            self.authority.authorize(claims, h.federation_id, h.client_id, h.rank)
            runtime = self.hub.get(h.federation_id)
            ticket = runtime.begin_push(
                h.client_id, h.round, h.rank, h.num_examples, h.lora_alpha, h.total_bytes, h.sha256
            )
            try:
                with STREAMING.push() as streaming:
                    trailer = await self._receive(stream, clock, ticket, bool(h.sha256), streaming)
            except Exception:
                await runtime.refuse_push(ticket)
                raise
            except BaseException:  # cancelled: no waiting here
                runtime.abort_push(ticket)
                raise
            # From here the upload is the server's business: a client that hangs up now does
            # not interrupt validation and commit half-way.
            task = asyncio.ensure_future(runtime.finish_push(ticket, trailer))
            task.add_done_callback(retrieve)
            outcome = await asyncio.shield(task)
        except Exception as exc:
            self._count_upload_error(federation, exc)
            raise
        self.metrics.push_seconds.labels(runtime.id).observe(time.perf_counter() - started)
        return push_response(outcome)

    async def BeginDirectPush(self, request: pb.PushHeader, context: Any) -> pb.DirectUpload:
        refuse_malformed(request)
        h = request
        try:
            grant = direct.begin_push(
                self._pusher(context, h),
                self.limits.direct_url_seconds,
                h.client_id,
                h.round,
                h.rank,
                h.num_examples,
                h.lora_alpha,
                h.total_bytes,
            )
        except Exception as exc:
            self._count_upload_error(h.federation_id, exc)
            raise
        return direct_upload_proto(grant)

    async def CommitDirectPush(
        self, request: pb.CommitDirectPushRequest, context: Any
    ) -> pb.PushResponse:
        started = time.perf_counter()
        refuse_malformed(request)
        h = request.header
        try:
            runtime = self._pusher(context, h)
            commit = direct.DirectCommit(
                request.upload_id,
                h.client_id,
                h.round,
                h.rank,
                h.num_examples,
                h.lora_alpha,
                h.total_bytes,
                h.sha256,
            )
            outcome = await direct.commit_push(runtime, commit)  # shielded inside
        except Exception as exc:
            self._count_upload_error(h.federation_id, exc)
            raise
        self.metrics.push_seconds.labels(runtime.id).observe(time.perf_counter() - started)
        return push_response(outcome)

    async def DirectPull(self, request: pb.PullRequest, context: Any) -> pb.DirectDownload:
        started = time.perf_counter()
        refuse_malformed(request)
        claims = self.authority.client(_metadata(context), request.federation_id, request.client_id)
        runtime = self.hub.get(request.federation_id)
        self.authority.authorize(
            claims, runtime.id, request.client_id, runtime.client(request.client_id).rank
        )
        requested = request.round if request.HasField("round") else None
        view, grant = await direct.pull(
            runtime, self.limits.direct_url_seconds, request.client_id, requested
        )
        self.metrics.download_bytes.labels(runtime.id, str(view.rank)).inc(view.size)
        self.metrics.pull_seconds.labels(runtime.id).observe(time.perf_counter() - started)
        return direct_download_proto(view, grant)

    def _pusher(self, context: Any, h: pb.PushHeader) -> FederationRuntime:
        """The federation of a direct push whose credential is bound to its header's terms."""
        claims = self.authority.authenticate(_metadata(context))
        self.authority.authorize(claims, h.federation_id, h.client_id, h.rank)
        return self.hub.get(h.federation_id)

    def _count_upload_error(self, federation: str, exc: Exception) -> None:
        if federation in self.hub.federations:
            self.metrics.upload_errors.labels(federation, refusal_of(exc).code.name).inc()

    async def _receive(
        self,
        stream: AsyncIterator[Any],
        clock: StreamClock,
        ticket: PushTicket,
        digest_first: bool,
        streaming: StreamingPush,
    ) -> str | None:
        """Feed a push's data chunks to its ticket; returns the trailer's digest, if any."""
        trailer: str | None = None
        while True:
            more, message = await clock.next_unless(stream, ticket.intake.failed)
            if not more:
                ticket.intake.raise_error()  # the checks failed while we waited
            if message is None:
                break
            if trailer is not None:
                raise InvalidArgumentError("trailer", "nothing may follow the PushTrailer")
            if isinstance(message, memoryview):  # a data chunk, decoded without a copy
                data = message
            else:
                refuse_malformed(message)
                kind = message.WhichOneof("payload")
                if kind == "trailer":
                    if digest_first:
                        raise InvalidArgumentError(
                            "trailer", "the header carries sha256: no PushTrailer may follow"
                        )
                    trailer = message.trailer.sha256
                    check_sha256(trailer)
                    continue
                if kind != "data":
                    raise InvalidArgumentError("header", "only data chunks may follow the header")
                data = memoryview(message.data)
            if not len(data):  # nothing to write, hash or check: no thread hop for it
                continue
            if len(data) > self.chunk_size:
                raise InvalidArgumentError(
                    "data", f"chunk of {len(data)} bytes exceeds chunk_size {self.chunk_size}"
                )
            streaming.received(len(data))
            await ticket.write(data)
        return trailer


async def stream_view(
    context: Any,
    clock: StreamClock,
    runtime: FederationRuntime,
    view: View,
    reader: ViewReader,
    header: pb.PullHeader,
    chunk_size: int,
) -> None:
    """Write a view as PullChunks (Pull, ExportAdapter), each write timed: from memory when it
    is hot (rounds/hot_views.py), else from storage (:func:`_stream_stored`)."""
    with reader:
        await clock.write(context, pb.PullChunk(header=header))
        if reader.hot is not None:
            for message in reader.hot:
                reader.check()
                await clock.write(context, message)
            return
        await _stream_stored(context, clock, runtime, view, reader, chunk_size)


async def stream_live(context: Any, clock: StreamClock, live: LivePull) -> None:
    """Write a view as its build frames it, then its digest in a trailer (docs/design.md
    §4.3): the client checks the digest at the end, as it would the header's."""
    with live:
        await clock.write(context, pb.PullChunk(header=live_pull_header(live)))
        async for message in live.messages():
            await clock.write(context, message)
        view = await live.view()
        await clock.write(context, pb.PullChunk(trailer=pb.PullTrailer(sha256=view.sha256)))


async def _stream_stored(
    context: Any,
    clock: StreamClock,
    runtime: FederationRuntime,
    view: View,
    reader: ViewReader,
    chunk_size: int,
) -> None:
    """Stream a view from storage, hashing as it goes: a view damaged at rest is discarded
    (rebuilt by the next call) and the client, which checks the same digest, sees DATA_LOSS.
    A view whose whole stream matched its digest is offered to the hot views.

    A worker thread reads, hashes and encodes the next chunk while the loop sends this one.
    """
    digest = hashlib.sha256()
    fill = runtime.views.begin_fill(view)
    kept: list[bytes] | None = [] if fill is not None else None

    def next_message() -> bytes | None:
        chunk = reader.read(chunk_size)
        if not chunk:
            return None
        digest.update(chunk)
        message = encode_data([chunk])
        if kept is not None:
            kept.append(message)
        return message

    intact = False
    try:
        if view.size <= _READ_AHEAD_FROM_BYTES:  # a few chunks: a thread hop costs more
            while (message := next_message()) is not None:
                await clock.write(context, message)
        else:
            await _write_reading_ahead(context, clock, next_message)
        intact = digest.hexdigest() == view.sha256
    finally:
        if fill is not None:
            runtime.views.end_fill(view, fill, kept if intact else None)
    if not intact:
        await runtime.discard_view(view)


async def _write_reading_ahead(
    context: Any, clock: StreamClock, next_message: Callable[[], bytes | None]
) -> None:
    """Send each message while a worker thread produces the next."""
    ahead = asyncio.ensure_future(asyncio.to_thread(next_message))
    try:
        while (message := await ahead) is not None:
            ahead = asyncio.ensure_future(asyncio.to_thread(next_message))
            await clock.write(context, message)
    finally:
        if not ahead.done():  # the client went away: let the read finish before closing
            with contextlib.suppress(Exception):
                await asyncio.shield(ahead)
        elif not ahead.cancelled():
            ahead.exception()  # seen: the error that ended the stream is already raised


_READ_AHEAD_FROM_BYTES = 4 << 20


__all__ = ["AdminService", "AggregationService", "Limits"]
