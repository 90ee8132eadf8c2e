"""The open round's acknowledged uploads, in memory before the close (docs/design.md §4.2).

A one-shot close used to start by reading every upload back from the store against its
digest: for the bench's 64-client round, about a third of the time from the last acknowledgement
to the publication. Now a push whose payload fits the budget keeps the chunks it received
(the very bytes the intake hashed and checked as they arrived, never written over), and at
its acknowledgement they are parsed into factors on a worker thread; the close takes them
from memory. Uploads acknowledged before a restart are read back from the store instead (the
same digest-checked ``read_upload`` the close would run), in the background.

It is an optimisation, never a requirement: an upload not ready in time is waited for, one
that could not be parsed or read, or did not fit the budget, is read by the close itself,
which also decides quarantine. The budget is one for the whole server (every federation's
open rounds and the pushes streaming into them), so that many federations cannot together
hold more than it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raflora.server.engine import AdapterSchema, FactorPair, GlobalState
from raflora.server.engine.sums import RoundSums
from raflora.v1.layout import Layout

from ..storage import FederationStore, UploadRecord
from ..storage.tensorio import factors_in_payload

if TYPE_CHECKING:
    from .summing import RoundSummer

log = logging.getLogger("raflora.server")

# One thread for every federation's parses and read-backs: a second would compete with the
# pushes still arriving on a small machine.
PRELOADS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raflora-preload")


# A push that received less than FLOWING_BYTES for this long costs next to no CPU: it no
# longer holds the sums back. Loopback chunks arrive every millisecond or two, and pushes
# spread 30 ms apart leave gaps that this keeps to the quiet ones; a client trickling small
# messages faster than that still moves under 1.3 MiB/s, which is no load either.
QUIET_SECONDS = 0.05
FLOWING_BYTES = 64 << 10


class StreamingPush:
    """One push receiving its bytes; :meth:`received` counts each data chunk it gets."""

    __slots__ = ("_clock", "_since", "last")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._since = 0  # bytes received since ``last``
        self.last = clock()

    def received(self, size: int) -> None:
        """On the event loop, no lock: ``last`` moves on once FLOWING_BYTES more arrived."""
        self._since += size
        if self._since >= FLOWING_BYTES:
            self._since = 0
            self.last = self._clock()


class Streaming:
    """Whether pushes are streaming their bytes into this server (thread-safe): the preload
    thread adds to a round's sums only while none is, since receiving is what the round waits
    for and the close does not need the sums densified (rounds/summing.py).

    A push counts only while its bytes flow (:data:`FLOWING_BYTES` in the last
    ``quiet_seconds``, or just opened): a client that opens a push and trickles small
    messages, or stalls, costs no CPU and must not stop every round's sums. Whoever waited
    is woken when the last push ends, or by a timer once the open ones have gone quiet."""

    def __init__(
        self, quiet_seconds: float = QUIET_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.quiet_seconds = quiet_seconds
        self._clock = clock
        self._pushes: set[StreamingPush] = set()
        self._lock = threading.Lock()
        self._waiting: weakref.WeakSet[RoundPreload] = weakref.WeakSet()
        self._timer: threading.Timer | None = None

    @contextmanager
    def push(self) -> Iterator[StreamingPush]:
        handle = StreamingPush(self._clock)
        with self._lock:
            self._pushes.add(handle)
        try:
            yield handle
        finally:
            with self._lock:
                self._pushes.discard(handle)
                woken = self._take_waiting() if not self._busy() else []
            for preload in woken:
                preload.wake()

    def busy_for(self, preload: RoundPreload) -> bool:
        """Whether a push is streaming in; if so ``preload.wake()`` is called once none is."""
        with self._lock:
            busy = self._busy()
            if busy:
                self._waiting.add(preload)
                self._arm()
            return busy

    def _busy(self) -> bool:
        now = self._clock()
        return any(now - p.last < self.quiet_seconds for p in self._pushes)

    def _take_waiting(self) -> list[RoundPreload]:
        woken = list(self._waiting)
        self._waiting.clear()
        return woken

    def _arm(self) -> None:
        """(Under the lock.) Look again in ``quiet_seconds``: pushes that stall end nothing."""
        if self._timer is None:
            timer = threading.Timer(self.quiet_seconds, self._recheck)
            timer.daemon = True
            timer.start()  # (a thread that cannot start leaves no timer that never fires)
            self._timer = timer

    def _recheck(self) -> None:
        with self._lock:
            self._timer = None
            if self._busy():
                woken = []
                if self._waiting:
                    self._arm()
            else:
                woken = self._take_waiting()
        for preload in woken:
            preload.wake()


STREAMING = Streaming()

Factors = dict[str, FactorPair]


class Reservation:
    """Bytes held against a :class:`MemoryBudget`; given back once, by :meth:`release` or
    when the last reference goes (so no refusal path can leak it)."""

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self.size = size
        self._give_back = weakref.finalize(self, budget.release, size)

    def release(self) -> None:
        self._give_back()


class MemoryBudget:
    """Bytes of uploads every open round together may hold in memory (thread-safe); no one
    upload above ``max_upload_bytes``, so that a large adapter still streams in a few chunks of
    memory (the close reads it) and the budget serves rounds of many small uploads, where
    reading them back costs the close most."""

    def __init__(self, limit_bytes: int, max_upload_bytes: int = 16 << 20) -> None:
        self.limit = limit_bytes
        self.max_upload = max_upload_bytes
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def reserve(self, size: int) -> Reservation | None:
        with self._lock:
            if size < 0 or size > self.max_upload or self._used + size > self.limit:
                return None
            self._used += size
        return Reservation(self, size)

    def release(self, size: int) -> None:
        with self._lock:
            self._used = max(0, self._used - size)


@dataclass
class _Entry:
    sha256: str
    reservation: Reservation
    future: Future[Factors]


class RoundPreload:
    """One open round's acknowledged uploads, parsed (or read back) in the background."""

    def __init__(
        self,
        store: FederationStore,
        schema: AdapterSchema,
        round_: int,
        budget: MemoryBudget,
        executor: Executor = PRELOADS,
        summer: RoundSummer | None = None,
        streaming: Streaming = STREAMING,
    ) -> None:
        self.store = store
        self.schema = schema
        self.round = round_
        self.budget = budget
        self.executor = executor
        self.summer = summer  # each upload, once parsed, is summed in (rounds/summing.py)
        self.streaming = streaming
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._released = False
        self._turn_queued = False  # a turn of _flush waits in the executor

    def submit(self, record: UploadRecord) -> None:
        """Read ``record`` back from the store in the background, if the budget has room."""
        if record.round != self.round or self._holds(record):
            return
        reservation = self.budget.reserve(record.size)
        if reservation is not None:
            self._add(record, reservation, self.store.read_upload, record, self.schema)

    def adopt(
        self,
        record: UploadRecord,
        chunks: Sequence[bytes | memoryview],
        layout: Layout,
        reservation: Reservation,
    ) -> None:
        """The factors of the payload ``record`` was acknowledged for, from the bytes its push
        kept and the layout its streaming check accepted."""
        if record.round != self.round or self._holds(record):
            reservation.release()
            return
        self._add(record, reservation, factors_in_payload, chunks, layout, self.schema)

    def _holds(self, record: UploadRecord) -> bool:
        with self._lock:
            entry = self._entries.get(record.client_id)
            return self._released or (entry is not None and entry.sha256 == record.sha256)

    def _add(
        self,
        record: UploadRecord,
        reservation: Reservation,
        job: Callable[..., Factors],
        *args: object,
    ) -> None:
        with self._lock:
            if self._released:
                reservation.release()
                return
            # Another upload of this client (the first was quarantined) replaces its entry.
            old = self._entries.pop(record.client_id, None)
            future = self.executor.submit(self._parse, record, job, *args)
            self._entries[record.client_id] = _Entry(record.sha256, reservation, future)
        if old is not None:
            old.future.cancel()
            old.reservation.release()

    def _parse(self, record: UploadRecord, job: Callable[..., Factors], *args: object) -> Factors:
        factors = job(*args)
        if self.summer is not None:
            self.summer.add(record, factors)
            self._flush()
        return factors

    def _flush(self) -> None:
        """Add pending columns to the round's sketches and sums, one bounded product per
        module and turn of the preload thread, while no push streams in: parses of newer
        uploads, and the close, never wait behind more than one."""
        with self._lock:
            self._turn_queued = False
        summer = self.summer  # (released: flush_some finds no sums and says no more)
        if summer is None or self.streaming.busy_for(self):
            return
        if summer.flush_some(idle=not self._waiting()):
            self.wake()

    def wake(self) -> None:
        """Queue a turn of the sums' work unless one is queued (any thread)."""
        with self._lock:
            if self._released or self._turn_queued or self.summer is None:
                return
            self._turn_queued = True
        try:
            self.executor.submit(self._flush)
        except RuntimeError:  # the executor is shut down (the process is exiting)
            with self._lock:
                self._turn_queued = False

    def _waiting(self) -> bool:
        """Whether an upload of this round waits to be parsed."""
        with self._lock:
            return any(
                not e.future.running() and not e.future.done() for e in self._entries.values()
            )

    def close_claimed(self, claimed: bool = True) -> None:
        """The round's close is claimed (``False``: it failed and the round collects again):
        columns waiting in the sums stay so, for the close to take (rounds/summing.py)."""
        if self.summer is not None:
            self.summer.closing(claimed)

    def summed(self, state: GlobalState, records: Sequence[UploadRecord]) -> RoundSums | None:
        """The round's sums if every one of ``records`` (taken already) was summed, else None."""
        return self.summer.take(state, records) if self.summer is not None else None

    def take(self, record: UploadRecord) -> Factors | None:
        """The factors of ``record`` if they are held (waiting for a parse or read under way);
        None: the caller reads it, and judges it, itself."""
        with self._lock:
            entry = self._entries.get(record.client_id)
        if entry is None or entry.sha256 != record.sha256:
            return None
        try:
            return entry.future.result()
        except Exception as exc:  # the close reads it again and quarantines it if it must
            log.info(
                "round %d: the upload of %s is left to the close: %s",
                self.round,
                record.client_id,
                exc,
            )
            return None

    def release(self) -> None:
        """The round is over (published, or the federation stops): forget every upload."""
        with self._lock:
            entries, self._entries = self._entries, {}
            self._released = True
        for entry in entries.values():
            entry.future.cancel()
            entry.reservation.release()
        if self.summer is not None:
            self.summer.release()

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._entries)
