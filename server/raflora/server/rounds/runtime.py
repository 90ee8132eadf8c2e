"""One federation's round state machine: collecting → aggregating → published → collecting.

All state changes happen on the event loop under one lock; payload validation, aggregation,
persistence and view building run in threads so the loop keeps serving every other client.
No grpc and no paths here: uploads arrive through a :class:`PushTicket` holding the store's
sink, and aggregation is :class:`RoundPublisher`'s job (docs/design.md, "The round state
machine").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from raflora.server.engine import (
    GlobalState,
    ModuleMap,
    RankEnergy,
    Strategy,
    make_strategy,
)
from raflora.v1.wire import DEFAULT_CHUNK_SIZE, ErrorReason

from ..config import FederationConfig, echo_id
from ..errors import (
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
    is_disk_full,
)
from ..metrics import ServerMetrics
from ..storage import (
    ClientRecord,
    CorruptDataError,
    FederationStore,
    ResumeReport,
    RoundManifest,
    UploadRecord,
    UploadSink,
)
from ..storage.manifest import Holders
from ..storage.s3_direct import DirectStore
from ..storage.tensorio import StreamingUploadCheck, UpdateBounds, confirm_readable
from .events import EventBus, EventType, Phase, PrivacyStatus, RoundEvent, Snapshot, Subscription
from .folding import FOLDS, RoundFolder
from .hot_views import HotViews
from .intake import Kept, UploadIntake
from .preload import PRELOADS, MemoryBudget, RoundPreload
from .privacy import RoundPrivacy, privacy_record_problem, round_privacy
from .publish import (
    NothingToAggregateError,
    PublishOutcome,
    Quarantined,
    RoundPublisher,
    apply_retention,
    holder_warnings,
)
from .published import PublishedRounds
from .selection import Selection, select
from .summing import RoundSummer
from .terms import check_push_terms, check_sha256, join_terms
from .tickets import HeaderVerdict, PushOutcome, PushTicket
from .views import LivePull, RoundContent, View, ViewCache, ViewReader

log = logging.getLogger("raflora.server")
T = TypeVar("T")
# A round whose publication failed on I/O (disk full) is retried with this backoff.
_RETRY_INITIAL_SECONDS = 1.0
_RETRY_MAX_SECONDS = 60.0
_VIEW_ATTEMPTS = 3


@dataclass(frozen=True)
class RuntimeLimits:
    max_pushes_per_round: int = 10
    max_joins_per_round: int = 20
    aggregation_delay_seconds: float = 0.0  # test hook: sleep before committing a round
    max_views_per_round: int = 64
    watcher_capacity: int = 1024
    aggregation_workers: int = 1  # aggregations of different federations that may run at once
    # Memory the open round's folded uploads may hold (docs/design.md §2.10); 0: never fold,
    # the default, because folding slows rounds whose uploads share no directions.
    fold_memory_bytes: int = 0
    # Memory every open round together may hold of uploads kept in memory for their close
    # (docs/design.md §4.2); 0: the close reads every upload itself.
    preload_memory_bytes: int = 0
    preload_max_upload_bytes: int = 16 << 20  # larger uploads stream as before
    # Memory every open round together may hold of the dense sums of its uploads kept in
    # memory (docs/design.md §2.11); 0: every close stacks the uploads themselves.
    round_sums_memory_bytes: int = 0
    # Memory the server may hold of pull views as framed messages (rounds/hot_views.py).
    hot_view_memory_bytes: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE  # the server's message size (settings.chunk_size)


class FederationRuntime:
    def __init__(
        self,
        config: FederationConfig,
        store: FederationStore,
        metrics: ServerMetrics,
        executor: Executor,
        device: str,
        limits: RuntimeLimits | None = None,
        fold_executor: Executor | None = None,
        map_modules: ModuleMap | None = None,
        preload_budget: MemoryBudget | None = None,
        preload_executor: Executor | None = None,
        hot_views: HotViews | None = None,
        sums_budget: MemoryBudget | None = None,
    ) -> None:
        self.config = config
        self.id = config.federation_id
        self.store = store
        self.metrics = metrics
        self.executor = executor
        self.limits = limits or RuntimeLimits()
        self.strategy: Strategy = make_strategy(config.strategy, config.strategy_config(device))
        # The store again, when it has a direct data plane (the object store's; §5.3).
        self.direct: DirectStore | None = (
            cast("DirectStore", store) if getattr(store, "direct", None) is not None else None
        )
        if config.data_plane == "direct" and self.direct is None:
            raise InvalidArgumentError(
                "data_plane",
                "direct transfers go through an object store: this server keeps its state on "
                "a local disk (storage = file); use data_plane grpc, or a server with "
                "storage = s3",
            )
        self.schema = self.strategy.schema
        self.bounds = UpdateBounds(self.strategy.dtype, config.max_update_norm)
        self.published = PublishedRounds(self.id, self.strategy, store, metrics)
        self.publisher = RoundPublisher(config, self.strategy, store, self.published, map_modules)
        if config.data_plane == "direct":  # its pulls read the bucket: no messages to keep
            hot_views = HotViews(0)
        elif hot_views is None:
            hot_views = HotViews(self.limits.hot_view_memory_bytes)
        self.views = ViewCache(
            self.strategy,
            store,
            self.limits.max_views_per_round,
            hot_views,
            self.id,
            self.limits.chunk_size,
        )
        self.events = EventBus(self.limits.watcher_capacity)
        self.lock = asyncio.Lock()
        self.state: GlobalState = self.strategy.initial_state()
        self.manifest: RoundManifest | None = None
        self.phase = Phase.COLLECTING
        self.uploads: dict[str, UploadRecord] = {}
        self.clients: dict[str, ClientRecord] = {}
        self.degraded = ""
        self.selection: Selection | None = None  # None: everyone who pushes takes part
        self.selection_pending = False  # a policy's draw waits for expected_clients to join
        self.observers: frozenset[str] = frozenset()  # clients that pull and never push
        self.deadline_unix = 0.0
        self._deadline_passed = False
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.deleted = False  # DeleteFederation: every RPC that still reaches it is NOT_FOUND
        self._push_attempts: dict[str, int] = {}  # client id -> attempts in the open round
        # Clients with a CommitDirectPush running: its terms and its task (a retry joins it).
        self.direct_commits: dict[str, tuple[Any, asyncio.Future[Any]]] = {}
        self.view_uploads: dict[str, asyncio.Lock] = {}  # direct pulls: one upload per view
        self._join_attempts: dict[str, int] = {}
        self._retry_handle: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_INITIAL_SECONDS
        self.folder: RoundFolder | None = None  # the open round's folded uploads
        self.fold_executor = fold_executor or FOLDS
        # The open round's uploads in memory for the close, under a server-wide budget.
        self.preload_budget = preload_budget or MemoryBudget(
            self.limits.preload_memory_bytes, self.limits.preload_max_upload_bytes
        )
        self.preload: RoundPreload | None = None
        self.preload_executor = preload_executor or PRELOADS
        # The sums of the uploads in memory (rounds/summing.py), under a server-wide budget.
        self.sums_budget = sums_budget or MemoryBudget(
            self.limits.round_sums_memory_bytes, self.limits.round_sums_memory_bytes
        )
        # This federation's jobs on the (shared, bounded) aggregation pool run one at a time and
        # in order: a prune never races the next round's publication.
        self._jobs = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the newest published round, joined clients and acknowledged uploads.

        Damage on disk never stops the server: incomplete rounds are set aside (a rollback,
        logged and counted), unreadable upload records are quarantined, and a published state
        that fails its digest puts this federation alone in the degraded state.
        """
        report = ResumeReport()
        latest = self.store.latest_round(report)
        if latest > 0:
            try:
                self.state, self.manifest = self.published.load(latest)
            except CorruptDataError as exc:
                self._degrade(f"published round {latest} is corrupt: {exc.problem}")
            else:
                self._check_privacy_record(latest)
        self.clients = self.store.load_clients()
        self.observers = frozenset(c for c, r in self.clients.items() if r.observer)
        if not self.degraded:
            self.uploads = self.store.load_uploads(self.state.round, report)
        for problem in report.problems:
            log.error("federation %s: storage: %s", self.id, problem)
            self.metrics.storage_problems.labels(self.id).inc()
        # The newest round's gauges, its publication time and the collapse count (recounted
        # from the stored manifests): what the alerts read survives a restart.
        self.metrics.record_resumed(self.id, self.manifest, self.store.read_manifest)
        if self.config.privacy.active and self.manifest is None:
            self.metrics.privacy_epsilon.labels(self.id).set(0.0)
            self.metrics.privacy_rounds.labels(self.id).set(0)
        self.metrics.current_round.labels(self.id).set(self.state.round)
        self.metrics.active_clients.labels(self.id).set(len(self.clients))
        self.metrics.round_uploads.labels(self.id).set(len(self.uploads))
        log.info(
            "federation %s resumed at round %d with %d acknowledged uploads",
            self.id,
            self.state.round,
            len(self.uploads),
        )

    def _degrade(self, reason: str) -> None:
        self.degraded = reason
        self.metrics.degraded.labels(self.id).set(1)
        log.error("federation %s is DEGRADED and refuses its RPCs: %s", self.id, reason)

    def start(self) -> None:
        """Arm the deadline and close the round if a crash left it ready to aggregate.

        Uploads acknowledged before a restart are folded again (in the background).
        """
        self._new_folder()
        for record in self.uploads.values():
            self._prepare_close(record)
        self._open_round()
        self._spawn(self._maybe_close())

    async def close(self) -> None:
        self._closed = True
        if self.preload is not None:
            self.preload.release()
        for handle in (self._deadline_handle, self._retry_handle):
            if handle is not None:
                handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def retire(self) -> None:
        """DeleteFederation's hook: refuse everything from now on (NOT_FOUND), end the watches
        and wait for the work in flight that writes to storage; the hub then deletes it."""
        async with self.lock:  # a join or commit under way finishes first; later ones refuse
            self.deleted = True
        self.views.close()
        await self.close()
        self.events.close()  # watches end; the SDK reconnects and gets NOT_FOUND
        await self.views.drain()

    def check_live(self) -> None:
        if self.deleted:
            raise NotFoundError(
                "federation_id",
                f"federation {self.id!r} was deleted",
                ErrorReason.FEDERATION_NOT_FOUND,
            )

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def check_serving(self) -> None:
        self.check_live()
        if self.degraded:
            raise UnavailableError(
                "federation_id", f"federation {self.id!r} is degraded: {self.degraded}"
            )

    # -- queries and events ----------------------------------------------------------------
    @property
    def energy(self) -> RankEnergy | None:
        return self.manifest.energy if self.manifest is not None else None

    @property
    def holders(self) -> tuple[Holders, ...]:
        return self.manifest.holders if self.manifest is not None else ()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            federation_id=self.id,
            round=self.state.round,
            phase=self.phase,
            uploads=len(self.uploads),
            min_clients=self.config.min_clients,
            expected_clients=self._quota(),
            deadline_unix=self.deadline_unix,
            energy=self.energy,
            holders=self.holders,
            joined_clients=len(self.clients),
            degraded=self.degraded,
            selected=self.selection.selected if self.selection is not None else None,
            selection_pending=self.selection_pending,
            observers=self.observers,
            privacy=self.privacy_status(),
        )

    def _check_privacy_record(self, latest: int) -> None:
        """A private federation's ε is recomposed from its newest manifest: one that lost or
        miscounts its rounds would under-report the privacy spent, so it degrades instead."""
        if not self.config.privacy.active or self.manifest is None:
            return
        problem = privacy_record_problem(self.config, self.manifest.privacy, latest)
        if problem:
            self._degrade(
                f"published round {latest} of a private federation: {problem}; "
                "the privacy spent cannot be accounted"
            )

    def privacy_status(self) -> PrivacyStatus | None:
        policy = self.config.privacy
        if not policy.active:
            return None
        spent = self.manifest.privacy if self.manifest is not None else None
        return PrivacyStatus(
            epsilon=spent.epsilon if spent is not None else 0.0,
            delta=policy.delta,
            rounds=spent.rounds if spent is not None else 0,
            noise_multiplier=policy.noise_multiplier,
            clip_norm=policy.clip_norm,
            noise_std=spent.noise_std if spent is not None else 0.0,
        )

    def subscribe(self) -> Subscription:
        return self.events.subscribe()

    def _emit(self, type_: EventType, message: str = "", warnings: tuple[str, ...] = ()) -> None:
        self.events.emit(RoundEvent(type_, self.snapshot(), message, warnings))

    # -- join ------------------------------------------------------------------------------
    async def join(
        self,
        client_id: str,
        rank: int,
        num_examples: int,
        lora_alpha: float,
        observer: bool = False,
    ) -> ClientRecord:
        """Join, or re-join with new terms; rank, alpha and examples are then fixed.

        Terms change only between rounds: never while the client has an upload in the open
        round. Who may call this for ``client_id`` is the api layer's (credential's) business.
        """
        self.check_serving()
        record = join_terms(self.config, client_id, rank, num_examples, lora_alpha, observer)
        async with self.lock:
            self.check_live()
            previous = self.clients.get(client_id)
            if previous == record:
                return record
            if previous is None and len(self.clients) >= self.config.max_clients:
                raise ResourceExhaustedError(
                    "client_id",
                    f"federation {self.id!r} has its maximum of {self.config.max_clients} clients",
                    ErrorReason.TOO_MANY_CLIENTS,
                )
            attempts = self._join_attempts.get(client_id, 0) + 1
            if attempts > self.limits.max_joins_per_round:
                raise ResourceExhaustedError(
                    "client_id",
                    f"client {echo_id(client_id)} changed its terms {attempts - 1} times in round "
                    f"{self.state.round}; wait for the next round",
                    ErrorReason.JOIN_LIMIT,
                )
            if previous is not None and client_id in self.uploads:
                raise FailedPreconditionError(
                    "rank" if previous.rank != rank else "client_id",
                    f"client {echo_id(client_id)} already uploaded at rank {previous.rank} in "
                    f"round {self.state.round}; it can change its terms from the next round",
                    ErrorReason.JOIN_LOCKED,
                )
            self._join_attempts[client_id] = attempts
            await asyncio.to_thread(self.store.save_client, record)
            self.clients[client_id] = record
            if record.observer != (client_id in self.observers):
                self.observers = self.observers ^ {client_id}
            if self.selection_pending:
                if self._select():
                    self._emit(EventType.SELECTED, self._selection_message())
            elif self.selection is not None and self.phase is Phase.COLLECTING and not observer:
                self.selection = self.selection.with_client(client_id)
        self.metrics.active_clients.labels(self.id).set(len(self.clients))
        return record

    def client(self, client_id: str) -> ClientRecord:
        record = self.clients.get(client_id)
        if record is None:
            raise FailedPreconditionError(
                "client_id",
                f"client {echo_id(client_id)} has not joined federation {self.id!r}",
                ErrorReason.NOT_JOINED,
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
        """Check a push's header; the ticket's sink then takes the payload."""
        verdict = self.check_push_header(
            client_id, round_, rank, num_examples, lora_alpha, total_bytes, sha256
        )
        return self.ticket(verdict, self.store.open_upload(round_))

    def check_push_header(
        self,
        client_id: str,
        round_: int,
        rank: int,
        num_examples: int,
        lora_alpha: float,
        total_bytes: int,
        sha256: str,
        *,
        count_attempt: bool = True,
    ) -> HeaderVerdict:
        """Everything a push's header must pass before a byte of its payload is taken
        (``count_attempt``: it counts towards ``max_pushes_per_round``)."""
        self.check_serving()
        joined = self.client(client_id)
        if joined.observer:
            raise FailedPreconditionError(
                "client_id",
                f"client {echo_id(client_id)} joined as an observer: it pulls, never pushes",
                ErrorReason.OBSERVER,
            )
        if count_attempt:
            self._count_push_attempt(client_id)
        if sha256:
            check_sha256(sha256)
            duplicate = self._already_counted(client_id, round_, sha256)
            open_checks = not duplicate
        else:  # the digest follows the data: an ack-lost retry is recognised at the end
            duplicate = False
            open_checks = not self._has_counted(client_id, round_)
            counted = self.uploads.get(client_id) if round_ == self.state.round else None
            if counted is not None and counted.size != total_bytes:
                self._refuse_second_upload(round_)  # it cannot be the same bytes
        if open_checks:
            self._check_round_open(round_)
            self._check_selected(client_id)
        check_push_terms(
            self.config, self.schema, joined, rank, num_examples, lora_alpha, total_bytes
        )
        check = None
        # Only the same bytes as a counted upload can succeed past an earlier upload: those
        # passed the checks already, so its bytes are only hashed.
        if open_checks:
            check = StreamingUploadCheck(
                self.schema, rank, client_id, joined.scale, self.bounds, total_bytes
            )
        return HeaderVerdict(
            client_id, round_, rank, num_examples, joined, total_bytes, sha256, check, duplicate
        )

    def ticket(self, verdict: HeaderVerdict, sink: UploadSink) -> PushTicket:
        """A push whose header passed: its payload flows into ``sink`` (and, if the budget has
        room for it, is kept in memory for the close: rounds/preload.py)."""
        joined = verdict.joined
        keep = None
        if self.preload is not None and verdict.check is not None and not verdict.duplicate:
            keep = self.preload_budget.reserve(verdict.total_bytes)
        return PushTicket(
            verdict.client_id,
            verdict.round,
            verdict.rank,
            verdict.num_examples,
            joined.lora_alpha,
            joined.scale,
            verdict.total_bytes,
            verdict.sha256,
            UploadIntake(sink, verdict.check, keep=keep),
            verdict.duplicate,
        )

    def refuse_if_counted(self, client_id: str, round_: int) -> None:
        """ALREADY_EXISTS for a client whose upload of ``round_`` is counted (a different
        one: an identical one is a duplicate and never gets here)."""
        if self._has_counted(client_id, round_):
            self._refuse_second_upload(round_)

    def uploads_in(self, round_: int) -> int:
        """Acknowledged uploads of ``round_`` (the open one, or the one just closed)."""
        return self._uploads_in(round_)

    def _has_counted(self, client_id: str, round_: int) -> bool:
        """Has ``client_id`` an acknowledged upload in ``round_`` (open or just closed)?"""
        if round_ == self.state.round:
            return client_id in self.uploads
        m = self.manifest
        return (
            m is not None
            and round_ == m.round - 1
            and any(u.client_id == client_id for u in m.uploads)
        )

    def _refuse_second_upload(self, round_: int) -> None:
        """A push that is not a counted upload's duplicate, from a client that has one."""
        self._check_round_open(round_)  # a closed round says so first
        raise AlreadyExistsError(
            "sha256",
            f"this client already uploaded a different update for round {round_}",
            ErrorReason.UPLOAD_CONFLICT,
        )

    def _already_counted(self, client_id: str, round_: int, sha256: str) -> bool:
        """Is this an identical re-push of an acknowledged upload (whose ack may be lost)?"""
        existing = self.uploads.get(client_id)
        if round_ == self.state.round and existing is not None:
            return existing.sha256 == sha256
        m = self.manifest
        return (
            m is not None
            and round_ == m.round - 1  # the round that just closed
            and any(u.client_id == client_id and u.sha256 == sha256 for u in m.uploads)
        )

    def _uploads_in(self, round_: int) -> int:
        if round_ == self.state.round:
            return len(self.uploads)
        m = self.manifest
        return len(m.uploads) if m is not None and m.round == round_ + 1 else 0

    def _count_push_attempt(self, client_id: str) -> None:
        """Every push of a joined client counts, refused ones included; reset each round."""
        attempts = self._push_attempts.get(client_id, 0) + 1
        self._push_attempts[client_id] = attempts
        if attempts > self.limits.max_pushes_per_round:
            raise ResourceExhaustedError(
                "round",
                f"client {echo_id(client_id)} reached the limit of "
                f"{self.limits.max_pushes_per_round} push attempts in round {self.state.round}; "
                "wait for the next round",
                ErrorReason.PUSH_LIMIT,
            )

    def _check_round_open(self, round_: int) -> None:
        self.check_live()
        current = self.state.round
        if round_ < current:
            raise FailedPreconditionError(
                "round",
                f"round {round_} is closed; the open round is {current}",
                ErrorReason.ROUND_CLOSED,
            )
        if round_ > current:
            raise FailedPreconditionError(
                "round",
                f"round {round_} is not open yet; the open round is {current}",
                ErrorReason.ROUND_NOT_OPEN,
            )
        if self.phase is Phase.AGGREGATING:
            raise FailedPreconditionError(
                "round",
                f"round {current} is aggregating; wait for round {current + 1}",
                ErrorReason.ROUND_AGGREGATING,
            )

    def _check_selected(self, client_id: str) -> None:
        if self.selection_pending:
            raise FailedPreconditionError(
                "client_id",
                f"round {self.state.round}'s selection is drawn once "
                f"{self.config.target_clients} clients have joined ({self._trainers()} have) or "
                "at the deadline; wait for it",
                ErrorReason.SELECTION_PENDING,
            )
        if self.selection is not None and client_id not in self.selection.selected:
            raise FailedPreconditionError(
                "client_id",
                f"client {echo_id(client_id)} is not selected for round {self.state.round} "
                f"({len(self.selection.selected)} of {len(self.clients)} clients are); wait for "
                f"round {self.state.round + 1}",
                ErrorReason.NOT_SELECTED,
            )

    def abort_push(self, ticket: PushTicket) -> None:
        """Forget a push's bytes without waiting (safe in a cancelled handler)."""
        ticket.intake.close()

    async def refuse_push(self, ticket: PushTicket) -> None:
        """Forget a refused push's bytes before the refusal goes out."""
        await ticket.intake.discard()

    async def finish_push(
        self, ticket: PushTicket, trailer_sha256: str | None = None
    ) -> PushOutcome:
        """Check a fully received payload, make it durable, acknowledge it."""
        try:
            return await self._finish_push(ticket, trailer_sha256)
        except Exception:
            await self.refuse_push(ticket)
            self.check_live()  # deleted meanwhile (its files went away): NOT_FOUND, not INTERNAL
            raise
        finally:
            ticket.intake.close()  # forgets the bytes unless they were committed

    async def _finish_push(self, ticket: PushTicket, trailer_sha256: str | None) -> PushOutcome:
        sink = ticket.intake.sink
        if ticket.intake.received != ticket.total_bytes:
            raise DataLossError(
                "data",
                f"stream ended after {ticket.intake.received} of {ticket.total_bytes} bytes",
                ErrorReason.SIZE_MISMATCH,
            )
        expected = ticket.sha256 or trailer_sha256
        if not expected:
            raise InvalidArgumentError(
                "trailer",
                "the header's sha256 is empty, so the stream must end with a PushTrailer",
            )
        digest = await ticket.intake.finish()  # the streaming checks' verdict comes first
        if digest != expected:
            raise DataLossError(
                "sha256",
                f"checksum mismatch: payload hashes to {digest}",
                ErrorReason.CHECKSUM_MISMATCH,
            )
        if not ticket.sha256 and self._already_counted(ticket.client_id, ticket.round, digest):
            ticket.duplicate = True
        if ticket.duplicate:  # identical bytes of an upload already counted
            return PushOutcome(
                ticket.round, True, ticket.total_bytes, self._uploads_in(ticket.round)
            )
        if ticket.intake.unchecked:  # let through only as a possible duplicate: it is not
            self._refuse_second_upload(ticket.round)
        ticket.sha256 = digest
        # The round may have closed while the payload streamed.
        self._check_round_open(ticket.round)
        self._check_selected(ticket.client_id)
        await asyncio.to_thread(confirm_readable, sink, ticket.intake.layout)
        async with self.lock:
            if self._already_counted(ticket.client_id, ticket.round, ticket.sha256):
                return PushOutcome(
                    ticket.round, True, ticket.total_bytes, self._uploads_in(ticket.round)
                )
            self._check_round_open(ticket.round)
            if ticket.client_id in self.uploads:
                raise AlreadyExistsError(
                    "sha256",
                    f"client {echo_id(ticket.client_id)} already uploaded a different update "
                    f"for round {ticket.round}",
                    ErrorReason.UPLOAD_CONFLICT,
                )
            joined = self.client(ticket.client_id)
            if joined.rank != ticket.rank or joined.scale != ticket.scale:
                raise FailedPreconditionError(
                    "rank",
                    "the client joined again with other terms while this push streamed",
                    ErrorReason.JOIN_LOCKED,
                )
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
            await asyncio.to_thread(self.store.commit_upload, sink, record)
            self.uploads[ticket.client_id] = record
            # under the lock: queued before any close that needs it
            self._prepare_close(record, ticket.intake.kept())
            count = len(self.uploads)
            claimed = self._claim_close()  # the push that completes the quota closes it
        rank = str(ticket.rank)
        self.metrics.uploads.labels(self.id, rank).inc()
        self.metrics.upload_bytes.labels(self.id, rank).inc(ticket.total_bytes)
        self.metrics.round_uploads.labels(self.id).set(count)
        self._emit(EventType.UPLOAD, f"{ticket.client_id} uploaded rank {ticket.rank}")
        if claimed is not None:
            self._spawn(self._aggregate(*claimed))
        return PushOutcome(ticket.round, False, ticket.total_bytes, count)

    # -- rounds ----------------------------------------------------------------------------
    def _new_folder(self) -> None:
        """The open round's work before its close: folding (if on), else uploads in memory."""
        budget = self.limits.fold_memory_bytes
        self.folder = None
        if not self.degraded and RoundFolder.enabled(self.strategy, budget):
            self.folder = RoundFolder(self.strategy, self.store, self.state, budget)
        if self.preload is not None:
            self.preload.release()
        self.preload = None
        if self.folder is None and not self.degraded and self.preload_budget.limit > 0:
            summer = None
            if RoundSummer.enabled(self.strategy, self.sums_budget):
                summer = RoundSummer(self.strategy, self.state, self.sums_budget)
            self.preload = RoundPreload(
                self.store,
                self.schema,
                self.state.round,
                self.preload_budget,
                self.preload_executor,
                summer,
            )

    def _reopen_folder(self) -> None:
        if self.folder is not None:
            self.folder.close_claimed(False)
        if self.preload is not None:
            self.preload.close_claimed(False)

    def _prepare_close(self, record: UploadRecord, kept: Kept | None = None) -> None:
        """Fold ``record`` (if the round folds), else have it in memory for the close: from the
        bytes its push kept, or read back from the store."""
        if self.folder is not None:
            self.folder.submit(record, self.fold_executor)
        if self.preload is not None:
            if kept is not None:
                self.preload.adopt(record, *kept)
            else:
                self.preload.submit(record)
        elif kept is not None:
            kept.reservation.release()

    def _open_round(self) -> None:
        self._arm_deadline()
        self._select()

    def _arm_deadline(self) -> None:
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

    def _select(self) -> bool:
        """Draw the open round's selection; True if drawn now, False if it must wait.

        Round 0's draw waits until ``expected_clients`` trainers have joined (or the deadline
        passes), so that it selects among the whole federation, not among the first to
        connect. Later rounds draw at once among those joined (clients never leave).
        """
        policy = self.config.participation
        was_pending = self.selection_pending
        self.selection, self.selection_pending = None, False
        if not policy.active:
            return False
        candidates = [c for c in self.clients.values() if not c.observer]
        waiting = len(candidates) < self.config.target_clients and not self._deadline_passed
        if self.state.round == 0 and waiting:
            self.selection_pending = True
            return False
        self.selection = select(policy, self.state.round, candidates)
        if was_pending:  # pushes refused while the draw was pending do not count
            self._push_attempts = {}
        self.metrics.record_selection(
            self.id, [self.clients[c].rank for c in self.selection.selected]
        )
        return True

    def _trainers(self) -> int:
        return sum(not c.observer for c in self.clients.values())

    def _selection_message(self) -> str:
        assert self.selection is not None
        return (
            f"round {self.state.round}: {len(self.selection.selected)} of {self._trainers()} "
            f"clients selected, the round closes at {self.selection.quota} uploads"
        )

    def _quota(self) -> int:
        return self.selection.quota if self.selection is not None else self.config.target_clients

    def _on_deadline(self) -> None:
        self._deadline_passed = True
        if self.selection_pending and self._select():
            # The drawn clients get a full collection window of their own: the round closes
            # at its quota, or at min_clients when this new deadline passes.
            self._arm_deadline()
            self._emit(EventType.SELECTED, self._selection_message())
            return
        self._spawn(self._maybe_close())

    def _ready(self) -> bool:
        n = len(self.uploads)
        if n >= self._quota():
            return True
        return self._deadline_passed and n >= self.config.min_clients

    def _claim_close(
        self,
    ) -> tuple[GlobalState, list[UploadRecord], RoundPrivacy | None] | None:
        """Under the lock: if the round is ready, close it now (no later push gets in).

        A private round's terms (its denominator, its noise seed) are fixed here, before any
        upload is read.
        """
        if self._closed or self.degraded or self.phase is not Phase.COLLECTING:
            return None
        if not self._ready():
            return None
        self.phase = Phase.AGGREGATING
        if self.folder is not None:
            self.folder.close_claimed()
        if self.preload is not None:
            self.preload.close_claimed()
        # m̄: the quota, fixed before any upload (two pushes may both land before the close:
        # then the count, also public; each term stays bounded by C/m̄ either way).
        denominator = max(self._quota(), len(self.uploads))
        privacy = round_privacy(self.config, denominator, self.manifest)
        return self.state, sorted(self.uploads.values(), key=lambda u: u.client_id), privacy

    async def _maybe_close(self) -> None:
        async with self.lock:
            claimed = self._claim_close()
        if claimed is not None:
            await self._aggregate(*claimed)

    async def _aggregate(
        self, state: GlobalState, uploads: list[UploadRecord], privacy: RoundPrivacy | None
    ) -> None:
        self._emit(EventType.AGGREGATING, f"aggregating {len(uploads)} uploads")
        try:
            outcome, queued, elapsed = await self.run_job(
                self.publisher.run,
                state,
                uploads,
                self._debug_delay,
                privacy,
                self.folder,
                self.preload,
            )
        except NothingToAggregateError as exc:
            await self._after_quarantine(exc.quarantined)
            async with self.lock:
                self.phase = Phase.COLLECTING
                self._reopen_folder()
            self._emit(EventType.FAILED, f"aggregation failed: {exc}")
            return
        except Exception as exc:  # keep collecting; the operator sees it in logs and metrics
            await self._aggregation_failed(state.round, exc)
            return
        self.metrics.aggregation_queue_seconds.labels(self.id).observe(queued)
        await self._published(outcome, len(uploads), elapsed)

    async def run_job(self, fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
        """``fn(*args)`` on the aggregation pool after this federation's earlier jobs; returns
        its result, the seconds it waited (for this federation's lane and for a free worker)
        and the seconds it ran."""
        asked = time.perf_counter()
        times: list[float] = []

        def job() -> T:
            times.append(time.perf_counter())
            return fn(*args)

        async with self._jobs:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, job)
        return result, times[0] - asked, time.perf_counter() - times[0]

    async def _after_quarantine(self, quarantined: Sequence[Quarantined]) -> None:
        async with self.lock:
            for q in quarantined:
                self.uploads.pop(q.record.client_id, None)
        for q in quarantined:
            log.error(
                "federation %s round %d: upload of client %s quarantined (%s)",
                self.id,
                q.record.round,
                q.record.client_id,
                q.reason,
            )
            self.metrics.quarantined.labels(self.id).inc()
            self._emit(
                EventType.QUARANTINED,
                f"upload of {q.record.client_id} removed from round {q.record.round}: {q.reason}",
            )
        self.metrics.round_uploads.labels(self.id).set(len(self.uploads))

    async def _aggregation_failed(self, round_: int, exc: Exception) -> None:
        io_error = (
            isinstance(exc, OSError)
            or is_disk_full(exc)
            or (isinstance(exc, ServiceError) and exc.reason == ErrorReason.DISK_FULL)
        )
        if io_error:
            log.error("federation %s: round %d not published: %s", self.id, round_, exc)
        else:
            log.exception("federation %s: aggregation of round %d failed", self.id, round_)
        self.metrics.aggregation_failures.labels(self.id).inc()
        async with self.lock:
            self.phase = Phase.COLLECTING
            self._reopen_folder()
        self._emit(EventType.FAILED, f"aggregation failed: {exc}")
        if io_error:  # I/O: try again later
            self._schedule_retry()

    async def _published(self, outcome: PublishOutcome, n_uploads: int, elapsed: float) -> None:
        await self._after_quarantine(outcome.quarantined)
        new_state, manifest = outcome.state, outcome.manifest
        self._retry_delay = _RETRY_INITIAL_SECONDS
        async with self.lock:
            self.state, self.manifest = new_state, manifest
            self.uploads = {}
            self._push_attempts = {}
            self._join_attempts = {}
            self.phase = Phase.COLLECTING
            self.views.keep_from(new_state.round - 1)
            self._new_folder()
            self._open_round()
        await apply_retention(self.id, self.store, self.views, self.config.keep_rounds)
        self.metrics.record_published(self.id, manifest, elapsed)
        if outcome.folded:
            self.metrics.rounds_folded.labels(self.id).inc()
        if outcome.summed:
            self.metrics.rounds_summed.labels(self.id).inc()
        log.info(
            "federation %s published round %d from %d uploads in %.2fs (E_min %.3f)",
            self.id,
            new_state.round,
            len(manifest.uploads),
            elapsed,
            manifest.energy.e_min,
        )
        warnings = holder_warnings(manifest, self.config.min_partition_holders)
        for warning in warnings:
            log.warning("federation %s round %d: %s", self.id, new_state.round, warning)
        self._emit(EventType.PUBLISHED, f"round {new_state.round} published", warnings)
        # The closed round's uploads are no longer read by anyone: drop them after the news, on
        # the aggregation thread, where no publication of the next round can be writing.
        await self.run_job(self.store.prune, new_state.round)

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
        if self.limits.aggregation_delay_seconds > 0:
            log.warning(
                "federation %s: debug_aggregation_delay_seconds: sleeping %.1fs before commit",
                self.id,
                self.limits.aggregation_delay_seconds,
            )
            time.sleep(self.limits.aggregation_delay_seconds)

    # -- pull ------------------------------------------------------------------------------
    async def view_for(self, client_id: str, round_: int | None = None) -> View:
        """The client's payload for the newest round (None) or for an older published one."""
        self.check_serving()
        joined = self.client(client_id)
        return await self.view_at(joined.rank, joined.scale, round_)

    async def view_at(self, rank: int, scale: float, round_: int | None = None) -> View:
        """The view at (``rank``, ``scale``) of the newest round (None) or an older one: what a
        client with those terms pulls, and what ExportAdapter serves."""
        round_at, content = self._view_source(round_)
        return await self.views.get(round_at, rank, scale, content)

    async def follow_view(self, client_id: str, round_: int | None = None) -> LivePull | None:
        """The client's view while it is being built, to stream as it is framed (a build
        starts on a miss); None when it is built already, or cannot be followed (then
        :meth:`open_view`)."""
        self.check_serving()
        joined = self.client(client_id)
        round_at, content = self._view_source(round_)
        return await self.views.follow(round_at, joined.rank, joined.scale, content)

    def _view_source(self, round_: int | None) -> tuple[int, Callable[[], RoundContent]]:
        """The round a view request means (None: the newest) and how to read its content."""
        current = self.state.round
        if round_ is not None and round_ > current:
            raise FailedPreconditionError(
                "round",
                f"round {round_} is not published yet; the newest is {current}",
                ErrorReason.ROUND_NOT_PUBLISHED,
            )
        if round_ is None or round_ == current:
            newest = RoundContent(self.state, self.energy, self.holders)
            return current, lambda: newest
        if round_ == 0:
            return 0, lambda: RoundContent(self.strategy.initial_state(), None, ())
        older = round_
        return older, lambda: self.published.content(older)

    async def discard_view(self, view: View) -> None:
        """A view whose bytes no longer match its digest: drop it, the next pull rebuilds it."""
        log.error(
            "federation %s: pull view %s of round %d is damaged on storage; rebuilding",
            self.id,
            view.stored.key,
            view.round,
        )
        self.metrics.storage_problems.labels(self.id).inc()
        self.views.forget(view)
        await asyncio.to_thread(self.store.delete_view, view.stored)

    async def open_view(self, client_id: str, round_: int | None = None) -> tuple[View, ViewReader]:
        """The client's view and its bytes, opened (see :meth:`open_view_at`)."""
        self.check_serving()
        joined = self.client(client_id)
        return await self.open_view_at(joined.rank, joined.scale, round_)

    async def open_view_at(
        self, rank: int, scale: float, round_: int | None = None
    ) -> tuple[View, ViewReader]:
        """The view at (``rank``, ``scale``) and its bytes, opened: its messages when it is hot
        (a reader with ``hot`` set), else its file. A publication may prune an older round's
        view while it is built or before it is opened: then it is built again."""
        for _ in range(_VIEW_ATTEMPTS - 1):
            try:  # a build that failed is built again by the next view_at
                view = await self.view_at(rank, scale, round_)
                return view, await self._open(view)
            except FileNotFoundError:
                continue
        view = await self.view_at(rank, scale, round_)
        return view, await self._open(view)

    async def _open(self, view: View) -> ViewReader:
        """A reader of ``view`` that pins its round (retention): from memory when it is hot,
        else its file; FileNotFoundError (and the view forgotten) if the file was pruned."""
        hot = self.views.open_hot(view)
        if hot is not None:
            return hot
        try:
            opened = await asyncio.to_thread(self.store.open_view, view.stored)
        except FileNotFoundError:
            self.views.forget(view)
            raise
        return self.views.open(view, opened)
