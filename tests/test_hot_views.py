"""Pull views kept in memory (rounds/hot_views.py): the byte limit, who may fill, what goes.

The service-level checks (a damaged view never enters memory, a deleted federation's hot view
is NOT_FOUND, a new round drops the old round's views) run through the real server below.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load

from raflora.client_sdk import AdminClient, RafloraClient, RafloraError, lora_state_dict
from raflora.server.rounds.hot_views import HotKey, HotViews
from raflora.server.testing import federation_spec, threaded_server
from raflora.v1.framing import Framer, data_of, encode_data

MiB = 1 << 20


def key(round_: int = 0, rank: int = 4, federation: str = "f", digest: str = "d") -> HotKey:
    return (federation, round_, rank, 1.0, digest)


def fill(hot: HotViews, k: HotKey, size: int) -> bool:
    if not hot.begin_fill(k, size):
        return False
    hot.end_fill(k, [b"x" * size])
    return True


def test_a_filled_view_is_served_and_counted() -> None:
    hot = HotViews(8 * MiB)
    assert hot.get(key()) is None
    assert fill(hot, key(), MiB)
    assert hot.get(key()) == (b"x" * MiB,)
    assert (hot.entries(), hot.used) == (1, MiB)
    assert hot.get(key(digest="other")) is None  # rebuilt with other bytes: not these


def test_the_limit_evicts_the_least_recently_used() -> None:
    hot = HotViews(8 * MiB)  # at most 2 MiB per view
    for rank in (1, 2, 3, 4):
        assert fill(hot, key(rank=rank), 2 * MiB)
    hot.get(key(rank=1))  # used: now the most recent
    assert fill(hot, key(rank=5), 2 * MiB)
    assert hot.get(key(rank=2)) is None  # the least recently used went
    assert all(hot.get(key(rank=r)) is not None for r in (1, 3, 4, 5))
    assert hot.used == 8 * MiB


def test_no_view_above_a_quarter_of_the_limit_and_none_when_off() -> None:
    assert not HotViews(8 * MiB).begin_fill(key(), 2 * MiB + 1)
    assert not HotViews(0).begin_fill(key(), 1)
    assert not HotViews(8 * MiB).begin_fill(key(), 0)


def test_one_fill_per_view_and_fills_reserve_their_room() -> None:
    """Many first pulls of one large view hold it once; fills in flight count against the
    limit, so they cannot together hold more than it."""
    hot = HotViews(8 * MiB)
    assert hot.begin_fill(key(rank=1), 2 * MiB)
    assert not hot.begin_fill(key(rank=1), 2 * MiB)  # a second pull of the same view streams
    for rank in (2, 3, 4):
        assert hot.begin_fill(key(rank=rank), 2 * MiB)
    assert hot.used == 8 * MiB
    assert not hot.begin_fill(key(rank=5), MiB)  # no room, and evicting would not make it
    hot.end_fill(key(rank=1), None)  # a failed or damaged stream gives its room back
    assert hot.used == 6 * MiB and hot.entries() == 0
    assert hot.begin_fill(key(rank=5), MiB)


def test_dropping_a_federation_forgets_its_entries_and_fills() -> None:
    hot = HotViews(8 * MiB)
    assert fill(hot, key(federation="a"), MiB)
    assert fill(hot, key(federation="b"), MiB)
    assert hot.begin_fill(key(federation="a", rank=7), MiB)
    hot.drop(lambda k: k[0] == "a")
    assert hot.get(key(federation="a")) is None
    assert hot.get(key(federation="b")) is not None
    assert hot.used == MiB
    hot.end_fill(key(federation="a", rank=7), [b"x" * MiB])  # the fill was dropped: not kept
    assert hot.get(key(federation="a", rank=7)) is None and hot.used == MiB


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


def test_a_built_view_enters_memory_as_its_file_framed(tmp_path: Path) -> None:
    """The build frames the bytes it writes and hashes: the hot entry is the view file, cut at
    the server's chunk size, and the digest the pull checks is that of the file."""
    with threaded_server(tmp_path, chunk_size=1024) as server, ExitStack() as stack:
        hot = server.server.hub.hot_views
        stack.enter_context(AdminClient(server.target)).create_federation(
            federation_spec("b", MODULES, min_clients=1, max_rank=8)
        )
        client = stack.enter_context(RafloraClient(server.target, "b", "c"))
        client.join(rank=8, num_examples=10)
        pulled = client.pull()
        (held,) = hot.held()
        (path,) = (tmp_path / "federations/b/views/00000000").glob("rank-8-*.safetensors")
        stored = path.read_bytes()
        messages = hot.get(held)
        assert messages is not None and len(messages) == -(-len(stored) // 1024) > 1
        assert b"".join(bytes(data_of(m) or b"") for m in messages) == stored
        assert held[4] == hashlib.sha256(stored).hexdigest()
        assert pulled.tensors.keys() == load(stored).keys()
