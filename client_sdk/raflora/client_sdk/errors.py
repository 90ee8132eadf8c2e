"""Typed exceptions for every gRPC status the service documents."""

from __future__ import annotations

import grpc


class RafloraError(Exception):
    """Base class; ``code`` is the gRPC status and ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    @property
    def field(self) -> str | None:
        """The field the server named (its messages read ``field: problem``)."""
        head, sep, _ = self.details.partition(": ")
        return head if sep and " " not in head else None


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


def from_rpc_error(exc: grpc.RpcError) -> RafloraError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    return _BY_CODE.get(code, RafloraError)(details, code)
