"""Domain errors of the service: a kind, the field at fault and a stable reason.

No transport here: ``api/interceptors.py`` turns the kind into a gRPC status and the reason and
field into google.rpc rich error details (docs/design.md, "Wire conventions"). Engine errors
(:class:`AggregationError`) are bad input and keep the field they name.
"""

from __future__ import annotations

import errno
from enum import Enum

from raflora.v1.wire import ErrorReason


class ErrorKind(str, Enum):
    """What went wrong, in the vocabulary of the API's documented status codes."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    DATA_LOSS = "DATA_LOSS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class ServiceError(Exception):
    """Base class. ``str(exc)`` is the human message, ``field: problem``."""

    kind: ErrorKind = ErrorKind.INTERNAL
    default_reason: str = ErrorReason.INTERNAL

    def __init__(self, field: str, message: str, reason: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message
        self.reason = reason or self.default_reason


class InvalidArgumentError(ServiceError):
    kind = ErrorKind.INVALID_ARGUMENT
    default_reason = ErrorReason.INVALID_FIELD


class NotFoundError(ServiceError):
    kind = ErrorKind.NOT_FOUND
    default_reason = ErrorReason.FEDERATION_NOT_FOUND


class FailedPreconditionError(ServiceError):
    kind = ErrorKind.FAILED_PRECONDITION
    default_reason = ErrorReason.ROUND_NOT_OPEN


class AlreadyExistsError(ServiceError):
    kind = ErrorKind.ALREADY_EXISTS
    default_reason = ErrorReason.UPLOAD_CONFLICT


class DataLossError(ServiceError):
    kind = ErrorKind.DATA_LOSS
    default_reason = ErrorReason.CHECKSUM_MISMATCH


class ResourceExhaustedError(ServiceError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    default_reason = ErrorReason.TOO_MANY_STREAMS


class DiskFullError(ResourceExhaustedError):
    """The server's storage is full; nothing already acknowledged was touched."""

    default_reason = ErrorReason.DISK_FULL


class UnauthenticatedError(ServiceError):
    """No credential, or one that is malformed, forged, expired or revoked."""

    kind = ErrorKind.UNAUTHENTICATED
    default_reason = ErrorReason.TOKEN_INVALID


class PermissionDeniedError(ServiceError):
    """A valid credential that does not cover this federation, client, rank or method."""

    kind = ErrorKind.PERMISSION_DENIED
    default_reason = ErrorReason.WRONG_CLIENT


class DeadlineExceededError(ServiceError):
    """A stream idle past ``idle_stream_timeout_seconds`` or longer than ``max_request_seconds``."""

    kind = ErrorKind.DEADLINE_EXCEEDED
    default_reason = ErrorReason.STREAM_IDLE


class UnavailableError(ServiceError):
    """The federation cannot serve now (degraded storage); retrying later may succeed."""

    kind = ErrorKind.UNAVAILABLE
    default_reason = ErrorReason.FEDERATION_DEGRADED


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS
