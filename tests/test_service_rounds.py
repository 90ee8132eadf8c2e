"""Concurrent clients against the real server: every published round equals the engine's result.

Eight clients of ranks {2, 4, 8} (unequal examples and alphas) run five rounds in parallel
threads, each through its own SDK client and gRPC channel; they wait on the watch stream, never
poll. Each round's published state is compared with the engine run directly on the same uploads
(its one-shot path: the server closes each round from the uploads folded as they arrived).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from raflora.client_sdk import AdminClient, RafloraClient
from raflora.server.engine import AdapterSchema, StrategyConfig, lora_scaling, make_strategy
from raflora.server.storage import FileFederationStore
from raflora.server.testing import scrape, threaded_server

from .conftest import rel_err
from .helpers.adapters import engine_update
from .helpers.federations import every_client_spec

MODULES = {"layers.0.q": (24, 16), "layers.0.v": (12, 20), "layers.1.q": (24, 16)}
CLIENTS = [  # id, rank, examples, alpha
    ("alpha", 2, 30, 4.0),
    ("bravo", 2, 10, 8.0),
    ("charlie", 4, 25, 16.0),
    ("delta", 4, 12, 16.0),
    ("echo", 8, 40, 32.0),
    ("foxtrot", 8, 7, 8.0),
    ("golf", 4, 18, 8.0),
    ("hotel", 2, 22, 16.0),
]
ROUNDS = 5


def local_update(pulled: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A deterministic stand-in for local training: a seeded step away from what was pulled."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        for name, t in sorted(pulled.items())
    }


def run_client(
    target: str,
    federation: str,
    spec_: tuple[str, int, int, float],
    index: int,
    uploads: dict[tuple[int, str], dict[str, torch.Tensor]],
    lock: threading.Lock,
) -> list[int]:
    cid, rank, examples, alpha = spec_
    seen = []
    with RafloraClient(target, federation, cid) as client:
        info = client.join(rank=rank, num_examples=examples, lora_alpha=alpha)
        assert info.scale == pytest.approx(lora_scaling(alpha, rank))
        current = info.round
        for _ in range(ROUNDS):
            pulled = client.pull()
            assert pulled.round == current and pulled.rank == rank
            for module, (d_out, d_in) in MODULES.items():
                assert pulled.tensors[f"{module}.lora_A.weight"].shape == (rank, d_in)
                assert pulled.tensors[f"{module}.lora_B.weight"].shape == (d_out, rank)
            tensors = local_update(pulled.tensors, seed=1000 * current + index)
            result = client.push(tensors, round=current, num_examples=examples)
            assert result.round == current and not result.duplicate
            with lock:
                uploads[(current, cid)] = tensors
            status = client.wait_for_round(current, timeout=60)
            seen.append(status.round)
            current = status.round
    return seen


@pytest.mark.parametrize("strategy", ["raflora", "flexlora"])
def test_concurrent_clients_match_the_engine(tmp_path: Path, strategy: str) -> None:
    fed = f"fed-{strategy}"
    uploads: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    lock = threading.Lock()
    with threaded_server(tmp_path, fold_memory_mib=2048) as server:
        AdminClient(server.target).create_federation(
            every_client_spec(
                fed, MODULES, len(CLIENTS), strategy=strategy, max_rank=8, init_seed=7
            )
        )
        with ThreadPoolExecutor(len(CLIENTS)) as pool:
            futures = [
                pool.submit(run_client, server.target, fed, c, i, uploads, lock)
                for i, c in enumerate(CLIENTS)
            ]
            seen = [f.result(timeout=300) for f in futures]
        # Every round closed from the uploads folded as they arrived (docs/design.md §2.10);
        # the comparison below is against the engine's one-shot path.
        folded = [
            line
            for line in scrape(server.metrics_url).splitlines()
            if line.startswith(f'raflora_rounds_folded_total{{federation="{fed}"}}')
        ]
        assert folded == [f'raflora_rounds_folded_total{{federation="{fed}"}} {float(ROUNDS)}']
    assert all(s == list(range(1, ROUNDS + 1)) for s in seen)

    store = FileFederationStore(tmp_path / "federations" / fed)
    strategy_ = make_strategy(
        strategy,
        StrategyConfig(schema=AdapterSchema.from_shapes(MODULES), max_rank=8, seed=7),
    )
    state = strategy_.initial_state()
    for t in range(ROUNDS):
        updates = [
            engine_update(cid, rank, n, alpha, uploads[(t, cid)], MODULES)
            for cid, rank, n, alpha in sorted(CLIENTS)
        ]
        expected = strategy_.aggregate(state, updates)
        published = store.load_published(t + 1, AdapterSchema.from_shapes(MODULES))[0]
        for m in MODULES:
            assert rel_err(published.dense(m), expected.dense(m)) < 1e-5
        manifest = store.read_manifest(t + 1)
        assert sorted(u.client_id for u in manifest.uploads) == sorted(c[0] for c in CLIENTS)
        state = published


def test_a_rescaled_upload_cannot_erase_the_others_in_a_folded_round(tmp_path: Path) -> None:
    """An attacker sends its own directions as B·1e6, A·1e-6 (the same product, so every
    bound holds); three honest clients train in one shared subspace, so the round folds.
    Through the real server, the folded round must be the engine's one-shot result over all
    four (the per-column floor that keeps a batch-mate's directions is unit-tested in
    tests/test_folding.py)."""
    from raflora.client_sdk import lora_state_dict

    modules = {"layers.0.q": (256, 192)}
    fed, rank = "rescaled", 8
    g = torch.Generator().manual_seed(12)
    shared_B = torch.randn(256, rank, generator=g) * 0.01
    shared_A = torch.randn(rank, 192, generator=g) * 0.01

    def adapter(scale: float, own: bool) -> dict[str, torch.Tensor]:
        if own:  # directions nobody else has
            B, A = torch.randn(256, rank, generator=g) * 0.01, torch.randn(rank, 192, generator=g)
        else:  # the shared subspace, mixed differently by each client
            B = shared_B @ torch.randn(rank, rank, generator=g)
            A = torch.randn(rank, rank, generator=g) @ shared_A
        return lora_state_dict({"layers.0.q": (B * scale, A / scale)})

    uploads = {"attacker": adapter(1e6, True), **{c: adapter(1.0, False) for c in "abc"}}
    with threaded_server(tmp_path, fold_memory_mib=2048) as server:
        AdminClient(server.target).create_federation(
            every_client_spec(fed, modules, len(uploads), max_rank=rank, init_seed=3)
        )
        for cid, tensors in uploads.items():
            with RafloraClient(server.target, fed, cid) as client:
                client.join(rank=rank, num_examples=10, lora_alpha=16.0)
                client.push(tensors, round=0, num_examples=10)
        with RafloraClient(server.target, fed, "a") as client:
            client.wait_for_round(0, timeout=60)
        folded = [
            line
            for line in scrape(server.metrics_url).splitlines()
            if line.startswith(f'raflora_rounds_folded_total{{federation="{fed}"}}')
        ]
    assert folded == [f'raflora_rounds_folded_total{{federation="{fed}"}} 1.0']
    schema = AdapterSchema.from_shapes(modules)
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=rank, seed=3))
    expected = strategy.aggregate(
        strategy.initial_state(),
        [engine_update(c, rank, 10, 16.0, t, modules) for c, t in sorted(uploads.items())],
    )
    store = FileFederationStore(tmp_path / "federations" / fed)
    published = store.load_published(1, schema)[0]
    assert rel_err(published.dense("layers.0.q"), expected.dense("layers.0.q")) < 1e-4
