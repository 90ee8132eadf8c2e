"""Pull views kept in memory (rounds/hot_views.py): the byte limit, who may fill, what goes.

The service-level checks (a damaged view never enters memory, a deleted federation's hot view
is NOT_FOUND, a new round drops the old round's views) run through the real server below.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load

from raflora.client_sdk import AdminClient, RafloraClient, RafloraError, lora_state_dict, pb
from raflora.server.rounds.hot_views import HotKey, HotViews
from raflora.server.testing import federation_spec, scrape, threaded_server
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.framing import Framer, data_of, encode_data

MiB = 1 << 20


def key(round_: int = 0, rank: int = 4, federation: str = "f", digest: str = "d") -> HotKey:
    return (federation, round_, rank, 1.0, digest)


def fill(hot: HotViews, k: HotKey, size: int, *, evict: bool = True) -> bool:
    reserved = hot.begin_fill(k, size, evict=evict)
    if reserved is None:
        return False
    hot.end_fill(reserved, [b"x" * size])
    return True


def test_a_filled_view_is_served_and_counted() -> None:
    hot = HotViews(8 * MiB)
    assert hot.acquire(key()) is None
    assert fill(hot, key(), MiB)
    entry = hot.acquire(key())
    assert entry is not None and entry.messages == (b"x" * MiB,)
    hot.release(entry)
    assert (hot.entries(), hot.used) == (1, MiB)
    assert hot.get(key(digest="other")) is None  # rebuilt with other bytes: not these


def test_a_build_evicts_the_least_recently_used_a_stream_fill_never_does() -> None:
    hot = HotViews(8 * MiB)  # at most 2 MiB per view
    for rank in (1, 2, 3, 4):
        assert fill(hot, key(rank=rank), 2 * MiB)
    hot.release(hot.acquire(key(rank=1)) or pytest.fail("held"))  # now the most recent
    assert not fill(hot, key(rank=5), 2 * MiB, evict=False)  # a pull from storage: no room
    assert hot.entries() == 4
    assert fill(hot, key(rank=5), 2 * MiB)  # a build makes room
    assert hot.get(key(rank=2)) is None  # the least recently used went
    assert all(hot.get(key(rank=r)) is not None for r in (1, 3, 4, 5))
    assert hot.used == 8 * MiB


def test_an_evicted_view_still_streamed_stays_counted_until_its_last_pull_ends() -> None:
    """A slow pull of an evicted view keeps its messages alive: they count against the limit
    until it ends, so slow pulls cannot hold more than the limit between them."""
    hot = HotViews(8 * MiB)
    assert fill(hot, key(rank=1), 2 * MiB)
    slow = hot.acquire(key(rank=1))
    assert slow is not None
    hot.drop(lambda k: True)  # evicted (or its round pruned) while it streams
    assert hot.entries() == 0 and hot.used == 2 * MiB
    for rank in (2, 3, 4):
        assert fill(hot, key(rank=rank), 2 * MiB)
    assert not fill(hot, key(rank=5), 2 * MiB, evict=False)  # the slow pull's room is taken
    hot.release(slow)
    assert hot.used == 6 * MiB
    assert fill(hot, key(rank=5), 2 * MiB, evict=False)


def test_no_view_above_a_quarter_of_the_limit_and_none_when_off() -> None:
    assert HotViews(8 * MiB).begin_fill(key(), 2 * MiB + 1, evict=True) is None
    assert HotViews(0).begin_fill(key(), 1, evict=True) is None
    assert HotViews(8 * MiB).begin_fill(key(), 0, evict=True) is None


def test_one_fill_per_view_and_fills_reserve_their_room() -> None:
    """Many first pulls of one large view hold it once; fills in flight count against the
    limit, so they cannot together hold more than it."""
    hot = HotViews(8 * MiB)
    first = hot.begin_fill(key(rank=1), 2 * MiB)
    assert first is not None
    assert hot.begin_fill(key(rank=1), 2 * MiB) is None  # a second pull of the view streams
    for rank in (2, 3, 4):
        assert hot.begin_fill(key(rank=rank), 2 * MiB) is not None
    assert hot.used == 8 * MiB
    assert hot.begin_fill(key(rank=5), MiB, evict=True) is None  # evicting would not help
    hot.end_fill(first, None)  # a failed or damaged stream gives its room back
    assert hot.used == 6 * MiB and hot.entries() == 0
    assert hot.begin_fill(key(rank=5), MiB) is not None


def test_a_build_reserves_before_it_knows_its_digest() -> None:
    hot = HotViews(8 * MiB)
    build = hot.begin_fill(None, 2 * MiB, evict=True)  # reserved before the bytes exist
    assert build is not None and hot.used == 2 * MiB
    hot.end_fill(build, [b"x" * MiB], key(digest="sha"))  # lands at its size, under its key
    assert hot.used == MiB and hot.get(key(digest="sha")) == (b"x" * MiB,)


def test_dropping_a_federation_forgets_its_entries_and_fills() -> None:
    hot = HotViews(8 * MiB)
    assert fill(hot, key(federation="a"), MiB)
    assert fill(hot, key(federation="b"), MiB)
    dropped = hot.begin_fill(key(federation="a", rank=7), MiB)
    assert dropped is not None
    hot.drop(lambda k: k[0] == "a")
    assert hot.get(key(federation="a")) is None
    assert hot.get(key(federation="b")) is not None
    assert hot.used == MiB
    again = hot.begin_fill(key(federation="a", rank=7), MiB)  # a new pull of the same view
    assert again is not None and hot.used == 2 * MiB
    hot.end_fill(dropped, [b"x" * MiB])  # the dropped fill keeps nothing, takes no one's room
    assert hot.get(key(federation="a", rank=7)) is None and hot.used == 2 * MiB
    hot.end_fill(again, [b"y" * MiB])
    assert hot.get(key(federation="a", rank=7)) == (b"y" * MiB,) and hot.used == 2 * MiB


MODULES = {"m0": (32, 16), "m1": (16, 24)}


def adapter(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return lora_state_dict(
        {
            m: (torch.randn(d_out, rank, generator=g) * 0.05, torch.randn(rank, d_in, generator=g))
            for m, (d_out, d_in) in MODULES.items()
        }
    )


def test_a_new_round_and_a_deleted_federation_leave_memory(tmp_path: Path) -> None:
    """Through the real server: a publication drops the views of rounds older than the one
    before it (as it does their files), and deleting a federation drops all of its views (a
    later pull is NOT_FOUND)."""
    with threaded_server(tmp_path) as server, ExitStack() as stack:
        hot = server.server.hub.hot_views
        admin = stack.enter_context(AdminClient(server.target))
        admin.create_federation(federation_spec("h", MODULES, min_clients=1, max_rank=8))
        admin.create_federation(federation_spec("other", MODULES, min_clients=1, max_rank=8))
        client = stack.enter_context(RafloraClient(server.target, "h", "c"))
        bystander = stack.enter_context(RafloraClient(server.target, "other", "b"))
        client.join(rank=4, num_examples=10)
        bystander.join(rank=4, num_examples=10)
        first = client.pull()
        bystander.pull()
        rounds = {k[1] for k in hot.held() if k[0] == "h"}
        assert rounds == {0}
        for round_ in range(2):
            client.push(adapter(4, round_), round=round_, num_examples=10)
            client.wait_for_round(round_, timeout=30)
            assert client.pull().round == round_ + 1
        assert {k[1] for k in hot.held() if k[0] == "h"} == {1, 2}  # 0 dropped
        assert first.round == 0
        admin.delete_federation("h")
        assert all(k[0] != "h" for k in hot.held())
        assert any(k[0] == "other" for k in hot.held())  # another federation's stays
        with pytest.raises(RafloraError) as refused:
            client.pull()
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert bystander.pull().round == 0


def test_a_framer_cuts_like_a_reader_of_chunk_size() -> None:
    data = bytes(range(256)) * 41  # 10496 bytes
    for chunk in (1, 7, 1024, 10496, 20000):
        for cut in (1, 5, 333, 4096):
            framer = Framer(chunk)
            for i in range(0, len(data), cut):
                framer.feed(memoryview(data)[i : i + cut])
            expected = [encode_data([data[i : i + chunk]]) for i in range(0, len(data), chunk)]
            assert framer.close() == expected, (chunk, cut)


def test_a_framer_frames_what_was_fed_even_if_that_memory_changes_later() -> None:
    source = bytearray(b"a" * 1500)
    framer = Framer(1024)
    framer.feed(memoryview(source))
    source[:] = b"b" * 1500  # a tensor written to after the build moved on
    assert framer.close() == [encode_data([b"a" * 1024]), encode_data([b"a" * 476])]


def joined_client(
    stack: ExitStack,
    target: str,
    federation: str,
    modules: dict[str, tuple[int, int]],
    client_id: str,
    rank: int,
) -> RafloraClient:
    """A one-client federation created on ``target`` and its client joined at ``rank``."""
    stack.enter_context(AdminClient(target)).create_federation(
        federation_spec(federation, modules, min_clients=1, max_rank=rank)
    )
    client = stack.enter_context(RafloraClient(target, federation, client_id))
    client.join(rank=rank, num_examples=10)
    return client


def test_a_built_view_enters_memory_as_its_file_framed(tmp_path: Path) -> None:
    """The build frames the bytes it writes and hashes: the hot entry is the view file, cut at
    the server's chunk size, and the digest the pull checks is that of the file."""
    with threaded_server(tmp_path, chunk_size=1024) as server, ExitStack() as stack:
        hot = server.server.hub.hot_views
        client = joined_client(stack, server.target, "b", MODULES, "c", 8)
        pulled = client.pull()
        (held,) = hot.held()
        (path,) = (tmp_path / "federations/b/views/00000000").glob("rank-8-*.safetensors")
        stored = path.read_bytes()
        messages = hot.get(held)
        assert messages is not None and len(messages) == -(-len(stored) // 1024) > 1
        assert b"".join(bytes(data_of(m) or b"") for m in messages) == stored
        assert held[4] == hashlib.sha256(stored).hexdigest()
        assert pulled.tensors.keys() == load(stored).keys()


def test_a_slow_pull_of_an_evicted_view_keeps_it_counted_through_the_real_server(
    tmp_path: Path,
) -> None:
    """A client opens a pull of a hot view and stops reading; the view is evicted meanwhile.
    Its messages stay alive for that pull, so they stay counted until the pull ends."""
    big = {f"m{i}": (4096, 4096) for i in range(8)}  # a 16 MiB view at rank 64
    with threaded_server(tmp_path) as server, ExitStack() as stack:
        hot = server.server.hub.hot_views
        client = joined_client(stack, server.target, "slow", big, "c", 64)
        client.pull()  # builds the view: hot
        held = hot.used
        assert hot.entries() == 1 and held > 16 * MiB
        channel = stack.enter_context(grpc.insecure_channel(server.target))
        call = pb_grpc.AggregationServiceStub(channel).Pull(
            pb.PullRequest(federation_id="slow", client_id="c")
        )
        received = iter(call)
        next(received), next(received)  # the header and one chunk; then it stops reading
        hot.drop(lambda k: True)  # what an eviction does
        assert hot.entries() == 0 and hot.used == held  # still streamed: still counted
        call.cancel()
        deadline = time.monotonic() + 10
        while hot.used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hot.used == 0


def test_the_hot_views_show_in_the_metrics(tmp_path: Path) -> None:
    """Scraped over HTTP: the bytes held and the pulls served from memory, per federation."""
    with threaded_server(tmp_path) as server, ExitStack() as stack:
        admin = stack.enter_context(AdminClient(server.target))
        admin.create_federation(federation_spec("m", MODULES, min_clients=1, max_rank=8))
        client = stack.enter_context(RafloraClient(server.target, "m", "c"))
        client.join(rank=8, num_examples=10)
        for _ in range(3):
            client.pull()
        held = server.server.hub.hot_views.used
        assert held > 0
        text = scrape(server.metrics_url)
        assert f"raflora_hot_view_bytes {float(held)}" in text
        # The first pull followed the build, which kept the view: no pull read the disk.
        assert 'raflora_pulls_while_built_total{federation="m"} 1.0' in text
        assert 'raflora_pulls_from_memory_total{federation="m"} 2.0' in text
        admin.delete_federation("m")
        assert "raflora_hot_view_bytes 0.0" in scrape(server.metrics_url)


def test_stalled_pulls_do_not_keep_another_client_from_being_served(tmp_path: Path) -> None:
    """An attacker opens three pulls of a 16 MiB hot view and stops reading; the view is
    evicted while they hang. An honest client of another rank still pulls (its view built and
    kept), memory stays within the limit, and once the attacker goes only the honest view is
    held and counted."""
    big = {f"m{i}": (4096, 4096) for i in range(8)}
    with threaded_server(tmp_path, hot_view_memory_mib=128) as server, ExitStack() as stack:
        hot = server.server.hub.hot_views
        attacker = joined_client(stack, server.target, "stall", big, "attacker", 64)
        attacker.pull()  # builds and keeps the rank-64 view
        channel = stack.enter_context(grpc.insecure_channel(server.target))
        stub = pb_grpc.AggregationServiceStub(channel)
        request = pb.PullRequest(federation_id="stall", client_id="attacker")
        calls = [stub.Pull(request) for _ in range(3)]
        for call in calls:
            received = iter(call)
            next(received), next(received)  # the header and one chunk, then nothing
        hot.drop(lambda k: True)  # evicted while the stalled pulls hold it
        honest = stack.enter_context(RafloraClient(server.target, "stall", "honest"))
        honest.join(rank=32, num_examples=10)
        pulled = honest.pull()
        assert pulled.rank == 32
        assert all(bool(torch.isfinite(t).all()) for t in pulled.tensors.values())
        (held,) = hot.held()
        honest_bytes = sum(len(m) for m in hot.get(held) or ())
        assert held[2] == 32 and honest_bytes <= hot.used <= hot.limit
        for call in calls:
            call.cancel()
        deadline = time.monotonic() + 10
        while hot.used != honest_bytes:
            assert time.monotonic() < deadline, hot.used
            time.sleep(0.05)
        assert hot.held() == [held]
