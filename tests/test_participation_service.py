"""Server-side client sampling end to end: the real server, the real SDK, client threads.

Six clients, three selected per round (plus one seat of over-selection). Selected clients train
(push), unselected ones wait for the next round, and a selected straggler that never pushes does
not block the round: it closes at its quota.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from raflora.client_sdk import AdminClient, RafloraClient, is_selected, pb
from raflora.client_sdk.errors import FailedPreconditionError
from raflora.server.storage import FileFederationStore
from raflora.server.testing import federation_spec, threaded_server
from raflora.v1.wire import ErrorReason
from tests.helpers.adapters import factors

MODULES = {"m": (12, 10)}
CLIENTS = [("a", 2), ("b", 2), ("c", 4), ("d", 4), ("e", 8), ("f", 8)]
ROUNDS = 3


def test_selected_clients_train_and_unselected_wait(tmp_path: Path) -> None:
    spec = federation_spec("p", MODULES, max_rank=8, min_clients=1, deadline_seconds=30)
    spec.participation.CopyFrom(
        pb.ParticipationPolicy(clients_per_round=3, over_selection=0.3, seed=1)
    )
    with threaded_server(tmp_path) as server:
        with AdminClient(server.target) as admin:
            admin.create_federation(spec)
        clients = {cid: RafloraClient(server.target, "p", cid) for cid, _ in CLIENTS}
        for cid, rank in CLIENTS:
            clients[cid].join(rank=rank, num_examples=10)
        pushed: dict[int, set[str]] = {}
        refused: list[str] = []
        lock = threading.Lock()
        errors: list[BaseException] = []

        def run(cid: str, rank: int) -> None:
            client = clients[cid]
            try:
                status = client.status()
                while status.round < ROUNDS:
                    t = status.round
                    if not is_selected(status):
                        try:  # an unselected client's push is refused, and nothing counts
                            client.push(factors(rank, 99, MODULES), round=t, num_examples=10)
                        except FailedPreconditionError as exc:
                            assert exc.reason in (
                                ErrorReason.NOT_SELECTED,
                                ErrorReason.ROUND_CLOSED,
                            )
                            with lock:
                                refused.append(cid)
                    elif cid == "f":
                        pass  # the straggler: when selected, it never pushes
                    else:
                        pulled = client.pull()
                        try:
                            client.push(pulled.tensors, round=t, num_examples=10)
                            with lock:
                                pushed.setdefault(t, set()).add(cid)
                        except FailedPreconditionError as exc:  # over-selected and late
                            assert exc.reason in (
                                ErrorReason.ROUND_AGGREGATING,
                                ErrorReason.ROUND_CLOSED,
                            )
                    status = client.wait_for_round(t, timeout=60)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=c) for c in CLIENTS]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        for c in clients.values():
            c.close()
        assert not errors, errors
        assert refused, "some client was left out of some round"
        store = FileFederationStore(server.server.settings.data_dir / "federations" / "p")
        for t in range(ROUNDS):
            manifest = store.read_manifest(t + 1)
            aggregated = {u.client_id for u in manifest.uploads}
            assert len(aggregated) == 3  # the round closed at its quota ...
            assert "f" not in aggregated  # ... without the straggler
            assert aggregated <= pushed[t]


@pytest.mark.parametrize("field", ["clients_per_round", "fraction"])
def test_a_policy_round_trips_through_the_spec(tmp_path: Path, field: str) -> None:
    spec = federation_spec("q", MODULES, max_rank=8)
    value = 2 if field == "clients_per_round" else 0.5
    setattr(spec.participation, field, value)
    spec.participation.stratify_by_rank = True
    with threaded_server(tmp_path) as server, AdminClient(server.target) as admin:
        created = admin.create_federation(spec)
        assert getattr(created.spec.participation, field) == pytest.approx(value)
        assert created.spec.participation.stratify_by_rank


def test_round_zero_selects_over_everyone_and_observers_only_watch(tmp_path: Path) -> None:
    """The SDK's waits return once the draw is made; every client sees the same selection."""
    spec = federation_spec("z", MODULES, max_rank=8, min_clients=1, expected_clients=6)
    spec.participation.CopyFrom(pb.ParticipationPolicy(fraction=0.5, seed=7))
    with threaded_server(tmp_path) as server:
        with AdminClient(server.target) as admin:
            admin.create_federation(spec)
        observer = RafloraClient(server.target, "z", "evaluator")
        observer.join(rank=8, num_examples=0, observer=True)
        assert observer.status().selection == pb.SELECTION_NOT_SELECTED  # it never pushes
        clients = {cid: RafloraClient(server.target, "z", cid) for cid, _ in CLIENTS}
        seen: dict[str, pb.RoundStatus] = {}
        errors: list[BaseException] = []

        def wait(cid: str) -> None:
            try:
                seen[cid] = clients[cid].wait_for_selection(0, timeout=30)
            except BaseException as exc:
                errors.append(exc)

        for cid, rank in CLIENTS[:5]:
            clients[cid].join(rank=rank, num_examples=10)
        threads = [threading.Thread(target=wait, args=(cid,)) for cid, _ in CLIENTS[:5]]
        for th in threads:
            th.start()
        with pytest.raises(FailedPreconditionError) as pending:
            clients["a"].push(factors(2, 1, MODULES), round=0, num_examples=10)
        assert pending.value.reason == ErrorReason.SELECTION_PENDING
        clients["f"].join(rank=8, num_examples=10)  # the sixth: the draw is made now
        seen["f"] = clients["f"].wait_for_selection(0, timeout=30)
        for th in threads:
            th.join(30)
        assert not errors, errors
        selected = {cid for cid, status in seen.items() if is_selected(status)}
        assert len(selected) == 3 and all(s.selected_clients == 3 for s in seen.values())
        assert not is_selected(observer.wait_for_selection(0, timeout=10))
        with pytest.raises(FailedPreconditionError) as watching:
            observer.push(factors(8, 1, MODULES), round=0, num_examples=1)
        assert watching.value.reason == ErrorReason.OBSERVER
        for cid in selected:
            rank = dict(CLIENTS)[cid]
            clients[cid].push(factors(rank, 2, MODULES), round=0, num_examples=10)
        published = observer.wait_for_round(0, timeout=30)
        assert published.round == 1
        assert observer.pull().round == 1  # an observer reads every round
        for c in [observer, *clients.values()]:
            c.close()
