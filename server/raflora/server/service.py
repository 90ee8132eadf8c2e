"""gRPC servicers: authenticate, parse the request, call the federation, map errors to statuses.

Requests are decoded by tolerant deserializers (:func:`add_services`): bytes that are not the
expected protobuf message reach the handler as :class:`Malformed` and are refused with
INVALID_ARGUMENT instead of gRPC's generic UNKNOWN. Push and Pull streams are bounded in time:
no message moving for ``idle_stream_timeout_seconds``, or a transfer longer than
``max_request_seconds``, aborts the stream with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc import aio

from raflora.server.engine import RankEnergy
from raflora.v1 import aggregation_pb2 as pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc

from .auth import Authority, check_secret_format
from .config import FederationConfig
from .errors import (
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    status_of,
)
from .federation import EventType, FederationRuntime, Holders, Phase, RoundEvent, Snapshot
from .hub import FederationHub
from .metrics import ServerMetrics
from .storage import disk_full_is_resource_exhausted

log = logging.getLogger("raflora.server")

T = TypeVar("T")
Req = TypeVar("Req")

_PHASES = {
    Phase.COLLECTING: pb.ROUND_PHASE_COLLECTING,
    Phase.AGGREGATING: pb.ROUND_PHASE_AGGREGATING,
}
_EVENTS = {
    EventType.STATUS: pb.ROUND_EVENT_TYPE_STATUS,
    EventType.UPLOAD: pb.ROUND_EVENT_TYPE_UPLOAD,
    EventType.AGGREGATING: pb.ROUND_EVENT_TYPE_AGGREGATING,
    EventType.PUBLISHED: pb.ROUND_EVENT_TYPE_PUBLISHED,
    EventType.FAILED: pb.ROUND_EVENT_TYPE_FAILED,
}


def energy_proto(energy: RankEnergy | None, holders: tuple[Holders, ...] = ()) -> pb.RankEnergy:
    if energy is None:
        return pb.RankEnergy()
    return pb.RankEnergy(
        partition_upper_ranks=list(energy.boundaries),
        partition_energy=list(energy.partition_energy),
        e_min=energy.e_min,
        effective_rank=energy.effective_rank,
        tail_energy=energy.tail_energy,
        partition_holders=[count for _, count, _ in holders],
        partition_holder_weight=[share for _, _, share in holders],
    )


def status_proto(s: Snapshot) -> pb.RoundStatus:
    return pb.RoundStatus(
        federation_id=s.federation_id,
        round=s.round,
        published_round=s.round,
        phase=_PHASES[s.phase],
        uploads=s.uploads,
        min_clients=s.min_clients,
        expected_clients=s.expected_clients,
        deadline_unix=s.deadline_unix,
        energy=energy_proto(s.energy, s.holders),
        joined_clients=s.joined_clients,
    )


def event_proto(e: RoundEvent) -> pb.RoundEvent:
    return pb.RoundEvent(
        type=_EVENTS[e.type],
        status=status_proto(e.snapshot),
        message=e.message,
        warnings=list(e.warnings),
    )


def federation_proto(runtime: FederationRuntime) -> pb.Federation:
    return pb.Federation(spec=runtime.config.to_proto(), status=status_proto(runtime.snapshot()))


@dataclass(frozen=True)
class Malformed:
    """What a tolerant deserializer hands over for bytes that are not the expected message."""

    message_type: str


@dataclass(frozen=True)
class Limits:
    chunk_size: int
    idle_stream_timeout_seconds: float = 60.0
    max_request_seconds: float = 3600.0


def _tolerant(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception:  # DecodeError, or anything a hostile payload provokes
            return Malformed(message_type.DESCRIPTOR.name)

    return parse


def _refuse_malformed(request: Any) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgumentError(
            "request", f"not a valid {request.message_type} protobuf message"
        )


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_services(server: aio.Server, *servicers: tuple[str, object]) -> None:
    """Register servicers (by service name) like the generated ``add_*_to_server`` functions,
    but with tolerant request deserializers."""
    for name, servicer in servicers:
        service = pb.DESCRIPTOR.services_by_name[name]
        handlers = {}
        for method in service.methods:
            factory: Any = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = factory(
                getattr(servicer, method.name),
                request_deserializer=_tolerant(getattr(pb, method.input_type.name)),
                response_serializer=getattr(pb, method.output_type.name).SerializeToString,
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
        server.add_registered_method_handlers(  # type: ignore[attr-defined]  # not in grpc-stubs
            service.full_name, handlers
        )


def _metadata(context: Any) -> Any:
    return context.invocation_metadata()


_AUDITED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


async def _abort(context: aio.ServicerContext[Any, Any], exc: BaseException, method: str) -> None:
    """Abort with the documented status. Refused credentials are logged for audit (the
    messages name what is wrong, never a credential); unexpected errors with a traceback."""
    code, message = status_of(exc)
    if code in _AUDITED:
        log.warning("%s refused for %s: %s %s", method, context.peer(), code.name, message)
    elif code is grpc.StatusCode.INTERNAL:
        log.error("%s failed for %s", method, context.peer(), exc_info=exc)
    await context.abort(code, message)


class _Instrumented:
    metrics: ServerMetrics


def unary(method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Record the outcome of a unary (or client-streaming) RPC and map errors to statuses."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def handler(
            self: _Instrumented, request: Any, context: aio.ServicerContext[Any, Any]
        ) -> T:
            code = grpc.StatusCode.OK
            try:
                _refuse_malformed(request)
                return await fn(self, request, context)
            except aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                code = status_of(exc)[0]
                await _abort(context, exc, method)
                raise  # unreachable: abort raises
            finally:
                self.metrics.rpcs.labels(method, code.name).inc()

        return handler

    return wrap


def streaming(
    method: str,
) -> Callable[[Callable[..., AsyncIterator[T]]], Callable[..., AsyncIterator[T]]]:
    """Same as :func:`unary` for server-streaming RPCs."""

    def wrap(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
        @functools.wraps(fn)
        async def handler(
            self: _Instrumented, request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[T]:
            code = grpc.StatusCode.OK
            try:
                _refuse_malformed(request)
                async for item in fn(self, request, context):
                    yield item
            except aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                code = status_of(exc)[0]
                await _abort(context, exc, method)
            finally:
                self.metrics.rpcs.labels(method, code.name).inc()

        return handler

    return wrap


class AdminService(pb_grpc.AdminServiceServicer):  # type: ignore[misc]
    def __init__(
        self, hub: FederationHub, metrics: ServerMetrics, authority: Authority | None = None
    ) -> None:
        self.hub = hub
        self.metrics = metrics
        self.authority = authority or Authority(None, None, 3600.0)

    @unary("CreateFederation")
    async def CreateFederation(
        self, request: pb.CreateFederationRequest, context: Any
    ) -> pb.Federation:
        self.authority.require_admin(_metadata(context))
        config = FederationConfig.from_proto(request.spec)
        if not self.authority.enabled:
            if request.enrolment_secret:
                log.warning(
                    "CreateFederation %s: enrolment_secret ignored, authentication is off",
                    config.federation_id,
                )
            return federation_proto(await self.hub.create(config))
        if request.enrolment_secret:
            check_secret_format(request.enrolment_secret)  # before anything is created
        runtime = await self.hub.create(config)
        secret = await asyncio.to_thread(
            self.authority.set_secret, config.federation_id, request.enrolment_secret or None
        )
        out = federation_proto(runtime)
        out.enrolment_secret = secret
        return out

    @unary("GetFederation")
    async def GetFederation(self, request: pb.GetFederationRequest, context: Any) -> pb.Federation:
        self.authority.require_admin(_metadata(context))
        return federation_proto(self.hub.get(request.federation_id))

    @unary("ListFederations")
    async def ListFederations(
        self, request: pb.ListFederationsRequest, context: Any
    ) -> pb.ListFederationsResponse:
        self.authority.require_admin(_metadata(context))
        return pb.ListFederationsResponse(
            federations=[federation_proto(r) for r in self.hub.federations.values()]
        )

    @unary("RotateEnrolmentSecret")
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


class AggregationService(pb_grpc.AggregationServiceServicer):  # type: ignore[misc]
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

    @unary("Join")
    async def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        self.authority.enrol(_metadata(context), request.federation_id)
        runtime = self.hub.get(request.federation_id)
        record = await runtime.join(
            request.client_id, request.rank, request.num_examples, request.lora_alpha
        )
        token, expires = self.authority.issue(runtime.id, record.client_id, record.rank)
        return pb.JoinResponse(
            spec=runtime.config.to_proto(),
            status=status_proto(runtime.snapshot()),
            scale=record.scale,
            chunk_size=self.chunk_size,
            client_token=token,
            token_expires_unix=expires,
        )

    @unary("GetRound")
    async def GetRound(self, request: pb.GetRoundRequest, context: Any) -> pb.RoundStatus:
        self.authority.client(_metadata(context), request.federation_id)
        return status_proto(self.hub.get(request.federation_id).snapshot())

    # -- bounded stream I/O ----------------------------------------------------------------
    def _timeout(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(
                "stream",
                f"transfer exceeded the server's limit of {self.limits.max_request_seconds:g}s",
            )
        return min(self.limits.idle_stream_timeout_seconds, remaining)

    def _timed_out(self, deadline: float) -> DeadlineExceededError:
        if time.monotonic() >= deadline:
            return DeadlineExceededError(
                "stream",
                f"transfer exceeded the server's limit of {self.limits.max_request_seconds:g}s",
            )
        return DeadlineExceededError(
            "stream",
            f"no message for {self.limits.idle_stream_timeout_seconds:g}s: the stream was idle",
        )

    async def _next(self, requests: AsyncIterator[Any], deadline: float) -> Any:
        """The next request message (None at the end), within the idle and total limits."""
        try:
            return await asyncio.wait_for(anext(requests, None), self._timeout(deadline))
        except TimeoutError:
            raise self._timed_out(deadline) from None

    async def _write(self, context: Any, message: pb.PullChunk, deadline: float) -> None:
        """Send one message; a reader that stops taking them is cut off like an idle writer."""
        try:
            await asyncio.wait_for(context.write(message), self._timeout(deadline))
        except TimeoutError:
            raise self._timed_out(deadline) from None

    # -- pull ------------------------------------------------------------------------------
    @unary("Pull")  # a coroutine that writes (context.write), so that each write is timed
    async def Pull(self, request: pb.PullRequest, context: Any) -> None:
        started = time.perf_counter()
        deadline = time.monotonic() + self.limits.max_request_seconds
        claims = self.authority.client(_metadata(context), request.federation_id, request.client_id)
        runtime = self.hub.get(request.federation_id)
        # A token from before a re-join at another rank does not read the new rank's adapter.
        self.authority.authorize(
            claims, runtime.id, request.client_id, runtime.client(request.client_id).rank
        )
        requested = request.round if request.HasField("round") else None
        view = await runtime.view_for(request.client_id, requested)
        header = pb.PullHeader(
            round=view.round,
            rank=view.rank,
            scale=view.scale,
            total_bytes=view.size,
            sha256=view.sha256,
            has_merge=view.has_merge,
            energy=energy_proto(view.energy, view.holders),
        )
        await self._write(context, pb.PullChunk(header=header), deadline)
        with view.path.open("rb") as f:
            while chunk := f.read(self.chunk_size):
                await self._write(context, pb.PullChunk(data=chunk), deadline)
        self.metrics.download_bytes.labels(runtime.id, str(view.rank)).inc(view.size)
        self.metrics.pull_seconds.labels(runtime.id).observe(time.perf_counter() - started)

    @streaming("WatchRounds")
    async def WatchRounds(
        self, request: pb.WatchRoundsRequest, context: Any
    ) -> AsyncIterator[pb.RoundEvent]:
        self.authority.client(_metadata(context), request.federation_id)
        runtime = self.hub.get(request.federation_id)
        # A watch ends cleanly after max_request_seconds (the SDK reconnects at once): no RPC
        # holds its slot forever, and a watcher's token is checked again at least that often.
        deadline = time.monotonic() + self.limits.max_request_seconds
        queue = runtime.subscribe()
        try:
            yield event_proto(RoundEvent(EventType.STATUS, runtime.snapshot()))
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                yield event_proto(event)
        finally:
            runtime.unsubscribe(queue)

    # -- push ------------------------------------------------------------------------------
    @unary("Push")
    async def Push(self, requests: AsyncIterator[pb.PushRequest], context: Any) -> pb.PushResponse:
        started = time.perf_counter()
        deadline = time.monotonic() + self.limits.max_request_seconds
        federation = "?"
        try:
            claims = self.authority.authenticate(_metadata(context))  # before reading anything
            stream = aiter(requests)
            first = await self._next(stream, deadline)
            _refuse_malformed(first)
            if first is None or first.WhichOneof("payload") != "header":
                raise InvalidArgumentError("header", "the first message must be a PushHeader")
            h = first.header
            federation = h.federation_id
            self.authority.authorize(claims, h.federation_id, h.client_id, h.rank)
            runtime = self.hub.get(h.federation_id)
            ticket = runtime.begin_push(
                h.client_id, h.round, h.rank, h.num_examples, h.lora_alpha, h.total_bytes, h.sha256
            )
            path = runtime.incoming_path(ticket.round)
            try:
                received, digest = await self._receive(stream, path, ticket.total_bytes, deadline)
                if received != ticket.total_bytes:
                    raise DataLossError(
                        "data", f"stream ended after {received} of {ticket.total_bytes} bytes"
                    )
                if digest != ticket.sha256:
                    raise DataLossError("sha256", f"checksum mismatch: payload hashes to {digest}")
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            # From here the upload is the server's business: a client that hangs up now does
            # not interrupt validation and commit half-way (the task removes ``path``).
            task = asyncio.ensure_future(runtime.finish_push(ticket, path))
            task.add_done_callback(_retrieve)
            outcome = await asyncio.shield(task)
        except Exception as exc:
            if federation in self.hub.federations:
                self.metrics.upload_errors.labels(federation, status_of(exc)[0].name).inc()
            raise
        self.metrics.push_seconds.labels(runtime.id).observe(time.perf_counter() - started)
        return pb.PushResponse(
            round=outcome.round,
            duplicate=outcome.duplicate,
            received_bytes=outcome.size,
            uploads_in_round=outcome.uploads_in_round,
        )

    async def _receive(
        self, requests: AsyncIterator[Any], path: Path, declared: int, deadline: float
    ) -> tuple[int, str]:
        """Stream chunks to disk while hashing; never holds more than one chunk."""
        digest = hashlib.sha256()
        received = 0
        with disk_full_is_resource_exhausted("receiving an upload"), path.open("wb") as out:
            while (message := await self._next(requests, deadline)) is not None:
                _refuse_malformed(message)
                if message.WhichOneof("payload") != "data":
                    raise InvalidArgumentError("header", "only data chunks may follow the header")
                chunk = message.data
                if len(chunk) > self.chunk_size:
                    raise InvalidArgumentError(
                        "data", f"chunk of {len(chunk)} bytes exceeds chunk_size {self.chunk_size}"
                    )
                received += len(chunk)
                if received > declared:  # a size mismatch: DATA_LOSS, as the API documents
                    raise DataLossError(
                        "total_bytes", f"stream carries more than the declared {declared} bytes"
                    )
                digest.update(chunk)
                out.write(chunk)
        return received, digest.hexdigest()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shielded task's exception as seen (its caller may have gone away)."""
    if not task.cancelled():
        task.exception()
