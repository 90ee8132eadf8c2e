"""Stream plumbing: tolerant registration, and reads and writes bounded in time.

Requests are decoded by tolerant deserializers: bytes that are not the expected protobuf
message reach the handler as :class:`Malformed` and are refused with INVALID_ARGUMENT instead of
gRPC's generic UNKNOWN. A stream with no message moving for ``idle_seconds``, or a transfer
longer than ``max_seconds``, ends with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc import aio

from raflora.v1 import aggregation_pb2 as pb
from raflora.v1.framing import data_of, serializer
from raflora.v1.wire import ErrorReason

from ..errors import DeadlineExceededError, InvalidArgumentError

T = TypeVar("T")


@dataclass(frozen=True)
class Malformed:
    """What a tolerant deserializer hands over for bytes that are not the expected message."""

    message_type: str


def refuse_malformed(request: object) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgumentError(
            "request",
            f"not a valid {request.message_type} protobuf message",
            ErrorReason.MALFORMED_REQUEST,
        )


def _tolerant(message_type: Any) -> Callable[[bytes], Any]:
    """Pushes' data chunks arrive as memoryviews of the received bytes (no protobuf copy);
    every other message is parsed, and bytes that do not parse become :class:`Malformed`."""
    fast = message_type is pb.PushRequest

    def parse(data: bytes) -> Any:
        if fast and (view := data_of(data)) is not None:
            return view
        try:
            return message_type.FromString(data)
        except Exception:  # DecodeError, or anything a hostile payload provokes
            return Malformed(message_type.DESCRIPTOR.name)

    return parse


_HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
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
            factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = factory(
                getattr(servicer, method.name),
                request_deserializer=_tolerant(getattr(pb, method.input_type.name)),
                # Pull and ExportAdapter hand over data chunks already encoded.
                response_serializer=serializer(getattr(pb, method.output_type.name)),
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
        server.add_registered_method_handlers(  # type: ignore[attr-defined]  # not in grpc-stubs
            service.full_name, handlers
        )


class StreamClock:
    """The idle and total time limits of one streaming RPC."""

    def __init__(self, idle_seconds: float, max_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds

    def _timeout(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._expired()
        return min(self.idle_seconds, remaining)

    def _expired(self, idle_seconds: float | None = None) -> DeadlineExceededError:
        if time.monotonic() >= self.deadline:
            return DeadlineExceededError(
                "stream",
                f"transfer exceeded the server's limit of {self.max_seconds:g}s",
                ErrorReason.REQUEST_TOO_LONG,
            )
        return DeadlineExceededError(
            "stream",
            f"no message for {idle_seconds or self.idle_seconds:g}s: the stream was idle",
            ErrorReason.STREAM_IDLE,
        )

    async def bounded(self, awaitable: Awaitable[T], idle_seconds: float | None = None) -> T:
        timeout = self._timeout()
        if idle_seconds is not None:
            timeout = min(timeout, idle_seconds)
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes on Python 3.10
            raise self._expired(idle_seconds) from None

    async def next(self, requests: AsyncIterator[T], idle_seconds: float | None = None) -> T | None:
        """The next request message (None at the end), within the idle and total limits."""
        return await self.bounded(anext(requests, None), idle_seconds)

    async def next_unless(
        self, requests: AsyncIterator[T], stop: asyncio.Event
    ) -> tuple[bool, T | None]:
        """Like :meth:`next`, but gives up as soon as ``stop`` is set: (False, None) then.

        A push whose checks have already failed is refused at once, not when (or if) the
        client sends its next chunk."""
        if stop.is_set():
            return False, None
        timeout = self._timeout()
        read = asyncio.ensure_future(anext(requests, None))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait(
                {read, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (read, stopped):
                if not task.done():
                    task.cancel()
        if read in done:
            return True, read.result()
        if stopped in done:
            return False, None
        raise self._expired()

    async def write(self, context: Any, message: Any) -> None:
        """Send one message; a reader that stops taking them is cut off like an idle writer."""
        await self.bounded(context.write(message))
