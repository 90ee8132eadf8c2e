"""The round state machine on its own: FederationRuntime over the in-memory store.

No server, no sockets, no disk: quorum, deadline, late and duplicate pushes, the trust rules of
join and push, quarantine and retry after a failed aggregation, and resume. Each published
state is compared with the engine run independently on the same uploads.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import torch
from safetensors.torch import save

from raflora.server.config import FederationConfig
from raflora.server.engine import AdapterSchema, make_strategy
from raflora.server.engine.compression import CompressedAggregation
from raflora.server.errors import (
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from raflora.server.metrics import ServerMetrics
from raflora.server.rounds import EventType, FederationRuntime, Phase, RuntimeLimits
from raflora.server.storage import MemoryFederationStore
from raflora.v1.wire import ErrorReason
from tests.helpers.adapters import engine_update, factors

MODULES = {"q": (8, 6), "v": (5, 6)}
SCHEMA = AdapterSchema.from_shapes(MODULES)
T = TypeVar("T")


def config(**overrides: Any) -> FederationConfig:
    data: dict[str, Any] = {
        "federation_id": "fed",
        "modules": [{"name": n, "d_out": o, "d_in": i} for n, (o, i) in MODULES.items()],
        "strategy": "raflora",
        "max_rank": 4,
        "min_clients": 2,
    }
    return FederationConfig.parse({**data, **overrides})


class Harness:
    """A runtime on a running event loop, with its in-memory store and an event log."""

    def __init__(
        self,
        cfg: FederationConfig,
        store: MemoryFederationStore | None = None,
        limits: RuntimeLimits | None = None,
    ) -> None:
        self.config = cfg
        self.store = store or MemoryFederationStore()
        self.executor = ThreadPoolExecutor(1)
        if self.store.config is None:
            self.store.create(cfg.model_dump(mode="json"))
        self.runtime = FederationRuntime(
            cfg,
            self.store,
            ServerMetrics(),
            self.executor,
            "cpu",
            limits or RuntimeLimits(),
            fold_executor=self.executor,  # one thread: a test can hold folds and closes back
            preload_executor=self.executor,  # and the read-backs
        )
        self.events: list[EventType] = []
        self.published_rounds: list[int] = []

    async def start(self) -> None:
        self.runtime.resume()
        self.runtime.start()
        subscription = self.runtime.subscribe()

        async def record() -> None:
            while True:
                event = await subscription.next()
                if event is not None:
                    self.events.append(event.type)
                    if event.type is EventType.PUBLISHED:
                        self.published_rounds.append(event.snapshot.round)

        self._recorder = asyncio.get_running_loop().create_task(record())

    async def stop(self) -> None:
        self._recorder.cancel()
        await self.runtime.close()
        self.executor.shutdown()

    async def push(
        self, client: str, data: bytes, *, rank: int, examples: int = 10, round_: int = 0
    ) -> Any:
        ticket = self.runtime.begin_push(
            client, round_, rank, examples, 0.0, len(data), hashlib.sha256(data).hexdigest()
        )
        for start in range(0, len(data), 256):
            await ticket.write(data[start : start + 256])
        return await self.runtime.finish_push(ticket)

    async def published(self, round_: int, timeout: float = 30) -> None:
        async def wait() -> None:  # until the publication's event went out
            while max(self.published_rounds, default=0) < round_:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(wait(), timeout)


# The close reads every upload back instead of using the ones folded as they arrived (the
# default); FOLDING turns folding on, as the ``fold_memory_mib`` setting does.
ONE_SHOT = RuntimeLimits()
FOLDING = RuntimeLimits(fold_memory_bytes=2 << 30)
# Uploads read back while the round goes on (``preload_memory_mib``, on in the server).
PRELOADING = RuntimeLimits(preload_memory_bytes=1 << 20)


def run(
    cfg: FederationConfig,
    scenario: Callable[[Harness], Awaitable[T]],
    limits: RuntimeLimits | None = None,
) -> T:
    async def main() -> T:
        h = Harness(cfg, limits=limits)
        await h.start()
        try:
            return await scenario(h)
        finally:
            await h.stop()

    return asyncio.run(main())


def upload(rank: int, seed: int) -> bytes:
    return save(factors(rank, seed, MODULES))


def test_a_round_closes_at_quorum_and_equals_the_engine() -> None:
    async def scenario(h: Harness) -> None:
        await h.runtime.join("a", 2, 30, 0.0)
        await h.runtime.join("b", 4, 10, 0.0)
        first = await h.push("a", upload(2, 1), rank=2, examples=30)
        assert (first.uploads_in_round, h.runtime.phase) == (1, Phase.COLLECTING)
        await h.push("b", upload(4, 2), rank=4, examples=10)
        await h.published(1)
        cfg = h.config
        strategy = make_strategy("raflora", cfg.strategy_config("cpu"))
        expected = strategy.aggregate(
            strategy.initial_state(),
            [
                engine_update("a", 2, 30, 16.0, factors(2, 1, MODULES), MODULES),
                engine_update("b", 4, 10, 16.0, factors(4, 2, MODULES), MODULES),
            ],
        )
        for m in MODULES:
            assert torch.allclose(h.runtime.state.dense(m), expected.dense(m), atol=1e-5)
        assert folded_rounds(h) == 1  # the close used the uploads folded as they arrived
        assert h.runtime.manifest is not None
        shares = {u.client_id: u.weight_share for u in h.runtime.manifest.uploads}
        assert shares == pytest.approx({"a": 0.75, "b": 0.25})
        assert EventType.PUBLISHED in h.events

    run(config(), scenario, FOLDING)


def test_deadline_closes_a_round_with_min_clients() -> None:
    async def scenario(h: Harness) -> None:
        await h.runtime.join("a", 2, 10, 0.0)
        await h.push("a", upload(2, 1), rank=2)
        await h.published(1, timeout=10)

    run(config(min_clients=1, expected_clients=3, deadline_seconds=0.2), scenario)


def test_late_duplicate_and_conflicting_pushes() -> None:
    async def scenario(h: Harness) -> None:
        for c in ("a", "b", "c"):
            await h.runtime.join(c, 2, 10, 0.0)
        a = upload(2, 1)
        await h.push("a", a, rank=2)
        again = await h.push("a", a, rank=2)  # an identical re-push: the ack was lost
        assert again.duplicate and again.uploads_in_round == 1
        with pytest.raises(AlreadyExistsError) as conflict:
            await h.push("a", upload(2, 9), rank=2)
        assert conflict.value.reason == ErrorReason.UPLOAD_CONFLICT
        await h.push("b", upload(2, 2), rank=2)
        await h.published(1)
        # The push that closed the round is repeated after the round closed: still a duplicate.
        late_again = await h.push("a", a, rank=2, round_=0)
        assert late_again.duplicate and late_again.uploads_in_round == 2
        with pytest.raises(FailedPreconditionError) as late:
            await h.push("c", upload(2, 3), rank=2, round_=0)
        assert late.value.reason == ErrorReason.ROUND_CLOSED
        with pytest.raises(FailedPreconditionError) as early:
            await h.push("c", upload(2, 3), rank=2, round_=5)
        assert early.value.reason == ErrorReason.ROUND_NOT_OPEN

    run(config(), scenario)


def test_terms_are_fixed_at_join() -> None:
    async def scenario(h: Harness) -> None:
        await h.runtime.join("a", 2, 100, 0.0)
        data = upload(2, 1)
        sha = hashlib.sha256(data).hexdigest()
        with pytest.raises(InvalidArgumentError, match="exceeds the 100 examples") as big:
            h.runtime.begin_push("a", 0, 2, 2**63 - 1, 0.0, len(data), sha)
        assert big.value.field == "num_examples"
        with pytest.raises(InvalidArgumentError) as alpha:
            h.runtime.begin_push("a", 0, 2, 10, 1e300, len(data), sha)
        assert alpha.value.field == "lora_alpha"
        await h.push("a", data, rank=2, examples=100)
        with pytest.raises(FailedPreconditionError) as locked:
            await h.runtime.join("a", 4, 100, 0.0)  # with an upload in the open round
        assert locked.value.reason == ErrorReason.JOIN_LOCKED
        with pytest.raises(InvalidArgumentError, match="max_examples_per_client"):
            await h.runtime.join("b", 2, 10**9, 0.0)

    run(config(max_examples_per_client=1000), scenario)


@pytest.mark.parametrize("alpha", [1e300, 5e-324, float("inf"), -1.0])
def test_alphas_whose_scale_would_over_or_underflow_are_refused_at_join(alpha: float) -> None:
    async def scenario(h: Harness) -> None:
        with pytest.raises(InvalidArgumentError) as refused:
            await h.runtime.join("a", 2, 10, alpha)
        assert refused.value.field == "lora_alpha"
        assert h.runtime.clients == {}

    run(config(), scenario)


@pytest.mark.parametrize(
    ("dtype", "value", "field"),
    [
        (torch.float64, 1e300, "q.lora_A.weight"),  # finite in fp64, Inf in fp32
        (torch.float32, 1e38, "q.lora_B.weight"),  # finite, Inf once scaled by s
        (torch.float32, 1e7, "q"),  # finite everywhere, beyond the norm bound
    ],
)
def test_uploads_that_would_poison_aggregation_are_refused_at_push(
    dtype: torch.dtype, value: float, field: str
) -> None:
    async def scenario(h: Harness) -> None:
        await h.runtime.join("a", 2, 10, 64.0)  # scale 32
        tensors = {k: v.to(dtype) for k, v in factors(2, 1, MODULES).items()}
        target = "q.lora_A.weight" if field == "q.lora_A.weight" else "q.lora_B.weight"
        tensors[target][0, 0] = value
        with pytest.raises(Exception) as refused:
            await h.push("a", save(tensors), rank=2)
        assert getattr(refused.value, "field", None) == field
        assert h.runtime.uploads == {}
        await h.runtime.join("b", 2, 10, 0.0)
        await h.push("b", upload(2, 2), rank=2)  # the others go on

    run(config(min_clients=2), scenario)


def test_payload_size_and_checksum_are_checked_before_anything_is_kept() -> None:
    async def scenario(h: Harness) -> None:
        await h.runtime.join("a", 2, 10, 0.0)
        data = upload(2, 1)
        sha = hashlib.sha256(data).hexdigest()
        ticket = h.runtime.begin_push("a", 0, 2, 10, 0.0, len(data), sha)
        await ticket.write(data[:-1])
        with pytest.raises(DataLossError) as short:
            await h.runtime.finish_push(ticket)
        assert short.value.reason == ErrorReason.SIZE_MISMATCH
        ticket = h.runtime.begin_push("a", 0, 2, 10, 0.0, len(data), "0" * 64)
        await ticket.write(data)
        with pytest.raises(DataLossError) as bad:
            await h.runtime.finish_push(ticket)
        assert bad.value.reason == ErrorReason.CHECKSUM_MISMATCH
        assert h.runtime.uploads == {} and h.store.uploads == {}

    run(config(), scenario)


def test_push_attempts_are_bounded_per_round() -> None:
    async def scenario(h: Harness) -> None:
        await h.runtime.join("a", 2, 10, 0.0)
        for _ in range(10):
            with pytest.raises(InvalidArgumentError):
                h.runtime.begin_push("a", 0, 2, 10, 0.0, 10, "nothex")
        with pytest.raises(ResourceExhaustedError) as limit:
            h.runtime.begin_push("a", 0, 2, 10, 0.0, 10, "0" * 64)
        assert limit.value.reason == ErrorReason.PUSH_LIMIT

    run(config(), scenario)


async def join_three_push_two(h: Harness) -> None:
    """a, b and c join at rank 2; a and b push (seeds 1 and 2); c's push will close the round."""
    for c in ("a", "b", "c"):
        await h.runtime.join(c, 2, 10, 0.0)
    await h.push("a", upload(2, 1), rank=2)
    await h.push("b", upload(2, 2), rank=2)


def flip_stored_bit(h: Harness, client: str) -> None:
    """A bit flip at rest in an acknowledged upload of round 0."""
    flip_stored_bit_in(h.store, client)


def flip_stored_bit_in(store: MemoryFederationStore, client: str) -> None:
    record, data = store.uploads[0][client]
    flipped = bytearray(data)
    flipped[-3] ^= 1
    store.uploads[0][client] = (record, bytes(flipped))


def assert_published_without_b(h: Harness) -> None:
    """Round 1 holds a's and c's uploads, b's was quarantined, and equals the engine's."""
    assert h.runtime.manifest is not None
    assert sorted(u.client_id for u in h.runtime.manifest.uploads) == ["a", "c"]
    assert h.runtime.manifest.quarantined == ("b",)
    expected = one_shot_state([("a", 2, 1), ("c", 2, 3)], h.config)
    for m in MODULES:
        assert torch.allclose(h.runtime.state.dense(m), expected[m], atol=1e-5)


def test_a_corrupt_stored_upload_is_quarantined_and_the_round_goes_on() -> None:
    async def scenario(h: Harness) -> None:
        await join_three_push_two(h)
        flip_stored_bit(h, "b")
        await h.push("c", upload(2, 3), rank=2)
        await h.published(1)
        assert h.runtime.manifest is not None
        assert sorted(u.client_id for u in h.runtime.manifest.uploads) == ["a", "c"]
        assert h.runtime.manifest.quarantined == ("b",)
        assert [r.client_id for r, _ in h.store.quarantined] == ["b"]
        assert EventType.QUARANTINED in h.events
        assert folded_rounds(h) == 0

    run(config(min_clients=3), scenario, ONE_SHOT)


def folded_rounds(h: Harness) -> float:
    value = h.runtime.metrics.registry.get_sample_value(
        "raflora_rounds_folded_total", {"federation": h.runtime.id}
    )
    assert value is not None
    return value


def one_shot_state(
    specs: list[tuple[str, int, int]], cfg: FederationConfig
) -> dict[str, torch.Tensor]:
    strategy = make_strategy(cfg.strategy, cfg.strategy_config("cpu"))
    updates = [
        engine_update(c, rank, 10, 16.0, factors(rank, seed, MODULES), MODULES)
        for c, rank, seed in specs
    ]
    state = strategy.aggregate(strategy.initial_state(), updates)
    return {m: state.dense(m) for m in MODULES}


def test_a_bit_flip_at_rest_after_the_fold_never_reaches_the_round() -> None:
    """The fold read the acknowledged bytes back against their digest; they are the round's."""

    async def scenario(h: Harness) -> None:
        await join_three_push_two(h)
        assert h.runtime.folder is not None
        await asyncio.wrap_future(h.runtime.folder._futures["b"])
        flip_stored_bit(h, "b")
        await h.push("c", upload(2, 3), rank=2)
        await h.published(1)
        assert h.runtime.manifest is not None
        assert sorted(u.client_id for u in h.runtime.manifest.uploads) == ["a", "b", "c"]
        assert h.runtime.manifest.quarantined == ()
        expected = one_shot_state([("a", 2, 1), ("b", 2, 2), ("c", 2, 3)], h.config)
        for m in MODULES:
            assert torch.allclose(h.runtime.state.dense(m), expected[m], atol=1e-5)
        assert folded_rounds(h) == 1

    run(config(min_clients=3), scenario, FOLDING)


def test_an_upload_that_cannot_be_folded_sends_the_close_one_shot() -> None:
    """A flip before the fold: the fold fails its digest, the close reads everything back,
    quarantines the damaged upload and publishes the rest."""

    async def scenario(h: Harness) -> None:
        for c in ("a", "b", "c"):
            await h.runtime.join(c, 2, 10, 0.0)
        gate = threading.Event()
        h.executor.submit(gate.wait, 10)  # the one aggregation thread is busy: no fold runs
        await h.push("a", upload(2, 1), rank=2)
        await h.push("b", upload(2, 2), rank=2)
        flip_stored_bit(h, "b")
        gate.set()
        await h.push("c", upload(2, 3), rank=2)
        await h.published(1)
        assert_published_without_b(h)
        assert folded_rounds(h) == 0

    run(config(min_clients=3), scenario, FOLDING)


class CountingReads(MemoryFederationStore):
    """The in-memory store, counting the uploads read back (by whom: the thread's name)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def read_upload(self, record: Any, schema: AdapterSchema) -> Any:
        self.reads.append(record.client_id)
        return super().read_upload(record, schema)


def run_with(
    store: MemoryFederationStore, cfg: FederationConfig, scenario: Any, limits: Any
) -> None:
    async def main() -> None:
        h = Harness(cfg, store=store, limits=limits)
        await h.start()
        try:
            await scenario(h)
        finally:
            await h.stop()

    asyncio.run(main())


def test_the_close_aggregates_the_bytes_the_pushes_checked() -> None:
    """Each push keeps the chunks it hashed and checked, and they are parsed for the close
    once it is acknowledged: nobody reads an upload back, and a bit flip at rest after the
    acknowledgement never reaches the round."""
    store = CountingReads()

    async def scenario(h: Harness) -> None:
        await join_three_push_two(h)
        assert h.runtime.preload is not None
        assert h.runtime.preload.take(h.runtime.uploads["b"]) is not None  # waits for it
        flip_stored_bit(h, "b")
        await h.push("c", upload(2, 3), rank=2)
        await h.published(1)
        assert h.runtime.manifest is not None
        assert h.runtime.manifest.quarantined == ()
        expected = one_shot_state([("a", 2, 1), ("b", 2, 2), ("c", 2, 3)], h.config)
        for m in MODULES:
            assert torch.allclose(h.runtime.state.dense(m), expected[m], atol=1e-5)
        assert store.reads == []  # the close read none back
        assert h.runtime.preload_budget.used == 0  # the published round's uploads forgotten

    run_with(store, config(min_clients=3), scenario, PRELOADING)


def test_uploads_acknowledged_before_a_restart_are_read_back_and_judged_by_the_close() -> None:
    """After a restart the acknowledged uploads are read back from the store in the
    background; one damaged at rest fails its digest there, the close reads it again,
    quarantines it and publishes the rest."""
    store = CountingReads()

    async def before(h: Harness) -> None:
        await join_three_push_two(h)

    async def after(h: Harness) -> None:
        await h.push("c", upload(2, 3), rank=2)
        await h.published(1)
        assert_published_without_b(h)
        # a and b read back after the restart, b again by the close; c's push kept its bytes
        assert sorted(store.reads) == ["a", "b", "b"]

    cfg = config(min_clients=3)
    run_with(store, cfg, before, PRELOADING)
    flip_stored_bit_in(store, "b")
    run_with(store, cfg, after, PRELOADING)


def test_uploads_past_the_budget_are_read_by_the_close() -> None:
    """A budget of one upload: the first push keeps its bytes, the others stream as usual and
    the close reads them; the round is the same either way."""
    store = CountingReads()
    one_upload = len(upload(2, 1))

    async def scenario(h: Harness) -> None:
        await join_three_push_two(h)
        assert h.runtime.preload is not None
        assert h.runtime.preload.held == 1
        assert h.runtime.preload_budget.used == one_upload
        assert h.runtime.preload.take(h.runtime.uploads["b"]) is None  # not held: the close's
        await h.push("c", upload(2, 3), rank=2)
        await h.published(1)
        expected = one_shot_state([("a", 2, 1), ("b", 2, 2), ("c", 2, 3)], h.config)
        for m in MODULES:
            assert torch.allclose(h.runtime.state.dense(m), expected[m], atol=1e-5)
        assert sorted(store.reads) == ["b", "c"]  # a was kept by its push
        assert h.runtime.preload_budget.used == 0

    run_with(store, config(min_clients=3), scenario, RuntimeLimits(preload_memory_bytes=one_upload))


def test_an_upload_above_the_per_upload_cap_streams_as_before() -> None:
    """Room in the budget, but the upload is larger than ``preload_max_upload_bytes``: its
    push keeps nothing (a large adapter streams in bounded memory) and the close reads it."""
    store = CountingReads()
    size = len(upload(2, 1))
    limits = RuntimeLimits(preload_memory_bytes=1 << 20, preload_max_upload_bytes=size - 1)

    async def scenario(h: Harness) -> None:
        await join_three_push_two(h)
        assert h.runtime.preload is not None and h.runtime.preload.held == 0
        assert h.runtime.preload_budget.used == 0
        await h.push("c", upload(2, 3), rank=2)
        await h.published(1)
        assert sorted(store.reads) == ["a", "b", "c"]  # all by the close

    run_with(store, config(min_clients=3), scenario, limits)


def test_a_refused_push_gives_its_reservation_back() -> None:
    """A push that fails its checks (or its digest) holds room for its payload only while it
    streams: after the refusal the budget is whole again, and honest pushes keep theirs."""

    async def scenario(h: Harness) -> None:
        for c in ("a", "b"):
            await h.runtime.join(c, 2, 10, 0.0)
        good = upload(2, 1)
        ticket = h.runtime.begin_push("a", 0, 2, 10, 0.0, len(good), "0" * 64)
        assert h.runtime.preload_budget.used == len(good)  # reserved at the header
        for start in range(0, len(good), 256):
            await ticket.write(good[start : start + 256])
        with pytest.raises(DataLossError):
            await h.runtime.finish_push(ticket)  # the digest does not match: refused
        assert h.runtime.preload_budget.used == 0
        await h.push("a", good, rank=2)
        await h.push("b", upload(2, 2), rank=2)
        await h.published(1)
        assert h.runtime.preload_budget.used == 0

    run(config(min_clients=2), scenario, PRELOADING)


def test_a_folded_close_that_fails_falls_back_to_one_shot(
    monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever breaks on the folded path, the round is aggregated one-shot (which alone
    quarantines): a fault there can neither stall the round nor cost an honest upload."""

    async def scenario(h: Harness) -> None:
        def broken(self: CompressedAggregation, updates: Any) -> Any:
            raise RuntimeError("a bug in the folded path")

        monkeypatch.setattr(CompressedAggregation, "aggregate", broken)
        for c in ("a", "b"):
            await h.runtime.join(c, 2, 10, 0.0)
        await h.push("a", upload(2, 1), rank=2)
        await h.push("b", upload(2, 2), rank=2)
        await h.published(1, timeout=10)
        assert EventType.FAILED not in h.events
        assert h.runtime.manifest is not None and h.runtime.manifest.quarantined == ()
        expected = one_shot_state([("a", 2, 1), ("b", 2, 2)], h.config)
        for m in MODULES:
            assert torch.allclose(h.runtime.state.dense(m), expected[m], atol=1e-5)
        assert folded_rounds(h) == 0
        assert "the folded close failed" in caplog.text

    caplog.set_level("WARNING", logger="raflora.server")
    run(config(min_clients=2), scenario, FOLDING)


def test_a_failed_aggregation_is_retried_when_the_round_changes(monkeypatch: Any) -> None:
    async def scenario(h: Harness) -> None:
        calls = {"n": 0}
        original = h.runtime.strategy.aggregate

        def flaky(state: Any, updates: Any, private: Any = None, map_modules: Any = None) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(5, "I/O error")  # the round as a whole, not one upload
            return original(state, updates, private, map_modules=map_modules)

        monkeypatch.setattr(h.runtime.strategy, "aggregate", flaky)  # the one-shot path's
        monkeypatch.setattr("raflora.server.rounds.runtime._RETRY_INITIAL_SECONDS", 0.05)
        h.runtime._retry_delay = 0.05
        await h.runtime.join("a", 2, 10, 0.0)
        await h.push("a", upload(2, 1), rank=2)
        await h.published(1, timeout=10)
        assert EventType.FAILED in h.events and calls["n"] >= 2

    run(config(min_clients=1), scenario, ONE_SHOT)


def test_a_retry_after_a_committed_publication_serves_what_was_stored(monkeypatch: Any) -> None:
    """The store commits the round, then its directory fsync fails: the runtime retries, and
    the store keeps the round it has. The runtime must serve that state, not its own second
    aggregation (for a private federation a second noise draw: two releases, one accounted)."""

    async def scenario(h: Harness) -> None:
        original = h.store.publish
        calls = {"n": 0}

        def commit_then_fail(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            manifest = original(*args, **kwargs)
            if calls["n"] == 1:
                raise OSError(5, "fsync of the rounds directory failed")
            return manifest

        monkeypatch.setattr(h.store, "publish", commit_then_fail)
        monkeypatch.setattr("raflora.server.rounds.runtime._RETRY_INITIAL_SECONDS", 0.05)
        h.runtime._retry_delay = 0.05
        await h.runtime.join("a", 2, 10, 0.0)
        await h.runtime.join("b", 4, 10, 0.0)
        await h.push("a", upload(2, 1), rank=2)
        await h.push("b", upload(4, 2), rank=4)
        await h.published(1, timeout=10)
        assert calls["n"] == 2 and EventType.FAILED in h.events
        stored, manifest = h.store.load_published(1, h.runtime.schema)
        for m in MODULES:
            assert torch.equal(h.runtime.state.dense(m), stored.dense(m).to(torch.float32))
        assert h.runtime.manifest == manifest
        assert h.runtime.manifest is not None and h.runtime.manifest.privacy is not None
        assert h.runtime.manifest.privacy.rounds == 1

    cfg = config(
        strategy="raflora_ha",
        weighting="uniform",
        privacy={"noise_multiplier": 1.0, "clip_norm": 5.0},
    )
    run(cfg, scenario)


def test_resume_restores_round_clients_and_uploads() -> None:
    store = MemoryFederationStore()
    cfg = config(min_clients=2)

    async def first() -> None:
        h = Harness(cfg, store)
        await h.start()
        await h.runtime.join("a", 2, 10, 0.0)
        await h.runtime.join("b", 2, 10, 0.0)
        await h.push("a", upload(2, 1), rank=2)
        await h.push("b", upload(2, 2), rank=2)
        await h.published(1)
        await h.push("a", upload(2, 3), rank=2, round_=1)
        await h.stop()

    async def second() -> None:
        h = Harness(cfg, store, FOLDING)
        await h.start()
        assert h.runtime.state.round == 1
        assert sorted(h.runtime.clients) == ["a", "b"]
        assert sorted(h.runtime.uploads) == ["a"]
        assert h.runtime.energy is not None  # from the manifest, not recomputed
        await h.push("b", upload(2, 4), rank=2, round_=1)
        await h.published(2)
        assert folded_rounds(h) == 1  # a's upload from before the restart was folded again
        await h.stop()

    asyncio.run(first())
    asyncio.run(second())


def test_a_corrupt_published_state_degrades_only_that_federation() -> None:
    store = MemoryFederationStore()
    cfg = config(min_clients=1)

    async def first() -> None:
        h = Harness(cfg, store)
        await h.start()
        await h.runtime.join("a", 2, 10, 0.0)
        await h.push("a", upload(2, 1), rank=2)
        await h.published(1)
        await h.stop()

    async def second() -> None:
        published = store.rounds[1]
        damaged = bytearray(published.state_bytes)
        damaged[-5] ^= 1
        published.state_bytes = bytes(damaged)
        h = Harness(cfg, store)
        await h.start()  # resumes: the server would still start
        assert "corrupt" in h.runtime.degraded
        with pytest.raises(UnavailableError) as refused:
            await h.runtime.view_for("a")
        assert refused.value.reason == ErrorReason.FEDERATION_DEGRADED
        await h.stop()

    asyncio.run(first())
    asyncio.run(second())


def test_a_weight_share_cap_bounds_a_large_client() -> None:
    async def scenario(h: Harness) -> None:
        await h.runtime.join("big", 2, 1_000_000, 0.0)
        await h.runtime.join("s1", 2, 10, 0.0)
        await h.runtime.join("s2", 2, 30, 0.0)
        await h.push("big", upload(2, 1), rank=2, examples=1_000_000)
        await h.push("s1", upload(2, 2), rank=2, examples=10)
        await h.push("s2", upload(2, 3), rank=2, examples=30)
        await h.published(1)
        assert h.runtime.manifest is not None
        shares = {u.client_id: u.weight_share for u in h.runtime.manifest.uploads}
        # 0.5 to the capped client, the rest split 10:30 among the others.
        assert shares == pytest.approx({"big": 0.5, "s1": 0.125, "s2": 0.375})

    run(config(min_clients=3, max_weight_share=0.5), scenario)


def test_a_policy_draws_its_selection_once_expected_clients_joined() -> None:
    """Round 0 selects over the whole federation, not among the first clients to connect."""

    async def scenario(h: Harness) -> None:
        await h.runtime.join("a", 2, 10, 0.0)
        await h.runtime.join("b", 2, 10, 0.0)
        assert h.runtime.snapshot().selection_pending
        with pytest.raises(FailedPreconditionError) as pending:
            await h.push("a", upload(2, 1), rank=2)
        assert pending.value.reason == ErrorReason.SELECTION_PENDING
        await h.runtime.join("c", 4, 10, 0.0)
        await h.runtime.join("d", 4, 10, 0.0)
        snapshot = h.runtime.snapshot()
        assert not snapshot.selection_pending
        assert snapshot.selected is not None and len(snapshot.selected) == 2
        assert EventType.SELECTED in h.events or await _eventually(h, EventType.SELECTED)
        # The draw is the pure, seeded function of the policy, the round and all four clients.
        from raflora.server.rounds.selection import select

        expected = select(h.config.participation, 0, list(h.runtime.clients.values()))
        assert snapshot.selected == expected.selected
        left_out = sorted({"a", "b", "c", "d"} - snapshot.selected)
        with pytest.raises(FailedPreconditionError) as refused:
            rank = h.runtime.clients[left_out[0]].rank
            await h.push(left_out[0], upload(rank, 2), rank=rank)
        assert refused.value.reason == ErrorReason.NOT_SELECTED

    run(
        config(min_clients=1, expected_clients=4, participation={"fraction": 0.5, "seed": 3}),
        scenario,
    )


def test_observers_are_never_selected_never_counted_and_cannot_push() -> None:
    async def scenario(h: Harness) -> None:
        observer = await h.runtime.join("eval", 4, 0, 0.0, observer=True)
        assert observer.observer  # examples may be 0 although weighting is by examples
        await h.runtime.join("a", 2, 10, 0.0)
        assert h.runtime.snapshot().selection_pending  # the observer does not count
        await h.runtime.join("b", 4, 10, 0.0)
        selected = h.runtime.snapshot().selected
        assert selected is not None and "eval" not in selected and len(selected) == 2
        with pytest.raises(FailedPreconditionError) as refused:
            await h.push("eval", upload(4, 1), rank=4)
        assert refused.value.reason == ErrorReason.OBSERVER
        with pytest.raises(InvalidArgumentError):  # a trainer still declares its examples
            await h.runtime.join("c", 2, 0, 0.0)

    run(
        config(min_clients=1, expected_clients=2, participation={"fraction": 1.0, "seed": 1}),
        scenario,
    )


def test_the_deadline_draws_a_pending_selection_among_those_joined() -> None:
    """The draw at the deadline opens a fresh window: the round closes at its quota of the
    drawn clients, not at the first push, and later rounds draw at once."""

    async def scenario(h: Harness) -> None:
        for c in ("a", "b", "c"):
            await h.runtime.join(c, 2, 10, 0.0)
        assert h.runtime.snapshot().selection_pending
        await _eventually(h, EventType.SELECTED, timeout=10)
        selected = sorted(h.runtime.snapshot().selected or ())
        assert len(selected) == 2
        await h.push(selected[0], upload(2, 1), rank=2)
        assert h.runtime.state.round == 0 and h.runtime.phase is Phase.COLLECTING
        await h.push(selected[1], upload(2, 2), rank=2)
        await h.published(1, timeout=10)
        after = h.runtime.snapshot()
        assert not after.selection_pending and after.selected is not None
        assert len(after.selected) == 2

    run(
        config(
            min_clients=1,
            expected_clients=4,
            deadline_seconds=0.3,
            participation={"clients_per_round": 2, "seed": 0},
        ),
        scenario,
    )


async def _eventually(h: Harness, event: EventType, timeout: float = 5) -> bool:
    async def wait() -> None:
        while event not in h.events:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)
    return True


def test_a_round_that_fills_the_modules_span_stops_folding_and_closes_one_shot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three rank-64 uploads span 192 of a 256-dimensional module, past a quarter of it:
    compressing it would save little, so folding gives up and the close reads the uploads
    back (same result)."""
    big = {"q": (256, 256)}

    async def scenario(h: Harness) -> None:
        for i, c in enumerate(("a", "b", "c")):
            await h.runtime.join(c, 64, 10 + i, 0.0)
        for i, c in enumerate(("a", "b", "c")):
            await h.push(c, save(factors(64, i, big)), rank=64, examples=10 + i)
        await h.published(1)
        assert h.runtime.folder is not None and h.runtime.folder.round == 1
        strategy = make_strategy("raflora", h.config.strategy_config("cpu"))
        updates = [
            engine_update(c, 64, 10 + i, 16.0, factors(64, i, big), big)
            for i, c in enumerate(("a", "b", "c"))
        ]
        expected = strategy.aggregate(strategy.initial_state(), updates)
        assert torch.allclose(h.runtime.state.dense("q"), expected.dense("q"), atol=1e-5)
        assert folded_rounds(h) == 0
        assert "too little left to compress" in caplog.text

    cfg = config(modules=[{"name": "q", "d_out": 256, "d_in": 256}], max_rank=64, min_clients=3)
    caplog.set_level("INFO", logger="raflora.server")
    run(cfg, scenario, FOLDING)


def test_a_close_does_not_wait_for_a_long_fold_backlog(
    monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """18 uploads of a 256² module land while the aggregation thread is busy. When it frees
    up, the first batch is folded; then the round is closing and (with an exact close priced
    at one flop) the rest would cost more than half of it, so the close reads everything
    back instead of waiting."""
    big = {"q": (256, 256)}
    clients = [f"c{i:02d}" for i in range(18)]
    monkeypatch.setattr("raflora.server.rounds.folding.exact_cost", lambda *_: 1.0)

    async def scenario(h: Harness) -> None:
        for c in clients:
            await h.runtime.join(c, 2, 10, 0.0)
        gate = threading.Event()
        h.executor.submit(gate.wait, 10)
        for c in clients:  # one shared adapter: the span stays 2, so only the backlog stops it
            await h.push(c, save(factors(2, 0, big)), rank=2)
        gate.set()
        await h.published(1)
        strategy = make_strategy("raflora", h.config.strategy_config("cpu"))
        updates = [engine_update(c, 2, 10, 16.0, factors(2, 0, big), big) for c in clients]
        expected = strategy.aggregate(strategy.initial_state(), updates)
        assert torch.allclose(h.runtime.state.dense("q"), expected.dense("q"), atol=1e-5)
        assert folded_rounds(h) == 0
        assert "2 uploads still to fold" in caplog.text

    caplog.set_level("INFO", logger="raflora.server")
    cfg = config(modules=[{"name": "q", "d_out": 256, "d_in": 256}], min_clients=len(clients))
    run(cfg, scenario, FOLDING)


def test_folding_stops_past_its_memory_budget(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(h: Harness) -> None:
        for c in ("a", "b"):
            await h.runtime.join(c, 2, 10, 0.0)
        await h.push("a", upload(2, 1), rank=2)
        await h.push("b", upload(2, 2), rank=2)
        await h.published(1)
        expected = one_shot_state([("a", 2, 1), ("b", 2, 2)], h.config)
        for m in MODULES:
            assert torch.allclose(h.runtime.state.dense(m), expected[m], atol=1e-5)
        assert folded_rounds(h) == 0
        assert "fold memory budget" in caplog.text

    caplog.set_level("INFO", logger="raflora.server")
    run(config(min_clients=2), scenario, RuntimeLimits(fold_memory_bytes=1))


def test_folding_stops_when_every_upload_brings_its_own_directions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Four independent rank-4 uploads of a 256² module span 16 directions for 16 folded
    ranks: nothing is shared, so the close would cost what it costs one-shot."""
    big = {"q": (256, 256)}

    async def scenario(h: Harness) -> None:
        for i in range(4):
            await h.runtime.join(f"c{i}", 4, 10, 0.0)
        for i in range(4):
            await h.push(f"c{i}", save(factors(4, i, big)), rank=4)
        await h.published(1)
        assert folded_rounds(h) == 0
        assert "every upload adds its own directions" in caplog.text

    caplog.set_level("INFO", logger="raflora.server")
    cfg = config(modules=[{"name": "q", "d_out": 256, "d_in": 256}], max_rank=4, min_clients=4)
    run(cfg, scenario, FOLDING)
