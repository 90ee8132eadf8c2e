"""The SDK's typed errors read ``reason`` and ``field`` from the rich status, never the text.

A tiny real gRPC server on loopback stands in for the service: each test says how each method
answers (usually an abort with a ``google.rpc.Status`` built by ``rpc_status.to_status``), and
the real SDK client calls it over the wire, unary and streaming alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc.error_details_pb2 import (  # type: ignore[import-untyped, unused-ignore]
    BadRequest,
    ErrorInfo,
)
from google.rpc.status_pb2 import Status  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status
from safetensors.torch import save as save_safetensors

from raflora.client_sdk import (
    AdminClient,
    AlreadyExistsError,
    DataLossError,
    ErrorReason,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RafloraClient,
    RafloraError,
    ResourceExhaustedError,
    RetryPolicy,
    UnauthenticatedError,
    pb,
)
from raflora.client_sdk.client import _needs_rejoin
from raflora.client_sdk.errors import from_rpc_error
from raflora.v1.wire import ERROR_DOMAIN, FIELD_METADATA_KEY

DETAILS_KEY = "grpc-status-details-bin"
NO_RETRY = RetryPolicy(attempts=1)
Handler = Callable[[Any, grpc.ServicerContext], Any]


def rich(
    code: grpc.StatusCode,
    message: str,
    reason: str | None,
    field_name: str | None = None,
    *,
    domain: str = ERROR_DOMAIN,
    violation: bool = False,
) -> grpc.Status:
    """The status the service aborts with: ErrorInfo (+ BadRequest for a bad field)."""
    status = Status(code=code.value[0], message=message)
    if reason is not None:
        metadata = {FIELD_METADATA_KEY: field_name} if field_name else {}
        status.details.add().Pack(ErrorInfo(domain=domain, reason=reason, metadata=metadata))
    if violation:
        violations = [BadRequest.FieldViolation(field=field_name, description=message)]
        status.details.add().Pack(BadRequest(field_violations=violations))
    return rpc_status.to_status(status)


def aborting(status: grpc.Status) -> Handler:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(status)

    return handler


def aborting_with_trailer(code: grpc.StatusCode, message: str, trailer: bytes) -> Handler:
    """Abort with ``trailer`` as the raw details (to send broken or mismatched ones)."""

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        context.set_trailing_metadata(((DETAILS_KEY, trailer),))
        context.abort(code, message)

    return handler


def token_of(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str):
            return value.removeprefix("Bearer ")
    return None


@dataclass
class FakeService:
    """What each method does; unset methods abort UNIMPLEMENTED."""

    on: dict[str, Handler] = field(default_factory=dict)
    calls: list[tuple[str, str | None]] = field(default_factory=list)  # (method, token)

    def _dispatch(self, method: str) -> Handler:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            self.calls.append((method, token_of(context)))
            behaviour = self.on.get(method)
            if behaviour is None:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} not faked")
            return behaviour(request, context)

        return handler

    def handlers(self) -> list[grpc.GenericRpcHandler[Any, Any]]:
        def unary(method: str, req: Any, resp: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                self._dispatch(method), req.FromString, resp.SerializeToString
            )

        def server_stream(method: str, req: Any, resp: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_stream_rpc_method_handler(
                self._dispatch(method), req.FromString, resp.SerializeToString
            )

        push = grpc.stream_unary_rpc_method_handler(
            self._dispatch("Push"), pb.PushRequest.FromString, pb.PushResponse.SerializeToString
        )
        aggregation = {
            "Join": unary("Join", pb.JoinRequest, pb.JoinResponse),
            "GetRound": unary("GetRound", pb.GetRoundRequest, pb.RoundStatus),
            "Pull": server_stream("Pull", pb.PullRequest, pb.PullChunk),
            "Push": push,
            "WatchRounds": server_stream("WatchRounds", pb.WatchRoundsRequest, pb.RoundEvent),
        }
        admin = {
            "CreateFederation": unary(
                "CreateFederation", pb.CreateFederationRequest, pb.Federation
            ),
        }
        return [
            grpc.method_handlers_generic_handler("raflora.v1.AggregationService", aggregation),
            grpc.method_handlers_generic_handler("raflora.v1.AdminService", admin),
        ]


@pytest.fixture
def service() -> Iterator[tuple[FakeService, str]]:
    fake = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(fake.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def client_for(target: str, **kwargs: Any) -> RafloraClient:
    return RafloraClient(target, "fed", "c0", retry=NO_RETRY, timeout=10.0, **kwargs)


def joined(token: str) -> Handler:
    def handler(request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        return pb.JoinResponse(
            scale=2.0, chunk_size=1 << 16, client_token=token, token_expires_unix=0.0
        )

    return handler


def adapter_chunks(sha256: str | None = None, cut: int = 0) -> list[pb.PullChunk]:
    payload = save_safetensors({"m.lora_A.weight": torch.ones(2, 3)})
    header = pb.PullHeader(
        round=3,
        rank=2,
        scale=1.0,
        total_bytes=len(payload),
        sha256=sha256 or hashlib.sha256(payload).hexdigest(),
    )
    return [pb.PullChunk(header=header), pb.PullChunk(data=payload[: len(payload) - cut])]


# -- rich status -> typed exception ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "field_name", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.INVALID_FIELD, "rank", InvalidArgumentError),
        (
            grpc.StatusCode.NOT_FOUND,
            ErrorReason.FEDERATION_NOT_FOUND,
            "federation_id",
            NotFoundError,
        ),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            ErrorReason.ROUND_CLOSED,
            "round",
            FailedPreconditionError,
        ),
        (grpc.StatusCode.DATA_LOSS, ErrorReason.CHECKSUM_MISMATCH, "sha256", DataLossError),
        (
            grpc.StatusCode.UNAUTHENTICATED,
            ErrorReason.TOKEN_INVALID,
            "authorization",
            UnauthenticatedError,
        ),
        (grpc.StatusCode.PERMISSION_DENIED, ErrorReason.WRONG_RANK, "rank", PermissionDeniedError),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ErrorReason.PUSH_LIMIT,
            "round",
            ResourceExhaustedError,
        ),
        (grpc.StatusCode.INTERNAL, ErrorReason.INTERNAL, None, InternalError),
        # A reason this SDK does not know yet passes through as its string.
        (grpc.StatusCode.FAILED_PRECONDITION, "SOME_FUTURE_REASON", "x", FailedPreconditionError),
    ],
)
def test_unary_error_carries_code_reason_field_and_message(
    service: tuple[FakeService, str],
    code: grpc.StatusCode,
    reason: str,
    field_name: str | None,
    error_type: type[RafloraError],
) -> None:
    fake, target = service
    message = "the server's words — not to be parsed"
    fake.on["GetRound"] = aborting(rich(code, message, reason, field_name))
    with client_for(target) as client, pytest.raises(error_type) as info:
        client.status()
    error = info.value
    assert type(error) is error_type
    assert (error.code, error.reason, error.field) == (code, reason, field_name)
    assert error.details == message == str(error)


def test_bad_field_has_field_violation_too(service: tuple[FakeService, str]) -> None:
    fake, target = service
    status = rich(
        grpc.StatusCode.INVALID_ARGUMENT,
        "rank 32 is above max_rank 16",
        ErrorReason.INVALID_FIELD,
        "rank",
        violation=True,
    )
    fake.on["Join"] = aborting(status)
    with client_for(target) as client, pytest.raises(InvalidArgumentError) as info:
        client.join(rank=32, num_examples=10)
    assert (info.value.reason, info.value.field) == (ErrorReason.INVALID_FIELD, "rank")


def test_field_from_field_violation_when_error_info_has_none(
    service: tuple[FakeService, str],
) -> None:
    fake, target = service
    status = Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad spec")
    status.details.add().Pack(ErrorInfo(domain=ERROR_DOMAIN, reason=ErrorReason.INVALID_FIELD))
    status.details.add().Pack(
        BadRequest(field_violations=[BadRequest.FieldViolation(field="spec.max_rank")])
    )
    fake.on["GetRound"] = aborting(rpc_status.to_status(status))
    with client_for(target) as client, pytest.raises(InvalidArgumentError) as info:
        client.status()
    assert (info.value.reason, info.value.field) == (ErrorReason.INVALID_FIELD, "spec.max_rank")


def test_admin_client_reads_the_rich_status(service: tuple[FakeService, str]) -> None:
    fake, target = service
    fake.on["CreateFederation"] = aborting(
        rich(
            grpc.StatusCode.ALREADY_EXISTS,
            "federation fed exists",
            ErrorReason.FEDERATION_EXISTS,
            "federation_id",
        )
    )
    with AdminClient(target) as admin, pytest.raises(AlreadyExistsError) as info:
        admin.create_federation(pb.FederationSpec(federation_id="fed"), timeout=10.0)
    assert (info.value.reason, info.value.field) == (ErrorReason.FEDERATION_EXISTS, "federation_id")


# -- streaming calls ------------------------------------------------------------------------


def test_pull_error_before_the_first_message(service: tuple[FakeService, str]) -> None:
    fake, target = service
    fake.on["Pull"] = aborting(
        rich(
            grpc.StatusCode.FAILED_PRECONDITION,
            "nothing published yet",
            ErrorReason.ROUND_NOT_PUBLISHED,
            "round",
        )
    )
    with client_for(target) as client, pytest.raises(FailedPreconditionError) as info:
        client.pull()
    assert (info.value.reason, info.value.field) == (ErrorReason.ROUND_NOT_PUBLISHED, "round")


def test_pull_error_in_the_middle_of_the_stream(service: tuple[FakeService, str]) -> None:
    fake, target = service

    def handler(request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.PullChunk]:
        yield adapter_chunks()[0]
        context.abort_with_status(
            rich(grpc.StatusCode.NOT_FOUND, "round 3 is gone", ErrorReason.ROUND_NOT_FOUND, "round")
        )

    fake.on["Pull"] = handler
    with client_for(target) as client, pytest.raises(NotFoundError) as info:
        client.pull()
    assert (info.value.reason, info.value.field) == (ErrorReason.ROUND_NOT_FOUND, "round")
    assert info.value.details == "round 3 is gone"


def test_push_error_after_the_upload(service: tuple[FakeService, str]) -> None:
    fake, target = service
    fake.on["Join"] = joined("")

    def handler(
        requests: Iterator[pb.PushRequest], context: grpc.ServicerContext
    ) -> pb.PushResponse:
        assert sum(len(r.data) for r in requests) > 0
        context.abort_with_status(
            rich(
                grpc.StatusCode.DATA_LOSS,
                "upload does not match its sha256",
                ErrorReason.CHECKSUM_MISMATCH,
                "sha256",
            )
        )

    fake.on["Push"] = handler
    with client_for(target) as client:
        client.join(rank=2, num_examples=10)
        with pytest.raises(DataLossError) as info:
            client.push({"m.lora_A.weight": torch.ones(2, 3)}, round=1, num_examples=10)
    assert (info.value.reason, info.value.field) == (ErrorReason.CHECKSUM_MISMATCH, "sha256")


def test_watch_error(service: tuple[FakeService, str]) -> None:
    fake, target = service
    fake.on["WatchRounds"] = aborting(
        rich(grpc.StatusCode.FAILED_PRECONDITION, "join first", ErrorReason.NOT_JOINED, "client_id")
    )
    with client_for(target) as client, pytest.raises(FailedPreconditionError) as info:
        client.wait_for_round(0, timeout=10.0)
    assert (info.value.reason, info.value.field) == (ErrorReason.NOT_JOINED, "client_id")


def test_asyncio_server_abort_reaches_the_sdk() -> None:
    """The service runs on grpc.aio: ``abort(code, message, status.trailing_metadata)`` there,
    unary and mid-stream, gives the sync SDK the same reason and field."""
    expired = rich(
        grpc.StatusCode.UNAUTHENTICATED, "token expired", ErrorReason.TOKEN_EXPIRED, "authorization"
    )
    closed = rich(
        grpc.StatusCode.FAILED_PRECONDITION, "round 3 closed", ErrorReason.ROUND_CLOSED, "round"
    )

    async def get_round(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(expired.code, expired.details, expired.trailing_metadata)

    async def pull(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PullChunk]:
        yield adapter_chunks()[0]
        await context.abort(closed.code, closed.details, closed.trailing_metadata)

    handlers = {
        "GetRound": grpc.unary_unary_rpc_method_handler(
            get_round, pb.GetRoundRequest.FromString, pb.RoundStatus.SerializeToString
        ),
        "Pull": grpc.unary_stream_rpc_method_handler(
            pull, pb.PullRequest.FromString, pb.PullChunk.SerializeToString
        ),
    }
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("raflora.v1.AggregationService", handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        with client_for(f"127.0.0.1:{port}") as client:
            with pytest.raises(UnauthenticatedError) as unauthenticated:
                client.status()
            with pytest.raises(FailedPreconditionError) as precondition:
                client.pull()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
    error = unauthenticated.value
    assert (error.reason, error.field, error.details) == (
        ErrorReason.TOKEN_EXPIRED,
        "authorization",
        "token expired",
    )
    assert _needs_rejoin(error)
    closed_error = precondition.value
    assert (closed_error.reason, closed_error.field) == (ErrorReason.ROUND_CLOSED, "round")


# -- no details, broken details: reason and field are None ----------------------------------


def test_no_details_gives_none_even_for_field_like_text(service: tuple[FakeService, str]) -> None:
    fake, target = service

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rank: must be positive")

    fake.on["GetRound"] = handler
    with client_for(target) as client, pytest.raises(InvalidArgumentError) as info:
        client.status()
    assert (info.value.reason, info.value.field) == (None, None)
    assert info.value.details == "rank: must be positive"


@pytest.mark.parametrize(
    "trailer",
    [
        pytest.param(b"\xff\xfe not a status", id="undecodable"),
        pytest.param(
            Status(
                code=grpc.StatusCode.NOT_FOUND.value[0], message="other words"
            ).SerializeToString(),
            id="message-differs",
        ),
    ],
)
def test_broken_details_give_none(service: tuple[FakeService, str], trailer: bytes) -> None:
    fake, target = service
    fake.on["GetRound"] = aborting_with_trailer(
        grpc.StatusCode.NOT_FOUND, "federation_id: no such federation", trailer
    )
    with client_for(target) as client, pytest.raises(NotFoundError) as info:
        client.status()
    assert (info.value.reason, info.value.field) == (None, None)
    assert info.value.details == "federation_id: no such federation"


def test_undecodable_detail_is_skipped(service: tuple[FakeService, str]) -> None:
    fake, target = service
    status = Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad rank")
    status.details.append(
        AnyProto(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff")
    )
    status.details.add().Pack(
        BadRequest(field_violations=[BadRequest.FieldViolation(field="rank")])
    )
    fake.on["GetRound"] = aborting(rpc_status.to_status(status))
    with client_for(target) as client, pytest.raises(InvalidArgumentError) as info:
        client.status()
    assert (info.value.reason, info.value.field) == (None, "rank")


def test_error_info_of_another_domain_is_ignored(service: tuple[FakeService, str]) -> None:
    fake, target = service
    fake.on["GetRound"] = aborting(
        rich(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "quota",
            "RATE_LIMIT_EXCEEDED",
            "round",
            domain="googleapis.com",
        )
    )
    with client_for(target) as client, pytest.raises(ResourceExhaustedError) as info:
        client.status()
    assert (info.value.reason, info.value.field) == (None, None)


def test_rpc_error_that_is_not_a_call() -> None:
    error = from_rpc_error(grpc.RpcError("connection torn down"))
    assert type(error) is RafloraError
    assert (error.code, error.reason, error.field) == (grpc.StatusCode.UNKNOWN, None, None)
    assert error.details == "connection torn down"


# -- errors the SDK raises itself -----------------------------------------------------------


def test_push_before_join() -> None:
    with client_for("127.0.0.1:1") as client, pytest.raises(FailedPreconditionError) as info:
        client.push({"m.lora_A.weight": torch.ones(2, 3)}, round=0, num_examples=1)
    assert (info.value.reason, info.value.field) == (ErrorReason.NOT_JOINED, "client_id")


@pytest.mark.parametrize(
    ("chunks", "reason", "field_name"),
    [
        (adapter_chunks(sha256="0" * 64), ErrorReason.CHECKSUM_MISMATCH, "sha256"),
        (adapter_chunks(cut=5), ErrorReason.SIZE_MISMATCH, "data"),
    ],
)
def test_pull_verification_errors(
    service: tuple[FakeService, str], chunks: list[pb.PullChunk], reason: str, field_name: str
) -> None:
    fake, target = service
    fake.on["Pull"] = lambda request, context: iter(chunks)
    with client_for(target) as client, pytest.raises(DataLossError) as info:
        client.pull()
    assert (info.value.reason, info.value.field) == (reason, field_name)


# -- re-joining is decided on the reason ----------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "message", "rejoin"),
    [
        (ErrorReason.TOKEN_EXPIRED, "client token expired", True),
        (ErrorReason.TOKEN_REVOKED, "client token revoked", True),
        (ErrorReason.ENROLMENT_REJECTED, "enrolment secret expired or revoked", False),
        (ErrorReason.TOKEN_INVALID, "token signature expired?", False),
        (None, "client token expired", False),  # no details: the text decides nothing
    ],
)
def test_needs_rejoin_decides_on_reason(
    service: tuple[FakeService, str], reason: str | None, message: str, rejoin: bool
) -> None:
    fake, target = service
    fake.on["GetRound"] = aborting(rich(grpc.StatusCode.UNAUTHENTICATED, message, reason))
    with client_for(target) as client, pytest.raises(UnauthenticatedError) as info:
        client.status()
    assert _needs_rejoin(info.value) is rejoin


def test_needs_rejoin_wants_unauthenticated() -> None:
    error = FailedPreconditionError("x", reason=ErrorReason.TOKEN_EXPIRED)
    assert not _needs_rejoin(error)


def expired_until_rejoined(reason: str, message: str, answer: Handler) -> Handler:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        if token_of(context) != "t2":
            context.abort_with_status(rich(grpc.StatusCode.UNAUTHENTICATED, message, reason))
        return answer(request, context)

    return handler


@pytest.mark.parametrize("reason", [ErrorReason.TOKEN_EXPIRED, ErrorReason.TOKEN_REVOKED])
def test_client_rejoins_on_expired_or_revoked_token(
    service: tuple[FakeService, str], reason: str
) -> None:
    fake, target = service
    tokens = iter(["t1", "t2"])
    fake.on["Join"] = lambda request, context: joined(next(tokens))(request, context)
    fake.on["GetRound"] = expired_until_rejoined(
        reason, "no longer valid", lambda request, context: pb.RoundStatus(round=7)
    )
    fake.on["Pull"] = expired_until_rejoined(
        reason, "no longer valid", lambda request, context: iter(adapter_chunks())
    )
    with client_for(target, enrolment_secret="secret") as client:
        client.join(rank=2, num_examples=10)
        assert client.status().round == 7
        assert [m for m, _ in fake.calls] == ["Join", "GetRound", "Join", "GetRound"]
        assert fake.calls[-1] == ("GetRound", "t2")
        # The server-streaming path re-joins the same way.
        tokens = iter(["t2"])
        client.token = "t1"
        assert client.pull().round == 3
        assert [m for m, _ in fake.calls[4:]] == ["Pull", "Join", "Pull"]


def test_client_does_not_rejoin_on_rejected_enrolment(service: tuple[FakeService, str]) -> None:
    fake, target = service
    fake.on["Join"] = joined("t1")
    fake.on["GetRound"] = aborting(
        rich(
            grpc.StatusCode.UNAUTHENTICATED,
            "enrolment secret expired",
            ErrorReason.ENROLMENT_REJECTED,
            "authorization",
        )
    )
    with client_for(target, enrolment_secret="secret") as client:
        client.join(rank=2, num_examples=10)
        with pytest.raises(UnauthenticatedError) as info:
            client.status()
    assert info.value.reason == ErrorReason.ENROLMENT_REJECTED
    assert [m for m, _ in fake.calls] == ["Join", "GetRound"]
