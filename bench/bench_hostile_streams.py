"""An honest client's latency while hostile members hold a thousand streams open.

A ``raflora-server`` process (TLS and authentication on) serves one federation that publishes a
round per push. An honest member runs ``--cycles`` rounds of pull, push, wait for the round,
and a gRPC health check, twice in the same run: first alone (the reference), then while
``--hostile`` members (each with its own valid client token, from a separate process) keep
``--streams`` Push streams open in total that never send a header. The server cuts each such
stream off after ``push_header_timeout_seconds`` and the attackers open it again at once, so
about that many are held at any moment. Printed: p50/p99 of each operation in both phases and
their ratio, how many streams the attackers held, and what the server answered them.

    .venv/bin/python bench/bench_hostile_streams.py --hostile 20 --streams 1000 --cycles 40

Run it alone: it prints the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raflora.client_sdk import AdminClient, RafloraClient, RetryPolicy
from raflora.server.testing import federation_spec, make_pki, start_server_process
from raflora.v1 import aggregation_pb2 as pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc

ADMIN_TOKEN = "bench-hostile-admin-token-0123456789"
MODULES = {f"layers.{i}.proj": (256, 256) for i in range(4)}


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:13]) / os.sysconf("SC_CLK_TCK")


class Busy:
    """Cores kept busy by this process and the server during a phase (CPU time / wall)."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid

    def __enter__(self) -> Busy:
        self.t0, self.me0 = time.perf_counter(), time.process_time()
        self.srv0 = cpu_seconds(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        self.client = (time.process_time() - self.me0) / wall
        self.server = (cpu_seconds(self.pid) - self.srv0) / wall


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# -- the attackers (a process of their own) ---------------------------------------------------
async def hold(
    target: str, ca: bytes, tokens: list[str], per_token: int, stop: Any, out: Any
) -> None:
    outcomes: Counter[str] = Counter()
    held = 0
    peak = 0
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)

    async def never() -> AsyncIterator[pb.PushRequest]:
        while True:
            await asyncio.sleep(3600)
            yield pb.PushRequest()

    async def one(stub: pb_grpc.AggregationServiceAsyncStub, token: str) -> None:
        nonlocal held, peak
        metadata = (("authorization", f"Bearer {token}"),)
        while not stop.is_set():
            held += 1
            peak = max(peak, held)
            try:
                await stub.Push(never(), metadata=metadata, timeout=120)
                outcomes["OK"] += 1
            except aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
            finally:
                held -= 1
            await asyncio.sleep(0.05)

    channels = [aio.secure_channel(target, credentials) for _ in tokens]
    stubs = [pb_grpc.AggregationServiceStub(c) for c in channels]
    tasks = [
        asyncio.ensure_future(one(stub, token))
        for stub, token in zip(stubs, tokens, strict=True)
        for _ in range(per_token)
    ]
    samples = []
    while not stop.is_set():
        await asyncio.sleep(0.5)
        samples.append(held)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(None)
    out.put(
        {"outcomes": dict(outcomes), "held_median": statistics.median(samples), "held_peak": peak}
    )


def attackers(
    target: str, ca: bytes, tokens: list[str], per_token: int, stop: Any, out: Any
) -> None:
    asyncio.run(hold(target, ca, tokens, per_token, stop, out))


# -- the honest member ------------------------------------------------------------------------
def cycles(client: RafloraClient, target: str, ca: bytes, n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"pull": [], "push": [], "round": [], "health": []}
    gen = torch.Generator().manual_seed(0)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(n):
            t = time.perf_counter()
            pulled = client.pull()
            times["pull"].append(time.perf_counter() - t)
            update = {
                k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in pulled.tensors.items()
            }
            t = time.perf_counter()
            client.push(update, round=pulled.round, num_examples=10)
            times["push"].append(time.perf_counter() - t)
            t = time.perf_counter()
            client.wait_for_round(pulled.round, timeout=60)
            times["round"].append(time.perf_counter() - t)
            t = time.perf_counter()
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            times["health"].append(time.perf_counter() - t)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--hostile", type=int, default=20, help="hostile members, one token each")
    p.add_argument("--streams", type=int, default=1000, help="header-less streams held in all")
    p.add_argument("--cycles", type=int, default=40, help="honest rounds per phase")
    p.add_argument(
        "--min-seconds", type=float, default=15.0, help="least time the attacked phase lasts"
    )
    args = p.parse_args()
    per_token = args.streams // args.hostile
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="raflora-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "admin").write_text(ADMIN_TOKEN)
        pki = make_pki(tmp / "pki")
        ca = pki.ca_cert.read_bytes()
        credentials = pki.channel_credentials()
        server = start_server_process(
            tmp / "data",
            tmp / "server.log",
            extra_args=[
                "--admin-token-file", str(tmp / "admin"),
                "--tls-cert-file", str(pki.server.cert),
                "--tls-key-file", str(pki.server.key),
                "--log-level", "WARNING",
            ],
            credentials=credentials,
        )  # fmt: skip
        try:
            with AdminClient(server.target, credentials=credentials, admin_token=ADMIN_TOKEN) as a:
                a.create_federation(federation_spec("h", MODULES, max_rank=8, min_clients=1))
                honest_credential = a.issue_client_credential("h", "honest")
                tokens = []
                for i in range(args.hostile):
                    cred = a.issue_client_credential("h", f"hostile-{i:02d}")
                    with RafloraClient(
                        server.target, "h", f"hostile-{i:02d}", credentials=credentials,
                        enrolment_secret=cred,
                    ) as hostile:  # fmt: skip
                        hostile.join(rank=4, num_examples=1)
                        assert hostile.token is not None
                        tokens.append(hostile.token)
            with RafloraClient(
                server.target, "h", "honest", credentials=credentials,
                enrolment_secret=honest_credential, retry=RetryPolicy(attempts=1),
            ) as honest:  # fmt: skip
                honest.join(rank=8, num_examples=10)
                cycles(honest, server.target, ca, 3)  # warm up
                with Busy(server.pid) as busy_alone:
                    alone = cycles(honest, server.target, ca, args.cycles)
                ctx = mp.get_context("spawn")
                stop, out = ctx.Event(), ctx.Queue()
                proc = ctx.Process(
                    target=attackers, args=(server.target, ca, tokens, per_token, stop, out)
                )
                proc.start()
                time.sleep(8)  # let the attackers open their streams
                with Busy(server.pid) as busy_attacked:
                    attacked = cycles(honest, server.target, ca, args.cycles)
                    # Keep going past the header timeout, so streams are cut off and reopened.
                    until = time.monotonic() + args.min_seconds
                    while time.monotonic() < until:
                        for op, xs in cycles(honest, server.target, ca, 5).items():
                            attacked[op] += xs
                stop.set()
                report = out.get(timeout=180)
                proc.join(30)
        finally:
            server.stop()
    print(
        f"{len(alone['push'])} honest rounds alone, {len(attacked['push'])} attacked; "
        f"{args.hostile} hostile members held {report['held_median']:.0f} header-less Push "
        f"streams (median; peak {report['held_peak']}), answered {report['outcomes']}; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; cores busy "
        f"alone: server {busy_alone.server:.2f}, honest client {busy_alone.client:.2f}; "
        f"attacked: server {busy_attacked.server:.2f}, honest client {busy_attacked.client:.2f} "
        f"(the attackers' process is not counted)",
        file=sys.stderr,
    )
    print("| operation | p50 alone (ms) | p50 attacked (ms) | ratio | p99 alone | p99 attacked |")
    print("|---|---:|---:|---:|---:|---:|")
    for op in ("pull", "push", "round", "health"):
        a50, b50 = pct(alone[op], 50) * 1e3, pct(attacked[op], 50) * 1e3
        a99, b99 = pct(alone[op], 99) * 1e3, pct(attacked[op], 99) * 1e3
        print(f"| {op} | {a50:.1f} | {b50:.1f} | {b50 / a50:.2f} | {a99:.1f} | {b99:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
