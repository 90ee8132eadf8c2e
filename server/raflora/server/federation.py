"""One federation's rounds: open -> collecting -> aggregating -> published.

All state changes happen on the event loop; payload validation, aggregation, persistence and
view building run in threads so the loop keeps serving every other client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from raflora.server.engine import (
    ClientUpdate,
    FactorPair,
    GlobalState,
    LowRank,
    RankEnergy,
    Strategy,
    Weighting,
    adapter_energy,
    client_weights,
    lora_scaling,
    make_strategy,
    partition_holders,
)
from raflora.server.engine.validation import validate_rank
from raflora.v1.wire import LORA_A, LORA_B, tensor_name

from .config import FederationConfig, check_id
from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from .metrics import ServerMetrics
from .storage import (
    ClientRecord,
    FederationStore,
    UploadRecord,
    disk_full_is_resource_exhausted,
)
from .tensorio import load_factors, max_upload_bytes, validate_upload_file, write_safetensors

log = logging.getLogger("raflora.server")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# A round whose publication failed on I/O (disk full) is retried with this backoff.
_RETRY_INITIAL_SECONDS = 1.0
_RETRY_MAX_SECONDS = 60.0


Holders = tuple[int, int, float]  # (partition upper rank, holder count, holder weight share)


class Phase(str, Enum):
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"


class EventType(str, Enum):
    STATUS = "status"
    UPLOAD = "upload"
    AGGREGATING = "aggregating"
    PUBLISHED = "published"
    FAILED = "failed"


@dataclass(frozen=True)
class Snapshot:
    federation_id: str
    round: int
    phase: Phase
    uploads: int
    min_clients: int
    expected_clients: int
    deadline_unix: float
    energy: RankEnergy | None
    joined_clients: int
    holders: tuple[Holders, ...] = ()


@dataclass(frozen=True)
class RoundEvent:
    type: EventType
    snapshot: Snapshot
    message: str = ""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PushTicket:
    """A push whose header passed every check; the payload is still to come."""

    client_id: str
    round: int
    rank: int
    num_examples: int
    lora_alpha: float
    scale: float
    total_bytes: int
    sha256: str


@dataclass(frozen=True)
class PushOutcome:
    round: int
    duplicate: bool
    size: int
    uploads_in_round: int


@dataclass(frozen=True)
class View:
    """A client's pull payload, cached on disk."""

    path: Path
    round: int
    rank: int
    scale: float
    size: int
    sha256: str
    has_merge: bool
    energy: RankEnergy | None
    holders: tuple[Holders, ...] = ()


class FederationRuntime:
    def __init__(
        self,
        config: FederationConfig,
        store: FederationStore,
        metrics: ServerMetrics,
        executor: Executor,
        device: str,
        *,
        max_pushes_per_round: int = 10,
        aggregation_delay_seconds: float = 0.0,
    ) -> None:
        self.config = config
        self.max_pushes_per_round = max_pushes_per_round
        self.aggregation_delay_seconds = aggregation_delay_seconds
        self.id = config.federation_id
        self.store = store
        self.metrics = metrics
        self.executor = executor
        self.strategy: Strategy = make_strategy(config.strategy, config.strategy_config(device))
        self.schema = self.strategy.schema
        self.lock = asyncio.Lock()
        self.state: GlobalState = self.strategy.initial_state()
        self.energy: RankEnergy | None = None
        self.holders: tuple[Holders, ...] = ()
        self.phase = Phase.COLLECTING
        self.uploads: dict[str, UploadRecord] = {}
        self.clients: dict[str, ClientRecord] = {}
        self.deadline_unix = 0.0
        self._deadline_passed = False
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._subscribers: set[asyncio.Queue[RoundEvent]] = set()
        self._views: dict[tuple[int, int, float], asyncio.Task[View]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._push_attempts: dict[str, int] = {}  # client id -> attempts in the open round
        self._retry_handle: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_INITIAL_SECONDS

    # -- lifecycle -------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the newest published round, joined clients and acknowledged uploads."""
        latest = self.store.latest_round()
        if latest > 0:
            self.state, self.energy, self.holders = self._load_published(latest)
            self.metrics.record_energy(self.id, self.energy)
            self.metrics.record_holders(self.id, self.holders)
        self.clients = self.store.load_clients()
        self.uploads = self.store.load_uploads(self.state.round)
        self.metrics.current_round.labels(self.id).set(self.state.round)
        self.metrics.last_published.labels(self.id).set(time.time())
        self.metrics.active_clients.labels(self.id).set(len(self.clients))
        self.metrics.round_uploads.labels(self.id).set(len(self.uploads))
        log.info(
            "federation %s resumed at round %d with %d acknowledged uploads",
            self.id,
            self.state.round,
            len(self.uploads),
        )

    def start(self) -> None:
        """Arm the deadline and close the round if a crash left it ready to aggregate."""
        self._open_round()
        self._spawn(self._maybe_close())

    async def close(self) -> None:
        self._closed = True
        for handle in (self._deadline_handle, self._retry_handle):
            if handle is not None:
                handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- queries ---------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return Snapshot(
            federation_id=self.id,
            round=self.state.round,
            phase=self.phase,
            uploads=len(self.uploads),
            min_clients=self.config.min_clients,
            expected_clients=self.config.target_clients,
            deadline_unix=self.deadline_unix,
            energy=self.energy,
            holders=self.holders,
            joined_clients=len(self.clients),
        )

    def subscribe(self) -> asyncio.Queue[RoundEvent]:
        queue: asyncio.Queue[RoundEvent] = asyncio.Queue(maxsize=1024)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[RoundEvent]) -> None:
        self._subscribers.discard(queue)

    def _emit(self, type_: EventType, message: str = "", warnings: tuple[str, ...] = ()) -> None:
        event = RoundEvent(type_, self.snapshot(), message, warnings)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a watcher that stopped reading: drop it
                self._subscribers.discard(queue)

    # -- join ------------------------------------------------------------------------------
    async def join(
        self, client_id: str, rank: int, num_examples: int, lora_alpha: float
    ) -> ClientRecord:
        check_id("client_id", client_id)
        validate_rank(rank, self.config.max_rank, self.config.allowed_ranks or None)
        alpha = lora_alpha or self.config.lora_alpha
        if not math.isfinite(alpha) or alpha <= 0:
            raise InvalidArgumentError("lora_alpha", f"must be a positive number, got {alpha}")
        record = ClientRecord(
            client_id,
            rank,
            num_examples,
            alpha,
            lora_scaling(alpha, rank, self.config.scaling_rule),
        )
        async with self.lock:
            previous = self.clients.get(client_id)
            if previous == record:
                return record
            if previous is not None and previous.rank != rank and client_id in self.uploads:
                raise FailedPreconditionError(
                    "rank",
                    f"client {client_id!r} already uploaded at rank {previous.rank} in round "
                    f"{self.state.round}; it can change rank from the next round",
                )
            clients = {**self.clients, client_id: record}
            await asyncio.to_thread(self.store.save_clients, clients)
            self.clients = clients
        self.metrics.active_clients.labels(self.id).set(len(self.clients))
        return record

    def client(self, client_id: str) -> ClientRecord:
        record = self.clients.get(client_id)
        if record is None:
            raise FailedPreconditionError(
                "client_id", f"client {client_id!r} has not joined federation {self.id!r}"
            )
        return record

    # -- push ------------------------------------------------------------------------------
    def begin_push(
        self,
        client_id: str,
        round_: int,
        rank: int,
        num_examples: int,
        lora_alpha: float,
        total_bytes: int,
        sha256: str,
    ) -> PushTicket:
        joined = self.client(client_id)
        self._count_push_attempt(client_id)
        if rank != joined.rank:
            raise InvalidArgumentError(
                "rank", f"upload rank {rank} != rank {joined.rank} given at join"
            )
        self._check_round_open(round_)
        if self.config.weighting is Weighting.EXAMPLES and num_examples < 1:
            raise InvalidArgumentError(
                "num_examples", "must be >= 1: this federation weighs clients by examples"
            )
        alpha = lora_alpha or joined.lora_alpha
        if not math.isfinite(alpha) or alpha <= 0:
            raise InvalidArgumentError("lora_alpha", f"must be a positive number, got {alpha}")
        if not _SHA_RE.match(sha256):
            raise InvalidArgumentError("sha256", "must be 64 lowercase hex digits")
        limit = max_upload_bytes(self.schema, rank)
        if not 0 < total_bytes <= limit:
            raise InvalidArgumentError(
                "total_bytes", f"{total_bytes} is outside 1..{limit} for rank {rank}"
            )
        return PushTicket(
            client_id,
            round_,
            rank,
            num_examples,
            alpha,
            lora_scaling(alpha, rank, self.config.scaling_rule),
            total_bytes,
            sha256,
        )

    def _count_push_attempt(self, client_id: str) -> None:
        """Every push of a joined client counts, refused ones included; reset each round."""
        attempts = self._push_attempts.get(client_id, 0) + 1
        self._push_attempts[client_id] = attempts
        if attempts > self.max_pushes_per_round:
            raise ResourceExhaustedError(
                "round",
                f"client {client_id!r} reached the limit of {self.max_pushes_per_round} push "
                f"attempts in round {self.state.round}; wait for the next round",
            )

    def _check_round_open(self, round_: int) -> None:
        current = self.state.round
        if round_ < current:
            raise FailedPreconditionError(
                "round", f"round {round_} is closed; the open round is {current}"
            )
        if round_ > current:
            raise FailedPreconditionError(
                "round", f"round {round_} is not open yet; the open round is {current}"
            )
        if self.phase is Phase.AGGREGATING:
            raise FailedPreconditionError(
                "round", f"round {current} is aggregating; wait for round {current + 1}"
            )

    def incoming_path(self, round_: int) -> Path:
        return self.store.incoming_path(round_)

    async def finish_push(self, ticket: PushTicket, received: Path) -> PushOutcome:
        """Validate a fully received payload, make it durable, acknowledge it."""
        try:
            await asyncio.to_thread(
                validate_upload_file, received, self.schema, ticket.rank, ticket.client_id
            )
            async with self.lock:
                self._check_round_open(ticket.round)
                existing = self.uploads.get(ticket.client_id)
                if existing is not None:
                    if existing.sha256 != ticket.sha256:
                        raise AlreadyExistsError(
                            "sha256",
                            f"client {ticket.client_id!r} already uploaded a different update "
                            f"for round {ticket.round}",
                        )
                    received.unlink(missing_ok=True)
                    return PushOutcome(ticket.round, True, existing.size, len(self.uploads))
                record = UploadRecord(
                    ticket.client_id,
                    ticket.round,
                    ticket.rank,
                    ticket.num_examples,
                    ticket.lora_alpha,
                    ticket.scale,
                    ticket.sha256,
                    ticket.total_bytes,
                )
                await asyncio.to_thread(self.store.commit_upload, received, record)
                self.uploads[ticket.client_id] = record
                count = len(self.uploads)
        finally:
            received.unlink(missing_ok=True)  # no-op once committed (it was renamed)
        rank = str(ticket.rank)
        self.metrics.uploads.labels(self.id, rank).inc()
        self.metrics.upload_bytes.labels(self.id, rank).inc(ticket.total_bytes)
        self.metrics.round_uploads.labels(self.id).set(count)
        self._emit(EventType.UPLOAD, f"{ticket.client_id} uploaded rank {ticket.rank}")
        self._spawn(self._maybe_close())
        return PushOutcome(ticket.round, False, ticket.total_bytes, count)

    # -- rounds ----------------------------------------------------------------------------
    def _open_round(self) -> None:
        self._deadline_passed = False
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        self.deadline_unix = 0.0
        if self.config.deadline_seconds > 0:
            self.deadline_unix = time.time() + self.config.deadline_seconds
            self._deadline_handle = asyncio.get_running_loop().call_later(
                self.config.deadline_seconds, self._on_deadline
            )

    def _on_deadline(self) -> None:
        self._deadline_passed = True
        self._spawn(self._maybe_close())

    def _ready(self) -> bool:
        n = len(self.uploads)
        if n >= self.config.target_clients:
            return True
        return self._deadline_passed and n >= self.config.min_clients

    async def _maybe_close(self) -> None:
        async with self.lock:
            if self._closed or self.phase is not Phase.COLLECTING or not self._ready():
                return
            self.phase = Phase.AGGREGATING
            uploads = sorted(self.uploads.values(), key=lambda u: u.client_id)
            state = self.state
        self._emit(EventType.AGGREGATING, f"aggregating {len(uploads)} uploads")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            new_state, energy, holders = await loop.run_in_executor(
                self.executor, self._aggregate_and_publish, state, uploads
            )
        except Exception as exc:  # keep collecting; the operator sees it in logs and metrics
            if isinstance(exc, ResourceExhaustedError):  # disk full: no traceback needed
                log.error("federation %s: round %d not published: %s", self.id, state.round, exc)
            else:
                log.exception("federation %s: aggregation of round %d failed", self.id, state.round)
            self.metrics.aggregation_failures.labels(self.id).inc()
            async with self.lock:
                self.phase = Phase.COLLECTING
            self._emit(EventType.FAILED, f"aggregation failed: {exc}")
            if isinstance(exc, OSError | ResourceExhaustedError):  # I/O: try again later
                self._schedule_retry()
            return
        elapsed = time.perf_counter() - started
        self._retry_delay = _RETRY_INITIAL_SECONDS
        async with self.lock:
            self.state, self.energy, self.holders = new_state, energy, holders
            self.uploads = {}
            self._push_attempts = {}
            self.phase = Phase.COLLECTING
            self._views = {k: v for k, v in self._views.items() if k[0] >= new_state.round}
            self._open_round()
        await asyncio.to_thread(self.store.prune, new_state.round)
        m = self.metrics
        m.aggregation_seconds.labels(self.id, self.config.strategy).observe(elapsed)
        m.rounds.labels(self.id).inc()
        m.current_round.labels(self.id).set(new_state.round)
        m.last_published.labels(self.id).set(time.time())
        m.round_uploads.labels(self.id).set(0)
        m.record_energy(self.id, energy)
        m.record_holders(self.id, holders)
        log.info(
            "federation %s published round %d from %d uploads in %.2fs (E_min %.3f)",
            self.id,
            new_state.round,
            len(uploads),
            elapsed,
            energy.e_min,
        )
        warnings = tuple(
            f"rank partition {k} (indices up to {rho}) is held by {count} client(s) "
            f"with {share:.0%} of the round's weight; fewer than min_partition_holders="
            f"{self.config.min_partition_holders}"
            for k, (rho, count, share) in enumerate(holders, start=1)
            if count < self.config.min_partition_holders
        )
        for warning in warnings:
            log.warning("federation %s round %d: %s", self.id, new_state.round, warning)
        self._emit(EventType.PUBLISHED, f"round {new_state.round} published", warnings)

    def _schedule_retry(self) -> None:
        if self._closed:
            return
        delay, self._retry_delay = (
            self._retry_delay,
            min(self._retry_delay * 2, _RETRY_MAX_SECONDS),
        )
        log.warning("federation %s: retrying the aggregation in %.0fs", self.id, delay)
        self._retry_handle = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._maybe_close())
        )

    def _debug_delay(self) -> None:
        if self.aggregation_delay_seconds > 0:
            log.warning(
                "federation %s: debug_aggregation_delay_seconds: sleeping %.1fs before commit",
                self.id,
                self.aggregation_delay_seconds,
            )
            time.sleep(self.aggregation_delay_seconds)

    def _aggregate_and_publish(
        self, state: GlobalState, uploads: list[UploadRecord]
    ) -> tuple[GlobalState, RankEnergy, tuple[Holders, ...]]:
        """Runs in the aggregation thread: load, aggregate, persist atomically."""
        updates = [
            ClientUpdate(
                u.client_id,
                u.rank,
                u.num_examples,
                u.scale,
                load_factors(self.store.upload_path(u.round, u.client_id), self.schema),
            )
            for u in uploads
        ]
        new_state = self.strategy.aggregate(state, updates)
        energy = adapter_energy(new_state).overall
        p = client_weights([u.num_examples for u in uploads], self.config.weighting)
        holders = tuple(partition_holders([u.rank for u in uploads], p))
        manifest = {
            "federation_id": self.id,
            "strategy": self.config.strategy,
            "uploads": [
                {
                    "client_id": u.client_id,
                    "rank": u.rank,
                    "num_examples": u.num_examples,
                    "scale": u.scale,
                    "sha256": u.sha256,
                }
                for u in uploads
            ],
            "energy": {
                "e_min": energy.e_min,
                "effective_rank": energy.effective_rank,
                "partition_upper_ranks": list(energy.boundaries),
                "partition_energy": list(energy.partition_energy),
            },
            "partition_holders": [list(h) for h in holders],
            "published_unix": time.time(),
        }
        self.store.publish(new_state, manifest, before_commit=self._debug_delay)
        return new_state, energy, holders

    # -- pull ------------------------------------------------------------------------------
    async def view_for(self, client_id: str, round_: int | None = None) -> View:
        """The client's payload for the newest round (None) or for an older published one."""
        joined = self.client(client_id)
        current = self.state.round
        if round_ is not None and round_ > current:
            raise FailedPreconditionError(
                "round", f"round {round_} is not published yet; the newest is {current}"
            )
        if round_ is None or round_ == current:
            state, energy, holders = self.state, self.energy, self.holders
        elif round_ == 0:
            state, energy, holders = self.strategy.initial_state(), None, ()
        else:
            state, energy, holders = await asyncio.to_thread(self._load_published, round_)
        key = (state.round, joined.rank, joined.scale)
        task = self._views.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(
                    self._build_view, state, energy, holders, joined.rank, joined.scale
                )
            )
            self._views[key] = task
        return await asyncio.shield(task)

    def _load_published(self, round_: int) -> tuple[GlobalState, RankEnergy, tuple[Holders, ...]]:
        """A published round from disk, on the compute device, with its energy and holders."""
        try:
            manifest = self.store.read_manifest(round_)
        except FileNotFoundError:
            raise NotFoundError("round", f"round {round_} is not on disk") from None
        loaded = self.store.load_state(round_, list(self.schema))
        state = GlobalState(
            round=loaded.round,
            modules={n: _to_device(m, self.strategy) for n, m in loaded.modules.items()},
            participant_ranks=loaded.participant_ranks,
        )
        holders = tuple(
            (int(r), int(c), float(w)) for r, c, w in manifest.get("partition_holders", [])
        )
        return state, adapter_energy(state).overall, holders

    def _build_view(
        self,
        state: GlobalState,
        energy: RankEnergy | None,
        holders: tuple[Holders, ...],
        rank: int,
        scale: float,
    ) -> View:
        folder = self.store.view_dir(state.round)
        path = folder / f"rank-{rank}-scale-{scale.hex()}.safetensors"
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        has_merge = False
        for name, shape in self.schema.modules.items():
            specs.append((tensor_name(name, LORA_A), torch.float32, (rank, shape.d_in)))
            specs.append((tensor_name(name, LORA_B), torch.float32, (shape.d_out, rank)))
            k = self.strategy.merge_rank(state, name)
            if k is not None:
                has_merge = True
                specs.append(
                    (tensor_name(name, LORA_A, merge=True), torch.float32, (k, shape.d_in))
                )
                specs.append(
                    (tensor_name(name, LORA_B, merge=True), torch.float32, (shape.d_out, k))
                )

        def produce() -> Iterator[tuple[str, Tensor]]:
            for name in self.schema:
                factors, merge = self.strategy.distribute_module(state, name, rank, scale)
                yield tensor_name(name, LORA_A), factors.A.float()
                yield tensor_name(name, LORA_B), factors.B.float()
                if merge is not None:
                    yield tensor_name(name, LORA_A, merge=True), merge.A.float()
                    yield tensor_name(name, LORA_B, merge=True), merge.B.float()

        tmp = folder / f".{path.name}.tmp"
        metadata = {
            "format": "raflora.v1",
            "round": str(state.round),
            "rank": str(rank),
            "scale": repr(scale),
        }
        try:
            with disk_full_is_resource_exhausted("building a pull view"):
                size, digest = write_safetensors(tmp, specs, produce(), metadata)
                tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return View(path, state.round, rank, scale, size, digest, has_merge, energy, holders)


def _to_device(module: LowRank | FactorPair, strategy: Strategy) -> LowRank | FactorPair:
    def move(t: Tensor) -> Tensor:
        return t.to(device=strategy.device, dtype=strategy.dtype)

    if isinstance(module, LowRank):
        return LowRank(move(module.U), move(module.S), move(module.V))
    return FactorPair(move(module.B), move(module.A))
