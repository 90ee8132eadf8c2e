"""Rounds closed from the sums kept as uploads arrived (rounds/summing.py), through the real
server: the publication is the engine's one-shot result and the independent reference, and
what the sums cannot stand for (a client claiming the weight of all, a budget too small)
closes one-shot, as before, with nobody's upload lost."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import pytest
import torch

from raflora.client_sdk import AdminClient, RafloraClient, lora_state_dict, pb
from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    GlobalState,
    Strategy,
    StrategyConfig,
    lowrank,
    make_strategy,
)
from raflora.server.storage import FileFederationStore, UploadRecord
from raflora.server.testing import threaded_server

from . import reference
from .conftest import as_reference, rel_err
from .helpers.adapters import engine_update
from .helpers.federations import every_client_spec
from .helpers.metrics import metric_value

# Large enough, with 40 clients, that the dense close is the cheaper one (the engine's cost
# models decide; the metric below says which path ran).
MODULES = {"layers.0.q": (256, 256), "layers.0.v": (256, 192)}
RANKS = [8, 2, 4, 8]  # in push order: the first rank seen is cut twice as smaller ones arrive
CLIENTS = 40
MAX_RANK = 8
Upload = tuple[str, int, int, dict[str, torch.Tensor]]  # client, rank, examples, tensors


def uploads(hostile_examples: int | None = None) -> list[Upload]:
    """(client, rank, examples, tensors): a shared adapter plus each client's own noise."""
    g = torch.Generator().manual_seed(5)
    shared = {
        m: (torch.randn(o, MAX_RANK, generator=g), torch.randn(MAX_RANK, i, generator=g))
        for m, (o, i) in MODULES.items()
    }
    out = []
    for c in range(CLIENTS):
        r = RANKS[c % len(RANKS)]
        pairs = {
            m: (
                B[:, :r] + 0.1 * torch.randn(B[:, :r].shape, generator=g),
                (A[:r] + 0.1 * torch.randn(A[:r].shape, generator=g)) / 16,
            )
            for m, (B, A) in shared.items()
        }
        examples = 10 + c
        if hostile_examples is not None and c == 0:
            examples = hostile_examples
        out.append((f"c{c:02d}", r, examples, lora_state_dict(pairs)))
    return out


def run_round(
    data: Path, fed: str, clients: list[Upload], **settings: object
) -> tuple[float, float, int]:
    """One round through a real server; (rounds summed, rounds published, sums budget used
    after the publication)."""
    with threaded_server(data, **settings) as srv:
        with AdminClient(srv.target) as admin:
            admin.create_federation(
                every_client_spec(
                    fed,
                    MODULES,
                    len(clients),
                    max_rank=MAX_RANK,
                    init_seed=3,
                    trust=pb.TrustPolicy(max_weight_share=0.2, max_examples_per_client=10**9),
                )
            )
        for cid, rank, n, tensors in clients:
            with RafloraClient(srv.target, fed, cid) as client:
                client.join(rank=rank, num_examples=n, lora_alpha=16.0)
                client.push(tensors, round=0, num_examples=n)
        with RafloraClient(srv.target, fed, clients[0][0]) as client:
            client.wait_for_round(0, timeout=60)
        summed = metric_value(srv.metrics_url, "raflora_rounds_summed_total", federation=fed)
        published = metric_value(srv.metrics_url, "raflora_rounds_published_total", federation=fed)
        return summed, published, srv.server.hub.sums_budget.used


def published(data: Path, fed: str) -> Mapping[str, torch.Tensor]:
    state = FileFederationStore(data / "federations" / fed).load_published(
        1, AdapterSchema.from_shapes(MODULES)
    )[0]
    return {m: state.dense(m) for m in MODULES}


def engine_one_shot(clients: list[Upload]) -> dict[str, torch.Tensor]:
    schema = AdapterSchema.from_shapes(MODULES)
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=MAX_RANK, seed=3))
    updates = [engine_update(c, r, n, 16.0, t, MODULES) for c, r, n, t in sorted(clients)]
    state = strategy.aggregate(strategy.initial_state(), updates)
    return {m: state.dense(m) for m in MODULES}


def test_a_round_of_many_clients_closes_from_its_sums_as_the_one_shot_close_would(
    tmp_path: Path,
) -> None:
    clients = uploads()
    summed, rounds, held = run_round(tmp_path, "sums", clients)
    assert (summed, rounds, held) == (1.0, 1.0, 0)  # from the sums; their memory given back
    got = published(tmp_path, "sums")
    want = engine_one_shot(clients)
    schema = AdapterSchema.from_shapes(MODULES)
    as_engine = [engine_update(c, r, n, 16.0, t, MODULES) for c, r, n, t in clients]
    for m in MODULES:
        assert rel_err(got[m], want[m]) < 1e-5
        independent = reference.raflora(as_reference(as_engine), m, MAX_RANK)
        assert rel_err(got[m], independent) < 1e-5
    assert schema  # the schema the store was read with


def test_a_client_claiming_the_weight_of_all_is_capped_on_the_one_shot_path(
    tmp_path: Path,
) -> None:
    """An attacker declares 10⁹ examples against the others' tens under a 20 % cap: the sums
    (weighted by declared examples) cannot stand for the capped round, so it closes one-shot,
    and what it publishes is what a server without sums publishes, the cap applied."""
    clients = uploads(hostile_examples=10**9)
    summed, rounds, _ = run_round(tmp_path / "with", "cap", clients)
    assert (summed, rounds) == (0.0, 1.0)
    manifest = FileFederationStore(tmp_path / "with" / "federations" / "cap").read_manifest(1)
    shares = {u.client_id: u.weight_share for u in manifest.uploads}
    assert len(shares) == CLIENTS and shares["c00"] <= 0.2 + 1e-9
    off, rounds_off, _ = run_round(tmp_path / "without", "cap", clients, round_sums_memory_mib=0)
    assert (off, rounds_off) == (0.0, 1.0)
    with_sums, without = published(tmp_path / "with", "cap"), published(tmp_path / "without", "cap")
    for m in MODULES:
        assert rel_err(with_sums[m], without[m]) < 1e-6


def test_sums_past_their_budget_give_up_and_the_round_closes_one_shot(tmp_path: Path) -> None:
    """Three distinct ranks need three 568 KiB sums (sketches included): 1 MiB holds one."""
    clients = uploads()
    summed, rounds, held = run_round(tmp_path, "small", clients, round_sums_memory_mib=1)
    assert (summed, rounds, held) == (0.0, 1.0, 0)
    got, want = published(tmp_path, "small"), engine_one_shot(clients)
    for m in MODULES:
        assert rel_err(got[m], want[m]) < 1e-5


def four_uploads() -> tuple[Strategy, GlobalState, list[ClientUpdate], list[UploadRecord]]:
    """A raFLoRA round's strategy and state, and the first four uploads (ranks 8, 2, 4, 8)
    as the engine takes them and as their acknowledgements record them."""
    schema = AdapterSchema.from_shapes(MODULES)
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=MAX_RANK))
    engine = [engine_update(c, r, n, 16.0, t, MODULES) for c, r, n, t in uploads()[:4]]
    records = [
        UploadRecord(u.client_id, 0, u.rank, u.num_examples, 16.0, u.scale, f"sha-{i}", 1)
        for i, u in enumerate(engine)
    ]
    return strategy, strategy.initial_state(), engine, records


def test_the_summer_holds_exactly_what_it_summed_and_gives_its_memory_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rounds/summing.py alone: a second upload of a client, an upload after a close took the
    sums, or one past the budget each end the round's sums (the close goes one-shot), and
    every byte they held is given back (by the round's end, if a close is using them)."""
    from raflora.server.rounds import summing
    from raflora.server.rounds.preload import MemoryBudget
    from raflora.server.rounds.summing import RoundSummer

    strategy, state, engine, records = four_uploads()
    width = MAX_RANK + lowrank.OVERSAMPLE + lowrank.PROBES  # each interval's sketch
    per_interval = sum(o * (i + width) for o, i in MODULES.values()) * 4
    basis = sum({i for _, i in MODULES.values()}) * width * 4  # [Ω G], once

    def fed(budget: MemoryBudget, count: int) -> RoundSummer:
        summer = RoundSummer(strategy, state, budget)
        for record, u in zip(records[:count], engine, strict=False):
            summer.add(record, u.factors)
        return summer

    budget = MemoryBudget(16 << 20, 16 << 20)
    summer = fed(budget, 4)  # ranks 8, 2, 4, 8: three intervals
    assert budget.used == summer.held_bytes == 3 * per_interval + basis
    assert summer.take(state, records[:3]) is None  # not the round's uploads
    assert summer.take(strategy.initial_state(), records) is None  # another state
    assert summer.take(state, records) is not None
    summer.add(UploadRecord("late", 0, 2, 5, 16.0, 1.0, "x", 1), engine[1].factors)
    assert "after a close" in summer.gave_up  # the close in flight keeps its memory ...
    assert budget.used == 3 * per_interval + basis
    summer.release()  # ... until the round is over
    assert budget.used == 0

    again = fed(budget, 2)
    again.add(records[1], engine[1].factors)
    assert "second upload" in again.gave_up and budget.used == 0
    assert again.take(state, records[:2]) is None

    claimed = fed(budget, 4)
    claimed.closing()  # a claimed close: no more additions to the sums, the close takes them
    assert claimed.flush_some(idle=True) is False
    sums = claimed.take(state, records)
    assert sums is not None and sums.pending_columns == sums.width  # nothing was added yet
    got = sums.aggregate(state, engine)
    want = strategy.aggregate(state, engine)
    for m in MODULES:
        assert rel_err(got.dense(m), want.dense(m)) < 1e-5
    claimed.release()
    while again.flush_some(idle=True):  # (gave up: nothing to add)
        pass
    busy = fed(budget, 4)
    assert busy.flush_some(idle=False) is False  # pushes streaming in: nothing is computed
    taken = busy.take(state, records)
    assert taken is not None and taken.unsketched_columns == taken.width
    busy.release()
    idle = fed(budget, 4)
    while idle.flush_some(idle=True):  # an idle preload thread adds, in turns, every interval
        pass  # with a quarter of FLUSH_COLUMNS waiting: none of these few columns
    taken = idle.take(state, records)
    assert taken is not None and taken.pending_columns == taken.width
    assert taken.unsketched_columns == 0  # sketching is cheap: every column was sketched
    idle.release()
    monkeypatch.setattr(summing, "FLUSH_COLUMNS", 4)  # a quarter: one column is worth it
    idle = fed(budget, 4)
    while idle.flush_some(idle=True):
        pass
    taken = idle.take(state, records)
    assert taken is not None and taken.pending_columns == 0
    idle.release()
    assert budget.used == 0

    small = MemoryBudget(2 * per_interval + basis, 2 * per_interval + basis)
    tight = fed(small, 3)  # the third distinct rank needs a third interval
    assert "memory budget" in tight.gave_up and small.used == 0
    kept = fed(small, 2)
    assert small.used == 2 * per_interval + basis
    kept.release()
    assert small.used == 0 and kept.take(state, records[:2]) is None


def test_the_sums_work_waits_for_pushes_streaming_in_and_resumes_after_the_last(
    tmp_path: Path,
) -> None:
    """rounds/preload.py with a real worker thread: an upload parsed while another push
    streams its bytes in is summed but not computed on; when the last push streaming in
    ends, the preload thread is woken and sketches every column."""
    from concurrent.futures import ThreadPoolExecutor

    from raflora.server.rounds.preload import MemoryBudget, RoundPreload, Streaming
    from raflora.server.rounds.summing import RoundSummer

    strategy, state, engine, records = four_uploads()
    schema = strategy.schema
    streaming = Streaming(quiet_seconds=3600.0)  # the push below streams the whole time
    budget = MemoryBudget(64 << 20, 16 << 20)
    summer = RoundSummer(strategy, state, budget)
    with ThreadPoolExecutor(max_workers=1) as executor:
        preload = RoundPreload(
            FileFederationStore(tmp_path), schema, 0, budget, executor, summer, streaming
        )

        def drained() -> None:
            for _ in range(100):  # the turns resubmit themselves: wait for the queue to empty
                executor.submit(lambda: None).result(timeout=10)

        with streaming.push():  # another client's push is receiving
            for record, u in zip(records, engine, strict=True):
                reservation = budget.reserve(1)
                assert reservation is not None
                preload._add(record, reservation, lambda f=u.factors: dict(f))
            drained()
            waiting = summer._sums  # the summer's own sums, not yet taken by a close
            assert waiting is not None and waiting.unsketched_columns == waiting.width
        drained()
        assert waiting.unsketched_columns == 0
        taken = preload.summed(state, records)
        assert taken is not None
        got, want = taken.aggregate(state, engine), strategy.aggregate(state, engine)
        for m in MODULES:
            assert rel_err(got.dense(m), want.dense(m)) < 1e-5
        preload.release()
    assert budget.used == 0


def test_a_push_counts_as_streaming_only_while_its_bytes_flow() -> None:
    """Streaming alone, on a clock of its own: a push holds the sums back while a chunk's worth
    of bytes came in the last quiet_seconds, and not once it stalls or trickles, open or not.
    (Its timer threads read this frozen clock and stop when the push ends.)"""
    from raflora.server.rounds.preload import FLOWING_BYTES, RoundPreload, Streaming

    now = [100.0]
    streaming = Streaming(quiet_seconds=0.05, clock=lambda: now[0])
    preload = cast(RoundPreload, _Woken())
    assert not streaming.busy_for(preload)
    with streaming.push() as push:
        assert streaming.busy_for(preload)  # just opened: its bytes are on their way
        now[0] += 0.04
        push.received(FLOWING_BYTES)
        now[0] += 0.04
        assert streaming.busy_for(preload)  # a chunk's worth 40 ms ago
        now[0] += 0.02
        assert not streaming.busy_for(preload)  # 60 ms of nothing: stalled, still open
        for _ in range(10):  # a trickle: ten small messages 10 ms apart
            push.received(100)
            now[0] += 0.01
            assert not streaming.busy_for(preload)
        push.received(FLOWING_BYTES)
        assert streaming.busy_for(preload)


class _Woken:
    """Stands in for a RoundPreload: counts its wake-ups (any thread)."""

    def __init__(self) -> None:
        self.woken = threading.Event()
        self.count = 0

    def wake(self) -> None:
        self.count += 1
        self.woken.set()


def test_a_stalled_push_wakes_the_sums_it_held_back_without_ending() -> None:
    """With the real clock and timer: a preload told to wait for a push is woken once that
    push stops sending, though its stream stays open; and at once when a push ends."""
    from raflora.server.rounds.preload import RoundPreload, Streaming

    streaming = Streaming(quiet_seconds=0.5)  # the asserts below run well within it
    waiter = _Woken()
    preload = cast(RoundPreload, waiter)
    with streaming.push():
        assert streaming.busy_for(preload)
        assert waiter.woken.wait(5), "a stalled push held the sums back"
        assert waiter.count == 1 and not streaming.busy_for(preload)
    ended = _Woken()
    with streaming.push() as push:
        assert streaming.busy_for(cast(RoundPreload, ended))
        push.received(1 << 20)
    assert ended.count == 1  # woken by the end, not a timer


def test_a_client_holding_a_push_open_does_not_stop_the_others_sums(tmp_path: Path) -> None:
    """An attacker opens a push, sends its header and a few bytes, and stalls (its stream
    stays open well within the server's timeouts). It costs the server no CPU, so it must
    not hold the sums back: the honest clients' round still closes from its sums (the
    attacker's upload never lands), and what it publishes is the one-shot result."""
    from safetensors.torch import save

    from .helpers.adapters import factors
    from .helpers.stalled import stalled_push

    clients = uploads()
    payload = save(factors(2, 9, MODULES))
    with threaded_server(tmp_path / "d") as srv:
        with AdminClient(srv.target) as admin:
            admin.create_federation(
                every_client_spec("fed", MODULES, len(clients), max_rank=MAX_RANK, init_seed=3)
            )
        with RafloraClient(srv.target, "fed", "stalls") as hostile:
            hostile.join(rank=2, num_examples=10, lora_alpha=16.0)

        with stalled_push(srv.target, "fed", "stalls", payload, rank=2) as call:
            for cid, rank, n, tensors in clients:
                with RafloraClient(srv.target, "fed", cid) as client:
                    client.join(rank=rank, num_examples=n, lora_alpha=16.0)
                    client.push(tensors, round=0, num_examples=n)
            with RafloraClient(srv.target, "fed", clients[0][0]) as client:
                client.wait_for_round(0, timeout=60)
            assert not call.done()  # the attacker's push was still open the whole round
            summed = metric_value(srv.metrics_url, "raflora_rounds_summed_total", federation="fed")
    assert summed == 1.0
    got, want = published(tmp_path / "d", "fed"), engine_one_shot(clients)
    for m in MODULES:
        assert rel_err(got[m], want[m]) < 1e-5


def test_a_client_pushing_again_is_summed_once_and_the_round_still_closes_from_its_sums(
    tmp_path: Path,
) -> None:
    """An attacker re-sends its acknowledged upload (the lost-ack retry the server must take)
    five times, then tries a different one. Each identical re-push is acknowledged and
    counted nowhere; the different one is refused (ALREADY_EXISTS). Neither outweighs its
    declared share nor ends the round's sums: the round closes from them, and equals the
    one-shot close with every client counted once."""
    from raflora.client_sdk.errors import AlreadyExistsError

    clients = uploads()
    attacker = 5
    different = clients[1][3]  # another client's tensors, of the attacker's rank (2)
    assert clients[1][1] == clients[attacker][1]
    with threaded_server(tmp_path / "d") as srv:
        with AdminClient(srv.target) as admin:
            admin.create_federation(
                every_client_spec("fed", MODULES, len(clients), max_rank=MAX_RANK, init_seed=3)
            )
        for k, (cid, rank, n, tensors) in enumerate(clients):
            with RafloraClient(srv.target, "fed", cid) as client:
                client.join(rank=rank, num_examples=n, lora_alpha=16.0)
                first = client.push(tensors, round=0, num_examples=n)
                if k != attacker:  # neither the first nor the last to push
                    continue
                for _ in range(5):
                    again = client.push(tensors, round=0, num_examples=n)
                    assert again.duplicate and not first.duplicate
                    assert again.uploads_in_round == first.uploads_in_round == k + 1
                with pytest.raises(AlreadyExistsError, match="different update"):
                    client.push(different, round=0, num_examples=n)
        with RafloraClient(srv.target, "fed", clients[0][0]) as client:
            client.wait_for_round(0, timeout=60)
        summed = metric_value(srv.metrics_url, "raflora_rounds_summed_total", federation="fed")
    assert summed == 1.0
    manifest = FileFederationStore(tmp_path / "d" / "federations" / "fed").read_manifest(1)
    assert sorted(u.client_id for u in manifest.uploads) == sorted(c for c, *_ in clients)
    got, want = published(tmp_path / "d", "fed"), engine_one_shot(clients)
    for m in MODULES:
        assert rel_err(got[m], want[m]) < 1e-5
