"""Prometheus metrics of the service, on a registry of its own (one per server instance)."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from raflora.server.engine import RankEnergy

from .storage.manifest import RoundManifest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.current_round = Gauge(
            "raflora_current_round", "Newest published round", ["federation"], registry=r
        )
        self.last_published = Gauge(
            "raflora_round_last_published_timestamp_seconds",
            "Unix time of the newest publication (or federation start)",
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
        self.aggregation_failures = Counter(
            "raflora_aggregation_failures",
            "Rounds whose aggregation failed",
            ["federation"],
            registry=r,
        )
        self.e_min = Gauge(
            "raflora_rank_energy_min_fraction",
            "Energy share of the top rho_1 directions of the published update (1 = collapse)",
            ["federation"],
            registry=r,
        )
        self.effective_rank = Gauge(
            "raflora_rank_effective_rank",
            "exp(entropy) of the published spectrum",
            ["federation"],
            registry=r,
        )
        self.partition_energy = Gauge(
            "raflora_rank_partition_energy",
            "Energy share of rank partition k (indices rho_{k-1}+1..rho_k)",
            ["federation", "partition", "upper_rank"],
            registry=r,
        )
        self.tail_energy = Gauge(
            "raflora_rank_tail_energy",
            "Energy share beyond the largest participant rank",
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
        self.partition_holder_weight = Gauge(
            "raflora_rank_partition_holder_weight",
            "Share of the last round's client weight held by partition k's holders",
            ["federation", "partition", "upper_rank"],
            registry=r,
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
        self.max_weight_share = Gauge(
            "raflora_round_max_weight_share",
            "Largest normalised client weight in the last published round",
            ["federation"],
            registry=r,
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
        self.carried_energy = Gauge(
            "raflora_round_carried_energy_fraction",
            "Energy share of the published state beyond the round's largest participant rank "
            "(carried over from the previous state when carry_over is on)",
            ["federation"],
            registry=r,
        )
        self._ranks_seen: dict[tuple[int, str], set[int]] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

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

    def record_published(self, federation: str, manifest: RoundManifest, seconds: float) -> None:
        """A round just published in ``seconds`` of aggregation."""
        self.aggregation_seconds.labels(federation, manifest.strategy).observe(seconds)
        self.rounds.labels(federation).inc()
        self.current_round.labels(federation).set(manifest.round)
        self.round_uploads.labels(federation).set(0)
        self.record_round(federation, manifest)

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

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (``port`` 0 picks one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http, self._thread = server, thread
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _count(ranks: Sequence[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in ranks:
        out[r] = out.get(r, 0) + 1
    return out
