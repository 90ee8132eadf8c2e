"""Benchmark the aggregation service end to end over loopback gRPC.

The server runs as a separate ``raflora-server`` process (one fresh process per phase, so its
peak RSS, ``VmHWM`` in ``/proc/<pid>/status``, belongs to that phase alone; a 5 ms sampler also
records the peak of ``RssAnon``, i.e. without the mmap-ed upload files the server validates);
clients are the real SDK in this process. Measured in the same run:

* **raw TCP**: a loopback socket copy of the same number of bytes, both directions
  (``sendall`` of one buffer, ``recv_into`` a preallocated buffer in 4 MiB windows);
* **throughput**, per adapter size: one client pushes a rank-64 fp32 adapter of 4096×4096
  modules (2 MiB per module) with the SDK's ``push`` (safetensors serialisation, SHA-256,
  chunked stream; on the server: hash, spill to disk, validation, fsync, ack), then ``pull``\\ s
  it twice: the first pull of a (round, rank, scale) builds the server's cached view, the
  second only streams it (round 0: the view is built from the empty initial state).
  ``min_clients`` is above the number of pushes, so no aggregation runs during this phase.
  Each repeat uses a new client (a new upload, not a duplicate) with its own ``lora_alpha``
  (a new view, so every repeat measures a cold first pull);
* **round**: ``--clients`` SDK clients in threads (gRPC releases the GIL while it waits) join
  a federation of four 1024×1024 modules at ranks 4/8/16/32 and pull; then all push at once
  through a barrier while one watcher stream records the AGGREGATING and PUBLISHED events.
  Turnaround is the time from the last push's acknowledgement (on the client) to PUBLISHED;
  after that every client pulls the new round.

Round-trip throughput is ``size / (push time + pull time)``: adapter bytes per second of a
full upload-then-download, each byte counted once (the raw-TCP round trip is defined the same
way, so the ratio is like for like).

``--server-threads N`` sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for the server process:
on a busy 2-core machine torch's default two intra-op threads can make validation, view
building and aggregation many times slower (see docs/benchmarks.md).

Progress goes to stderr; Markdown tables and PASS/MISS verdicts against the goals (>= 500 MiB/s
round trip for 64 MiB, turnaround under a second) go to stdout; ``--json`` writes every
measurement. Run from the repository root::

    .venv/bin/python bench/bench_service.py --json /tmp/bench_service.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from cpu_time import machine_cpu_seconds
from safetensors.torch import save as save_safetensors
from torch import Tensor

from raflora.client_sdk import AdminClient, RafloraClient, lora_state_dict, pb
from raflora.client_sdk.payload import PushPayload
from raflora.server.testing import ServerProcess, federation_spec, scrape, start_server_process
from raflora.v1 import aggregation_pb2_grpc as pb_grpc

MiB = 1 << 20
MODULE_DIM = 4096
THROUGHPUT_RANK = 64
ROUND_RANKS = (4, 8, 16, 32)
ROUND_MODULES = 4
ROUND_DIM = 1024
TCP_WINDOW = 4 * MiB
GOAL_ROUND_TRIP_MIB_S = 500.0
GOAL_TURNAROUND_S = 0.1  # issue 14: last ack -> PUBLISHED at 64 clients
ROUND_PATHS = {
    "summed": {"RAFLORA_FOLD_MEMORY_MIB": "0"},  # the default server: sums kept as uploads arrive
    "folded": {"RAFLORA_FOLD_MEMORY_MIB": "2048"},
    # The reference: every close stacks and sketches the uploads themselves.
    "one-shot": {"RAFLORA_FOLD_MEMORY_MIB": "0", "RAFLORA_ROUND_SUMS_MEMORY_MIB": "0"},
}
GOAL_SIZE_MIB = 64
GOAL_ECHO_CACHED = 0.75  # issue 14: push + cached pull vs the raw grpcio echo
GOAL_ECHO_FIRST = 0.6
LOAD_BEFORE = [0.0]  # the 1-minute load average when the run started (main sets it)


def contended(busy: float) -> str:
    """A verdict's suffix when other work shared the machine: the load average before the
    run (this bench had not started yet) was above 1. ``busy`` is shown beside it."""
    if LOAD_BEFORE[0] > 1.0:
        return f" (load {LOAD_BEFORE[0]:.1f}, cores busy {busy:.2f}: contended, rerun quiet)"
    return ""


def round_contended(summary: dict[str, float]) -> str:
    """A round verdict's suffix when other work shared the machine during its phase."""
    other, steal = summary["other_cores_busy"], summary["steal_share"]
    if LOAD_BEFORE[0] > 1.0 or other > OTHER_CORES_LIMIT or steal > STEAL_LIMIT:
        return (
            f" (load {LOAD_BEFORE[0]:.1f}, other processes {other:.2f} cores, stolen "
            f"{steal:.0%}: contended, rerun quiet)"
        )
    return ""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: Sequence[float], q: float) -> float:
    """numpy's linear-interpolated percentile, q in [0, 100]; NaN for no samples."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


# -- server process and its memory -------------------------------------------------------------
def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """Samples VmRSS of a process every few ms; ``peak`` also folds in the kernel's VmHWM."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.max_rss_kib = 0
        self.max_anon_kib = 0  # RssAnon: heap and buffers, without mmap-ed file pages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_rss_kib = max(self.max_rss_kib, proc_status_kib(self.pid, "VmRSS"))
                self.max_anon_kib = max(self.max_anon_kib, proc_status_kib(self.pid, "RssAnon"))
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mib(self) -> float:
        hwm = proc_status_kib(self.pid, "VmHWM")
        return max(hwm, self.max_rss_kib) / 1024

    def peak_anon_mib(self) -> float:
        return self.max_anon_kib / 1024


@dataclass
class Server:
    process: ServerProcess
    idle_rss_mib: float

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return self.process.target


def launch(workdir: Path, name: str, env: dict[str, str] | None = None) -> Server:
    data = workdir / name
    data.mkdir(parents=True)
    handle = start_server_process(data, workdir / f"{name}.log", env=env)
    idle = proc_status_kib(handle.pid, "VmRSS") / 1024
    log(f"server {name}: pid {handle.pid}, {handle.target}, idle RSS {idle:.0f} MiB")
    return Server(handle, idle)


def stop(server: Server) -> None:
    code = server.process.terminate()
    if code != 0:
        log(f"warning: server exited with {code}; see {server.process.log}")


# -- raw TCP baseline --------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, buf: memoryview) -> None:
    got, n = 0, len(buf)
    while got < n:
        k = sock.recv_into(buf[got : got + TCP_WINDOW])
        if k == 0:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k


def tcp_copy(payload: bytes, sink: bytearray, upload: bool) -> float:
    """Seconds to move ``payload`` over one loopback TCP connection into ``sink``.

    ``upload``: this thread sends, a server thread receives (the push direction); otherwise
    the server thread sends and this thread receives (the pull direction). The clock runs from
    the first byte handed to the kernel to the last byte landing in ``sink``.
    """
    view = memoryview(sink)[: len(payload)]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        ready = threading.Event()
        done: list[float] = []
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    ready.wait()
                    if upload:
                        _recv_exact(conn, view)
                        done.append(time.perf_counter())
                    else:
                        conn.sendall(payload)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port)) as client:
            start = time.perf_counter()
            ready.set()
            if upload:
                client.sendall(payload)
            else:
                _recv_exact(client, view)
                done.append(time.perf_counter())
            thread.join(120)
        if errors:
            raise errors[0]
    return done[0] - start


# -- raw grpcio echo (the ceiling for Python gRPC here) ----------------------------------------
ECHO_CHUNKS = (1 * MiB, 4 * MiB)


def grpc_echo(payload: bytes, repeats: int) -> tuple[dict[int, list[float]], list[float]]:
    """Seconds to echo ``payload`` through a bare grpcio server process (bench/grpc_echo_server),
    per chunk size: the client streams the chunks up while the server streams them back. Then,
    in 1 MiB chunks (the service's), seconds to stream it up and then down, one way at a
    time: what a push followed by a pull could take with no service at all."""
    import subprocess

    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("grpc_echo_server.py"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        options = [("grpc.max_receive_message_length", 16 * MiB)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.stream_stream(
                "/bench.Echo/Echo", request_serializer=None, response_deserializer=None
            )
            view = memoryview(payload)
            out: dict[int, list[float]] = {}
            for chunk in ECHO_CHUNKS:
                sum(len(m) for m in call(_messages(view, chunk)))  # warm the channel at this size
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    got = sum(len(m) for m in call(_messages(view, chunk)))
                    times.append(time.perf_counter() - t0)
                    if got != len(payload):
                        raise RuntimeError(f"echo returned {got} of {len(payload)} bytes")
                out[chunk] = times
            one_way = _grpc_up_then_down(channel, view, repeats)
            return out, one_way
    finally:
        server.kill()
        server.wait()


def _messages(view: memoryview, size: int) -> Iterator[bytes]:
    """``view`` as the echo server's messages of ``size`` bytes (a copy each, as grpcio sends)."""
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


def _grpc_up_then_down(channel: grpc.Channel, view: memoryview, repeats: int) -> list[float]:
    up = channel.stream_unary("/bench.Echo/Up", None, None)
    down = channel.unary_stream("/bench.Echo/Down", None, None)
    up(_messages(view, MiB))  # warm
    sum(len(m) for m in down(b""))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        up(_messages(view, MiB))
        got = sum(len(m) for m in down(b""))
        times.append(time.perf_counter() - t0)
        if got != len(view):
            raise RuntimeError(f"down returned {got} of {len(view)} bytes")
    return times


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Other processes busier than this, or a hypervisor stealing more than this share of the
# machine, during a round phase: its figures are contended (the clients idle between
# staggered pushes, so this bench's own cores busy says nothing by itself there).
OTHER_CORES_LIMIT = 0.25
STEAL_LIMIT = 0.05


# -- payloads ----------------------------------------------------------------------------------
def make_adapter(modules: int, dim: int, rank: int, seed: int) -> dict[str, Tensor]:
    """PEFT-named fp32 factors, the same rank for every module."""
    g = torch.Generator().manual_seed(seed)
    factors = {
        f"layers.{i}.proj": (
            torch.randn(dim, rank, generator=g) * 0.01,
            torch.randn(rank, dim, generator=g) * 0.01,
        )
        for i in range(modules)
    }
    return lora_state_dict(factors)


def module_shapes(modules: int, dim: int) -> dict[str, tuple[int, int]]:
    return {f"layers.{i}.proj": (dim, dim) for i in range(modules)}


# -- phase 1: throughput -----------------------------------------------------------------------
@dataclass
class TransferRun:
    repeat: int
    payload_bytes: int
    client_prep_s: float  # the SDK's serialisation into one buffer (a push streams it instead)
    push_s: float
    pull_first_s: float
    pull_cached_s: float
    server_push_s: float  # the server's own push histogram: first message to ack
    server_cpu_s: float = 0.0  # the server process's CPU time over push + both pulls
    client_cpu_s: float = 0.0


@dataclass
class SizeResult:
    size_mib: int
    modules: int
    payload_bytes: int
    tcp_up_s: list[float]
    tcp_down_s: list[float]
    echo_s: dict[int, list[float]]
    one_way_s: list[float]
    runs: list[TransferRun]
    server_idle_rss_mib: float
    server_peak_rss_mib: float
    server_peak_anon_mib: float
    summary: dict[str, float] = field(default_factory=dict)


def scrape_sum(url: str, metric: str) -> float:
    """The sum of ``metric`` over all its label sets, from one scrape of ``url``."""
    total = 0.0
    for line in scrape(url).splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def bench_size(workdir: Path, size_mib: int, repeats: int) -> SizeResult:
    per_module = THROUGHPUT_RANK * 2 * MODULE_DIM * 4
    modules = max(1, round(size_mib * MiB / per_module))
    log(f"--- {size_mib} MiB: {modules} modules {MODULE_DIM}x{MODULE_DIM} at rank 64, fp32")
    tensors = make_adapter(modules, MODULE_DIM, THROUGHPUT_RANK, seed=size_mib)
    payload = save_safetensors(tensors)
    n = len(payload)

    sink = bytearray(n)
    sink[:] = payload  # fault the receive buffer in once; every copy below reuses it
    up, down = [], []
    for i in range(repeats):
        up.append(tcp_copy(payload, sink, upload=True))
        down.append(tcp_copy(payload, sink, upload=False))
        log(f"raw tcp #{i}: up {n / MiB / up[-1]:.0f} MiB/s, down {n / MiB / down[-1]:.0f} MiB/s")
    del sink
    gc.collect()
    echo, one_way = grpc_echo(payload, repeats)
    for chunk, times in echo.items():
        log(f"grpc echo, {chunk // MiB} MiB chunks: {2 * n / MiB / median(times):.0f} MiB/s moved")
    log(f"grpc up, then down (1 MiB chunks): {2 * n / MiB / median(one_way):.0f} MiB/s moved")

    server = launch(workdir, f"size-{size_mib}")
    runs: list[TransferRun] = []
    federation = f"tp-{size_mib}"
    metrics_url = server.process.metrics_url
    push_metric = "raflora_push_duration_seconds_sum"
    with RssSampler(server.pid) as sampler:
        with AdminClient(server.target) as admin:
            admin.create_federation(
                federation_spec(
                    federation,
                    module_shapes(modules, MODULE_DIM),
                    max_rank=THROUGHPUT_RANK,
                    min_clients=repeats + 2,
                )
            )
        for i in range(repeats):
            gc.collect()
            t0 = time.perf_counter()
            PushPayload(tensors).to_bytes()  # what a push serialises, here into one buffer
            prep = time.perf_counter() - t0
            with RafloraClient(server.target, federation, f"client-{i}") as client:
                # A distinct alpha per client: a distinct scale, hence a cold view per repeat.
                info = client.join(THROUGHPUT_RANK, num_examples=100, lora_alpha=16.0 + i)
                before = scrape_sum(metrics_url, push_metric)
                cpu0, own0 = cpu_seconds(server.pid), time.process_time()
                t0 = time.perf_counter()
                result = client.push(tensors, round=info.round, num_examples=100)
                push = time.perf_counter() - t0
                server_push = scrape_sum(metrics_url, push_metric) - before
                if result.duplicate or result.received_bytes != n:
                    raise RuntimeError(f"unexpected push result {result}")
                t0 = time.perf_counter()
                first = client.pull()
                pull_first = time.perf_counter() - t0
                del first
                gc.collect()
                t0 = time.perf_counter()
                second = client.pull()
                pull_cached = time.perf_counter() - t0
                cpu = cpu_seconds(server.pid) - cpu0
                own = time.process_time() - own0
                del second
                gc.collect()
            run = TransferRun(i, n, prep, push, pull_first, pull_cached, server_push, cpu, own)
            runs.append(run)
            log(
                f"service #{i}: push {n / MiB / push:.0f} MiB/s ({push:.2f}s; server side "
                f"{server_push:.2f}s, client prep {prep:.2f}s), pull first "
                f"{n / MiB / pull_first:.0f} MiB/s, cached {n / MiB / pull_cached:.0f} MiB/s"
            )
        peak, anon = sampler.peak_mib(), sampler.peak_anon_mib()
    stop(server)
    shutil.rmtree(workdir / f"size-{size_mib}", ignore_errors=True)
    res = SizeResult(
        size_mib, modules, n, up, down, echo, one_way, runs, server.idle_rss_mib, peak, anon
    )
    res.summary = summarise_size(res)
    return res


def summarise_size(r: SizeResult) -> dict[str, float]:
    mib = r.payload_bytes / MiB
    tcp_up, tcp_down = median(r.tcp_up_s), median(r.tcp_down_s)
    push = median([x.push_s for x in r.runs])
    first = median([x.pull_first_s for x in r.runs])
    cached = median([x.pull_cached_s for x in r.runs])
    rt_cached = median([x.push_s + x.pull_cached_s for x in r.runs])
    rt_first = median([x.push_s + x.pull_first_s for x in r.runs])
    tcp_rt = median([u + d for u, d in zip(r.tcp_up_s, r.tcp_down_s, strict=True)])
    # Bytes moved per second (each byte up, then down): the unit of the grpc echo.
    echo_best = min(median(t) for t in r.echo_s.values())
    echo_mib_s = 2 * mib / echo_best
    moved = 2 * mib
    busy = [
        (x.server_cpu_s + x.client_cpu_s) / (x.push_s + x.pull_first_s + x.pull_cached_s)
        for x in r.runs
    ]
    return {
        "echo_mib_s": echo_mib_s,
        **{f"echo_{c // MiB}mib_mib_s": 2 * mib / median(t) for c, t in r.echo_s.items()},
        "moved_cached_mib_s": moved / rt_cached,
        "moved_cached_vs_echo": moved / rt_cached / echo_mib_s,
        "one_way_mib_s": moved / median(r.one_way_s),
        "moved_cached_vs_one_way": median(r.one_way_s) / rt_cached,
        "moved_first_vs_one_way": median(r.one_way_s) / rt_first,
        "moved_first_mib_s": moved / rt_first,
        "moved_first_vs_echo": moved / rt_first / echo_mib_s,
        "cores_busy": median(busy),
        "tcp_up_mib_s": mib / tcp_up,
        "tcp_down_mib_s": mib / tcp_down,
        "tcp_round_trip_mib_s": mib / tcp_rt,
        "push_s": push,
        "push_mib_s": mib / push,
        "push_ratio": tcp_up / push,
        "client_prep_s": median([x.client_prep_s for x in r.runs]),
        "server_cpu_s": median([x.server_cpu_s for x in r.runs]),
        "client_cpu_s": median([x.client_cpu_s for x in r.runs]),
        "server_push_s": median([x.server_push_s for x in r.runs]),
        "pull_first_s": first,
        "pull_first_mib_s": mib / first,
        "pull_cached_s": cached,
        "pull_cached_mib_s": mib / cached,
        "pull_cached_ratio": tcp_down / cached,
        "round_trip_s": rt_cached,
        "round_trip_mib_s": mib / rt_cached,
        "round_trip_ratio": tcp_rt / rt_cached,
        "round_trip_cold_s": rt_first,
        "round_trip_cold_mib_s": mib / rt_first,
        "round_trip_cold_ratio": tcp_rt / rt_first,
    }


# -- phase 2: one round with many concurrent clients -------------------------------------------
@dataclass
class RoundRun:
    round: int
    push_latency_s: list[float]
    first_push_start: float
    last_ack: float
    aggregating_at: float
    published_at: float
    all_pulled_at: float
    summary: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundResult:
    path: str  # "summed" (the default), "folded" or "one-shot" (the reference): ROUND_PATHS
    uploads: str  # "same": one adapter per rank; "distinct": one per client
    clients: int
    payload_bytes_by_rank: dict[int, int]
    runs: list[RoundRun]
    server_idle_rss_mib: float
    server_peak_rss_mib: float
    server_peak_anon_mib: float
    summary: dict[str, float] = field(default_factory=dict)
    stagger_s: float = 0.0  # the window the pushes were spread over (0: all at once)

    @property
    def label(self) -> str:
        spread = f", spread over {self.stagger_s * 1e3:.0f} ms" if self.stagger_s else ""
        return f"{self.path}, {self.uploads} uploads{spread}"


class Watcher:
    """One WatchRounds stream; records when each round's AGGREGATING and PUBLISHED arrive."""

    def __init__(self, target: str, federation: str) -> None:
        self.channel = grpc.insecure_channel(target)
        stub = pb_grpc.AggregationServiceStub(self.channel)
        self.stream = stub.WatchRounds(pb.WatchRoundsRequest(federation_id=federation))
        self.subscribed = threading.Event()
        self.aggregating: dict[int, float] = {}
        self.published: dict[int, float] = {}
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.subscribed.wait(30):
            raise TimeoutError("watch stream did not start")

    def _run(self) -> None:
        try:
            for event in self.stream:
                now = time.perf_counter()
                with self.cond:
                    if event.type == pb.ROUND_EVENT_TYPE_STATUS:
                        self.subscribed.set()
                    elif event.type == pb.ROUND_EVENT_TYPE_AGGREGATING:
                        # Sent while the closing round is still the open one: it becomes
                        # round + 1 when PUBLISHED arrives.
                        self.aggregating[event.status.round + 1] = now
                    elif event.type == pb.ROUND_EVENT_TYPE_PUBLISHED:
                        self.published[event.status.round] = now
                    elif event.type == pb.ROUND_EVENT_TYPE_FAILED:
                        log(f"aggregation failed: {event.message}")
                    self.cond.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log(f"watch stream ended: {exc.code()}")

    def wait_published(self, round_: int, timeout: float) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: round_ in self.published, timeout):
                raise TimeoutError(f"round {round_} was not published within {timeout}s")
            return self.published[round_]

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(10)
        self.channel.close()


def run_threads(n: int, fn: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def one_round(
    clients: list[RafloraClient],
    adapters: list[dict[str, Tensor]],
    watcher: Watcher,
    round_: int,
    stagger_s: float = 0.0,
) -> RoundRun:
    """Every client pushes at once (after a barrier), or client i ``i·stagger_s / n`` later
    (clients that finish training at different times); then waits for the round and pulls
    it."""
    n = len(clients)
    barrier = threading.Barrier(n + 1)
    starts = [0.0] * n
    acks = [0.0] * n

    def push(i: int) -> None:
        barrier.wait()
        if stagger_s:
            time.sleep(stagger_s * i / n)
        starts[i] = time.perf_counter()
        clients[i].push(adapters[i], round=round_, num_examples=50 + i)
        acks[i] = time.perf_counter()

    threads = [threading.Thread(target=push, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join(300)
    if not all(acks):
        raise RuntimeError("some pushes did not finish")
    published = watcher.wait_published(round_ + 1, 300)
    pulled = [0.0] * n

    def pull(i: int) -> None:
        got = clients[i].pull()
        if got.round != round_ + 1:
            raise RuntimeError(f"client {i} pulled round {got.round}, not {round_ + 1}")
        pulled[i] = time.perf_counter()

    run_threads(n, pull)
    run = RoundRun(
        round_ + 1,
        [a - s for a, s in zip(acks, starts, strict=True)],
        min(starts),
        max(acks),
        watcher.aggregating.get(round_ + 1, float("nan")),
        published,
        max(pulled),
    )
    run.summary = summarise_round(run)
    return run


def distinct_adapter(shared: dict[str, Tensor], rank: int, seed: int) -> dict[str, Tensor]:
    """A client's own adapter: the first ``rank`` components of a shared one plus 10 % noise
    of its own, so the round's sum has a decaying spectrum and every upload adds directions."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for key, t in shared.items():
        part = t[:, :rank] if "lora_B" in key else t[:rank]
        out[key] = (part + 0.1 * part.std() * torch.randn(part.shape, generator=g)).contiguous()
    return out


def bench_round(
    workdir: Path, n_clients: int, rounds: int, path: str, uploads: str, stagger_s: float = 0.0
) -> RoundResult:
    spread = f", pushes spread over {stagger_s * 1e3:.0f} ms" if stagger_s else ", pushes at once"
    log(
        f"--- round ({path}, {uploads} uploads): {n_clients} clients, {ROUND_MODULES} modules "
        f"{ROUND_DIM}x{ROUND_DIM}{spread}"
    )
    server = launch(workdir, f"round-{path}", ROUND_PATHS[path])
    federation = "round-bench"
    ranks = [ROUND_RANKS[i % len(ROUND_RANKS)] for i in range(n_clients)]
    by_rank = {r: make_adapter(ROUND_MODULES, ROUND_DIM, r, seed=r) for r in sorted(set(ranks))}
    sizes = {r: len(save_safetensors(a)) for r, a in by_rank.items()}
    if uploads == "same":
        adapters = [by_rank[r] for r in ranks]
    else:
        shared = make_adapter(ROUND_MODULES, ROUND_DIM, max(ROUND_RANKS), seed=0)
        adapters = [distinct_adapter(shared, r, i) for i, r in enumerate(ranks)]
    runs: list[RoundRun] = []
    with RssSampler(server.pid) as sampler:
        with AdminClient(server.target) as admin:
            admin.create_federation(
                federation_spec(
                    federation,
                    module_shapes(ROUND_MODULES, ROUND_DIM),
                    max_rank=max(ROUND_RANKS),
                    min_clients=n_clients,
                    expected_clients=n_clients,
                )
            )
        clients = [RafloraClient(server.target, federation, f"c{i:03d}") for i in range(n_clients)]

        def join_and_pull(i: int) -> None:
            clients[i].join(ranks[i], num_examples=50 + i)
            clients[i].pull()

        run_threads(n_clients, join_and_pull)
        watcher = Watcher(server.target, federation)
        wall0, ours0 = time.perf_counter(), cpu_seconds(server.pid) + time.process_time()
        busy0, stolen0 = machine_cpu_seconds()
        try:
            for k in range(rounds):
                run = one_round(clients, adapters, watcher, k, stagger_s)
                runs.append(run)
                s = run.summary
                log(
                    f"round {run.round}: push p50 {s['push_p50_s'] * 1e3:.0f} ms, p99 "
                    f"{s['push_p99_s'] * 1e3:.0f} ms; last ack -> published "
                    f"{s['turnaround_s'] * 1e3:.0f} ms; -> all pulled "
                    f"{s['publish_to_all_pulled_s'] * 1e3:.0f} ms"
                )
        finally:
            watcher.close()
            for c in clients:
                c.close()
        wall = time.perf_counter() - wall0
        ours = cpu_seconds(server.pid) + time.process_time() - ours0
        busy, stolen = (b - a for a, b in zip((busy0, stolen0), machine_cpu_seconds(), strict=True))
        peak, anon = sampler.peak_mib(), sampler.peak_anon_mib()
        folded = scrape_sum(server.process.metrics_url, "raflora_rounds_folded_total")
        summed = scrape_sum(server.process.metrics_url, "raflora_rounds_summed_total")
    stop(server)
    shutil.rmtree(workdir / f"round-{path}", ignore_errors=True)
    log(
        f"{path}: of {len(runs)} rounds, {folded:.0f} closed from folded uploads, "
        f"{summed:.0f} from their sums, the rest one-shot"
    )
    result = RoundResult(path, uploads, n_clients, sizes, runs, server.idle_rss_mib, peak, anon)
    result.stagger_s = stagger_s
    latencies = [x for r in runs for x in r.push_latency_s]
    result.summary = {
        "push_p50_s": percentile(latencies, 50),
        "push_p99_s": percentile(latencies, 99),
        "push_max_s": max(latencies),
        "turnaround_s": median([r.summary["turnaround_s"] for r in runs]),
        "turnaround_max_s": max(r.summary["turnaround_s"] for r in runs),
        "round_wall_s": median([r.summary["round_wall_s"] for r in runs]),
        "publish_to_all_pulled_s": median([r.summary["publish_to_all_pulled_s"] for r in runs]),
        "server_peak_rss_mib": peak,
        "cores_busy": ours / wall,  # the server and this bench's clients
        "other_cores_busy": max(0.0, busy - ours) / wall,  # every other process
        "steal_share": stolen / (wall * (os.cpu_count() or 1)),
    }
    return result


def summarise_round(r: RoundRun) -> dict[str, float]:
    return {
        "push_p50_s": percentile(r.push_latency_s, 50),
        "push_p99_s": percentile(r.push_latency_s, 99),
        "push_max_s": max(r.push_latency_s),
        "pushes_wall_s": r.last_ack - r.first_push_start,
        "ack_to_aggregating_s": r.aggregating_at - r.last_ack,
        "aggregating_to_published_s": r.published_at - r.aggregating_at,
        "turnaround_s": r.published_at - r.last_ack,
        "round_wall_s": r.published_at - r.first_push_start,
        "publish_to_all_pulled_s": r.all_pulled_at - r.published_at,
    }


# -- phase 3: memory of a large adapter's round trip ------------------------------------
def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def bench_memory(workdir: Path, mib: int) -> list[str]:
    """A large adapter's round trip: the client's peak increase against the payload and the
    server's anonymous memory; a memcpy into a fresh buffer is the same-run reference."""
    log(f"--- memory: a {mib} MiB adapter round trip")
    per_module = THROUGHPUT_RANK * 2 * MODULE_DIM * 4
    modules = max(1, round(mib * MiB / per_module))
    tensors = make_adapter(modules, MODULE_DIM, THROUGHPUT_RANK, seed=1)
    payload_mib = PushPayload(tensors).total_bytes / MiB
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    t0 = time.perf_counter()
    copy = flat.clone()  # into a fresh buffer: the page faults are part of it
    memcpy_s = time.perf_counter() - t0
    del copy, flat
    gc.collect()
    server = launch(workdir, "mem")
    try:
        with AdminClient(server.target) as admin:
            admin.create_federation(
                federation_spec(
                    "mem",
                    module_shapes(modules, MODULE_DIM),
                    max_rank=THROUGHPUT_RANK,
                    min_clients=3,
                )
            )
        with RafloraClient(server.target, "mem", "c0", timeout=600) as client:
            info = client.join(THROUGHPUT_RANK, num_examples=10)
            client.pull()  # build the round-0 view now: the timed pull only streams it
            gc.collect()
            with RssSampler(os.getpid()) as own, RssSampler(server.pid) as srv:
                base = rss_mib()
                t0 = time.perf_counter()
                client.push(tensors, round=info.round, num_examples=10)
                push_s = time.perf_counter() - t0
                push_peak = own.max_rss_kib / 1024 - base
            gc.collect()
            with RssSampler(os.getpid()) as own2, RssSampler(server.pid) as srv2:
                base2 = rss_mib()
                t0 = time.perf_counter()
                pulled = client.pull()
                pull_s = time.perf_counter() - t0
                pull_peak = own2.max_rss_kib / 1024 - base2
            del pulled
    finally:
        stop(server)
    out = []
    out.append(f"adapter: {payload_mib:.0f} MiB ({modules} modules {MODULE_DIM}², rank 64, fp32)")
    out.append(f"memcpy into a fresh buffer: {memcpy_s:.2f} s ({payload_mib / memcpy_s:.0f} MiB/s)")
    out.append(
        f"push: {push_s:.2f} s ({payload_mib / push_s:.0f} MiB/s, {memcpy_s / push_s:.2f}× "
        f"memcpy); client peak increase {push_peak:.0f} MiB = {push_peak / payload_mib:.2f}× "
        f"the payload; server anonymous peak {srv.peak_anon_mib():.0f} MiB "
        f"(idle RSS {server.idle_rss_mib:.0f} MiB)"
    )
    out.append(
        f"pull: {pull_s:.2f} s ({payload_mib / pull_s:.0f} MiB/s); client peak increase "
        f"{pull_peak:.0f} MiB = {pull_peak / payload_mib:.2f}× the payload; server anonymous "
        f"peak {srv2.peak_anon_mib():.0f} MiB"
    )
    worst = max(push_peak, pull_peak) / payload_mib
    verdict = "PASS" if worst <= 1.2 else "MISS"
    out.append(f"{verdict}: client peak {worst:.2f}× the payload vs goal <= 1.2×" + contended(1.0))
    return out


# -- report ------------------------------------------------------------------------------------
def report(sizes: list[SizeResult], round_results: list[RoundResult]) -> list[str]:
    out = []
    if sizes:
        out += [
            "| adapter | raw TCP up / down | push | pull, first (builds view) | pull, cached "
            "| round trip (cached pull) | round trip (first pull) | server peak RSS (anon; idle) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sizes:
            s = r.summary
            mib = r.payload_bytes / MiB
            out.append(
                f"| {mib:.1f} MiB ({r.modules} mod.) "
                f"| {s['tcp_up_mib_s']:.0f} / {s['tcp_down_mib_s']:.0f} MiB/s "
                f"| {s['push_mib_s']:.0f} MiB/s ({s['push_s']:.2f} s, {s['push_ratio']:.2f}× TCP) "
                f"| {s['pull_first_mib_s']:.0f} MiB/s ({s['pull_first_s']:.2f} s) "
                f"| {s['pull_cached_mib_s']:.0f} MiB/s ({s['pull_cached_s']:.2f} s, "
                f"{s['pull_cached_ratio']:.2f}× TCP) "
                f"| {s['round_trip_mib_s']:.0f} MiB/s ({s['round_trip_ratio']:.2f}× TCP) "
                f"| {s['round_trip_cold_mib_s']:.0f} MiB/s ({s['round_trip_cold_ratio']:.2f}× TCP) "
                f"| {r.server_peak_rss_mib:.0f} MiB ({r.server_peak_anon_mib:.0f}; "
                f"{r.server_idle_rss_mib:.0f}) |"
            )
        out.append("")
        out += [
            "| adapter | grpc echo, 1 / 4 MiB chunks (bytes moved) | grpc up, then down "
            "| push + cached pull | × echo | × up-then-down | push + first pull | × echo "
            "| × up-then-down | cores busy (server + client) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sizes:
            s = r.summary
            out.append(
                f"| {r.payload_bytes / MiB:.1f} MiB | {s['echo_1mib_mib_s']:.0f} / "
                f"{s['echo_4mib_mib_s']:.0f} MiB/s | {s['one_way_mib_s']:.0f} MiB/s "
                f"| {s['moved_cached_mib_s']:.0f} MiB/s "
                f"| **{s['moved_cached_vs_echo']:.2f}×** | {s['moved_cached_vs_one_way']:.2f}× "
                f"| {s['moved_first_mib_s']:.0f} MiB/s "
                f"| **{s['moved_first_vs_echo']:.2f}×** | {s['moved_first_vs_one_way']:.2f}× "
                f"| {s['cores_busy']:.2f} |"
            )
        out.append("")
        out += [
            "| adapter | serialise into one buffer (not done by a push) | push: server side "
            "| push total | CPU per transfer (push + 2 pulls): server / client |",
            "|---|---|---|---|---|",
        ]
        for r in sizes:
            s = r.summary
            out.append(
                f"| {r.payload_bytes / MiB:.1f} MiB | {s['client_prep_s']:.2f} s "
                f"| {s['server_push_s']:.2f} s | {s['push_s']:.2f} s "
                f"| {s['server_cpu_s']:.2f} / {s['client_cpu_s']:.2f} s |"
            )
        out.append("")
    for rr in round_results:
        out += [
            f"| round ({rr.label}, {rr.clients} clients) | push p50 "
            "| push p99 | pushes wall "
            "| last ack → AGGREGATING | → PUBLISHED | **last ack → published** "
            "| published → all pulled |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run in rr.runs:
            s = run.summary
            out.append(
                f"| round {run.round} | {s['push_p50_s'] * 1e3:.0f} ms "
                f"| {s['push_p99_s'] * 1e3:.0f} ms | {s['pushes_wall_s'] * 1e3:.0f} ms "
                f"| {s['ack_to_aggregating_s'] * 1e3:.0f} ms "
                f"| {s['aggregating_to_published_s'] * 1e3:.0f} ms "
                f"| **{s['turnaround_s'] * 1e3:.0f} ms** "
                f"| {s['publish_to_all_pulled_s'] * 1e3:.0f} ms |"
            )
        s = rr.summary
        out.append(
            f"| all rounds | {s['push_p50_s'] * 1e3:.0f} ms | {s['push_p99_s'] * 1e3:.0f} ms "
            f"| | | | **{s['turnaround_s'] * 1e3:.0f} ms** (median) "
            f"| {s['publish_to_all_pulled_s'] * 1e3:.0f} ms |"
        )
        payloads = ", ".join(
            f"r{r}: {b / MiB:.2f} MiB" for r, b in rr.payload_bytes_by_rank.items()
        )
        out.append("")
        out.append(
            f"Server peak RSS during the round phase: {rr.server_peak_rss_mib:.0f} MiB "
            f"(anonymous {rr.server_peak_anon_mib:.0f} MiB; idle {rr.server_idle_rss_mib:.0f} MiB)."
            f" Upload sizes: {payloads}. Cores busy {rr.summary['cores_busy']:.2f} (server and "
            f"clients), other processes {rr.summary['other_cores_busy']:.2f}, stolen "
            f"{rr.summary['steal_share']:.0%}."
        )
        out.append("")
    return out


def verdicts(sizes: list[SizeResult], round_results: list[RoundResult]) -> list[str]:
    out = []
    goal = [r for r in sizes if round(r.payload_bytes / MiB) == GOAL_SIZE_MIB]
    if goal:
        s = goal[0].summary
        for label, key in (
            ("cached pull", "round_trip_mib_s"),
            ("first pull", "round_trip_cold_mib_s"),
        ):
            ok = s[key] >= GOAL_ROUND_TRIP_MIB_S
            out.append(
                f"{'PASS' if ok else 'MISS'}: {GOAL_SIZE_MIB} MiB round trip ({label}) "
                f"{s[key]:.0f} MiB/s vs goal >= {GOAL_ROUND_TRIP_MIB_S:.0f} MiB/s"
            )
        for label, key, goal_ratio in (
            ("cached pull", "moved_cached_vs_echo", GOAL_ECHO_CACHED),
            ("first pull", "moved_first_vs_echo", GOAL_ECHO_FIRST),
        ):
            ok = s[key] >= goal_ratio
            out.append(
                f"{'PASS' if ok else 'MISS'}: {GOAL_SIZE_MIB} MiB push + {label} {s[key]:.2f}× "
                f"the grpc echo ({s['echo_mib_s']:.0f} MiB/s moved) vs goal >= {goal_ratio}×"
                + contended(s["cores_busy"])
            )
    else:
        out.append(f"n/a: round-trip goal needs --sizes to include {GOAL_SIZE_MIB}")
    paths = {r.path: r for r in round_results}
    for rr in round_results:
        worst = rr.summary["turnaround_max_s"]
        ok = worst <= GOAL_TURNAROUND_S
        versus = ""
        if rr.path != "one-shot" and "one-shot" in paths:
            reference = paths["one-shot"].summary["turnaround_s"]
            versus = f"; {rr.summary['turnaround_s'] / reference:.2f}× the one-shot close"
        out.append(
            f"{'PASS' if ok else 'MISS'}: round turnaround ({rr.label}; "
            f"last ack -> published), worst round {worst * 1e3:.0f} ms (median "
            f"{rr.summary['turnaround_s'] * 1e3:.0f} ms{versus}) vs goal <= "
            f"{GOAL_TURNAROUND_S * 1e3:.0f} ms" + round_contended(rr.summary)
        )
    return out


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpc": grpc.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="64,512", help="adapter sizes in MiB, comma-separated")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients in one round")
    p.add_argument("--repeats", type=int, default=3, help="transfers per size / rounds")
    p.add_argument("--workdir", type=Path, default=None, help="server data (default: a tmp dir)")
    p.add_argument(
        "--keep", action="store_true", help="keep the servers' data and logs (*.log) after the run"
    )
    p.add_argument("--json", type=Path, default=None, help="write every measurement here")
    p.add_argument("--skip-round", action="store_true", help="only the throughput phase")
    p.add_argument(
        "--round-paths",
        default="summed,one-shot",
        help="round closes to measure: summed (the default server: dense sums kept as uploads "
        "arrive), folded (uploads folded as they arrive, fold_memory_mib = 2048) and/or "
        "one-shot (neither: every close stacks the uploads; the reference)",
    )
    p.add_argument(
        "--round-stagger-ms",
        type=float,
        default=0.0,
        help="spread the round's pushes over this window (client i starts i/n of it late), "
        "as clients that finish training at different times do; 0: all at once",
    )
    p.add_argument(
        "--round-uploads",
        choices=("same", "distinct"),
        default="same",
        help="same: one fixed adapter per rank (the sum has rank 60); distinct: each client "
        "its own (a shared part plus its own noise)",
    )
    p.add_argument(
        "--memory-mib",
        type=int,
        default=0,
        help="also round-trip an adapter this large and report memory (issue 14: 640)",
    )
    p.add_argument(
        "--server-threads",
        type=int,
        default=0,
        help="OMP/MKL threads of the server process (0: torch's default, one per core)",
    )
    args = p.parse_args(argv)
    if args.server_threads > 0:  # start_server_process hands our environment to the server
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.server_threads)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    workdir = Path(tempfile.mkdtemp(prefix="raflora-bench-", dir=args.workdir))
    log(f"data under {workdir}")
    load_before = os.getloadavg()
    LOAD_BEFORE[0] = load_before[0]
    started = time.perf_counter()
    try:
        size_results = [bench_size(workdir, s, args.repeats) for s in sizes]
        paths = [x.strip() for x in args.round_paths.split(",") if x.strip()]
        unknown = sorted(set(paths) - set(ROUND_PATHS))
        if unknown:
            p.error(f"--round-paths: unknown {unknown}; choose from {sorted(ROUND_PATHS)}")
        round_results = (
            []
            if args.skip_round or args.clients < 1
            else [
                bench_round(
                    workdir,
                    args.clients,
                    args.repeats,
                    path,
                    args.round_uploads,
                    args.round_stagger_ms / 1e3,
                )
                for path in paths
            ]
        )
        memory = bench_memory(workdir, args.memory_mib) if args.memory_mib > 0 else []
    finally:
        if args.keep:
            log(f"kept the servers' data and logs under {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    log(f"done in {elapsed:.0f}s")

    lines = report(size_results, round_results)
    lines.append(
        f"Run took {elapsed:.0f} s on {os.cpu_count()} CPUs; server intra-op threads: "
        f"{args.server_threads or 'torch default'}; 1-min load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (other work on the machine "
        "competes with both the server and the clients)."
    )
    lines.append("")
    lines += verdicts(size_results, round_results)
    if memory:
        lines += ["", *memory]
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "load_average": {"before": load_before, "after": load_after},
                    "elapsed_s": elapsed,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "sizes": [asdict(r) for r in size_results],
                    "rounds": [asdict(r) for r in round_results],
                    "verdicts": verdicts(size_results, round_results),
                },
                indent=2,
            )
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
