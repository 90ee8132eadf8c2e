"""Error translation, RPC metrics and the access log for every method, in one place.

A domain error becomes its documented status and human message plus google.rpc rich details in
the ``grpc-status-details-bin`` trailer: an ErrorInfo with a stable reason and the field, and a
BadRequest.FieldViolation for bad input. Clients branch on the reason, never on the text.

Every refused RPC leaves one access-log line (logger ``raflora.server.access``) with the
method, peer, gRPC status, reason, federation and client: INFO for a client's mistake, WARNING
for refused credentials and damaged or excess traffic, ERROR with the traceback for an internal
error. Joins are logged at INFO, every other RPC that succeeds at DEBUG. A line names ids,
codes and the refusal's message, never a credential.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
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
from ..storage.s3 import BucketError
from .admission import Admission, Ticket
from .streams import refuse_malformed

log = logging.getLogger("raflora.server")
access_log = logging.getLogger("raflora.server.access")

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:  # the stubs' generics are not subscriptable at run time
    Handler = grpc.RpcMethodHandler
    _Interceptor = aio.ServerInterceptor
_AUDITED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# Refusals logged at WARNING: refused credentials, damaged streams, limits hit, degraded state.
_WARNING_CODES = _AUDITED | {
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
_ERROR_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
# Ids in a log line are what a client sent: bounded like everything else it controls.
_MAX_LOGGED_ID = 128
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
    if isinstance(exc, BucketError) and not exc.refused:  # a timeout, a 5xx: try again
        return Refusal(
            grpc.StatusCode.UNAVAILABLE,
            "storage: the object store did not answer; try again",
            ErrorReason.STORAGE_UNAVAILABLE,
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


async def abort(context: aio.ServicerContext[Any, Any], refusal: Refusal) -> None:
    """Abort with the documented status and rich details."""
    status = rich_status(refusal)
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass
class Caller:
    """Who an RPC is for, as its request names it (read, never trusted)."""

    federation: str = ""
    client: str = ""
    detail: str = ""

    def note(self, request: Any) -> None:
        """The federation and client ids of a request (a Push's header, a spec's id)."""
        try:
            fields = request.DESCRIPTOR.fields_by_name
            for wrapper in ("header", "spec"):
                if wrapper in fields and request.HasField(wrapper):
                    request = getattr(request, wrapper)
                    fields = request.DESCRIPTOR.fields_by_name
            if "federation_id" in fields:
                self.federation = _clip_id(request.federation_id)
            if "client_id" in fields:
                self.client = _clip_id(request.client_id)
            if "rank" in fields and request.rank:
                self.detail = f"rank {request.rank}"
        except (AttributeError, TypeError, ValueError):  # a malformed request names nobody
            pass


def _clip_id(value: object) -> str:
    """Bounded, and printable: a client's newline must not forge a second log line."""
    text = _printable(str(value)[: _MAX_LOGGED_ID + 1])
    return text if len(text) <= _MAX_LOGGED_ID else text[:_MAX_LOGGED_ID] + "…"


def _printable(text: str) -> str:
    """Escape what a client may have put in a message (a tensor name, an id): no newline or
    control character reaches the log, whatever the log format."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def log_refusal(
    method: str,
    peer: str,
    code: grpc.StatusCode,
    reason: str,
    message: str,
    caller: Caller,
    seconds: float,
    exc: BaseException | None = None,
) -> None:
    """The access-log line of one refused RPC."""
    if code in _ERROR_CODES:
        level = logging.ERROR
    elif code in _WARNING_CODES:
        level = logging.WARNING
    else:
        level = logging.INFO
    access_log.log(
        level,
        "%s refused: %s %s federation=%r client=%r peer=%s: %s",
        method,
        code.name,
        reason or "-",
        caller.federation,
        caller.client,
        peer,
        _printable(_clip(message, _MAX_MESSAGE_BYTES)),
        exc_info=exc if code in _ERROR_CODES else None,
        extra=_fields(method, peer, code, reason, caller, seconds),
    )


def log_served(method: str, peer: str, caller: Caller, seconds: float) -> None:
    """The access-log line of one RPC that succeeded: INFO for a Join, DEBUG otherwise."""
    level = logging.INFO if method == "Join" else logging.DEBUG
    if not access_log.isEnabledFor(level):
        return
    access_log.log(
        level,
        "%s OK federation=%r client=%r peer=%s%s (%.3fs)",
        method,
        caller.federation,
        caller.client,
        peer,
        f": {caller.detail}" if caller.detail else "",
        seconds,
        extra=_fields(method, peer, grpc.StatusCode.OK, "", caller, seconds),
    )


def _fields(
    method: str, peer: str, code: grpc.StatusCode, reason: str, caller: Caller, seconds: float
) -> dict[str, Any]:
    """The structured fields of an access line (keys of a JSON log line)."""
    return {
        "method": method,
        "peer": peer,
        "status": code.name,
        "reason": reason,
        "federation": caller.federation,
        "client": caller.client,
        "duration_seconds": round(seconds, 6),
    }


class _Tap:
    """A client stream passed through unchanged; the first message names the caller."""

    def __init__(self, requests: Any, caller: Caller) -> None:
        self._requests = aiter(requests)
        self._caller = caller
        self._first = True

    def __aiter__(self) -> _Tap:
        return self

    async def __anext__(self) -> Any:
        message = await anext(self._requests)
        if self._first:
            self._first = False
            self._caller.note(message)
        return message


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
        caller: Caller,
    ) -> AsyncIterator[None]:
        """Admission, malformed requests, error translation, the RPC count and the access log
        of one call. ``check``: a unary request, checked here and read for the caller's ids
        (a client stream names them in its first message, read as it arrives)."""
        code = grpc.StatusCode.OK
        ticket = None
        started = time.perf_counter()
        if check:
            caller.note(request)
        try:
            ticket = self._admit(method, context)
            if check:
                refuse_malformed(request)
            yield
        except aio.AbortError:  # aborted already (by a handler, not by a refusal raised here)
            code = _code(context)
            log_refusal(method, context.peer(), code, "", "", caller, time.perf_counter() - started)
            raise
        except Exception as exc:
            refusal = refusal_of(exc)
            code = refusal.code
            log_refusal(
                method,
                context.peer(),
                code,
                refusal.reason,
                refusal.message,
                caller,
                time.perf_counter() - started,
                exc,
            )
            await abort(context, refusal)
        else:
            log_served(method, context.peer(), caller, time.perf_counter() - started)
        finally:
            if ticket is not None:
                ticket.release()
            self._count(method, code)

    def _unary(
        self, behaviour: Callable[..., Awaitable[Any]], method: str, *, check: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            caller = Caller()
            if not check:  # a client stream
                request = _Tap(request, caller)
            async with self._guarded(method, context, request, check, caller):
                response = await behaviour(request, context)
                caller.detail = _detail(response) or caller.detail
                return response

        return handler

    def _streaming(
        self, behaviour: Callable[..., AsyncIterator[Any]], method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def handler(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with self._guarded(method, context, request, True, Caller()):
                async for item in behaviour(request, context):
                    yield item

        return handler


def _any(behaviour: object) -> Any:
    return behaviour


def _detail(response: Any) -> str:
    """What a successful Push acknowledged, for its access line."""
    try:
        if response is None or "received_bytes" not in response.DESCRIPTOR.fields_by_name:
            return ""
        duplicate = ", a duplicate" if response.duplicate else ""
        return f"round {response.round}, {response.received_bytes} bytes{duplicate}"
    except (AttributeError, TypeError, ValueError):
        return ""


def _code(context: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code: Any = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
