"""Faults: a client killed mid-upload, a stream that stalls, the server killed while it
aggregates, and the disk filling up while it persists.

Each ends the same way: no acknowledged upload is lost, the failing party gets a clear status
(or nothing, when it is dead), no temporary file is left behind, and the server goes on serving
the clients that remain.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import save

from raflora.client_sdk import (
    AdminClient,
    RafloraClient,
    ResourceExhaustedError,
    RetryPolicy,
    pb,
)
from raflora.client_sdk.payload import PushPayload
from raflora.server.engine import AdapterSchema, StrategyConfig, make_strategy
from raflora.server.storage import FileFederationStore
from raflora.server.testing import (
    ServerProcess,
    ThreadedServer,
    python_env,
    scrape,
    start_server_process,
    threaded_server,
)
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.wire import iter_chunks

from .conftest import rel_err
from .helpers.adapters import engine_update, factors, push_header
from .helpers.federations import every_client_spec
from .helpers.metrics import metric_value
from .helpers.waiting import wait_until

ADMIN_TOKEN = "faults-admin-token-0123456789"
NO_RETRY = RetryPolicy(attempts=1)


def incoming(data_dir: Path) -> list[Path]:
    return sorted(data_dir.rglob(".incoming-*"))


# -- client killed mid-upload; a stream that stalls ---------------------------------------------

MODULES = {f"layers.{i}.proj": (256, 256) for i in range(4)}  # rank 16: a 128 KiB upload

CLIENT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from raflora.client_sdk import RafloraClient, RetryPolicy, lora_state_dict

    target, fid, secret, credential_file = sys.argv[1:5]
    g = torch.Generator().manual_seed(99)
    modules = {f"layers.{i}.proj": (256, 256) for i in range(4)}
    tensors = lora_state_dict(
        {m: (torch.randn(o, 16, generator=g), torch.randn(16, i, generator=g))
         for m, (o, i) in modules.items()}
    )
    client = RafloraClient(target, fid, "doomed", enrolment_secret=secret, chunk_size=1024,
                           credential_file=credential_file, retry=RetryPolicy(attempts=1))
    client.join(rank=16, num_examples=7)
    print("joined", flush=True)

    def slowly(done, total):
        time.sleep(0.01)  # ~130 chunks: the upload takes over a second

    client.push(tensors, round=0, num_examples=7, progress=slowly)
    print("finished", flush=True)  # never reached: the test kills this process first
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    data = tmp_path_factory.mktemp("faults")
    with threaded_server(
        data, admin_token=ADMIN_TOKEN, chunk_size=1024, idle_stream_timeout_seconds=1.0
    ) as handle:
        yield handle


def new_federation(server: ThreadedServer, fid: str, clients: int) -> str:
    with AdminClient(server.target, admin_token=ADMIN_TOKEN) as admin:
        created = admin.create_federation(
            every_client_spec(fid, MODULES, clients, max_rank=16), open_enrolment=True
        )
    return created.enrolment_secret


def test_client_killed_mid_upload(server: ThreadedServer, tmp_path: Path) -> None:
    data_dir = server.server.settings.data_dir
    secret = new_federation(server, "killed", clients=2)
    with ExitStack() as stack:
        survivor = stack.enter_context(
            RafloraClient(server.target, "killed", "survivor", enrolment_secret=secret)
        )
        survivor.join(rank=8, num_examples=3)
        acked = factors(8, 1, MODULES, fan_in_scaled=True)
        assert survivor.push(acked, round=0, num_examples=3).uploads_in_round == 1

        script = tmp_path / "client.py"
        script.write_text(CLIENT_SCRIPT)
        # Open enrolment: the first join returns the id's own credential, which the job keeps
        # in a file so that a restarted process can enrol as the same client.
        credential = tmp_path / "doomed.credential"
        child = subprocess.Popen(
            [sys.executable, str(script), server.target, "killed", secret, str(credential)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=python_env(),
        )
        try:
            # Kill it once the server is writing its upload to disk.
            assert wait_until(
                lambda: any(p.stat().st_size > 4096 for p in incoming(data_dir)), timeout=60
            ), "the upload never started"
            child.send_signal(signal.SIGKILL)
            assert child.wait(10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
        output = child.stdout.read().decode() if child.stdout else ""
        assert "joined" in output and "finished" not in output
        # The server sees the connection drop: the partial file goes, nothing is counted.
        assert wait_until(lambda: incoming(data_dir) == []), incoming(data_dir)
        status = survivor.status()
        assert (status.round, status.uploads, status.joined_clients) == (0, 1, 2)
        assert survivor.pull().round == 0  # others are served meanwhile
        # The killed client comes back (a new process would do the same) and completes.
        assert credential.read_text().startswith("rfc1.")
        back = stack.enter_context(
            RafloraClient(
                server.target,
                "killed",
                "doomed",
                enrolment_secret=secret,
                credential_file=credential,
            )
        )
        back.join(rank=16, num_examples=7)
        tensors = factors(16, 99, MODULES)  # what CLIENT_SCRIPT sends
        assert back.push(tensors, round=0, num_examples=7).uploads_in_round == 2
        assert survivor.wait_for_round(0, timeout=30).round == 1
    manifest = FileFederationStore(data_dir / "federations" / "killed").read_manifest(1)
    by_client = {u.client_id: u.sha256 for u in manifest.uploads}
    assert by_client == {
        "doomed": hashlib.sha256(PushPayload(tensors).to_bytes()).hexdigest(),
        "survivor": hashlib.sha256(PushPayload(acked).to_bytes()).hexdigest(),
    }


def test_stalled_stream_is_cut_at_the_idle_timeout(server: ThreadedServer) -> None:
    data_dir = server.server.settings.data_dir
    secret = new_federation(server, "stalled", clients=2)
    with ExitStack() as stack:
        good = stack.enter_context(
            RafloraClient(server.target, "stalled", "good", enrolment_secret=secret)
        )
        good.join(rank=8, num_examples=3)
        assert (
            good.push(
                factors(8, 1, MODULES, fan_in_scaled=True), round=0, num_examples=3
            ).uploads_in_round
            == 1
        )
        slow = stack.enter_context(
            RafloraClient(server.target, "stalled", "slow", enrolment_secret=secret)
        )
        slow.join(rank=16, num_examples=5)
        assert slow.token is not None
        payload = save(factors(16, 2, MODULES, fan_in_scaled=True))
        header = push_header("stalled", "slow", payload, rank=16, num_examples=5)
        release = stack.enter_context(_Event())

        def stalls() -> Iterator[pb.PushRequest]:
            yield pb.PushRequest(header=header)
            for chunk in list(iter_chunks(payload, 1024))[:5]:
                yield pb.PushRequest(data=chunk)
            release.wait(30)  # then nothing: the connection stays open, the stream idle

        channel = stack.enter_context(grpc.insecure_channel(server.target))
        stub: Any = pb_grpc.AggregationServiceStub(channel)
        metadata = (("authorization", f"Bearer {slow.token}"),)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Push(stalls(), timeout=30, metadata=metadata)
        elapsed = time.monotonic() - started
        release.set()
        error: Any = info.value
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.details().startswith("stream: no message for 1s")
        assert 0.9 < elapsed < 10
        assert wait_until(lambda: incoming(data_dir) == [])
        assert good.status().uploads == 1
        metrics = scrape(server.metrics_url)
        assert (
            'raflora_upload_errors_total{code="DEADLINE_EXCEEDED",federation="stalled"} 1.0'
            in metrics
        )
        # The slow client tries again at full speed and the round completes.
        assert (
            slow.push(
                factors(16, 2, MODULES, fan_in_scaled=True), round=0, num_examples=5
            ).uploads_in_round
            == 2
        )
        assert good.wait_for_round(0, timeout=30).round == 1


class _Event:
    """A threading.Event that is set when the test leaves (so no generator waits forever)."""

    def __init__(self) -> None:
        import threading

        self._event = threading.Event()

    def __enter__(self) -> _Event:
        return self

    def __exit__(self, *exc: object) -> None:
        self._event.set()

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)

    def set(self) -> None:
        self._event.set()


# -- the server SIGKILLed while it aggregates ---------------------------------------------------

AGG_MODULES = {"layers.0.q": (48, 32), "layers.0.v": (32, 40)}
AGG_CLIENTS = [("a", 2, 10), ("b", 4, 30), ("c", 8, 20)]


def test_server_killed_during_aggregation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    auth = ["--admin-token-file", str(token_file)]
    started: list[ServerProcess] = []
    try:
        first = start_server_process(
            data,
            tmp_path / "first.log",
            extra_args=auth,
            env={"RAFLORA_DEBUG_AGGREGATION_DELAY_SECONDS": "60"},
        )
        started.append(first)
        with AdminClient(first.target, admin_token=ADMIN_TOKEN) as admin:
            secret = admin.create_federation(
                every_client_spec("agg", AGG_MODULES, 3, max_rank=8), open_enrolment=True
            ).enrolment_secret
        uploads: dict[str, dict[str, torch.Tensor]] = {}
        tokens = {}
        for i, (cid, rank, n) in enumerate(AGG_CLIENTS):
            with RafloraClient(
                first.target,
                "agg",
                cid,
                enrolment_secret=secret,
                credential_file=tmp_path / f"{cid}.credential",
            ) as client:
                client.join(rank=rank, num_examples=n)
                uploads[cid] = factors(rank, i, AGG_MODULES, fan_in_scaled=True)
                result = client.push(uploads[cid], round=0, num_examples=n)
                assert result.uploads_in_round == i + 1  # acknowledged
                tokens[cid] = client.token
        # The third upload closed the round: the server aggregates, writes the new state into a
        # temporary directory, and (test hook) sleeps before renaming it into place.
        rounds = data / "federations" / "agg" / "rounds"
        assert wait_until(lambda: any(rounds.glob(".tmp-*/manifest.json")), timeout=30)
        # The hook logs as it starts to sleep; the log may trail the file by a moment.
        assert wait_until(lambda: "debug_aggregation_delay_seconds" in first.log_text(), timeout=10)
        first.kill()
        assert first.process.returncode == -signal.SIGKILL
        assert not (rounds / "00000001").exists()  # nothing half-published

        second = start_server_process(data, tmp_path / "second.log", extra_args=auth)
        started.append(second)
        # On start the federation finds its three acknowledged uploads and aggregates again.
        with RafloraClient(second.target, "agg", "a", token=tokens["a"]) as client:
            status = client.wait_for_round(0, timeout=60)  # tokens survive the restart
            assert status.round == 1
        assert not list(rounds.glob(".tmp-*"))  # the orphan was cleaned up
        store = FileFederationStore(data / "federations" / "agg")
        manifest = store.read_manifest(1)
        assert sorted(u.client_id for u in manifest.uploads) == ["a", "b", "c"]
        for u in manifest.uploads:
            assert (
                u.sha256 == hashlib.sha256(PushPayload(uploads[u.client_id]).to_bytes()).hexdigest()
            )
        strategy = make_strategy(
            "raflora",
            StrategyConfig(schema=AdapterSchema.from_shapes(AGG_MODULES), max_rank=8),
        )
        expected = strategy.aggregate(
            strategy.initial_state(),
            [
                engine_update(cid, rank, n, 16.0, uploads[cid], AGG_MODULES)
                for cid, rank, n in AGG_CLIENTS
            ],
        )
        published = store.load_published(1, AdapterSchema.from_shapes(AGG_MODULES))[0]
        for m in AGG_MODULES:
            assert rel_err(published.dense(m), expected.dense(m)) < 1e-5
        with RafloraClient(
            second.target, "agg", "c", credential_file=tmp_path / "c.credential"
        ) as client:
            client.join(rank=8, num_examples=20)
            assert client.pull().round == 1  # and it serves on
        assert second.terminate() == 0
    finally:
        for handle in started:
            if handle.running:
                handle.kill()


# -- the disk fills up while the server persists ------------------------------------------------

DISK_MODULES = {f"layers.{i}.proj": (256, 256) for i in range(4)}  # rank 32: 256 KiB uploads
DISK_RANK = 32


def aggregation_failures(server: ThreadedServer) -> float:
    return metric_value(server.metrics_url, "raflora_aggregation_failures_total", federation="disk")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'not permitted'}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(path: Path, leave: int = 0) -> None:
    """Write ``path`` until the file system has about ``leave`` bytes left."""
    block = b"\0" * 4096
    with path.open("ab") as f:
        while True:
            free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
            if free <= leave:
                break
            try:
                f.write(block)
                f.flush()
            except OSError:
                break


def test_disk_full_while_persisting(small_disk: Path) -> None:
    data_dir = small_disk / "data"
    with threaded_server(data_dir) as server, ExitStack() as stack:
        AdminClient(server.target).create_federation(
            every_client_spec("disk", DISK_MODULES, 3, max_rank=DISK_RANK)
        )
        clients = {}
        for cid in "abcd":
            clients[cid] = stack.enter_context(
                RafloraClient(server.target, "disk", cid, retry=NO_RETRY)
            )
        for cid in "abc":
            clients[cid].join(rank=DISK_RANK, num_examples=4)
        assert clients["a"].pull().round == 0  # build the round-0 view while there is room
        tensors = {
            cid: factors(DISK_RANK, i, DISK_MODULES, fan_in_scaled=True)
            for i, cid in enumerate("abc")
        }
        upload_bytes = PushPayload(tensors["a"]).total_bytes
        assert clients["a"].push(tensors["a"], round=0, num_examples=4).uploads_in_round == 1
        acked = data_dir / "federations" / "disk" / "uploads" / "00000000" / "a.safetensors"
        acked_sha = hashlib.sha256(acked.read_bytes()).hexdigest()

        ballast = small_disk / "ballast"
        fill(ballast)
        # Full: an upload, a join and a new view are each refused with a clear status.
        with pytest.raises(ResourceExhaustedError) as push_full:
            clients["b"].push(tensors["b"], round=0, num_examples=4)
        assert push_full.value.details.startswith("storage: disk full")
        with pytest.raises(ResourceExhaustedError) as join_full:
            clients["d"].join(rank=4, num_examples=1)
        assert join_full.value.field == "storage"
        status = clients["a"].status()
        assert (status.uploads, status.joined_clients) == (1, 3)
        assert incoming(data_dir) == []
        assert hashlib.sha256(acked.read_bytes()).hexdigest() == acked_sha  # untouched

        # Room for the two remaining uploads but not for publishing the round.
        ballast.unlink()
        fill(ballast, leave=2 * upload_bytes + 64 * 1024)
        for cid in "bc":
            result = clients[cid].push(tensors[cid], round=0, num_examples=4)
            assert not result.duplicate
        assert wait_until(lambda: aggregation_failures(server) >= 1, timeout=15)
        status = clients["a"].status()
        assert (status.round, status.uploads) == (0, 3)  # the round still holds all three
        assert not list((data_dir / "federations" / "disk" / "rounds").glob(".tmp-*"))

        # Space comes back: the server retries on its own and publishes; everyone carries on.
        ballast.unlink()
        assert clients["a"].wait_for_round(0, timeout=30).round == 1
        manifest = FileFederationStore(data_dir / "federations" / "disk").read_manifest(1)
        assert sorted(u.client_id for u in manifest.uploads) == ["a", "b", "c"]
        assert next(u for u in manifest.uploads if u.client_id == "a").sha256 == acked_sha
        assert clients["b"].pull().round == 1
        clients["d"].join(rank=4, num_examples=1)
        assert clients["d"].status().joined_clients == 4
        failures = [
            line
            for line in scrape(server.metrics_url).splitlines()
            if line.startswith("raflora_upload_errors_total")
        ]
        assert any('code="RESOURCE_EXHAUSTED"' in line for line in failures), failures
        joined = data_dir / "federations" / "disk" / "clients"
        assert sorted(json.loads(f.read_text())["client_id"] for f in joined.glob("*.json")) == [
            *"abcd"
        ]
