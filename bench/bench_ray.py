"""Benchmark a LLaMA-7B-shaped round aggregated in process vs on a local Ray cluster.

For each client count, on the same synthetic uploads as ``bench_aggregation.py`` (64 modules
of 4096×4096 by default, ranks 4..64), in one sitting:

* **in process**: ``strategy.aggregate`` on this process's torch threads (the default mode);
* **on Ray**: the same call with ``map_modules`` = the server's own ``RayModuleMap``, on a
  one-node cluster of ``--ray-cpus`` CPUs that this script starts (``ray start --head``); one
  task per module, one CPU (one torch thread) per task. The two results are compared;
* **per-module times**: every module job run alone, here, on one thread: what a Ray task
  computes. From them, the projected round time on N one-CPU workers is the longest-first
  schedule of those times plus the overhead this run measured (Ray wall time minus the
  2-worker schedule: shipping the round to the workers, scheduling, gathering), and the
  projected speed-up is the in-process time over that.

On one 2-core machine Ray cannot be faster than in process: the figure of merit is the overhead
ratio (Ray wall / in-process wall). Machine load and cores busy (from /proc/stat, all
processes: Ray's work is in its workers) are printed for every phase; a contended run is
rerun, never quoted.

    python bench/bench_ray.py --clients 32,100 --json /tmp/bench_ray.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from bench_aggregation import (
    draw_clients,
    global_adapter,
    log,
    machine,
    make_uploads,
    module_names,
    release_memory,
    table,
)
from cpu_time import machine_cpu_seconds

from raflora.server.cluster.ray_modules import RayModuleMap
from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    FactorPair,
    GlobalState,
    StrategyConfig,
    make_strategy,
)
from raflora.server.testing_ray import RAY_ENV, ray_cluster

T = TypeVar("T")
MIB = 1 << 20


def busy_seconds() -> float:
    """Non-idle CPU time of the whole machine so far, in seconds (stolen time counts)."""
    busy, stolen = machine_cpu_seconds()
    return busy + stolen


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """fn's result, wall seconds, and cores busy machine-wide meanwhile."""
    busy0 = busy_seconds()
    start = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - start
    busy1 = busy_seconds()
    return out, wall, (busy1 - busy0) / wall


def schedule(times: Sequence[float], workers: int) -> float:
    """Makespan of longest-first list scheduling of ``times`` on ``workers`` machines."""
    loads = [0.0] * workers
    heapq.heapify(loads)
    for t in sorted(times, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + t)
    return max(loads)


def relative_gap(a: GlobalState, b: GlobalState) -> float:
    return max(
        float((a.dense(n) - b.dense(n)).norm() / b.dense(n).norm().clamp_min(1e-30))
        for n in a.modules
    )


@dataclass(frozen=True)
class RoundResult:
    clients: int
    stacked_rank: int
    uploaded_mib: float
    in_process_s: float
    in_process_cores: float
    ray_s: float
    ray_cores: float
    ray_tasks: int
    ray_fallbacks: int
    module_sum_s: float  # Σ per-module times on one thread
    module_max_s: float
    overhead_s: float  # ray_s − schedule(module times, ray_cpus)
    rel_gap: float  # on Ray vs in process (fp32, other thread count)
    load_before: float
    projected: dict[int, float]  # workers -> projected round seconds

    @property
    def overhead_ratio(self) -> float:
        return self.ray_s / self.in_process_s


def run_round(args: argparse.Namespace, n: int, ray_map: RayModuleMap) -> RoundResult:
    names = module_names(args.layers)
    schema = AdapterSchema.from_shapes({name: (args.dim, args.dim) for name in names})
    strategy = make_strategy(args.strategy, StrategyConfig(schema=schema, max_rank=args.max_rank))
    clients = draw_clients(n, args.ranks, args.seed)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + n)
    log(f"{n} clients: generating uploads (ranks Σ={sum(c.rank for c in clients)})")
    # Shared uploads (bench_aggregation's default): the global adapter's slice plus a local
    # change, so AUTO takes the certified randomized path as a real round would.
    base = global_adapter(names, args.dim, args.max_rank, gen)
    updates = make_uploads(clients, names, args.dim, base, torch.float32, gen)
    del base
    uploaded = sum(
        t.numel() * t.element_size()
        for u in updates
        for f in u.factors.values()
        for t in (f.B, f.A)
    )
    state = strategy.initial_state()
    release_memory()
    load_before = os.getloadavg()[0]

    log(f"{n} clients: in process ({torch.get_num_threads()} threads), {len(names)} modules")
    here, here_s, here_cores = timed(partial(strategy.aggregate, state, updates))
    log(f"{n} clients: in process {here_s:.1f} s, {here_cores:.2f} cores busy")

    tasks0, fallbacks0 = ray_map.tasks, ray_map.fallbacks
    log(f"{n} clients: on Ray ({args.ray_cpus} CPUs), one task per module")
    on_ray, ray_s, ray_cores = timed(
        partial(strategy.aggregate, state, updates, map_modules=ray_map)
    )
    log(f"{n} clients: on Ray {ray_s:.1f} s, {ray_cores:.2f} cores busy")
    gap = relative_gap(on_ray, here)
    del on_ray, here

    log(f"{n} clients: each module job alone on one thread (what a task computes)")
    prepared = strategy.prepare(updates)
    jobs = strategy.module_jobs(state, prepared)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module_times = []
        for job in jobs:
            start = time.perf_counter()
            job.run()
            module_times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    del jobs, prepared, updates
    release_memory()
    overhead = max(0.0, ray_s - schedule(module_times, args.ray_cpus))
    projected = {w: schedule(module_times, w) + overhead for w in args.project}
    return RoundResult(
        clients=n,
        stacked_rank=sum(c.rank for c in clients),
        uploaded_mib=uploaded / MIB,
        in_process_s=here_s,
        in_process_cores=here_cores,
        ray_s=ray_s,
        ray_cores=ray_cores,
        ray_tasks=ray_map.tasks - tasks0,
        ray_fallbacks=ray_map.fallbacks - fallbacks0,
        module_sum_s=sum(module_times),
        module_max_s=max(module_times),
        overhead_s=overhead,
        rel_gap=gap,
        load_before=load_before,
        projected=projected,
    )


def report(args: argparse.Namespace, results: Sequence[RoundResult]) -> str:
    lines = [
        f"## In process vs Ray: {args.layers * 2} modules of {args.dim}×{args.dim}, "
        f"ranks {list(args.ranks)}, {args.strategy}, Ray on {args.ray_cpus} local CPUs",
        "",
        table(
            [
                "clients",
                "uploaded MiB",
                "in process s (cores busy)",
                "Ray s (cores busy)",
                "Ray / in process",
                "overhead s",
                "Σ module s (1 thread)",
                "rel. gap",
                "load before",
            ],
            [
                [
                    str(r.clients),
                    f"{r.uploaded_mib:.0f}",
                    f"{r.in_process_s:.1f} ({r.in_process_cores:.2f})",
                    f"{r.ray_s:.1f} ({r.ray_cores:.2f})",
                    f"{r.overhead_ratio:.2f}×",
                    f"{r.overhead_s:.1f}",
                    f"{r.module_sum_s:.1f}",
                    f"{r.rel_gap:.1e}",
                    f"{r.load_before:.2f}",
                ]
                for r in results
            ],
        ),
        "",
        "Projected round time on N one-CPU Ray workers (longest-first schedule of the measured "
        "per-module times + this run's overhead) and speed-up over in process:",
        "",
        table(
            ["clients", *(f"N={w}" for w in args.project)],
            [
                [
                    str(r.clients),
                    *(
                        f"{r.projected[w]:.1f} s ({r.in_process_s / r.projected[w]:.1f}×)"
                        for w in args.project
                    ),
                ]
                for r in results
            ],
        ),
        "",
        "cores busy: machine-wide CPU seconds / wall seconds of the phase (/proc/stat): "
        f"{os.cpu_count()} cores here; well under that for the in-process phase means the run "
        "was not alone or not compute-bound.",
    ]
    return "\n".join(lines)


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int_list, default=(32, 100))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--ranks", type=int_list, default=(4, 8, 16, 32, 64))
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--strategy", default="raflora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--object-store-mib",
        type=int,
        default=12 << 10,
        help="the local cluster's object store: a round's uploads pass through it",
    )
    parser.add_argument("--project", type=int_list, default=(2, 8, 16, 64))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def warm_up(ray_map: RayModuleMap, cpus: int) -> None:
    """Start every worker (a process that imports torch: seconds) before anything is timed: a
    server keeps its cluster's workers, so a round pays that once, not every time."""
    schema = AdapterSchema.from_shapes({f"m{i}": (64, 64) for i in range(4 * cpus)})
    strategy = make_strategy("raflora", StrategyConfig(schema=schema, max_rank=4))
    g = torch.Generator().manual_seed(0)
    factors = {
        m: FactorPair(torch.randn(64, 4, generator=g), torch.randn(4, 64, generator=g))
        for m in schema
    }
    update = ClientUpdate("warm-up", 4, 1, 1.0, factors)
    start = time.perf_counter()
    strategy.aggregate(strategy.initial_state(), [update], map_modules=ray_map)
    log(f"workers warmed up in {time.perf_counter() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    os.environ.update(RAY_ENV)
    log(f"starting a local Ray cluster: {args.ray_cpus} CPUs")
    results: list[RoundResult] = []
    with ray_cluster(cpus=args.ray_cpus, object_store_mib=args.object_store_mib) as cluster:
        ray.init(address=cluster.gcs_address, logging_level=logging.WARNING, log_to_driver=False)
        try:
            ray_map = RayModuleMap(cluster.gcs_address)
            log(f"joined {ray_map.connect()}")
            warm_up(ray_map, args.ray_cpus)
            for n in args.clients:
                results.append(run_round(args, n, ray_map))
                release_memory()
        finally:
            ray.shutdown()
    print(report(args, results))
    if args.json:
        payload: dict[str, Any] = {
            "machine": machine(),
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "results": [asdict(r) | {"overhead_ratio": r.overhead_ratio} for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0 if all(r.ray_fallbacks == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
