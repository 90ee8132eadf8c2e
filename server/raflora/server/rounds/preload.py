"""The open round's acknowledged uploads, read back while the round goes on (docs/design.md §4.2).

A one-shot close reads every upload back from the store and checks it against its digest
before the engine can start: for the bench's 64-client round, a fifth of the time from the
last acknowledgement to the publication. Each acknowledged upload is instead read back (the
same :meth:`~raflora.server.storage.FederationStore.read_upload`, digest checked) on a worker
thread while the other clients still push, and the close takes what is already in memory.

It is an optimisation, never a requirement: an upload not read in time is waited for, one
that could not be read or is over the memory budget is read by the close itself, which also
decides quarantine. The budget is one for the whole server (every federation's open rounds),
so that many federations cannot together hold more than it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

from raflora.server.engine import AdapterSchema, FactorPair

from ..storage import FederationStore, UploadRecord

log = logging.getLogger("raflora.server")

# One thread for every federation's read-backs: reading and hashing release the GIL, and a
# second thread would compete with the pushes still arriving on a small machine.
PRELOADS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raflora-preload")

Factors = dict[str, FactorPair]


class MemoryBudget:
    """Bytes of uploads every open round together may hold in memory (thread-safe)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def reserve(self, n: int) -> bool:
        with self._lock:
            if n < 0 or self._used + n > self.limit:
                return False
            self._used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._used = max(0, self._used - n)


@dataclass
class _Entry:
    sha256: str
    size: int  # bytes reserved for it
    future: Future[Factors]


class RoundPreload:
    """One open round's uploads, each read back once it is acknowledged."""

    def __init__(
        self,
        store: FederationStore,
        schema: AdapterSchema,
        round_: int,
        budget: MemoryBudget,
        executor: Executor = PRELOADS,
    ) -> None:
        self.store = store
        self.schema = schema
        self.round = round_
        self.budget = budget
        self.executor = executor
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._released = False

    def submit(self, record: UploadRecord) -> None:
        """Read ``record`` back in the background, if the budget has room for it."""
        if record.round != self.round:
            return
        with self._lock:
            if self._released:
                return
            old = self._entries.get(record.client_id)
            if old is not None:
                if old.sha256 == record.sha256:
                    return
                # another upload of this client (the first was quarantined): read this one
                del self._entries[record.client_id]
                old.future.cancel()
                self.budget.release(old.size)
            if not self.budget.reserve(record.size):
                return  # the close reads it itself
            future = self.executor.submit(self.store.read_upload, record, self.schema)
            self._entries[record.client_id] = _Entry(record.sha256, record.size, future)

    def take(self, record: UploadRecord) -> Factors | None:
        """The factors of ``record`` if they were read back (waiting for a read under way);
        None: the caller reads it, and judges it, itself."""
        with self._lock:
            entry = self._entries.get(record.client_id)
        if entry is None or entry.sha256 != record.sha256 or record.round != self.round:
            return None
        try:
            return entry.future.result()
        except Exception as exc:  # the close reads it again and quarantines it if it must
            log.info("round %d: the read-back of %s failed: %s", self.round, record.client_id, exc)
            return None

    def release(self) -> None:
        """The round is over (published, or the federation stops): forget every upload."""
        with self._lock:
            entries, self._entries = self._entries, {}
            self._released = True
        for entry in entries.values():
            entry.future.cancel()
            self.budget.release(entry.size)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._entries)
