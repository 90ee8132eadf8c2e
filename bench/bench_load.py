"""Load test: many simulated clients in several federations, over loopback only.

A ``raflora-server`` process (authentication on, TLS on unless ``--no-tls``) serves
``--federations`` federations of ``--clients`` clients in total for ``--rounds`` rounds. The
clients are the real SDK, one RafloraClient (and so one gRPC channel and one TCP connection)
each, run as threads in ``--procs`` client processes (one process per federation by default;
threads, because 200 processes would not fit the CPU this runs on). Each client joins with the
federation's enrolment secret, then every round pulls, perturbs what it pulled (a stand-in for
training), pushes and waits on the watch stream for the next round; each federation's round
closes when all of its clients have pushed.

With ``--hostile N``, N more members (spread over the federations, in a process of their own)
attack all along: each joins as itself (open enrolment), then loops over poisoned uploads (fp64
1e300, a norm far past the bound), a weight it did not declare (``num_examples`` 2**63-1),
pushes and joins in an honest member's name, and Push streams that never send a header. Every
attack must be refused with its documented status; one that is accepted is reported as a
breach. The honest clients' figures are the ones below, and their error count must stay 0.

Reported: p50/p99/max latency of join, pull, push and of the wait from a client's push to the
round's publication; the error count (goal: 0; any exception a client sees counts); the
server's peak RSS (VmHWM) and its CPU time (utime + stime from /proc/<pid>/stat), and the
wall time. Everything is bounded: ``--timeout`` for the whole run, 120 s per round wait.

Run from the repository root::

    .venv/bin/python bench/bench_load.py               # 200 clients, 4 federations, 10 rounds
    .venv/bin/python bench/bench_load.py --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from raflora.client_sdk import AdminClient, RafloraClient, RetryPolicy
from raflora.server.testing import federation_spec, make_pki, start_server_process

ADMIN_TOKEN = "bench-load-admin-token-0123456789"
MODULES = {f"layers.{i}.proj": (256, 256) for i in range(4)}
RANKS = (4, 8, 16)
OPS = ("join", "pull", "push", "round_wait")


@dataclass
class ClientReport:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    errors: list[str] = field(default_factory=list)
    rounds_done: int = 0


def percentile(xs: Sequence[float], q: float) -> float:
    """numpy's linear-interpolated percentile, q in [0, 100]; NaN for no samples."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (and its reaped children), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# -- one client ---------------------------------------------------------------------------------
def run_client(
    target: str,
    ca: bytes | None,
    federation: str,
    secret: str,
    client_id: str,
    rank: int,
    rounds: int,
    deadline: float,
    report: ClientReport,
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca) if ca else None
    gen = torch.Generator().manual_seed(hash(client_id) & 0xFFFF)
    with RafloraClient(
        target,
        federation,
        client_id,
        credentials=credentials,
        enrolment_secret=secret,
        timeout=120,
        retry=RetryPolicy(attempts=4),
    ) as client:
        t = time.perf_counter()
        current = client.join(rank=rank, num_examples=10 + rank).round
        report.latencies["join"].append(time.perf_counter() - t)
        for _ in range(rounds):
            if time.time() > deadline:
                raise TimeoutError("the run's --timeout passed")
            t = time.perf_counter()
            pulled = client.pull()
            report.latencies["pull"].append(time.perf_counter() - t)
            update = {
                k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in pulled.tensors.items()
            }
            t = time.perf_counter()
            client.push(update, round=current, num_examples=10 + rank)
            pushed = time.perf_counter()
            report.latencies["push"].append(pushed - t)
            status = client.wait_for_round(current, timeout=min(120.0, deadline - time.time()))
            report.latencies["round_wait"].append(time.perf_counter() - pushed)
            current = status.round
            report.rounds_done += 1


def run_process(
    target: str,
    ca: bytes | None,
    jobs: list[tuple[str, str, str, int]],
    rounds: int,
    deadline: float,
    out: Any,
) -> None:
    """A client process: one thread per client; sends its merged report back through ``out``."""
    torch.set_num_threads(1)
    reports = [ClientReport() for _ in jobs]

    def guarded(job: tuple[str, str, str, int], report: ClientReport) -> None:
        federation, secret, client_id, rank = job
        try:
            run_client(target, ca, federation, secret, client_id, rank, rounds, deadline, report)
        except Exception as exc:
            report.errors.append(f"{client_id}: {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=guarded, args=(job, report), daemon=True)
        for job, report in zip(jobs, reports, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, deadline - time.time() + 5))
    merged = ClientReport()
    for report in reports:
        for op in OPS:
            merged.latencies[op] += report.latencies[op]
        merged.errors += report.errors
        merged.rounds_done += report.rounds_done
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        merged.errors.append(f"{stuck} client threads still running at the deadline")
    out.put(asdict(merged))


# -- hostile members ----------------------------------------------------------------------------
# Any refusal is fine for a poisoned push (FAILED_PRECONDITION: its round closed meanwhile;
# RESOURCE_EXHAUSTED: the attempts per round ran out); only OK would be a breach.
_REFUSED = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
EXPECTED_REFUSALS = {
    "poison_fp64": _REFUSED,
    "poison_norm": _REFUSED,
    "undeclared_weight": _REFUSED,
    "push_as_victim": {"PERMISSION_DENIED"},
    "join_as_victim": {"PERMISSION_DENIED"},
    "headerless_stream": {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED"},
}


def silence(seconds: float) -> Iterator[Any]:
    """A request stream that sends nothing for ``seconds``, then ends."""
    time.sleep(seconds)
    yield from ()


def run_hostile(
    target: str,
    ca: bytes | None,
    jobs: list[tuple[str, str, str, str]],
    stop: Any,
    deadline: float,
    out: Any,
) -> None:
    """Hostile members (federation, secret, own id, victim id) attacking until ``stop`` is set."""
    from raflora.client_sdk import lora_state_dict, pb
    from raflora.client_sdk.errors import RafloraError
    from raflora.v1 import aggregation_pb2_grpc as grpc_stubs

    torch.set_num_threads(1)
    outcomes: dict[str, dict[str, int]] = {k: {} for k in EXPECTED_REFUSALS}
    lock = threading.Lock()

    def record(kind: str, code: str) -> None:
        with lock:
            outcomes[kind][code] = outcomes[kind].get(code, 0) + 1

    def attacker(job: tuple[str, str, str, str]) -> None:
        federation, secret, own_id, victim = job
        credentials = grpc.ssl_channel_credentials(root_certificates=ca) if ca else None
        rank = 4
        good = lora_state_dict(
            {
                m: (torch.randn(o, rank) * 0.01, torch.randn(rank, i) / i**0.5)
                for m, (o, i) in MODULES.items()
            }
        )
        fp64 = {k: v.double() for k, v in good.items()}
        first = next(iter(fp64))
        fp64[first][0, 0] = 1e300
        loud = {k: v * 1e5 for k, v in good.items()}
        with RafloraClient(
            target,
            federation,
            own_id,
            credentials=credentials,
            enrolment_secret=secret,
            retry=RetryPolicy(attempts=1),
            timeout=30,
        ) as me:
            me.join(rank=rank, num_examples=5)
            stub = grpc_stubs.AggregationServiceStub(me.channel)
            while not stop.is_set() and time.time() < deadline:
                current = me.status().round
                attempts: list[tuple[str, dict[str, torch.Tensor], int]] = [
                    ("poison_fp64", fp64, 5),
                    ("poison_norm", loud, 5),
                    ("undeclared_weight", good, 2**63 - 1),
                ]
                for kind, tensors, examples in attempts:
                    try:
                        me.push(tensors, round=current, num_examples=examples)
                        record(kind, "OK")
                    except RafloraError as exc:
                        record(kind, exc.code.name)
                header = pb.PushHeader(
                    federation_id=federation,
                    client_id=victim,
                    round=current,
                    rank=rank,
                    num_examples=5,
                    total_bytes=10,
                    sha256="0" * 64,
                )
                try:
                    stub.Push(
                        iter([pb.PushRequest(header=header)]),
                        metadata=me._token_metadata(),
                        timeout=10,
                    )
                    record("push_as_victim", "OK")
                except grpc.RpcError as exc:
                    record("push_as_victim", exc.code().name)
                with RafloraClient(
                    target,
                    federation,
                    victim,
                    credentials=credentials,
                    enrolment_secret=secret,
                    retry=RetryPolicy(attempts=1),
                    timeout=30,
                ) as thief:
                    try:
                        thief.join(rank=16, num_examples=10**6)
                        record("join_as_victim", "OK")
                    except RafloraError as exc:
                        record("join_as_victim", exc.code.name)
                # Streams that never send a header, cut off by the server.
                calls = [
                    stub.Push.future(silence(30), metadata=me._token_metadata(), timeout=40)
                    for _ in range(8)
                ]
                for call in calls:
                    try:
                        call.result()
                        record("headerless_stream", "OK")
                    except grpc.RpcError as exc:
                        record("headerless_stream", exc.code().name)
                time.sleep(0.5)

    threads = [threading.Thread(target=attacker, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, deadline - time.time() + 60))
    out.put(outcomes)


# -- the run ------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--federations", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--procs", type=int, default=0, help="client processes (0: one per federation)")
    p.add_argument("--no-tls", action="store_true", help="plaintext gRPC (auth stays on)")
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run (s)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--hostile", type=int, default=0, help="hostile members attacking meanwhile")
    args = p.parse_args()
    if args.clients % args.federations:
        p.error("--clients must be a multiple of --federations")
    per_federation = args.clients // args.federations
    procs = args.procs or args.federations
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="raflora-load-") as tmp_name:
        tmp = Path(tmp_name)
        token_file = tmp / "admin-token"
        token_file.write_text(ADMIN_TOKEN)
        extra = ["--admin-token-file", str(token_file), "--log-level", "WARNING"]
        ca: bytes | None = None
        credentials = None
        if not args.no_tls:
            pki = make_pki(tmp / "pki")
            ca = pki.ca_cert.read_bytes()
            credentials = pki.channel_credentials()
            extra += [
                "--tls-cert-file",
                str(pki.server.cert),
                "--tls-key-file",
                str(pki.server.key),
            ]
        server = start_server_process(
            tmp / "data", tmp / "server.log", extra_args=extra, credentials=credentials
        )
        pid = server.process.pid
        try:
            cpu_before = cpu_seconds(pid)
            jobs: list[tuple[str, str, str, int]] = []
            hostile_jobs: list[tuple[str, str, str, str]] = []
            with AdminClient(server.target, credentials=credentials, admin_token=ADMIN_TOKEN) as a:
                for f in range(args.federations):
                    fid = f"load-{f}"
                    secret = a.create_federation(
                        federation_spec(
                            fid,
                            MODULES,
                            max_rank=max(RANKS),
                            min_clients=per_federation,
                            expected_clients=per_federation,
                        ),
                        open_enrolment=True,
                    ).enrolment_secret
                    for c in range(per_federation):
                        jobs.append((fid, secret, f"f{f}-c{c:03d}", RANKS[c % len(RANKS)]))
                    for h in range(f, args.hostile, args.federations):
                        hostile_jobs.append((fid, secret, f"f{f}-hostile{h:02d}", f"f{f}-c000"))
            print(
                f"server pid {pid} on {server.target} ({'TLS' if ca else 'plaintext'}, auth on); "
                f"{args.clients} clients, {args.federations} federations, {args.rounds} rounds, "
                f"{procs} client processes",
                file=sys.stderr,
                flush=True,
            )
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            deadline = time.time() + args.timeout
            started = time.perf_counter()
            workers = [
                ctx.Process(
                    target=run_process,
                    args=(server.target, ca, jobs[i::procs], args.rounds, deadline, queue),
                )
                for i in range(procs)
            ]
            for w in workers:
                w.start()
            hostile_queue = ctx.Queue()
            stop_attack = ctx.Event()
            hostile = None
            if hostile_jobs:
                time.sleep(2)  # let the honest members enrol first: their ids are the victims
                hostile = ctx.Process(
                    target=run_hostile,
                    args=(server.target, ca, hostile_jobs, stop_attack, deadline, hostile_queue),
                )
                hostile.start()
            merged = ClientReport()
            for _ in workers:
                part = queue.get(timeout=max(1.0, deadline - time.time() + 60))
                for op in OPS:
                    merged.latencies[op] += part["latencies"][op]
                merged.errors += part["errors"]
                merged.rounds_done += part["rounds_done"]
            for w in workers:
                w.join(10)
            wall = time.perf_counter() - started
            attacks: dict[str, dict[str, int]] = {}
            if hostile is not None:
                stop_attack.set()  # the honest run is over; collect what the attacks met
                attacks = hostile_queue.get(timeout=120)
                hostile.join(10)
            cpu = cpu_seconds(pid) - cpu_before
            peak_rss_mib = status_kib(pid, "VmHWM") / 1024
        except Exception:
            traceback.print_exc()
            return 2
        finally:
            server.stop()

    expected_rounds = args.clients * args.rounds
    result = {
        "config": {
            "clients": args.clients,
            "federations": args.federations,
            "rounds": args.rounds,
            "client_processes": procs,
            "tls": ca is not None,
            "auth": True,
            "modules": {k: list(v) for k, v in MODULES.items()},
            "ranks": list(RANKS),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}",
        },
        "latency_s": {
            op: {
                "n": len(v),
                "p50": percentile(v, 50),
                "p99": percentile(v, 99),
                "max": max(v, default=float("nan")),
            }
            for op, v in merged.latencies.items()
        },
        "errors": len(merged.errors),
        "error_samples": merged.errors[:10],
        "client_rounds_completed": merged.rounds_done,
        "client_rounds_expected": expected_rounds,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "server_cpu_utilisation": cpu / wall,
        "server_peak_rss_mib": peak_rss_mib,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "hostile_members": args.hostile,
        "attacks": attacks,
    }
    breaches = 0
    if attacks:
        print("\n| attack | outcomes (status: count) | breaches |\n|---|---|---:|")
        for kind, codes in attacks.items():
            bad = sum(n for code, n in codes.items() if code not in EXPECTED_REFUSALS[kind])
            breaches += bad
            shown = ", ".join(f"{code}: {n}" for code, n in sorted(codes.items()))
            print(f"| {kind} | {shown} | {bad} |")
    result["breaches"] = breaches
    print("\n| operation | n | p50 (ms) | p99 (ms) | max (ms) |\n|---|---:|---:|---:|---:|")
    for op, s in result["latency_s"].items():
        print(
            f"| {op} | {s['n']} | {s['p50'] * 1e3:.1f} | {s['p99'] * 1e3:.1f} | "
            f"{s['max'] * 1e3:.1f} |"
        )
    print(
        f"\nerrors: {result['errors']} (goal 0); client-rounds {merged.rounds_done}/"
        f"{expected_rounds}; wall {wall:.1f} s; server CPU {cpu:.1f} s "
        f"({cpu / wall:.2f} cores busy); server peak RSS {peak_rss_mib:.0f} MiB; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    for sample in merged.errors[:10]:
        print(f"  error: {sample}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    ok = not merged.errors and merged.rounds_done == expected_rounds and not breaches
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
