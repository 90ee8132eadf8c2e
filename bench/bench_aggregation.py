"""Benchmark one aggregation round of the engine at LLaMA-7B-like shapes.

For each client count the script builds one round of synthetic uploads and measures, in the
same process and on the same data:

* the *floor*: a memcpy of every uploaded byte into a preallocated buffer (best of a few);
* the *engine*: ``strategy.aggregate`` (validation, fp32 move, per-module truncated SVD);
* the *naive* path: dense ``Σ w_i s_i B_i A_i`` then a full ``torch.linalg.svd``, truncated to
  the federation's max rank. A full SVD of a 4096×4096 matrix takes seconds, so it is timed on
  ``--naive-modules`` modules and the mean per-module time is scaled to all modules;
* peak resident memory of the engine phase (a 5 ms sampler over ``/proc/self/statm``);
* a correctness check: the engine's and the naive path's rank-R reconstructions of one module;
* the *folded* path (docs/design.md §2.10, on unless ``--no-fold``): every upload folded into
  the round's bases as the service does while a round collects ("fold", spread over the
  round), then the close alone, which is what a round's turnaround pays. The goal (issue 14)
  is a close ≤ 10 % of the one-shot engine time at 32 clients; its result is checked against
  the naive path too.

Progress goes to stderr; the result tables (Markdown) go to stdout, ``--json`` writes them.
Run from the repository root: ``python bench/bench_aggregation.py --json /tmp/bench_agg.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import TracebackType

import numpy as np
import torch
from torch import Tensor

from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    FactorPair,
    LowRank,
    StrategyConfig,
    SvdMethod,
    choose_method,
    client_weights,
    lora_scaling,
    make_strategy,
)
from raflora.server.engine.compression import CompressedAggregation, RoundBases
from raflora.server.engine.lowrank import worth_randomizing
from raflora.server.engine.strategies import SpectralStrategy
from raflora.server.rounds.folding import MAX_SPAN_FRACTION

UPLOAD_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# Spectral strategies are the ones whose round is "top-R SVD of Σ w s B A"; the naive path
# below is only a fair reference for those.
SPECTRAL = ("raflora", "flexlora")
ALPHAS = (8.0, 16.0, 32.0)
GOAL_SPEEDUP = 20.0
GOAL_PER_BYTE_GROWTH = 1.5
GOAL_CLOSE_FRACTION = 0.10  # issue 14: the close after folding, vs the one-shot engine
GOAL_CLOSE_CLIENTS = 32
# A timed phase that kept fewer than this share of the torch threads busy shared the cores
# with another process; its verdicts are flagged rather than silently trusted.
CONTENDED_BELOW = 0.85
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024**2
GIB = 1024**3


def log(msg: str) -> None:
    """Progress on stderr: a full run takes minutes and stdout is kept for the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- memory ----------------------------------------------------------------------------------
def read_rss() -> int:
    """Current resident set size in bytes (field 2 of /proc/self/statm is resident pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    Without ``malloc_trim`` glibc may keep freed arena memory resident; a later phase would
    then reuse it without raising RSS and its peak increase would be understated.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssPeak:
    """Peak RSS increase over the baseline taken when the phase starts.

    ``ru_maxrss`` is a process-lifetime maximum and cannot be reset between phases, so a
    background thread polls ``/proc/self/statm`` every ``interval_s``. Torch kernels release
    the GIL, so the sampler keeps running during the heavy calls it is meant to observe.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, read_rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssPeak:
        release_memory()
        self.baseline = read_rss()
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, read_rss())

    @property
    def increase(self) -> int:
        return self.peak - self.baseline


# -- synthetic round -------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientMeta:
    rank: int
    num_examples: int
    alpha: float


def draw_clients(n: int, rank_set: Sequence[int], seed: int) -> list[ClientMeta]:
    """Ranks, example counts and LoRA alphas, drawn from a seed fixed per client count."""
    rng = np.random.default_rng((seed, n))
    return [
        ClientMeta(
            rank=int(rng.choice(rank_set)),
            num_examples=int(rng.integers(100, 5001)),
            alpha=float(rng.choice(ALPHAS)),
        )
        for _ in range(n)
    ]


def global_adapter(
    names: Sequence[str], dim: int, max_rank: int, gen: torch.Generator
) -> dict[str, FactorPair]:
    """A max-rank global adapter every client starts from (A rows ~unit norm, B small)."""
    return {
        name: FactorPair(
            B=torch.randn(dim, max_rank, generator=gen) * 1e-2,
            A=torch.randn(max_rank, dim, generator=gen) / math.sqrt(dim),
        )
        for name in names
    }


def client_factors(
    base: FactorPair | None, rank: int, dim: int, dtype: torch.dtype, gen: torch.Generator
) -> FactorPair:
    """One module of one upload: the global slice plus a local change, or random factors.

    Shared: ``B = B_g[:, :r] + ε_B`` with σ(ε_B) = σ(B_g)/2 (B moves a lot in a round) and
    ``A = A_g[:r] + ε_A`` with σ(ε_A) = 5% of σ(A_g). Either way the stacked factors have full
    column rank Σ r, so the engine's work is that of a real round.
    """
    B = torch.randn(dim, rank, generator=gen)
    A = torch.randn(rank, dim, generator=gen)
    if base is None:
        return FactorPair(B=(B * 1e-2).to(dtype), A=(A / math.sqrt(dim)).to(dtype))
    B.mul_(0.5e-2).add_(base.B[:, :rank])
    A.mul_(0.05 / math.sqrt(dim)).add_(base.A[:rank])
    return FactorPair(B=B.to(dtype), A=A.to(dtype))


def make_uploads(
    clients: Sequence[ClientMeta],
    names: Sequence[str],
    dim: int,
    base: dict[str, FactorPair] | None,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            client_id=f"client-{i:03d}",
            rank=c.rank,
            num_examples=c.num_examples,
            scale=lora_scaling(c.alpha, c.rank),
            factors={
                name: client_factors(None if base is None else base[name], c.rank, dim, dtype, gen)
                for name in names
            },
        )
        for i, c in enumerate(clients)
    ]


def module_names(layers: int) -> list[str]:
    """LLaMA's attention projections that LoRA usually targets: q and v of every layer."""
    return [f"layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qv"]


def upload_tensors(updates: Sequence[ClientUpdate]) -> list[Tensor]:
    return [t for u in updates for f in u.factors.values() for t in (f.B, f.A)]


# -- the three measurements ------------------------------------------------------------------
def time_memcpy(tensors: Sequence[Tensor], repeats: int) -> float:
    """Best time to copy every uploaded byte into one preallocated buffer: the floor.

    The buffer is zero-filled first so the timed copies measure bandwidth, not page faults;
    the best of ``repeats`` is taken because a floor should be the floor.
    """
    total = sum(t.numel() for t in tensors)
    dst = torch.empty(total, dtype=tensors[0].dtype)
    dst.zero_()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        offset = 0
        for t in tensors:
            n = t.numel()
            dst[offset : offset + n].copy_(t.reshape(-1))
            offset += n
        best = min(best, time.perf_counter() - start)
    del dst
    return best


def naive_module(
    updates: Sequence[ClientUpdate],
    weights: Sequence[Tensor],
    name: str,
    max_rank: int,
    device: torch.device | None = None,
) -> LowRank:
    """The reference: the dense weighted sum, then a full SVD truncated to ``max_rank``.

    On ``device`` (default CPU), with the uploads moved there inside the timing, as the
    engine's are."""
    first = updates[0].factors[name]
    dev = device or torch.device("cpu")
    acc = torch.zeros(first.B.shape[0], first.A.shape[1], dtype=torch.float32, device=dev)
    for u, w in zip(updates, weights, strict=True):
        f = u.factors[name]
        col = w.to(device=dev, dtype=torch.float32) * u.scale
        acc.addmm_(f.B.to(dev, torch.float32) * col, f.A.to(dev, torch.float32))
    U, S, Vh = torch.linalg.svd(acc, full_matrices=False)
    k = min(max_rank, int(S.shape[0]))
    return LowRank(U[:, :k], S[:k], Vh[:k].T)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(engine: LowRank, naive: LowRank) -> tuple[float, float]:
    """Relative Frobenius error of the rank-R reconstructions, and max σ error / σ_1."""
    ref = naive.dense()
    rel = float(torch.linalg.matrix_norm(engine.dense() - ref) / torch.linalg.matrix_norm(ref))
    k = min(engine.rank, naive.rank)
    sigma = float((engine.S[:k] - naive.S[:k]).abs().max() / naive.S[0])
    return rel, sigma


@dataclass
class RoundResult:
    clients: int
    stacked_rank: int
    uploaded_bytes: int
    svd_method: str
    memcpy_s: float
    validate_s: float
    engine_s: float
    engine_peak_rss_bytes: int
    naive_modules_timed: int
    naive_module_s: float
    naive_est_s: float
    naive_peak_rss_bytes: int
    rel_frobenius_err: float
    rel_sigma_err: float
    engine_cores_used: float
    naive_cores_used: float
    loadavg_1m: float
    fold_s: float = math.nan  # folding every upload (spread over the round in the service)
    last_fold_s: float = math.nan  # the last upload's fold: it precedes the close
    close_s: float = math.nan  # the close after folding
    close_cores_used: float = math.nan
    fold_width: int = 0  # k_B of module 0's basis
    close_rel_frobenius_err: float = math.nan  # module 0 against the naive path

    @property
    def engine_over_memcpy(self) -> float:
        return self.engine_s / self.memcpy_s

    @property
    def speedup(self) -> float:
        return self.naive_est_s / self.engine_s

    @property
    def s_per_gb(self) -> float:
        return self.engine_s / (self.uploaded_bytes / GIB)

    def contended(self, *, naive: bool) -> bool:
        """Whether the engine (and, if asked, the naive) phase lost cores to another process."""
        busy = self.engine_cores_used
        if naive:
            busy = min(busy, self.naive_cores_used)
        return busy < CONTENDED_BELOW * torch.get_num_threads()


def run_round(args: argparse.Namespace, n: int, base: dict[str, FactorPair] | None) -> RoundResult:
    """Generate one round of ``n`` uploads, measure it, and free it before returning."""
    names = module_names(args.layers)
    schema = AdapterSchema.from_shapes({name: (args.dim, args.dim) for name in names})
    config = StrategyConfig(
        schema=schema,
        max_rank=args.max_rank,
        seed=args.seed,
        svd_method=SvdMethod.AUTO,
        device=args.device,
    )
    strategy = make_strategy(args.strategy, config)
    assert isinstance(strategy, SpectralStrategy)

    clients = draw_clients(n, args.ranks, args.seed)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + n)
    log(f"{n} clients: generating uploads (ranks Σ={sum(c.rank for c in clients)})")
    updates = make_uploads(clients, names, args.dim, base, UPLOAD_DTYPES[args.upload_dtype], gen)
    tensors = upload_tensors(updates)
    uploaded = sum(t.numel() * t.element_size() for t in tensors)
    stacked = sum(u.rank for u in updates)
    # What AUTO tries first: the certified randomized path (exact fallback) or an exact one.
    method = (
        "randomized"
        if worth_randomizing(args.dim, args.dim, stacked, args.max_rank)
        else choose_method(args.dim, args.dim, stacked).value
    )

    log(f"{n} clients: memcpy floor of {uploaded / MIB:.0f} MiB (best of {args.memcpy_repeats})")
    memcpy_s = time_memcpy(tensors, args.memcpy_repeats)
    del tensors

    log(f"{n} clients: validate + move (strategy.prepare alone, for the breakdown)")
    start = time.perf_counter()
    prepared = strategy.prepare(updates)
    validate_s = time.perf_counter() - start
    del prepared

    log(f"{n} clients: engine aggregate over {len(names)} modules (auto → {method})")
    state = strategy.initial_state()
    with RssPeak() as engine_mem:
        start, cpu = time.perf_counter(), time.process_time()
        new_state = strategy.aggregate(state, updates)  # uploads moved to the device inside
        synchronize(strategy.device)
        engine_s = time.perf_counter() - start
        engine_cores = (time.process_time() - cpu) / engine_s
    engine_first = new_state.modules[names[0]]
    assert isinstance(engine_first, LowRank)
    del new_state, state
    log(f"{n} clients: engine {engine_s:.1f} s")

    p = client_weights([u.num_examples for u in updates], config.weighting)
    weights = strategy.index_weights([u.rank for u in updates], p)
    timed = min(args.naive_modules, len(names))
    naive_times: list[float] = []
    naive_first: LowRank | None = None
    naive_cpu = 0.0
    with RssPeak() as naive_mem:
        for name in names[:timed]:
            log(f"{n} clients: naive dense sum + full SVD on {name}")
            start, cpu = time.perf_counter(), time.process_time()
            result = naive_module(updates, weights, name, args.max_rank, strategy.device)
            synchronize(strategy.device)
            naive_times.append(time.perf_counter() - start)
            naive_cpu += time.process_time() - cpu
            if naive_first is None:
                naive_first = result
            del result
    assert naive_first is not None
    rel, sigma = compare(engine_first, naive_first)
    naive_module_s = sum(naive_times) / len(naive_times)
    naive_cores = naive_cpu / sum(naive_times)
    # The service stops folding a round whose span passes this share of a module: skip it.
    folds = args.fold and stacked <= MAX_SPAN_FRACTION * args.dim
    if args.fold and not folds:
        log(f"{n} clients: N = {stacked} > {MAX_SPAN_FRACTION:g}·d: the service closes one-shot")
    folded = time_folded(strategy, updates, naive_first, names[0]) if folds else {}

    del updates
    release_memory()
    return RoundResult(
        **folded,  # type: ignore[arg-type]
        clients=n,
        stacked_rank=stacked,
        uploaded_bytes=uploaded,
        svd_method=method,
        memcpy_s=memcpy_s,
        validate_s=validate_s,
        engine_s=engine_s,
        engine_peak_rss_bytes=engine_mem.increase,
        naive_modules_timed=timed,
        naive_module_s=naive_module_s,
        naive_est_s=naive_module_s * len(names),
        naive_peak_rss_bytes=naive_mem.increase,
        rel_frobenius_err=rel,
        rel_sigma_err=sigma,
        engine_cores_used=engine_cores,
        naive_cores_used=naive_cores,
        loadavg_1m=os.getloadavg()[0],
    )


def time_folded(
    strategy: SpectralStrategy, updates: Sequence[ClientUpdate], naive: LowRank, first: str
) -> dict[str, float | int]:
    """Fold every upload as the service does on acknowledgement (in batches of 16, what a
    busy server folds at once), then time the close alone."""
    state = strategy.initial_state()
    n = len(updates)
    log(f"{n} clients: folding the uploads into the round's bases")
    start = time.perf_counter()
    bases = RoundBases(strategy.schema, state, strategy.dtype, strategy.device)
    early = updates[:-1]
    folded = [f for i in range(0, n - 1, 16) for f in bases.fold_many(early[i : i + 16])]
    synchronize(strategy.device)
    fold_s = time.perf_counter() - start
    start = time.perf_counter()  # the last upload's fold sits in the round's turnaround
    folded += bases.fold_many(updates[-1:])
    synchronize(strategy.device)
    last_fold_s = time.perf_counter() - start
    fold_s += last_fold_s
    log(f"{n} clients: folded in {fold_s:.1f} s, the last upload in {last_fold_s:.2f} s")
    start, cpu = time.perf_counter(), time.process_time()
    result = CompressedAggregation(strategy, bases, state).aggregate(folded)
    synchronize(strategy.device)
    close_s = time.perf_counter() - start
    cores = (time.process_time() - cpu) / close_s
    log(f"{n} clients: close after folding {close_s:.2f} s")
    module = result.modules[first]
    assert isinstance(module, LowRank)
    return {
        "fold_s": fold_s,
        "last_fold_s": last_fold_s,
        "close_s": close_s,
        "close_cores_used": cores,
        "fold_width": bases.widths()[first][0],
        "close_rel_frobenius_err": compare(module, naive)[0],
    }


# -- reporting -------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join(lines)


def goals(results: Sequence[RoundResult]) -> list[dict[str, str]]:
    """The issue's goals, checked against the measured numbers as they are."""
    small, large = results[0], results[-1]
    growth = (large.engine_s / large.uploaded_bytes) / (small.engine_s / small.uploaded_bytes)
    noisy = " (contended: rerun on a quiet machine)"
    g1 = "PASS" if small.speedup >= GOAL_SPEEDUP else "MISS"
    g2 = "PASS" if growth <= GOAL_PER_BYTE_GROWTH else "MISS"
    g3 = "REPORTED"
    return [
        {
            "goal": f"engine ≥ {GOAL_SPEEDUP:g}× faster than naive at {small.clients} clients",
            "measured": f"{small.speedup:.1f}×",
            "verdict": g1 + (noisy if small.contended(naive=True) else ""),
        },
        {
            "goal": (
                f"time per uploaded byte at {large.clients} clients ≤ "
                f"{GOAL_PER_BYTE_GROWTH:g}× that at {small.clients}"
            ),
            "measured": f"{growth:.2f}×",
            "verdict": g2
            + (noisy if small.contended(naive=False) or large.contended(naive=False) else ""),
        },
        *close_goals(results),
        {
            "goal": "report engine time / memcpy floor",
            "measured": ", ".join(f"{r.clients}: {r.engine_over_memcpy:.0f}×" for r in results),
            "verdict": g3 + (noisy if any(r.contended(naive=False) for r in results) else ""),
        },
    ]


def close_goals(results: Sequence[RoundResult]) -> list[dict[str, str]]:
    noisy = " (contended: rerun on a quiet machine)"
    out = []
    for r in results:
        if math.isnan(r.close_s) or r.clients != GOAL_CLOSE_CLIENTS:
            continue
        turnaround = r.last_fold_s + r.close_s  # what follows the last acknowledgement
        fraction = turnaround / r.engine_s
        busy = min(r.engine_cores_used, r.close_cores_used)
        out.append(
            {
                "goal": (
                    f"last upload's fold + close ≤ {GOAL_CLOSE_FRACTION:.0%} of the one-shot "
                    f"engine at {r.clients} clients"
                ),
                "measured": f"{fraction:.1%} ({turnaround:.2f} s vs {r.engine_s:.2f} s)",
                "verdict": ("PASS" if fraction <= GOAL_CLOSE_FRACTION else "MISS")
                + (noisy if busy < CONTENDED_BELOW * torch.get_num_threads() else ""),
            }
        )
    return out


def report(args: argparse.Namespace, results: Sequence[RoundResult]) -> dict[str, object]:
    info = machine()
    modules = 2 * args.layers
    base = results[0]
    base_per_byte = base.engine_s / base.uploaded_bytes
    print("# Aggregation engine, one round")
    print(
        f"strategy={args.strategy} modules={modules} ({args.layers} layers × q,v of "
        f"{args.dim}×{args.dim}) ranks={list(args.ranks)} max_rank={args.max_rank} "
        f"upload_dtype={args.upload_dtype} uploads={args.uploads} seed={args.seed}"
    )
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), CUDA={info['cuda']}"
    )
    print(
        f"naive = dense Σ w·s·B·A + full torch.linalg.svd, timed on {base.naive_modules_timed} "
        f"of {modules} modules and scaled ×{modules / base.naive_modules_timed:g}; "
        "memcpy = best of "
        f"{args.memcpy_repeats}; engine = one strategy.aggregate call (validation included)."
    )
    print(
        "cores busy = process CPU time / wall time of the phase; well under the thread count, or "
        "a 1-min load average above it, means another process shared the cores (noisy timings)."
    )
    print()
    timing = [
        [
            str(r.clients),
            str(r.stacked_rank),
            f"{r.uploaded_bytes / MIB:.0f}",
            r.svd_method,
            f"{r.memcpy_s:.3f}",
            f"{r.validate_s:.2f}",
            f"{r.engine_s:.2f}",
            f"{r.naive_module_s:.2f}",
            f"{r.naive_est_s:.1f}",
            f"{r.engine_over_memcpy:.0f}×",
            f"{r.speedup:.1f}×",
            f"{r.s_per_gb:.2f}",
            f"{(r.engine_s / r.uploaded_bytes) / base_per_byte:.2f}×",
        ]
        for r in results
    ]
    print(
        table(
            [
                "clients",
                "N=Σr",
                "upload MiB",
                "auto SVD",
                "memcpy s",
                "validate s",
                "engine s",
                "naive s/module",
                "naive s (est.)",
                "engine/memcpy",
                "naive/engine",
                "engine s/GiB",
                f"per-byte vs {base.clients}",
            ],
            timing,
        )
    )
    print()
    memory = [
        [
            str(r.clients),
            f"{r.uploaded_bytes / MIB:.0f}",
            f"{r.engine_peak_rss_bytes / MIB:.0f}",
            f"{r.engine_peak_rss_bytes / r.uploaded_bytes:.2f}",
            f"{r.naive_peak_rss_bytes / MIB:.0f}",
            f"{r.rel_frobenius_err:.1e}",
            f"{r.rel_sigma_err:.1e}",
            f"{r.engine_cores_used:.2f} / {r.naive_cores_used:.2f}",
            f"{r.loadavg_1m:.2f}",
        ]
        for r in results
    ]
    print(
        table(
            [
                "clients",
                "upload MiB",
                "engine peak ΔRSS MiB",
                "ΔRSS / upload",
                "naive peak ΔRSS MiB",
                "rel. Frobenius err (module 0)",
                "max |Δσ|/σ₁",
                "cores busy engine / naive",
                "load avg (1 min)",
            ],
            memory,
        )
    )
    print()
    if args.fold:
        folding = [
            [
                str(r.clients),
                str(r.fold_width),
                f"{r.fold_s:.2f}",
                f"{r.last_fold_s:.2f}",
                f"{r.close_s:.2f}",
                f"{r.engine_s:.2f}",
                f"{r.close_s / r.engine_s:.1%}",
                f"{r.close_rel_frobenius_err:.1e}",
                f"{r.close_cores_used:.2f}",
            ]
            for r in results
            if r.fold_width
        ]
        print(
            table(
                [
                    "clients",
                    "basis width k (module 0)",
                    "fold s (during the round)",
                    "of it, the last upload s",
                    "close s",
                    "one-shot engine s",
                    "close / one-shot",
                    "rel. Frobenius err vs naive",
                    "cores busy close",
                ],
                folding,
            )
        )
        print()
    verdicts = goals(results)
    print(table(["goal", "measured", "verdict"], [list(g.values()) for g in verdicts]))
    return {
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "machine": info,
        "results": [asdict(r) for r in results],
        "goals": verdicts,
    }


# -- CLI -------------------------------------------------------------------------------------
def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int_list, default=(8, 32, 100))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--ranks", type=int_list, default=(4, 8, 16, 32, 64))
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--strategy", choices=SPECTRAL, default="raflora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--naive-modules",
        type=int,
        default=2,
        help="modules on which the naive path is timed; its mean is scaled to all modules",
    )
    parser.add_argument("--upload-dtype", choices=sorted(UPLOAD_DTYPES), default="fp32")
    parser.add_argument(
        "--uploads",
        choices=("shared", "random"),
        default="shared",
        help="shared: global adapter slice + local change (default); random: independent",
    )
    parser.add_argument("--memcpy-repeats", type=int, default=3)
    parser.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="skip the folded path (fold every upload, then time the close alone)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the engine and the naive reference run: cpu, cuda, cuda:N or auto",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if max(args.ranks) > args.max_rank:
        parser.error(f"--ranks must not exceed --max-rank {args.max_rank}")
    if args.naive_modules < 1 or args.memcpy_repeats < 1 or args.layers < 1 or args.dim < 1:
        parser.error("--naive-modules, --memcpy-repeats, --layers and --dim must be >= 1")
    args.clients = tuple(sorted(set(args.clients)))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; clients {args.clients}")
    base = None
    if args.uploads == "shared":
        gen = torch.Generator().manual_seed(args.seed)
        base = global_adapter(module_names(args.layers), args.dim, args.max_rank, gen)
    results = [run_round(args, n, base) for n in args.clients]
    payload = report(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
