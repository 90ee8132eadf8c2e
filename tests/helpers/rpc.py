"""The gRPC status a call ends with, whether it went through the SDK or a raw stub."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import grpc
import pytest

from raflora.client_sdk import RafloraError


class Outcome(NamedTuple):
    """How a call ended: OK (``error`` None) or the status of the error it raised.

    A tuple, so ``code, details, error = outcome(...)`` unpacks it.
    """

    code: grpc.StatusCode
    details: str
    error: BaseException | None


def outcome(action: Callable[[], object]) -> Outcome:
    """Run ``action``; its status: the SDK's typed error, a raw stub's RpcError, or OK."""
    try:
        action()
    except RafloraError as exc:
        return Outcome(exc.code, exc.details, exc)
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        return Outcome(exc.code(), exc.details() or "", exc)
    return Outcome(grpc.StatusCode.OK, "", None)


def refusal(action: Callable[[], object], accepted: str = "the call was accepted") -> Outcome:
    """:func:`outcome` of a call that must fail: the test fails with ``accepted`` if it does
    not."""
    result = outcome(action)
    if result.error is None:
        pytest.fail(accepted)
    return result
