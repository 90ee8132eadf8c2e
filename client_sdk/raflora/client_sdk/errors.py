"""Typed exceptions for every gRPC status the service documents.

A refused RPC carries a ``google.rpc.Status`` in its ``grpc-status-details-bin`` trailer: an
``ErrorInfo`` (domain ``raflora.v1``, a stable ``reason``, ``metadata["field"]``) and, for a bad
field, a ``BadRequest``. ``reason`` and ``field`` are read from those details only; the message
(``details``) is for people and is never parsed.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import (  # type: ignore[import-untyped, unused-ignore]
    BadRequest,
    ErrorInfo,
)
from google.rpc.status_pb2 import Status  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from raflora.v1.wire import ERROR_DOMAIN, FIELD_METADATA_KEY, ErrorReason


class RafloraError(Exception):
    """Base class: ``code`` is the gRPC status, ``details`` the server's message, ``reason``
    the stable ``ErrorReason`` string and ``field`` the request field it is about (None when
    the server sent no such detail)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        *,
        reason: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(details)
        self.details = details
        self.reason = reason
        self.field = field
        if code is not None:
            self.code = code


class InvalidArgumentError(RafloraError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RafloraError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(RafloraError):
    """Wrong round, or the client has not joined."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExistsError(RafloraError):
    code = grpc.StatusCode.ALREADY_EXISTS


class DataLossError(RafloraError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(RafloraError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RafloraError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(RafloraError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(RafloraError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(RafloraError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(RafloraError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[RafloraError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        AlreadyExistsError,
        DataLossError,
        UnauthenticatedError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        InternalError,
    )
}

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _rich_status(exc: grpc.RpcError) -> Status | None:
    """The call's ``google.rpc.Status`` (None: not a call, no details, or not decodable)."""
    if not isinstance(exc, grpc.Call):
        return None
    try:
        status = rpc_status.from_call(exc)
    except (ValueError, DecodeError, NotImplementedError):
        # ValueError: its code or message disagrees with the call's, so it is not this call's.
        return None
    return status if isinstance(status, Status) else None


def _reason_and_field(status: Status | None) -> tuple[str | None, str | None]:
    """(reason, field) from a status's ErrorInfo of our domain and its first FieldViolation;
    the ErrorInfo's field wins. Details that do not decode are skipped."""
    reason = info_field = violation_field = None
    for detail in status.details if status is not None else ():
        info, bad = ErrorInfo(), BadRequest()
        try:  # Unpack is False for another message type, raises for bytes that do not decode
            if detail.Unpack(info):
                if reason is None and info.domain == ERROR_DOMAIN:
                    reason = info.reason or None
                    info_field = info.metadata.get(FIELD_METADATA_KEY) or None
            elif detail.Unpack(bad) and violation_field is None and bad.field_violations:
                violation_field = bad.field_violations[0].field or None
        except DecodeError:
            continue
    return reason, info_field or violation_field


def from_rpc_error(exc: grpc.RpcError) -> RafloraError:
    """The typed exception for a failed call (sync calls, unary or streaming)."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    reason, field = _reason_and_field(_rich_status(exc))
    return _BY_CODE.get(code, RafloraError)(details, code, reason=reason, field=field)


__all__ = [
    "RETRYABLE",
    "AlreadyExistsError",
    "DataLossError",
    "DeadlineExceededError",
    "ErrorReason",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RafloraError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]
