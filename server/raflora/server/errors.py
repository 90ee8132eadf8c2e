"""Service-level errors, each bound to the gRPC status code the API documents."""

from __future__ import annotations

import errno

import grpc

from raflora.server.engine import AggregationError, UnknownStrategyError


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExistsError(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class DataLossError(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


class InvalidArgumentError(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(ServiceError):
    """No credential, or one that is malformed, forged, expired or revoked."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ServiceError):
    """A valid credential that does not cover this federation, client, rank or method."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceededError(ServiceError):
    """A stream idle past ``idle_stream_timeout_seconds`` or longer than ``max_request_seconds``."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message to abort with; engine errors are bad input."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, UnknownStrategyError | AggregationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "storage: disk full on the server"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
