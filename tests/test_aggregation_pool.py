"""Federations don't queue behind each other (issue 13, part 4), through the real server.

A "heavy" federation's aggregation is held on a gate (as a 70B-class round would hold a worker
for minutes). With ``aggregation_workers = 2`` a light federation's round publishes meanwhile;
with the default of 1 it waits, and ``raflora_aggregation_queue_seconds`` (scraped over HTTP)
shows the wait apart from the compute time.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from raflora.client_sdk import AdminClient, RafloraClient, lora_state_dict
from raflora.server.testing import ThreadedServer, scrape, threaded_server

from .helpers.federations import every_client_spec

MODULES = {"layers.0.q": (16, 12)}


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return lora_state_dict(
        {
            "layers.0.q": (
                torch.randn(16, 4, generator=g) * 0.1,
                torch.randn(4, 12, generator=g) * 0.1,
            )
        }
    )


def hold_aggregation(server: ThreadedServer, federation: str) -> threading.Event:
    """Make ``federation``'s next aggregation wait on the returned gate (in its worker)."""
    runtime = server.server.hub.get(federation)
    gate = threading.Event()
    original = runtime.publisher.run

    def held(*args: Any) -> Any:
        assert gate.wait(60)
        return original(*args)

    runtime.publisher.run = held  # type: ignore[method-assign,assignment]
    return gate


def push_one(target: str, federation: str, seed: int) -> RafloraClient:
    client = RafloraClient(target, federation, f"c-{federation}")
    client.join(rank=4, num_examples=10, lora_alpha=8.0)
    client.push(adapter(seed), round=0, num_examples=10)
    return client


def queue_seconds(metrics_url: str, federation: str) -> float:
    text = scrape(metrics_url)
    match = re.search(
        rf'raflora_aggregation_queue_seconds_sum{{federation="{federation}"}} (\S+)', text
    )
    assert match, "no queue-wait series"
    return float(match.group(1))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_heavy_federation_does_not_hold_back_another(tmp_path: Path, workers: int) -> None:
    with threaded_server(tmp_path, aggregation_workers=workers) as server:
        with AdminClient(server.target) as admin:
            for fed in ("heavy", "light"):
                admin.create_federation(every_client_spec(fed, MODULES, 1, max_rank=4))
        gate = hold_aggregation(server, "heavy")
        heavy = push_one(server.target, "heavy", 1)  # closes the round: its worker waits
        light = push_one(server.target, "light", 2)
        try:
            if workers == 2:
                assert light.wait_for_round(0, timeout=30).round == 1  # while heavy is held
                assert heavy.status().round == 0
                gate.set()
            else:
                time.sleep(1.0)
                assert light.status().round == 0  # queued behind the held aggregation
                gate.set()
                assert light.wait_for_round(0, timeout=30).round == 1
            assert heavy.wait_for_round(0, timeout=30).round == 1
            waited = queue_seconds(server.metrics_url, "light")
            if workers == 2:
                assert waited < 0.5
            else:
                assert waited >= 1.0  # the second it was held, apart from compute
        finally:
            gate.set()
            heavy.close()
            light.close()
