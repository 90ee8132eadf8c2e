"""gRPC servicers: parse the request, call the federation, map errors to status codes."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from raflora.server.engine import RankEnergy
from raflora.v1 import aggregation_pb2 as pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc

from .config import FederationConfig
from .errors import DataLossError, InvalidArgumentError, status_of
from .federation import EventType, FederationRuntime, Phase, RoundEvent, Snapshot
from .hub import FederationHub
from .metrics import ServerMetrics

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


def energy_proto(energy: RankEnergy | None) -> pb.RankEnergy:
    if energy is None:
        return pb.RankEnergy()
    return pb.RankEnergy(
        partition_upper_ranks=list(energy.boundaries),
        partition_energy=list(energy.partition_energy),
        e_min=energy.e_min,
        effective_rank=energy.effective_rank,
        tail_energy=energy.tail_energy,
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
        energy=energy_proto(s.energy),
        joined_clients=s.joined_clients,
    )


def event_proto(e: RoundEvent) -> pb.RoundEvent:
    return pb.RoundEvent(type=_EVENTS[e.type], status=status_proto(e.snapshot), message=e.message)


def federation_proto(runtime: FederationRuntime) -> pb.Federation:
    return pb.Federation(spec=runtime.config.to_proto(), status=status_proto(runtime.snapshot()))


async def _abort(context: aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    code, message = status_of(exc)
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
                return await fn(self, request, context)
            except aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                code = status_of(exc)[0]
                await _abort(context, exc)
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
                async for item in fn(self, request, context):
                    yield item
            except aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                code = status_of(exc)[0]
                await _abort(context, exc)
            finally:
                self.metrics.rpcs.labels(method, code.name).inc()

        return handler

    return wrap


class AdminService(pb_grpc.AdminServiceServicer):  # type: ignore[misc]
    def __init__(self, hub: FederationHub, metrics: ServerMetrics) -> None:
        self.hub = hub
        self.metrics = metrics

    @unary("CreateFederation")
    async def CreateFederation(
        self, request: pb.CreateFederationRequest, context: Any
    ) -> pb.Federation:
        config = FederationConfig.from_proto(request.spec)
        return federation_proto(await self.hub.create(config))

    @unary("GetFederation")
    async def GetFederation(self, request: pb.GetFederationRequest, context: Any) -> pb.Federation:
        return federation_proto(self.hub.get(request.federation_id))

    @unary("ListFederations")
    async def ListFederations(
        self, request: pb.ListFederationsRequest, context: Any
    ) -> pb.ListFederationsResponse:
        return pb.ListFederationsResponse(
            federations=[federation_proto(r) for r in self.hub.federations.values()]
        )


class AggregationService(pb_grpc.AggregationServiceServicer):  # type: ignore[misc]
    def __init__(self, hub: FederationHub, metrics: ServerMetrics, chunk_size: int) -> None:
        self.hub = hub
        self.metrics = metrics
        self.chunk_size = chunk_size

    @unary("Join")
    async def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        runtime = self.hub.get(request.federation_id)
        record = await runtime.join(
            request.client_id, request.rank, request.num_examples, request.lora_alpha
        )
        return pb.JoinResponse(
            spec=runtime.config.to_proto(),
            status=status_proto(runtime.snapshot()),
            scale=record.scale,
            chunk_size=self.chunk_size,
        )

    @unary("GetRound")
    async def GetRound(self, request: pb.GetRoundRequest, context: Any) -> pb.RoundStatus:
        return status_proto(self.hub.get(request.federation_id).snapshot())

    @streaming("Pull")
    async def Pull(self, request: pb.PullRequest, context: Any) -> AsyncIterator[pb.PullChunk]:
        started = time.perf_counter()
        runtime = self.hub.get(request.federation_id)
        view = await runtime.view_for(request.client_id)
        yield pb.PullChunk(
            header=pb.PullHeader(
                round=view.round,
                rank=view.rank,
                scale=view.scale,
                total_bytes=view.size,
                sha256=view.sha256,
                has_merge=view.has_merge,
                energy=energy_proto(view.energy),
            )
        )
        with view.path.open("rb") as f:
            while chunk := f.read(self.chunk_size):
                yield pb.PullChunk(data=chunk)
        self.metrics.download_bytes.labels(runtime.id, str(view.rank)).inc(view.size)
        self.metrics.pull_seconds.labels(runtime.id).observe(time.perf_counter() - started)

    @streaming("WatchRounds")
    async def WatchRounds(
        self, request: pb.WatchRoundsRequest, context: Any
    ) -> AsyncIterator[pb.RoundEvent]:
        runtime = self.hub.get(request.federation_id)
        queue = runtime.subscribe()
        try:
            yield event_proto(RoundEvent(EventType.STATUS, runtime.snapshot()))
            while True:
                event = await queue.get()
                yield event_proto(event)
        finally:
            runtime.unsubscribe(queue)

    @unary("Push")
    async def Push(self, requests: AsyncIterator[pb.PushRequest], context: Any) -> pb.PushResponse:
        started = time.perf_counter()
        federation = "?"
        try:
            first = await anext(aiter(requests), None)
            if first is None or first.WhichOneof("payload") != "header":
                raise InvalidArgumentError("header", "the first message must be a PushHeader")
            h = first.header
            federation = h.federation_id
            runtime = self.hub.get(h.federation_id)
            ticket = runtime.begin_push(
                h.client_id, h.round, h.rank, h.num_examples, h.lora_alpha, h.total_bytes, h.sha256
            )
            path = runtime.incoming_path(ticket.round)
            try:
                received, digest = await self._receive(requests, path, ticket.total_bytes)
                if received != ticket.total_bytes:
                    raise DataLossError(
                        "data", f"stream ended after {received} of {ticket.total_bytes} bytes"
                    )
                if digest != ticket.sha256:
                    raise DataLossError("sha256", f"checksum mismatch: payload hashes to {digest}")
                outcome = await runtime.finish_push(ticket, path)
            finally:
                path.unlink(missing_ok=True)
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
        self, requests: AsyncIterator[pb.PushRequest], path: Any, declared: int
    ) -> tuple[int, str]:
        """Stream chunks to disk while hashing; never holds more than one chunk."""
        digest = hashlib.sha256()
        received = 0
        with path.open("wb") as out:
            async for message in requests:
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
