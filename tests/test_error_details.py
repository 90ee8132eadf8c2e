"""The real server's refusals carry google.rpc rich details, and WatchRounds honours after_round.

Each refusal is checked twice: raw (the ``grpc-status-details-bin`` trailer decoded with
grpcio-status: ErrorInfo domain, reason and field, BadRequest for bad input) and through the SDK
(``.reason`` and ``.field``), so neither side can drift from the contract in wire.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from safetensors.torch import save

from raflora.client_sdk import AdminClient, RafloraClient
from raflora.client_sdk.errors import RafloraError
from raflora.server.testing import ThreadedServer, threaded_server
from raflora.v1 import aggregation_pb2 as pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.wire import ERROR_DOMAIN, ErrorReason, sha256_hex
from tests.helpers.adapters import factors, push_header
from tests.helpers.federations import every_client_spec

MODULES = {"m": (8, 6)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with threaded_server(tmp_path_factory.mktemp("details")) as handle:
        with AdminClient(handle.target) as admin:
            admin.create_federation(every_client_spec("f", MODULES, 2, max_rank=4))
        yield handle


def details(error: grpc.RpcError) -> tuple[str, str, list[str]]:
    """(reason, field, BadRequest fields) from a raw call's trailer."""
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status.message == error.details()
    reason = field = ""
    violations: list[str] = []
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            assert info.domain == ERROR_DOMAIN
            reason, field = info.reason, info.metadata["field"]
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            violations = [v.field for v in bad.field_violations]
    return reason, field, violations


def raw_refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_unknown_federation_and_not_joined(server: ThreadedServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AggregationServiceStub(channel)
        missing = raw_refusal(lambda: stub.GetRound(pb.GetRoundRequest(federation_id="nope")))
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        assert details(missing)[:2] == (ErrorReason.FEDERATION_NOT_FOUND, "federation_id")
        stranger = raw_refusal(
            lambda: list(stub.Pull(pb.PullRequest(federation_id="f", client_id="stranger")))
        )
        assert details(stranger)[:2] == (ErrorReason.NOT_JOINED, "client_id")
    with RafloraClient(server.target, "f", "stranger") as client, pytest.raises(RafloraError) as e:
        client.pull()
    assert (e.value.code, e.value.reason, e.value.field) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        ErrorReason.NOT_JOINED,
        "client_id",
    )


def test_bad_input_names_its_field_in_a_bad_request(server: ThreadedServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AggregationServiceStub(channel)
        bad_rank = raw_refusal(
            lambda: stub.Join(pb.JoinRequest(federation_id="f", client_id="c", rank=99))
        )
        assert bad_rank.code() == grpc.StatusCode.INVALID_ARGUMENT
        reason, field, violations = details(bad_rank)
        assert (field, violations) == ("rank", ["rank"])
        assert reason == ErrorReason.INVALID_UPDATE  # the engine's rank check
        bad_id = raw_refusal(
            lambda: stub.Join(pb.JoinRequest(federation_id="f", client_id="legit\n", rank=2))
        )
        assert details(bad_id)[1:] == ("client_id", ["client_id"])
        malformed = channel.unary_unary(
            "/raflora.v1.AggregationService/GetRound", None, lambda b: b
        )
        garbage = raw_refusal(lambda: malformed(b"\xff\xff\xff"))
        assert details(garbage)[:2] == (ErrorReason.MALFORMED_REQUEST, "request")


def test_checksum_and_round_refusals(server: ThreadedServer) -> None:
    with RafloraClient(server.target, "f", "a") as a:
        a.join(rank=2, num_examples=5)
        data = save(factors(2, 1, MODULES))
        header = push_header("f", "a", data, rank=2, num_examples=5)
        header.sha256 = sha256_hex(b"something else")
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AggregationServiceStub(channel)
            wrong = raw_refusal(
                lambda: stub.Push(iter([pb.PushRequest(header=header), pb.PushRequest(data=data)]))
            )
            assert wrong.code() == grpc.StatusCode.DATA_LOSS
            assert details(wrong)[:2] == (ErrorReason.CHECKSUM_MISMATCH, "sha256")
        with pytest.raises(RafloraError) as early:
            a.push(factors(2, 1, MODULES), round=3, num_examples=5)
        assert (early.value.reason, early.value.field) == (ErrorReason.ROUND_NOT_OPEN, "round")


def test_watch_rounds_honours_after_round(tmp_path: Path) -> None:
    with threaded_server(tmp_path) as server:
        with AdminClient(server.target) as admin:
            admin.create_federation(every_client_spec("w", MODULES, 1, max_rank=4))
        with (
            RafloraClient(server.target, "w", "a") as a,
            grpc.insecure_channel(server.target) as channel,
        ):
            a.join(rank=2, num_examples=5)
            stub = pb_grpc.AggregationServiceStub(channel)
            every = iter(stub.WatchRounds(pb.WatchRoundsRequest(federation_id="w"), timeout=20))
            later = iter(
                stub.WatchRounds(
                    pb.WatchRoundsRequest(federation_id="w", after_round=1), timeout=20
                )
            )
            assert next(every).type == pb.ROUND_EVENT_TYPE_STATUS
            assert next(later).type == pb.ROUND_EVENT_TYPE_STATUS  # always first
            a.push(factors(2, 1, MODULES), round=0, num_examples=5)  # publishes round 1
            a.wait_for_round(0, timeout=20)
            a.push(factors(2, 2, MODULES), round=1, num_examples=5)  # publishes round 2
            a.wait_for_round(1, timeout=20)
            seen_every = [next(every) for _ in range(3)]
            assert [e.type for e in seen_every] == [
                pb.ROUND_EVENT_TYPE_UPLOAD,
                pb.ROUND_EVENT_TYPE_AGGREGATING,
                pb.ROUND_EVENT_TYPE_PUBLISHED,
            ]
            assert seen_every[0].status.round == 0
            # after_round=1: nothing of rounds 0 and 1, the first event is round 2's publication.
            first_later = next(later)
            assert (first_later.type, first_later.status.round) == (
                pb.ROUND_EVENT_TYPE_PUBLISHED,
                2,
            )
            channel.close()  # ends both watches
