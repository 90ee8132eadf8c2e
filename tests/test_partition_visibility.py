"""Operators see how many clients hold each rank partition, and are warned when too few do."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import torch

from raflora.client_sdk import AdminClient, RafloraClient, pb
from raflora.server.engine import partition_holders
from raflora.server.testing import threaded_server
from raflora.v1 import aggregation_pb2_grpc as pb_grpc

from .helpers.adapters import factors
from .helpers.federations import every_client_spec, spec
from .helpers.metrics import samples

MODULES = {"m": (12, 10)}
CLIENTS = [("a", 2, 30), ("b", 2, 10), ("c", 4, 20), ("d", 8, 40)]


def test_partition_holders_definition() -> None:
    p = torch.tensor([0.3, 0.1, 0.2, 0.4], dtype=torch.float64)
    got = partition_holders([2, 2, 4, 8], p)
    assert [(r, c) for r, c, _ in got] == [(2, 4), (4, 2), (8, 1)]
    assert [w for _, _, w in got] == pytest.approx([1.0, 0.6, 0.4])


def test_metrics_status_and_warning_event(tmp_path: Path) -> None:
    with threaded_server(tmp_path) as server:
        AdminClient(server.target).create_federation(
            every_client_spec("vis", MODULES, 4, max_rank=8, min_partition_holders=2)
        )
        events: list[pb.RoundEvent] = []
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AggregationServiceStub(channel)
            stream = stub.WatchRounds(pb.WatchRoundsRequest(federation_id="vis"), timeout=60)

            def collect() -> None:
                for event in stream:
                    events.append(event)
                    if event.type == pb.ROUND_EVENT_TYPE_PUBLISHED:
                        return

            watcher = threading.Thread(target=collect)
            watcher.start()
            for cid, rank, n in CLIENTS:
                with RafloraClient(server.target, "vis", cid) as client:
                    client.join(rank=rank, num_examples=n)
                    client.push(factors(rank, rank + n, MODULES), round=0, num_examples=n)
            watcher.join(60)
            stream.cancel()
        published = [e for e in events if e.type == pb.ROUND_EVENT_TYPE_PUBLISHED]
        assert len(published) == 1
        (warning,) = published[0].warnings  # only partition 3 (rank 8) has a single holder
        assert "partition 3" in warning and "1 client" in warning and "40%" in warning
        energy = published[0].status.energy
        assert list(energy.partition_holders) == [4, 2, 1]
        assert list(energy.partition_holder_weight) == pytest.approx([1.0, 0.6, 0.4])
        holders = {
            (name, dict(labels)["upper_rank"]): v
            for (name, labels), v in samples(server.metrics_url).items()
            if name.startswith("raflora_rank_partition_holder")
            and dict(labels)["federation"] == "vis"
        }
        assert holders[("raflora_rank_partition_holders", "8")] == 1
        assert holders[("raflora_rank_partition_holders", "2")] == 4
        assert holders[("raflora_rank_partition_holder_weight", "4")] == pytest.approx(0.6)


def test_older_rounds_can_be_pulled(tmp_path: Path) -> None:
    """An evaluator that falls behind still reads every round, exactly as it was published."""
    from raflora.client_sdk import FailedPreconditionError

    with threaded_server(tmp_path) as server:
        AdminClient(server.target).create_federation(spec("old", MODULES, max_rank=8))
        with RafloraClient(server.target, "old", "solo") as client:
            client.join(rank=4, num_examples=5)
            seen = {}
            for t in range(3):
                pulled = client.pull()
                assert pulled.round == t
                seen[t] = pulled.tensors
                bumped = {k: v + 0.1 * (t + 1) for k, v in pulled.tensors.items()}
                client.push(bumped, round=t, num_examples=5)
                client.wait_for_round(t, timeout=30)
            for t in range(3):
                again = client.pull(round=t)
                assert again.round == t
                assert all(torch.equal(again.tensors[k], seen[t][k]) for k in seen[t])
            assert client.pull().round == 3
            assert float(client.pull(round=0).tensors["m.lora_B.weight"].abs().sum()) == 0
            with pytest.raises(FailedPreconditionError) as info:
                client.pull(round=9)
            assert info.value.field == "round"
