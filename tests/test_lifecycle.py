"""Federation lifecycle against the real server and the SDK: DeleteFederation and retention.

Deleting stops the federation (every RPC on it, in flight or later, is NOT_FOUND), removes or
archives its folder crash-safely, survives a restart and frees the id; its client tokens and
credentials stop working, also against a new federation of the same id. ``keep_rounds`` keeps
the newest N published rounds and never one that a pull is streaming.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from raflora.client_sdk import (
    AdminClient,
    NotFoundError,
    RafloraClient,
    RafloraError,
    RetryPolicy,
    UnauthenticatedError,
    pb,
)
from raflora.server.errors import NotFoundError as ServerNotFoundError
from raflora.server.testing import ThreadedServer, scrape, threaded_server
from raflora.v1.framing import data_of
from raflora.v1.wire import ErrorReason

from .helpers.adapters import factors
from .helpers.federations import spec

MODULES = {"q": (8, 6), "v": (4, 6)}
ADMIN_TOKEN = "admin-lifecycle-0123456789abcdef"
NO_RETRY = RetryPolicy(attempts=1)


def client(server: ThreadedServer, fid: str, cid: str = "c1", **kwargs: Any) -> RafloraClient:
    return RafloraClient(server.target, fid, cid, retry=NO_RETRY, timeout=30, **kwargs)


def push_round(c: RafloraClient, seed: int) -> int:
    """Push an update for the open round (min_clients = 1: it publishes the next one)."""
    status = c.status()
    c.push(factors(4, seed, MODULES), round=status.round, num_examples=10)
    return c.wait_for_round(status.round, timeout=30).round


def refused(action: Callable[[], object]) -> RafloraError:
    with pytest.raises(RafloraError) as info:
        action()
    return info.value


def assert_not_found(action: Callable[[], object], reason: str) -> None:
    error = refused(action)
    assert error.code == grpc.StatusCode.NOT_FOUND, error
    assert error.reason == reason, error


def stored(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "federations").iterdir())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadedServer]:
    with threaded_server(tmp_path / "data") as handle:
        yield handle


def test_delete_stops_everything_removes_the_folder_and_frees_the_id(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with threaded_server(data) as server, AdminClient(server.target) as admin:
        admin.create_federation(spec("fed", MODULES, max_rank=4))
        admin.create_federation(spec("other", MODULES, max_rank=4))
        with client(server, "fed") as c:
            c.join(rank=4, num_examples=10)
            assert push_round(c, 1) == 1
            assert admin.delete_federation("fed") is None
            fed_gone = ErrorReason.FEDERATION_NOT_FOUND
            assert_not_found(c.status, fed_gone)
            assert_not_found(c.pull, fed_gone)
            assert_not_found(lambda: c.pull(round=1), fed_gone)
            assert_not_found(
                lambda: c.push(factors(4, 2, MODULES), round=1, num_examples=10), fed_gone
            )
            assert_not_found(lambda: c.wait_for_round(1, timeout=10), fed_gone)
            assert_not_found(lambda: c.join(rank=4, num_examples=10), fed_gone)
        for action in (
            lambda: admin.get_federation("fed"),
            lambda: admin.list_clients("fed"),
            lambda: admin.delete_federation("fed"),
            lambda: admin.rotate_enrolment_secret("fed"),
            lambda: admin.export_adapter("fed", tmp_path / "export"),
        ):
            assert_not_found(action, fed_gone)
        assert not (tmp_path / "export").exists()
        assert [f.spec.federation_id for f in admin.list_federations()] == ["other"]
        assert stored(data) == ["other"]  # no folder, no tombstone
        assert not (data / "archive").exists()
        metrics = scrape(server.metrics_url)  # no stale series to keep alerts firing
        assert 'federation="other"' in metrics and 'federation="fed"' not in metrics
    with threaded_server(data) as server, AdminClient(server.target) as admin:
        assert [f.spec.federation_id for f in admin.list_federations()] == ["other"]
        created = admin.create_federation(spec("fed", MODULES, max_rank=2))
        assert created.status.round == 0 and created.status.joined_clients == 0
        assert created.spec.max_rank == 2
        with client(server, "fed") as c:
            c.join(rank=2, num_examples=5)
            assert c.pull().round == 0


def test_archive_keeps_the_folder_readable_and_out_of_service(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with threaded_server(data) as server, AdminClient(server.target) as admin:
        admin.create_federation(spec("fed", MODULES, max_rank=4))
        with client(server, "fed") as c:
            c.join(rank=4, num_examples=10)
            push_round(c, 1)
        name = admin.delete_federation("fed", archive=True)
        assert name is not None and name.startswith("fed-")
        archived = data / "archive" / name
        assert (archived / "federation.json").exists()
        assert (archived / "rounds" / "00000001" / "manifest.json").exists()
        assert (archived / "clients" / "c1.json").exists()
        assert stored(data) == []
        assert_not_found(lambda: admin.get_federation("fed"), ErrorReason.FEDERATION_NOT_FOUND)
        # The same id again, archived again: a second archive folder.
        admin.create_federation(spec("fed", MODULES, max_rank=4))
        second = admin.delete_federation("fed", archive=True)
        assert second is not None and second != name
    with threaded_server(data) as server, AdminClient(server.target) as admin:
        assert admin.list_federations() == []  # archives are never resumed
    assert sorted(p.name for p in (data / "archive").iterdir()) == sorted([name, second])


def test_a_watch_and_a_pull_in_flight_are_refused(server: ThreadedServer) -> None:
    with AdminClient(server.target) as admin, client(server, "fed") as c:
        admin.create_federation(spec("fed", MODULES, max_rank=4, min_clients=2))
        c.join(rank=4, num_examples=10)
        outcome: list[BaseException] = []

        def watch() -> None:
            try:
                c.wait_for_round(0, timeout=60)
            except BaseException as exc:
                outcome.append(exc)

        watcher = threading.Thread(target=watch)
        watcher.start()
        runtime = server.server.hub.get("fed")
        for _ in range(200):  # the watch is subscribed
            if runtime.events.watchers:
                break
            threading.Event().wait(0.05)
        assert runtime.events.watchers == 1

        async def open_pull() -> Any:
            return await runtime.open_view("c1")

        _, reader = server.run(open_pull())
        admin.delete_federation("fed")
        watcher.join(30)
        assert not watcher.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], NotFoundError), outcome
        assert outcome[0].reason == ErrorReason.FEDERATION_NOT_FOUND
        with pytest.raises(ServerNotFoundError):  # a pull streaming it is cut off
            reader.read(16)
        reader.close()


def test_deleted_federation_tokens_and_credentials_stop_working(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with (
        threaded_server(data, admin_token=ADMIN_TOKEN) as server,
        AdminClient(server.target, admin_token=ADMIN_TOKEN) as admin,
    ):
        secret = admin.create_federation(
            spec("fed", MODULES, max_rank=4), open_enrolment=True
        ).enrolment_secret
        old = client(server, "fed", enrolment_secret=secret)
        old.join(rank=4, num_examples=10)
        old_token, old_credential = old.token, old.client_credential
        assert old_token and old_credential and old_credential != secret
        push_round(old, 1)
        with AdminClient(server.target, admin_token=old_token) as impostor:
            for action in (
                lambda: impostor.delete_federation("fed"),
                lambda: impostor.list_clients("fed"),
                lambda: impostor.export_adapter("fed", tmp_path / "stolen"),
                lambda: impostor._call(  # the RPC itself, not only the GetFederation before it
                    lambda: list(
                        impostor.stub.ExportAdapter(
                            pb.ExportAdapterRequest(federation_id="fed"),
                            metadata=impostor._metadata,
                        )
                    )
                ),
            ):
                assert refused(action).reason == ErrorReason.ADMIN_ONLY  # a client's token
        assert not (tmp_path / "stolen").exists()
        admin.delete_federation("fed")
        # The token no longer works (the SDK's re-join with its credential fails too).
        error = refused(old.status)
        assert isinstance(error, UnauthenticatedError | NotFoundError), error
        # A new federation under the same id accepts neither the old token nor the credential.
        new_secret = admin.create_federation(
            spec("fed", MODULES, max_rank=4), open_enrolment=True
        ).enrolment_secret
        stale = client(server, "fed", token=old_token)
        assert refused(stale.status).reason == ErrorReason.TOKEN_REVOKED
        stale.close()
        reuse = client(server, "fed", enrolment_secret=old_credential)
        assert refused(lambda: reuse.join(rank=4, num_examples=10)).reason == (
            ErrorReason.ENROLMENT_REJECTED
        )
        reuse.close()
        fresh = client(server, "fed", "c2", enrolment_secret=new_secret)
        fresh.join(rank=4, num_examples=10)
        assert fresh.status().round == 0
        fresh.close()
        old.close()
    # After a restart (which forgets what was deleted) the old token is still refused.
    with threaded_server(data, admin_token=ADMIN_TOKEN) as server:
        stale = client(server, "fed", token=old_token)
        assert refused(stale.status).reason == ErrorReason.TOKEN_REVOKED
        stale.close()


def test_keep_rounds_keeps_the_newest_and_pull_of_a_deleted_round_is_not_found(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    rounds_dir = data / "federations" / "fed" / "rounds"
    with threaded_server(data) as server, AdminClient(server.target) as admin:
        created = admin.create_federation(
            {
                "federation_id": "fed",
                "modules": [{"name": m, "d_out": o, "d_in": i} for m, (o, i) in MODULES.items()],
                "max_rank": 4,
                "keep_rounds": 2,
            }
        )
        assert created.spec.round_policy.keep_rounds == 2
        with client(server, "fed") as c:
            c.join(rank=4, num_examples=10)
            for seed in range(4):
                push_round(c, seed)
            assert sorted(p.name for p in rounds_dir.iterdir()) == ["00000003", "00000004"]
            assert_not_found(lambda: c.pull(round=1), ErrorReason.ROUND_NOT_FOUND)
            assert_not_found(lambda: c.pull(round=2), ErrorReason.ROUND_NOT_FOUND)
            assert c.pull(round=3).round == 3
            assert c.pull().round == 4
            assert c.pull(round=0).round == 0  # the seeded start is not stored: always there
            assert not (data / "federations" / "fed" / "views" / "00000001").exists()
    with threaded_server(data) as server, client(server, "fed") as c:
        c.join(rank=4, num_examples=10)
        assert c.status().round == 4
        assert_not_found(lambda: c.pull(round=2), ErrorReason.ROUND_NOT_FOUND)
        assert c.pull(round=3).round == 3


@pytest.mark.parametrize("from_memory", [False, True], ids=["from-file", "hot-view"])
def test_retention_never_deletes_a_round_being_streamed(tmp_path: Path, from_memory: bool) -> None:
    fid = f"fed-{from_memory}"
    hot_view_memory_mib = 512 if from_memory else 0  # off: every reader reads the view file
    with (
        threaded_server(tmp_path, hot_view_memory_mib=hot_view_memory_mib) as server,
        AdminClient(server.target) as admin,
        client(server, fid) as c,
    ):
        admin.create_federation(_keep_one(fid))
        c.join(rank=4, num_examples=10)
        push_round(c, 0)
        push_round(c, 1)  # round 1 is gone already (keep_rounds = 1)
        runtime = server.server.hub.get(fid)

        async def open_pull(round_: int) -> Any:
            return await runtime.open_view("c1", round_)

        view, reader = server.run(open_pull(2))  # a pull of round 2, its stream open
        assert (reader.hot is not None) == from_memory
        push_round(c, 2)  # publishes 3: round 2 is kept while it streams
        rounds_dir = server.server.settings.data_dir / "federations" / fid / "rounds"
        assert sorted(p.name for p in rounds_dir.iterdir()) == ["00000002", "00000003"]
        if from_memory:  # the stream completes
            assert sum(len(data_of(m) or b"") for m in reader.hot) == view.size
        else:
            assert len(reader.read(-1)) == view.size
        reader.close()
        push_round(c, 3)  # publishes 4: now round 2 goes
        assert sorted(p.name for p in rounds_dir.iterdir()) == ["00000004"]
        assert_not_found(lambda: c.pull(round=2), ErrorReason.ROUND_NOT_FOUND)


def _keep_one(fid: str) -> pb.FederationSpec:
    s = spec(fid, MODULES, max_rank=4)
    s.round_policy.keep_rounds = 1
    return s


def test_list_clients(server: ThreadedServer) -> None:
    with AdminClient(server.target) as admin:
        admin.create_federation(spec("fed", MODULES, max_rank=4, min_clients=2))
        with client(server, "fed", "b") as b, client(server, "fed", "a") as a:
            a.join(rank=4, num_examples=10, lora_alpha=8)
            b.join(rank=2, num_examples=0, observer=True)
            assert [c.client_id for c in admin.list_clients("fed")] == ["a", "b"]
            a.push(factors(4, 0, MODULES), round=0, num_examples=10)
            first, second = admin.list_clients("fed")
        assert (first.rank, first.num_examples, first.lora_alpha, first.scale) == (4, 10, 8, 2)
        assert first.HasField("last_round_uploaded") and first.last_round_uploaded == 0
        assert second.observer and not second.HasField("last_round_uploaded")


def test_a_stored_federation_that_could_not_be_resumed_can_be_deleted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broken = data / "federations" / "broken"
    broken.mkdir(parents=True)
    (broken / "federation.json").write_text("{not json")
    with threaded_server(data) as server, AdminClient(server.target) as admin:
        assert admin.list_federations() == []  # skipped at start, loudly
        assert_not_found(lambda: admin.get_federation("broken"), ErrorReason.FEDERATION_NOT_FOUND)
        assert admin.delete_federation("broken", archive=True) is not None
        assert stored(data) == []
        assert_not_found(
            lambda: admin.delete_federation("broken"), ErrorReason.FEDERATION_NOT_FOUND
        )
