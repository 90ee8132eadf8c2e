"""Prometheus metrics of the service, on a registry of its own (one per server instance), and
the plaintext HTTP side of the server: ``/metrics``, and ``/healthz`` and ``/readyz``, which
answer from a thread of their own whether the event loop still beats (:class:`Heartbeat`)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import math
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import MetricWrapperBase

from raflora.server.engine import RankEnergy

from .errors import ErrorKind
from .storage.manifest import RoundManifest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: How far back :meth:`ServerMetrics.record_resumed` reads manifests to recount a collapse.
COLLAPSE_LOOKBACK_ROUNDS = 10_000
#: The gRPC codes a refused upload is counted under (raflora_upload_errors_total), created at 0
#: for every federation so that the first refusals show in increase() and rate().
UPLOAD_ERROR_CODES = tuple(kind.value for kind in ErrorKind)
#: 0-1 gauges renamed to end in ``_ratio``: old name -> new name. The old names are exported
#: too, with the same values, for one release (docs/operations.md, "Metrics").
DEPRECATED_RATIO_NAMES = {
    "raflora_rank_energy_min_fraction": "raflora_rank_energy_min_ratio",
    "raflora_rank_partition_energy": "raflora_rank_partition_energy_ratio",
    "raflora_rank_tail_energy": "raflora_rank_tail_energy_ratio",
    "raflora_rank_partition_holder_weight": "raflora_rank_partition_holder_weight_ratio",
    "raflora_round_max_weight_share": "raflora_round_max_weight_share_ratio",
    "raflora_round_carried_energy_fraction": "raflora_round_carried_energy_ratio",
}
_OLD_NAMES = {new: old for old, new in DEPRECATED_RATIO_NAMES.items()}


class _Pair:
    def __init__(self, *children: Any) -> None:
        self._children = children

    def set(self, value: float) -> None:
        for child in self._children:
            child.set(value)


class RatioGauge:
    """A 0-1 gauge exported as ``name`` (ending in ``_ratio``) and, for one release, under its
    deprecated old name with the same value."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        old = _OLD_NAMES[name]
        self.gauge = Gauge(name, documentation, labels, registry=registry)
        self.deprecated = Gauge(
            old, f"DEPRECATED, removed in the next release: use {name}", labels, registry=registry
        )

    def labels(self, *values: str) -> _Pair:
        return _Pair(self.gauge.labels(*values), self.deprecated.labels(*values))


class ServerMetrics:
    def __init__(self, collapse_threshold: float = 0.9) -> None:
        self.registry = CollectorRegistry()
        self.collapse_threshold = collapse_threshold
        r = self.registry
        # The process' own CPU, memory, file descriptors, GC and Python version, as the default
        # registry would have them (process_*, python_gc_*, python_info).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "raflora_build_info",
            "1, labelled with the server's version, Python, PyTorch and compute device",
            ["version", "python", "torch", "device"],
            registry=r,
        )
        self.rpcs = Counter(
            "raflora_rpcs",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.rounds = Counter(
            "raflora_rounds_published",
            "Rounds aggregated and published",
            ["federation"],
            registry=r,
        )
        self.rounds_folded = Counter(
            "raflora_rounds_folded",
            "Published rounds whose close aggregated the uploads folded as they arrived "
            "(the rest read every upload back: docs/design.md §2.10)",
            ["federation"],
            registry=r,
        )
        self.rounds_summed = Counter(
            "raflora_rounds_summed",
            "Published rounds whose close combined the dense sums kept as uploads arrived "
            "instead of stacking every upload (docs/design.md §2.11)",
            ["federation"],
            registry=r,
        )
        self.current_round = Gauge(
            "raflora_current_round", "Newest published round", ["federation"], registry=r
        )
        self.last_published = Gauge(
            "raflora_round_last_published_timestamp_seconds",
            "Unix time of the newest publication, from its manifest (before round 1: when "
            "this server started serving the federation)",
            ["federation"],
            registry=r,
        )
        self.round_uploads = Gauge(
            "raflora_round_uploads",
            "Uploads acknowledged in the open round",
            ["federation"],
            registry=r,
        )
        self.active_clients = Gauge(
            "raflora_active_clients", "Clients joined to the federation", ["federation"], registry=r
        )
        self.uploads = Counter(
            "raflora_uploads", "Acknowledged uploads", ["federation", "rank"], registry=r
        )
        self.upload_bytes = Counter(
            "raflora_upload_bytes",
            "Bytes of acknowledged uploads",
            ["federation", "rank"],
            registry=r,
        )
        self.upload_errors = Counter(
            "raflora_upload_errors",
            "Refused uploads, by gRPC status code",
            ["federation", "code"],
            registry=r,
        )
        self.download_bytes = Counter(
            "raflora_download_bytes", "Bytes served by Pull", ["federation", "rank"], registry=r
        )
        self.pulls_from_memory = Counter(
            "raflora_pulls_from_memory",
            "Pulls served from the views kept in memory (hot_view_memory_mib)",
            ["federation"],
            registry=r,
        )
        self.pulls_while_built = Counter(
            "raflora_pulls_while_built",
            "Pulls that streamed their view while it was being built (the digest last)",
            ["federation"],
            registry=r,
        )
        self.hot_view_bytes = Gauge(
            "raflora_hot_view_bytes",
            "Memory held by pull views kept as messages, fills and views still streamed included",
            registry=r,
        )
        self.push_seconds = Histogram(
            "raflora_push_duration_seconds",
            "Push latency",
            ["federation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pull_seconds = Histogram(
            "raflora_pull_duration_seconds",
            "Pull latency",
            ["federation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.aggregation_seconds = Histogram(
            "raflora_aggregation_duration_seconds",
            "Round aggregation time",
            ["federation", "strategy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.aggregation_queue_seconds = Histogram(
            "raflora_aggregation_queue_seconds",
            "Time a closed round waited for an aggregation worker (aggregation_workers) before "
            "its aggregation started",
            ["federation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ray_tasks = Counter(
            "raflora_ray_tasks",
            "Module aggregations submitted to the Ray cluster (ray_address)",
            registry=r,
        )
        self.ray_fallbacks = Counter(
            "raflora_ray_fallbacks",
            "Rounds aggregated in process because the Ray cluster (ray_address) failed them",
            registry=r,
        )
        self.aggregation_failures = Counter(
            "raflora_aggregation_failures",
            "Rounds whose aggregation failed",
            ["federation"],
            registry=r,
        )
        self.e_min = RatioGauge(
            "raflora_rank_energy_min_ratio",
            "Energy share of the top rho_1 directions of the published update (1 = collapse)",
            ["federation"],
            r,
        )
        self.collapse_rounds = Gauge(
            "raflora_rank_collapse_rounds",
            "Consecutive published rounds, up to the newest, whose E_min is above "
            "collapse_e_min_threshold (0 for a federation with a single rank partition); "
            "recounted from the stored manifests on restart",
            ["federation"],
            registry=r,
        )
        self.collapse_threshold_ratio = Gauge(
            "raflora_rank_collapse_threshold_ratio",
            "The server's collapse_e_min_threshold",
            registry=r,
        )
        self.collapse_threshold_ratio.set(collapse_threshold)
        self.effective_rank = Gauge(
            "raflora_rank_effective_rank",
            "exp(entropy) of the published spectrum",
            ["federation"],
            registry=r,
        )
        self.partition_energy = RatioGauge(
            "raflora_rank_partition_energy_ratio",
            "Energy share of rank partition k (indices rho_{k-1}+1..rho_k)",
            ["federation", "partition", "upper_rank"],
            r,
        )
        self.tail_energy = RatioGauge(
            "raflora_rank_tail_energy_ratio",
            "Energy share beyond the largest participant rank",
            ["federation"],
            r,
        )
        self.privacy_epsilon = Gauge(
            "raflora_privacy_epsilon",
            "Client-level DP spent by a private federation's published rounds: epsilon at "
            "the federation's delta (RDP accountant, docs/design.md 2.9)",
            ["federation"],
            registry=r,
        )
        self.privacy_rounds = Gauge(
            "raflora_privacy_rounds",
            "Private rounds published (each spends privacy)",
            ["federation"],
            registry=r,
        )
        self.security = Gauge(
            "raflora_security_info",
            "1, labelled with whether authentication (on/off) and TLS (off/tls/mtls) are on",
            ["auth", "tls"],
            registry=r,
        )
        self.partition_holders = Gauge(
            "raflora_rank_partition_holders",
            "Clients of the last round whose rank covers partition k",
            ["federation", "partition", "upper_rank"],
            registry=r,
        )
        self.partition_holder_weight = RatioGauge(
            "raflora_rank_partition_holder_weight_ratio",
            "Share of the last round's client weight held by partition k's holders",
            ["federation", "partition", "upper_rank"],
            r,
        )
        self.storage_problems = Counter(
            "raflora_storage_problems",
            "Damage found on storage: rolled-back rounds, corrupt records or states",
            ["federation"],
            registry=r,
        )
        self.degraded = Gauge(
            "raflora_federation_degraded",
            "1 while a federation refuses its RPCs because its stored state is damaged",
            ["federation"],
            registry=r,
        )
        self.quarantined = Counter(
            "raflora_uploads_quarantined",
            "Acknowledged uploads removed from a round (corrupt on disk or failing aggregation)",
            ["federation"],
            registry=r,
        )
        self.max_weight_share = RatioGauge(
            "raflora_round_max_weight_share_ratio",
            "Largest normalised client weight in the last published round",
            ["federation"],
            r,
        )
        self.selected = Gauge(
            "raflora_round_selected_clients",
            "Clients selected for the open round, by rank (participation policy)",
            ["federation", "rank"],
            registry=r,
        )
        self.participants = Gauge(
            "raflora_round_participants",
            "Clients aggregated in the last published round, by rank",
            ["federation", "rank"],
            registry=r,
        )
        self.carried_energy = RatioGauge(
            "raflora_round_carried_energy_ratio",
            "Energy share of the published state beyond the round's largest participant rank "
            "(carried over from the previous state when carry_over is on)",
            ["federation"],
            r,
        )
        self._ranks_seen: dict[tuple[int, str], set[int]] = {}
        self._collapse: dict[str, int] = {}
        self._servers: list[WSGIServer] = []

    # -- process and federation ----------------------------------------------------------------
    def record_build(self, device: str) -> None:
        """raflora_build_info: what runs, for dashboards and bug reports."""
        try:
            version = importlib.metadata.version("raflora")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        torch_version = str(torch.__version__)
        self.build_info.labels(version, platform.python_version(), torch_version, device).set(1)

    def init_federation(self, federation: str) -> None:
        """Create a federation's counters at 0 (every refusal code included), so that its first
        refusals or failures show in increase() instead of appearing already counted."""
        for code in UPLOAD_ERROR_CODES:
            self.upload_errors.labels(federation, code)
        for counter in (
            self.rounds,
            self.rounds_folded,
            self.rounds_summed,
            self.aggregation_failures,
            self.storage_problems,
            self.quarantined,
        ):
            counter.labels(federation)
        self.degraded.labels(federation)
        self.collapse_rounds.labels(federation).set(self._collapse.get(federation, 0))

    # -- rounds ----------------------------------------------------------------------------
    def forget_federation(self, federation: str) -> None:
        """Drop a deleted federation's series: a stale gauge would keep its alerts firing."""

        def metrics(value: object, depth: int = 0) -> Iterator[MetricWrapperBase]:
            if isinstance(value, MetricWrapperBase):
                yield value
            elif depth == 0 and isinstance(value, RatioGauge):  # a gauge and its old name
                for inner in vars(value).values():
                    yield from metrics(inner, 1)

        for value in vars(self).values():
            for metric in metrics(value):
                with contextlib.suppress(ValueError, AttributeError):  # no "federation" label
                    metric.remove_by_labels({"federation": federation})

    def record_energy(self, federation: str, energy: RankEnergy) -> None:
        if math.isnan(energy.e_min):
            return
        self.e_min.labels(federation).set(energy.e_min)
        self.effective_rank.labels(federation).set(energy.effective_rank)
        self.tail_energy.labels(federation).set(energy.tail_energy)
        for k, (upper, share) in enumerate(
            zip(energy.boundaries, energy.partition_energy, strict=True), start=1
        ):
            self.partition_energy.labels(federation, str(k), str(upper)).set(share)

    def record_holders(self, federation: str, holders: Sequence[tuple[int, int, float]]) -> None:
        for k, (upper, count, share) in enumerate(holders, start=1):
            self.partition_holders.labels(federation, str(k), str(upper)).set(count)
            self.partition_holder_weight.labels(federation, str(k), str(upper)).set(share)

    def collapsed(self, energy: RankEnergy) -> bool:
        """Does a round with this energy count towards a rank collapse? E_min above the
        threshold, with more than one rank partition (one partition has E_min = 1 always)."""
        return (
            len(energy.boundaries) > 1
            and not math.isnan(energy.e_min)
            and energy.e_min > self.collapse_threshold
        )

    def _set_collapse(self, federation: str, rounds: int) -> None:
        self._collapse[federation] = rounds
        self.collapse_rounds.labels(federation).set(rounds)

    def record_published(self, federation: str, manifest: RoundManifest, seconds: float) -> None:
        """A round just published in ``seconds`` of aggregation."""
        self.aggregation_seconds.labels(federation, manifest.strategy).observe(seconds)
        self.rounds.labels(federation).inc()
        self.current_round.labels(federation).set(manifest.round)
        self.round_uploads.labels(federation).set(0)
        self.record_round(federation, manifest)
        collapsed = self.collapsed(manifest.energy)
        self._set_collapse(federation, self._collapse.get(federation, 0) + 1 if collapsed else 0)

    def record_resumed(
        self,
        federation: str,
        manifest: RoundManifest | None,
        earlier: Callable[[int], RoundManifest],
    ) -> None:
        """A federation resumed at ``manifest``'s round (None: before round 1).

        The gauges of the newest round come back from its manifest: the publication time (so
        RafloraRoundsStalled keeps its clock across restarts) and the collapse count, recounted
        from the stored manifests of the rounds before it (``earlier(t)`` reads round t's),
        newest first, for as long as they count (at most :data:`COLLAPSE_LOOKBACK_ROUNDS`).
        """
        self.init_federation(federation)
        if manifest is None:
            self.last_published.labels(federation).set(time.time())
            self._set_collapse(federation, 0)
            return
        self.record_round(federation, manifest)
        self._set_collapse(federation, self._recount_collapse(manifest, earlier))

    def _recount_collapse(
        self, newest: RoundManifest, earlier: Callable[[int], RoundManifest]
    ) -> int:
        count = 0
        manifest = newest
        while self.collapsed(manifest.energy):
            count += 1
            if manifest.round <= 1 or count >= COLLAPSE_LOOKBACK_ROUNDS:
                break
            try:
                manifest = earlier(manifest.round - 1)
            except Exception:  # a missing or damaged older round ends the count, nothing else
                break
        return count

    def _set_counts(self, gauge: Gauge, federation: str, ranks: Sequence[int]) -> None:
        """Per-rank counts; ranks counted before and absent now read 0, not a stale value."""
        counts = _count(ranks)
        key = (id(gauge), federation)
        for rank in self._ranks_seen.get(key, set()) - set(counts):
            gauge.labels(federation, str(rank)).set(0)
        for rank, count in counts.items():
            gauge.labels(federation, str(rank)).set(count)
        self._ranks_seen[key] = self._ranks_seen.get(key, set()) | set(counts)

    def record_selection(self, federation: str, ranks: Sequence[int]) -> None:
        self._set_counts(self.selected, federation, ranks)

    def record_round(self, federation: str, manifest: RoundManifest) -> None:
        """The gauges of a published round, from its manifest."""
        self._set_counts(self.participants, federation, [u.rank for u in manifest.uploads])
        if not math.isnan(manifest.energy.tail_energy):
            self.carried_energy.labels(federation).set(manifest.energy.tail_energy)
        self.last_published.labels(federation).set(manifest.published_unix)
        self.record_energy(federation, manifest.energy)
        self.record_holders(federation, manifest.holders)
        self.max_weight_share.labels(federation).set(manifest.max_weight_share)
        if manifest.privacy is not None:
            self.privacy_epsilon.labels(federation).set(manifest.privacy.epsilon)
            self.privacy_rounds.labels(federation).set(manifest.privacy.rounds)

    # -- HTTP ------------------------------------------------------------------------------
    def serve(self, host: str, port: int, heartbeat: Heartbeat | None = None) -> int:
        """Expose /metrics over HTTP (and /healthz, /readyz with ``heartbeat``); returns the
        bound port (``port`` 0 picks one)."""
        return self._serve(host, port, health_app(heartbeat, make_wsgi_app(self.registry)))

    def serve_health(self, host: str, port: int, heartbeat: Heartbeat) -> int:
        """/healthz and /readyz alone, on a port of their own; returns the bound port."""
        return self._serve(host, port, health_app(heartbeat))

    def _serve(self, host: str, port: int, app: _WsgiApp) -> int:
        server = _http_server(host, port, app)
        self._servers.append(server)
        return int(server.server_port)

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []


def _count(ranks: Sequence[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in ranks:
        out[r] = out.get(r, 0) + 1
    return out


# -- health ------------------------------------------------------------------------------------


class Heartbeat:
    """The event loop's pulse, read from another thread.

    :meth:`run`, a task on the server's event loop, stamps the time every ``interval``; the
    HTTP thread that answers the probes only reads the stamp. A loop that stops turning (a
    callback that blocks it, a deadlock) stops the stamps: once the newest is older than
    ``timeout`` the probes answer 503, though the process, its gRPC port and TLS handshakes may
    all still look alive. ``ready`` is the server's own say (SERVING, not shutting down).
    """

    def __init__(self, timeout: float, interval: float = 1.0) -> None:
        self.timeout = timeout
        self.interval = interval
        self.ready = False
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    @property
    def age(self) -> float:
        """Seconds since the loop last beat."""
        return time.monotonic() - self._last

    @property
    def alive(self) -> bool:
        return self.age <= self.timeout

    async def run(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(self.interval)


_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
HEALTH_PATHS = ("/healthz", "/readyz")


def health_app(heartbeat: Heartbeat | None, fallback: _WsgiApp | None = None) -> _WsgiApp:
    """WSGI: ``/healthz`` (liveness: the loop beats) and ``/readyz`` (readiness: it beats and
    the server is SERVING), 200 or 503 with a small JSON body; anything else to ``fallback``."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if heartbeat is not None and path in HEALTH_PATHS:
            age = heartbeat.age
            if not heartbeat.alive:
                state = "event loop stalled"
            elif path == "/readyz" and not heartbeat.ready:
                state = "not ready"
            else:
                state = "ok"
            body = json.dumps(
                {"status": state, "heartbeat_age_seconds": round(age, 3)}, sort_keys=True
            ).encode()
            start_response(
                "200 OK" if state == "ok" else "503 Service Unavailable",
                [
                    ("Content-Type", "application/json"),
                    ("Cache-Control", "no-store"),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        if fallback is not None:
            return fallback(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


def _http_server(host: str, port: int, app: _WsgiApp) -> WSGIServer:
    """A threaded WSGI server in a daemon thread (one more thread per request)."""

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, name=f"raflora-http-{server.server_port}", daemon=True
    )
    thread.start()
    return server
