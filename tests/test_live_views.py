"""Pulls that stream a view while it is built (rounds/live_views.py, docs/design.md §4.3).

The accounting and the follower's wake-ups are checked on their own; the protocol (header
without a digest, data as it is framed, the digest in a trailer), the SDK's checks of it, a
build that fails half-way and a follower that stops reading run through the real server on
loopback. A gate held in the build thread keeps a build in flight for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load, save

from raflora.client_sdk import AdminClient, RafloraClient, RafloraError, pb
from raflora.client_sdk.errors import DataLossError
from raflora.client_sdk.payload import receive_adapter
from raflora.server.engine.strategies.spectral import SpectralStrategy
from raflora.server.rounds.hot_views import HotKey, HotViews
from raflora.server.rounds.live_views import LiveBuild, LiveFacts
from raflora.server.testing import federation_spec, scrape, threaded_server
from raflora.v1 import aggregation_pb2_grpc as pb_grpc

MiB = 1 << 20
MODULES = {f"m{i}": (512, 512) for i in range(6)}  # 1.5 MiB per view at rank 64


def key(rank: int = 4, digest: str = "d") -> HotKey:
    return ("f", 0, rank, 1.0, digest)


# -- the accounting of followed fills ----------------------------------------------------------
def test_a_followed_fill_that_is_kept_hands_its_followers_over_as_readers() -> None:
    hot = HotViews(8 * MiB)
    building = hot.begin_fill(None, 2 * MiB, evict=True)
    assert building is not None and hot.follow(building)
    hot.end_fill(building, [b"x" * MiB], key(digest="sha"))
    assert hot.used == MiB and not hot.follow(building)  # built: later pulls read the entry
    hot.drop(lambda k: True)  # evicted while its follower still streams
    assert hot.entries() == 0 and hot.used == MiB
    hot.unfollow(building)
    assert hot.used == 0


@pytest.mark.parametrize("how", ["failed", "not kept", "too large to keep"])
def test_a_followed_fill_not_kept_stays_counted_until_its_last_follower_ends(how: str) -> None:
    hot = HotViews(8 * MiB)
    if how == "not kept":  # its view is held already (built twice)
        held = hot.begin_fill(key(), MiB)
        assert held is not None
        hot.end_fill(held, [b"y"])
    building = hot.begin_fill(None, 2 * MiB, evict=True)
    assert building is not None and hot.follow(building) and hot.follow(building)
    before = hot.used
    messages = None if how == "failed" else [b"x" * (3 * MiB if how.startswith("too") else 10)]
    hot.end_fill(building, messages, key())
    assert hot.used == before  # both followers may still hold its messages
    hot.unfollow(building)
    assert hot.used == before
    hot.unfollow(building)
    assert hot.used == before - 2 * MiB


# -- following a build -------------------------------------------------------------------------
def test_every_follower_gets_every_message_in_order_as_the_build_frames_them() -> None:
    async def scenario() -> tuple[list[bytes], list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        live = LiveBuild(loop)
        framed: list[bytes] = []
        hot = HotViews(8 * MiB)
        fill = hot.begin_fill(None, MiB, evict=True)
        assert fill is not None

        def build() -> None:
            live.begin(LiveFacts(30, False, 0, None, ()), framed, fill)
            for i in range(30):
                framed.append(bytes([i]))
                if i % 7 == 0:
                    live.advanced()
                    time.sleep(0.002)
            # no word after the last ones: finishing must still deliver them

        async def collect() -> list[bytes]:
            return [m async for m in live.follow()]

        builder = loop.run_in_executor(None, build)
        assert await live.started
        early, late = asyncio.ensure_future(collect()), None
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(collect())
        await builder
        live.finish()
        return framed, await early, await late

    framed, early, late = asyncio.run(scenario())
    assert early == framed == late and len(framed) == 30


# -- through the real server -------------------------------------------------------------------
class Gate:
    """Holds the view builds of the strategy in the build thread after their first module."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> None:
        self.open = threading.Event()
        self.reached = threading.Event()
        self.fail_after = fail_after
        real = SpectralStrategy.distribute_module
        calls = [0]

        def gated(strategy: Any, state: Any, name: str, rank: int, scale: float) -> Any:
            calls[0] += 1
            if calls[0] == 2:
                self.reached.set()
                assert self.open.wait(30), "the test never opened the gate"
            factors, merge = real(strategy, state, name, rank, scale)
            if self.fail_after is not None and calls[0] > self.fail_after:
                factors = type(factors)(B=factors.B + float("nan"), A=factors.A)
            return factors, merge

        monkeypatch.setattr(SpectralStrategy, "distribute_module", gated)


def joined(stack: ExitStack, target: str, client_id: str, rank: int = 64) -> RafloraClient:
    client = stack.enter_context(RafloraClient(target, "live", client_id))
    client.join(rank=rank, num_examples=10)
    return client


def create(stack: ExitStack, target: str, modules: dict[str, tuple[int, int]] = MODULES) -> None:
    stack.enter_context(AdminClient(target)).create_federation(
        federation_spec("live", modules, min_clients=2, max_rank=64)
    )


def raw_pull(target: str, stack: ExitStack, client_id: str) -> Iterator[Any]:
    channel = stack.enter_context(grpc.insecure_channel(target))
    call = pb_grpc.AggregationServiceStub(channel).Pull(
        pb.PullRequest(federation_id="live", client_id=client_id, digest_last=True)
    )
    stack.callback(call.cancel)
    return iter(call)


def test_pulls_stream_a_view_while_it_is_built_and_its_digest_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw pull gets its header (no digest) and the first module's bytes while the build is
    held after that module; an SDK pull of the same view joins the build; once it finishes
    both have the view file's bytes, and the trailer carries its SHA-256."""
    gate = Gate(monkeypatch)
    with threaded_server(tmp_path, chunk_size=64 << 10) as server, ExitStack() as stack:
        create(stack, server.target)
        joined(stack, server.target, "raw")
        sdk = joined(stack, server.target, "sdk")
        stream = raw_pull(server.target, stack, "raw")
        header = next(stream)
        assert header.WhichOneof("payload") == "header" and header.header.sha256 == ""
        assert gate.reached.wait(10)
        early = [next(stream) for _ in range(3)]  # sent while the build is held
        assert not gate.open.is_set()
        pulled: list[Any] = []
        second = threading.Thread(target=lambda: pulled.append(sdk.pull()))
        second.start()
        deadline = time.monotonic() + 10
        while 'raflora_pulls_while_built_total{federation="live"} 2.0' not in scrape(
            server.metrics_url
        ):
            assert time.monotonic() < deadline, "the second pull did not follow the build"
            time.sleep(0.02)
        gate.open.set()
        rest = list(stream)
        second.join(30)
        *data, trailer = early + rest
        assert trailer.WhichOneof("payload") == "trailer"
        payload = b"".join(m.data for m in data)
        (path,) = (tmp_path / "federations/live/views/00000000").glob("rank-64-*.safetensors")
        stored = path.read_bytes()
        assert payload == stored and len(stored) == header.header.total_bytes
        assert trailer.trailer.sha256 == hashlib.sha256(stored).hexdigest()
        (adapter,) = pulled
        expected = load(stored)
        assert adapter.tensors.keys() == expected.keys()
        assert all(torch.equal(adapter.tensors[k], expected[k]) for k in expected)
        # Later pulls find the view built and hot: they do not follow anything.
        sdk.pull()
        text = scrape(server.metrics_url)
        assert 'raflora_pulls_while_built_total{federation="live"} 2.0' in text
        assert 'raflora_pulls_from_memory_total{federation="live"} 1.0' in text


def test_a_build_that_fails_half_way_fails_its_followers_and_serves_no_partial_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view turns out not finite at its third module, after the first ones were sent:
    the follower's stream ends in INVALID_ARGUMENT, the SDK raises instead of returning a
    partial adapter, the room is given back, and the next pull (gate gone) builds anew."""
    gate = Gate(monkeypatch, fail_after=2)
    gate.open.set()
    with threaded_server(tmp_path, chunk_size=64 << 10) as server, ExitStack() as stack:
        create(stack, server.target)
        client = joined(stack, server.target, "c")
        with pytest.raises(RafloraError) as refused:
            client.pull()
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not finite" in str(refused.value)
        hot = server.server.hub.hot_views
        assert hot.used == 0 and hot.entries() == 0
        monkeypatch.undo()
        pulled = client.pull()
        assert all(bool(torch.isfinite(t).all()) for t in pulled.tensors.values())


def test_a_follower_that_stops_reading_holds_up_no_one_and_its_room_stays_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker follows a build, reads its header and one chunk, and stops. The build
    finishes, another client of the same rank pulls the view, the view is evicted meanwhile:
    the attacker's share stays counted until it goes, then nothing is held but what is kept."""
    gate = Gate(monkeypatch)
    big = {f"m{i}": (4096, 4096) for i in range(8)}  # 16 MiB: more than a stream buffers
    with threaded_server(tmp_path) as server, ExitStack() as stack:
        create(stack, server.target, big)
        joined(stack, server.target, "attacker")
        honest = joined(stack, server.target, "honest")
        hot = server.server.hub.hot_views
        stalled = raw_pull(server.target, stack, "attacker")
        next(stalled), next(stalled)
        assert gate.reached.wait(10)
        gate.open.set()
        pulled = honest.pull()
        assert pulled.rank == 64
        held = hot.used
        assert held > 16 * MiB
        hot.drop(lambda k: True)  # evicted while the attacker still holds its messages
        assert hot.entries() == 0 and hot.used == held
        stack.close()  # the attacker's call is cancelled
        deadline = time.monotonic() + 10
        while hot.used:
            assert time.monotonic() < deadline, hot.used
            time.sleep(0.02)


def test_without_hot_memory_a_first_pull_waits_for_the_build_as_before(tmp_path: Path) -> None:
    with threaded_server(tmp_path, hot_view_memory_mib=0) as server, ExitStack() as stack:
        create(stack, server.target)
        client = joined(stack, server.target, "c")
        stream = raw_pull(server.target, stack, "c")
        header = next(stream)
        assert len(header.header.sha256) == 64  # built first: the digest up front
        *_, last = stream
        assert last.WhichOneof("payload") != "trailer"
        assert client.pull().rank == 64
        assert 'raflora_pulls_while_built_total{federation="live"}' not in scrape(
            server.metrics_url
        )


# -- the SDK's checks of a digest that comes last ----------------------------------------------
PAYLOAD = b"0123456789" * 100


def chunks(*, digest: str = "", trailer: str | None = None, extra: bool = False) -> list[Any]:
    header = pb.PullChunk(
        header=pb.PullHeader(round=0, rank=1, total_bytes=len(PAYLOAD), sha256=digest)
    )
    out: list[Any] = [header, memoryview(PAYLOAD[:500]), memoryview(PAYLOAD[500:])]
    if trailer is not None:
        out.append(pb.PullChunk(trailer=pb.PullTrailer(sha256=trailer)))
    if extra:
        out.append(memoryview(b"x"))
    return out


GOOD = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.mark.parametrize(
    ("stream", "field"),
    [
        (chunks(), "sha256"),  # no trailer where the header promised one
        (chunks(trailer=hashlib.sha256(b"other").hexdigest()), "sha256"),
        (chunks(trailer=""), "sha256"),
        (chunks(trailer=GOOD, extra=True), "data"),  # data after the trailer
        (chunks(digest=GOOD, trailer=GOOD), "trailer"),  # the header had the digest
        ([pb.PullChunk(trailer=pb.PullTrailer(sha256=GOOD)), *chunks()], "trailer"),
        (chunks(trailer=GOOD)[:3] + [chunks(trailer=GOOD)[3]] * 2, "trailer"),
    ],
)
def test_the_sdk_refuses_a_download_whose_digest_trailer_is_wrong_or_missing(
    stream: list[Any], field: str
) -> None:
    with pytest.raises(DataLossError) as refused:
        receive_adapter(stream)
    assert refused.value.field == field


def test_the_sdk_takes_the_digest_from_the_trailer() -> None:
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    raw = save(tensors)
    header = pb.PullChunk(header=pb.PullHeader(round=3, rank=1, total_bytes=len(raw)))
    trailer = pb.PullChunk(trailer=pb.PullTrailer(sha256=hashlib.sha256(raw).hexdigest()))
    got_header, got = receive_adapter([header, pb.PullChunk(data=raw), trailer])
    assert got_header.round == 3 and torch.equal(got["w"], tensors["w"])
