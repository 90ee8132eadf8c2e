"""SDK failure handling against the real server: restarts, interrupted transfers, typed errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raflora.client_sdk import (
    AdminClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RafloraClient,
    RetryPolicy,
    UnavailableError,
)
from raflora.server.testing import ServerProcess

from .helpers.adapters import factors
from .helpers.federations import every_client_spec

MODULES = {"m0": (64, 48), "m1": (32, 64)}
PATIENT = RetryPolicy(attempts=40, initial_backoff=0.1, max_backoff=0.5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path / "data", tmp_path / "server-0.log") as handle:
        AdminClient(handle.target).create_federation(
            every_client_spec("fed", MODULES, 2, max_rank=8)
        )
        yield handle


def restart(handle: ServerProcess, tmp_path: Path, delay: float, name: str) -> threading.Thread:
    """Kill the server now; start it again on the same port and data after ``delay``."""
    handle.kill()

    def later() -> None:
        time.sleep(delay)
        handle.start(log=tmp_path / f"{name}.log")

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def test_client_reconnects_after_a_restart_and_carries_on(
    server: ServerProcess, tmp_path: Path
) -> None:
    a = RafloraClient(server.target, "fed", "a", retry=PATIENT)
    b = RafloraClient(server.target, "fed", "b", retry=PATIENT)
    a.join(rank=4, num_examples=10)
    b.join(rank=8, num_examples=30)
    a.push(factors(4, 1, MODULES), round=0, num_examples=10)
    waiter: dict[str, int] = {}
    watch = threading.Thread(target=lambda: waiter.update(r=a.wait_for_round(0, 60).round))
    watch.start()
    time.sleep(0.5)
    restarted = restart(server, tmp_path, delay=1.5, name="server-1")
    pulled = b.pull()  # issued while the server is down: retried until it is back
    assert pulled.round == 0
    restarted.join(30)
    result = b.push(factors(8, 2, MODULES), round=0, num_examples=30)
    assert result.uploads_in_round == 2  # a's acknowledged upload survived
    watch.join(60)
    assert waiter == {"r": 1}  # the watcher reconnected and saw round 1 published
    assert a.pull().round == 1
    a.close()
    b.close()


def test_interrupted_push_is_retried_and_counted_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    big = factors(8, 3, MODULES)  # ~22 KiB in 1 KiB chunks: the kill lands mid-stream
    client = RafloraClient(server.target, "fed", "c", retry=PATIENT, chunk_size=1024)
    client.join(rank=8, num_examples=5)
    killed: list[threading.Thread] = []

    def progress(done: int, total: int) -> None:
        if done >= total // 3 and not killed:
            killed.append(restart(server, tmp_path, delay=1.0, name="server-1"))

    result = client.push(big, round=0, num_examples=5, progress=progress)
    assert killed, "the server was never interrupted"
    killed[0].join(60)  # the fixture must see the restarted process to stop it
    assert result.uploads_in_round == 1 and not result.duplicate
    again = client.push(big, round=0, num_examples=5)
    assert again.duplicate and again.uploads_in_round == 1
    assert client.status().uploads == 1
    client.close()


def test_wrong_rank_or_federation_raise_typed_errors(server: ServerProcess) -> None:
    with RafloraClient(server.target, "nope", "x") as lost, pytest.raises(NotFoundError) as nf:
        lost.join(rank=4, num_examples=1)
    assert nf.value.field == "federation_id"
    with RafloraClient(server.target, "fed", "x") as client:
        with pytest.raises(InvalidArgumentError) as too_big:
            client.join(rank=64, num_examples=1)
        assert too_big.value.field == "rank"
        client.join(rank=4, num_examples=1)
        client.rank = 8  # a client that lies about its rank at push time
        with pytest.raises(InvalidArgumentError) as wrong:
            client.push(factors(8, 4, MODULES), round=0, num_examples=1)
        assert wrong.value.field == "rank"
        client.rank = 4
        with pytest.raises(FailedPreconditionError) as late:
            client.push(factors(4, 4, MODULES), round=7, num_examples=1)
        assert late.value.field == "round"


def test_the_default_retry_budget_outlasts_a_pod_restart() -> None:
    """At least 60 s of waiting by default (the old budget was ~6 s); attempts=1 never retries."""
    waits = list(RetryPolicy().delays())
    assert sum(waits) >= 60 and max(waits) <= RetryPolicy().max_backoff * 1.5
    assert list(RetryPolicy(attempts=1).delays()) == []
    assert len(list(RetryPolicy(attempts=3).delays())) == 2


def test_a_push_with_default_retries_survives_a_restart_and_logs_it(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = RafloraClient(server.target, "fed", "a")  # the default policy
    client.join(rank=4, num_examples=10)
    thread = restart(server, tmp_path, 8.0, "server-1")  # down longer than the old budget
    with caplog.at_level("WARNING", logger="raflora.client_sdk"):
        result = client.push(factors(4, 1, MODULES), round=0, num_examples=10)
    thread.join()
    assert result.uploads_in_round == 1
    assert any("retrying in" in r.getMessage() for r in caplog.records)
    client.close()


def test_the_retry_budget_is_wall_time_tries_included() -> None:
    """Against a server that never answers (a socket that accepts and stays silent), each try
    runs into its own timeout; the budget still ends the call on time."""
    import socket

    from raflora.client_sdk import DeadlineExceededError

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    target = f"127.0.0.1:{silent.getsockname()[1]}"
    client = RafloraClient(target, "fed", "a", timeout=0.4, retry=RetryPolicy(budget_seconds=1.5))
    started = time.monotonic()
    with pytest.raises((DeadlineExceededError, UnavailableError)):
        client.status()
    elapsed = time.monotonic() - started
    client.close()
    silent.close()
    # It used the budget (the last wait ends at 1.5 s, one last try follows) and not more.
    assert 1.4 <= elapsed < 3.0, elapsed
