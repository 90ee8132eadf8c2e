"""Limits, each configurable: pushes per client per round, concurrent RPCs, message size, the
longest transfer, idle streams in both directions, and upload size from the schema.

Every refusal carries its documented status, and the clients within the limits carry on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
from safetensors.torch import save

from raflora.client_sdk import (
    AdminClient,
    RafloraClient,
    RafloraError,
    ResourceExhaustedError,
    RetryPolicy,
    pb,
)
from raflora.server.settings import ServerSettings
from raflora.server.testing import threaded_server
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.wire import iter_chunks

from .helpers.adapters import factors, push_header
from .helpers.federations import spec
from .helpers.rpc import outcome
from .helpers.waiting import wait_until

MODULES = {"m0": (16, 12), "m1": (8, 20)}
NO_RETRY = RetryPolicy(attempts=1)


def test_push_attempts_per_client_per_round(tmp_path: Path) -> None:
    with (
        threaded_server(tmp_path, max_pushes_per_round=3) as server,
        ExitStack() as stack,
    ):
        AdminClient(server.target).create_federation(
            spec("f", MODULES, max_rank=4, min_clients=2, expected_clients=2)
        )
        a, b = (
            stack.enter_context(RafloraClient(server.target, "f", cid, retry=NO_RETRY))
            for cid in "ab"
        )
        a.join(rank=2, num_examples=5)
        b.join(rank=2, num_examples=5)
        bad = factors(4, 0, MODULES)  # wrong rank: refused, but it counts
        for _ in range(2):
            with pytest.raises(RafloraError) as refused:
                a.push(bad, round=0, num_examples=5)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert a.push(factors(2, 1, MODULES), round=0, num_examples=5).uploads_in_round == 1  # 3rd
        with pytest.raises(ResourceExhaustedError) as exhausted:  # 4th, even a duplicate
            a.push(factors(2, 1, MODULES), round=0, num_examples=5)
        assert exhausted.value.field == "round" and "limit of 3" in exhausted.value.details
        assert a.status().uploads == 1  # the acknowledged upload stands
        assert (
            b.push(factors(2, 2, MODULES), round=0, num_examples=5).uploads_in_round == 2
        )  # b: own
        assert a.wait_for_round(0, timeout=30).round == 1
        # A new round, a fresh allowance.
        assert a.push(factors(2, 3, MODULES), round=1, num_examples=5).uploads_in_round == 1


def test_concurrent_rpcs_are_capped(tmp_path: Path) -> None:
    with threaded_server(tmp_path, max_concurrent_rpcs=3) as server:
        AdminClient(server.target).create_federation(spec("f", MODULES, max_rank=4))
        channel = grpc.insecure_channel(server.target)
        stub: Any = pb_grpc.AggregationServiceStub(channel)
        watches = [
            stub.WatchRounds(pb.WatchRoundsRequest(federation_id="f"), timeout=30) for _ in range(3)
        ]
        for watch in watches:
            next(watch)  # each stream is open and holds a slot
        code = outcome(lambda: stub.GetRound(pb.GetRoundRequest(federation_id="f"), timeout=5)).code
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for watch in watches:
            watch.cancel()
        # Slots are released as the cancels land.
        assert wait_until(
            lambda: (
                outcome(lambda: stub.GetRound(pb.GetRoundRequest(federation_id="f"))).code
                == grpc.StatusCode.OK
            ),
            timeout=5,
            interval=0.05,
        )
        channel.close()


def test_message_size_and_transfer_time_limits(tmp_path: Path) -> None:
    with threaded_server(
        tmp_path,
        chunk_size=16 << 10,
        max_message_bytes=64 << 10,
        max_request_seconds=1.5,
        idle_stream_timeout_seconds=1.0,
    ) as server:
        AdminClient(server.target).create_federation(spec("f", MODULES, max_rank=4, min_clients=2))
        with RafloraClient(server.target, "f", "a", retry=NO_RETRY) as client:
            client.join(rank=2, num_examples=5)
        data = save(factors(2, 0, MODULES))
        header = pb.PushRequest(header=push_header("f", "a", data, rank=2, num_examples=5))
        with grpc.insecure_channel(server.target) as channel:
            stub: Any = pb_grpc.AggregationServiceStub(channel)
            # One message above max_message_bytes: refused by gRPC itself.
            huge = pb.PushRequest(data=b"\0" * (100 << 10))
            code = outcome(lambda: stub.Push(iter([header, huge]), timeout=10)).code
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

            # Chunks that each arrive within the idle timeout, but too slowly overall.
            def trickle() -> Iterator[pb.PushRequest]:
                yield header
                for chunk in iter_chunks(data, 64):
                    time.sleep(0.4)
                    yield pb.PushRequest(data=chunk)

            started = time.monotonic()
            try:
                stub.Push(trickle(), timeout=20)
                pytest.fail("a push longer than max_request_seconds was accepted")
            except grpc.RpcError as exc:
                assert isinstance(exc, grpc.Call)
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "limit of 1.5s" in (exc.details() or "")
            assert time.monotonic() - started < 5
        with RafloraClient(server.target, "f", "a", retry=NO_RETRY) as client:
            assert client.status().uploads == 0
            client.join(rank=2, num_examples=5)
            assert (
                client.push(factors(2, 0, MODULES), round=0, num_examples=5).uploads_in_round == 1
            )
        assert not list(tmp_path.rglob(".incoming-*"))
    with pytest.raises(ValueError, match="max_message_bytes"):
        ServerSettings(data_dir=tmp_path, chunk_size=4 << 20, max_message_bytes=4 << 20)


def test_a_pull_reader_that_stops_reading_is_cut_off(tmp_path: Path) -> None:
    """The server-side send of a Pull is bounded by the idle timeout too."""
    big = {f"layers.{i}": (1024, 1024) for i in range(8)}  # rank 64: a 4 MiB view
    with threaded_server(tmp_path, chunk_size=64 << 10, idle_stream_timeout_seconds=1.0) as server:
        AdminClient(server.target).create_federation(spec("f", big, max_rank=64))
        with RafloraClient(server.target, "f", "a", retry=NO_RETRY) as client:
            client.join(rank=64, num_examples=5)
            assert client.pull().rank == 64  # a reader that keeps up is served
        channel = grpc.insecure_channel(
            server.target,
            # Small receive windows, so that a stalled reader stalls the server's send.
            options=[("grpc.http2.lookahead_bytes", 65536), ("grpc.http2.bdp_probe", 0)],
        )
        stub: Any = pb_grpc.AggregationServiceStub(channel)
        stream = stub.Pull(pb.PullRequest(federation_id="f", client_id="a"), timeout=30)
        assert next(stream).WhichOneof("payload") == "header"
        time.sleep(3.0)  # stop reading for longer than the idle timeout
        received = 0
        with pytest.raises(grpc.RpcError) as info:
            for message in stream:
                received += len(message.data)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert received < 4 << 20
        channel.close()
        with RafloraClient(server.target, "f", "a", retry=NO_RETRY) as client:
            assert client.status().round == 0


def test_upload_size_is_bounded_by_the_schema(tmp_path: Path) -> None:
    """A header that declares more bytes than the rank's adapter can take is refused at once,
    before a byte of payload is read."""
    with threaded_server(tmp_path) as server:
        AdminClient(server.target).create_federation(spec("f", MODULES, max_rank=4))
        with RafloraClient(server.target, "f", "a", retry=NO_RETRY) as client:
            client.join(rank=2, num_examples=5)
        sent = threading.Event()

        def messages() -> Iterator[pb.PushRequest]:
            yield pb.PushRequest(
                header=pb.PushHeader(
                    federation_id="f",
                    client_id="a",
                    round=0,
                    rank=2,
                    num_examples=5,
                    total_bytes=200 << 10,  # 2 x (2 x (12+16) + 2 x (20+8)) fp64 is ~2 KiB
                    sha256="0" * 64,
                )
            )
            sent.wait(5)  # never sends data: the refusal must not wait for it

        with grpc.insecure_channel(server.target) as channel:
            stub: Any = pb_grpc.AggregationServiceStub(channel)
            started = time.monotonic()
            code = outcome(lambda: stub.Push(messages(), timeout=10)).code
            sent.set()
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert time.monotonic() - started < 3


def test_watch_streams_end_after_the_request_limit_and_the_sdk_reconnects(
    tmp_path: Path,
) -> None:
    with threaded_server(tmp_path, max_request_seconds=1.0) as server:
        AdminClient(server.target).create_federation(spec("f", MODULES, max_rank=4))
        with grpc.insecure_channel(server.target) as channel:
            stub: Any = pb_grpc.AggregationServiceStub(channel)
            started = time.monotonic()
            watch = stub.WatchRounds(pb.WatchRoundsRequest(federation_id="f"), timeout=10)
            events = list(watch)
            assert len(events) == 1  # the status event, then a clean end after ~1 s
            assert 0.9 < time.monotonic() - started < 5
        with (
            RafloraClient(server.target, "f", "watcher") as watcher,
            RafloraClient(server.target, "f", "pusher") as pusher,
        ):
            pusher.join(rank=2, num_examples=5)

            def push_later() -> None:
                time.sleep(2.5)  # the watcher's stream has ended (and been renewed) by then
                pusher.push(factors(2, 0, MODULES), round=0, num_examples=5)

            thread = threading.Thread(target=push_later)
            thread.start()
            assert watcher.wait_for_round(0, timeout=20).round == 1
            thread.join(10)
