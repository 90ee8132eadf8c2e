"""Error translation and RPC metrics for every method, in one place.

A domain error becomes its documented status and human message plus google.rpc rich details in
the ``grpc-status-details-bin`` trailer: an ErrorInfo with a stable reason and the field, and a
BadRequest.FieldViolation for bad input. Clients branch on the reason, never on the text.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from raflora.server.engine import AggregationError, ConfigError
from raflora.v1.wire import ERROR_DOMAIN, FIELD_METADATA_KEY, ErrorReason

from ..errors import ServiceError, is_disk_full
from ..metrics import ServerMetrics
from .admission import Admission, Ticket
from .streams import refuse_malformed

log = logging.getLogger("raflora.server")

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:  # the stubs' generics are not subscriptable at run time
    Handler = grpc.RpcMethodHandler
    _Interceptor = aio.ServerInterceptor
_AUDITED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# A status message never grows with what a client sent: it travels three times (grpc-message,
# Status.message, FieldViolation.description) within gRPC's 8 KiB metadata budget.
_MAX_MESSAGE_BYTES = 1024
_MAX_FIELD_BYTES = 200


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str
    reason: str
    field: str


def refusal_of(exc: BaseException) -> Refusal:
    """The status an exception maps to; engine errors are bad input."""
    if isinstance(exc, ServiceError):
        return Refusal(grpc.StatusCode[exc.kind.value], str(exc), exc.reason, exc.field)
    if isinstance(exc, ConfigError):  # a declared setting or id, not an upload
        return Refusal(
            grpc.StatusCode.INVALID_ARGUMENT, str(exc), ErrorReason.INVALID_FIELD, exc.field
        )
    if isinstance(exc, AggregationError):
        return Refusal(
            grpc.StatusCode.INVALID_ARGUMENT, str(exc), ErrorReason.INVALID_UPDATE, exc.field
        )
    if is_disk_full(exc):
        return Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "storage: disk full on the server",
            ErrorReason.DISK_FULL,
            "storage",
        )
    return Refusal(
        grpc.StatusCode.INTERNAL,
        f"internal error: {type(exc).__name__}",
        ErrorReason.INTERNAL,
        "",
    )


def rich_status(refusal: Refusal) -> grpc.Status:
    message = _clip(refusal.message, _MAX_MESSAGE_BYTES)
    field = _clip(refusal.field, _MAX_FIELD_BYTES)
    info = error_details_pb2.ErrorInfo(
        reason=refusal.reason, domain=ERROR_DOMAIN, metadata={FIELD_METADATA_KEY: field}
    )
    details = [_pack(info)]
    if refusal.code is grpc.StatusCode.INVALID_ARGUMENT and field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=refusal.code.value[0], message=message, details=details)
    return rpc_status.to_status(status)


def _clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, on a character boundary."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode(errors="ignore") + "…"


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def abort(context: aio.ServicerContext[Any, Any], method: str, exc: BaseException) -> None:
    """Abort with the documented status. Refused credentials are logged for audit (messages
    name what is wrong, never a credential); unexpected errors with a traceback."""
    refusal = refusal_of(exc)
    if refusal.code in _AUDITED:
        log.warning(
            "%s refused for %s: %s %s", method, context.peer(), refusal.code.name, refusal.message
        )
    elif refusal.code is grpc.StatusCode.INTERNAL:
        log.error("%s failed for %s", method, context.peer(), exc_info=exc)
    status = rich_status(refusal)
    await context.abort(status.code, status.details, status.trailing_metadata)


class ServiceInterceptor(_Interceptor):
    """Wraps the handlers of ``services``: malformed requests, domain errors, RPC counts."""

    def __init__(
        self, metrics: ServerMetrics, services: frozenset[str], admission: Admission | None = None
    ) -> None:
        self.metrics = metrics
        self.services = services
        self.admission = admission

    def _admit(self, method: str, context: aio.ServicerContext[Any, Any]) -> Ticket | None:
        if self.admission is None:
            return None
        return self.admission.admit(method, context.invocation_metadata(), context.peer())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service not in self.services:
            return handler
        return self._wrap(handler, method)

    def _wrap(self, handler: Handler, method: str) -> Handler:
        # grpc-stubs type handlers as synchronous; under grpc.aio they are coroutines.
        common = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(_any(handler.unary_unary), method, check=True), **common
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(_any(handler.stream_unary), method, check=False), **common
            )
        if handler.unary_stream is not None:
            behaviour: Any = handler.unary_stream
            if inspect.isasyncgenfunction(behaviour):
                return grpc.unary_stream_rpc_method_handler(
                    self._streaming(behaviour, method), **common
                )
            return grpc.unary_stream_rpc_method_handler(
                self._unary(behaviour, method, check=True), **common
            )
        return handler

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.rpcs.labels(method, code.name).inc()

    @contextlib.asynccontextmanager
    async def _guarded(
        self,
        method: str,
        context: aio.ServicerContext[Any, Any],
        request: Any,
        check: bool,
    ) -> AsyncIterator[None]:
        """Admission, malformed requests, error translation and the RPC count of one call."""
        code = grpc.StatusCode.OK
        ticket = None
        try:
            ticket = self._admit(method, context)
            if check:
                refuse_malformed(request)
            yield
        except aio.AbortError:
            code = _code(context)
            raise
        except Exception as exc:
            code = refusal_of(exc).code
            await abort(context, method, exc)
        finally:
            if ticket is not None:
                ticket.release()
            self._count(method, code)

    def _unary(
        self, behaviour: Callable[..., Awaitable[Any]], method: str, *, check: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            async with self._guarded(method, context, request, check):
                return await behaviour(request, context)

        return handler

    def _streaming(
        self, behaviour: Callable[..., AsyncIterator[Any]], method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def handler(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with self._guarded(method, context, request, True):
                async for item in behaviour(request, context):
                    yield item

        return handler


def _any(behaviour: object) -> Any:
    return behaviour


def _code(context: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code: Any = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
