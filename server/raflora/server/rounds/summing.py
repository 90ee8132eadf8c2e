"""The open round's uploads summed as they are acknowledged (docs/design.md §2.11).

Each upload kept in memory for the close (rounds/preload.py) is added to the round's dense
sums on the preload thread, right after it is parsed: the close then combines a few matrices
per module instead of stacking and sketching every upload. Like the preload it is an
optimisation, never a requirement: an upload that was not summed (not kept in memory, over
the memory budget, pushed a second time, refused by the engine's checks), or a close whose
weights the sums cannot stand for (an influence cap that binds), sends the close to the
one-shot path, which also decides quarantine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

from raflora.server.engine import ClientUpdate, FactorPair, GlobalState, Strategy
from raflora.server.engine.sums import FLUSH_COLUMNS, RoundSums, can_sum

from ..storage import UploadRecord
from .preload import MemoryBudget, Reservation

log = logging.getLogger("raflora.server")

# Columns one turn sketches: a sketched column costs about a sixth of a summed one, so a turn
# costs about what one of :data:`FLUSH_COLUMNS` summed columns does.
_SKETCH_COLUMNS = 4 * FLUSH_COLUMNS


class RoundSummer:
    """One open round's sums, fed from worker threads, taken by the close (thread-safe)."""

    def __init__(self, strategy: Strategy, state: GlobalState, budget: MemoryBudget) -> None:
        self.round = state.round
        self.budget = budget
        self._lock = threading.Lock()
        self._sums: RoundSums | None = RoundSums(strategy, state)
        self._digests: dict[str, str] = {}  # client -> sha256 of the upload summed
        self._reservations: list[Reservation] = []
        self.gave_up = ""  # why this round's close will not come from the sums
        self._taken = False  # a close holds the sums: nothing may change them any more
        self._closing = False  # a close is claimed: columns pending stay so (it takes them)

    @staticmethod
    def enabled(strategy: Strategy, budget: MemoryBudget) -> bool:
        return budget.limit > 0 and can_sum(strategy)

    def add(self, record: UploadRecord, factors: Mapping[str, FactorPair]) -> None:
        """Sum one acknowledged upload in (a worker thread); never raises. Its columns wait
        beside the sums until :meth:`flush_some` adds them."""
        with self._lock:
            sums = self._sums
            if sums is None or record.round != self.round:
                return
            if self._taken:  # the close is using them: their memory stays until release()
                self.gave_up = f"{record.client_id}'s upload arrived after a close took the sums"
                return
            if record.client_id in self._digests:
                self._give_up(f"{record.client_id} pushed a second upload")
                return
            update = ClientUpdate(
                record.client_id, record.rank, record.num_examples, record.scale, factors
            )
            more = sums.bytes_with(record.rank) - sums.held_bytes + sums.copy_bytes(update)
            if more > 0:
                reservation = self.budget.reserve(more)
                if reservation is None:
                    self._give_up(
                        f"its sums would pass the memory budget ({self.budget.limit >> 20} MiB)"
                    )
                    return
                self._reservations.append(reservation)
            try:
                sums.add(update, flush=False)
            except Exception as exc:  # the one-shot close judges the upload itself
                self._give_up(f"the upload of {record.client_id} was not summed: {exc}")
                return
            self._digests[record.client_id] = record.sha256

    def flush_some(self, idle: bool) -> bool:
        """If the server is ``idle`` and no close is claimed (a worker thread): sketch the
        columns of one interval that wait for it, or else add up to :data:`FLUSH_COLUMNS`
        pending columns of the fullest interval to its sum; whether more could be done. One
        bounded product per module at a time, so that a parse or a close waits for little.

        Only when idle: while pushes stream in, receiving them is what the round waits for,
        and the close can take any column as a factor. Densifying costs about twice the CPU
        of the close it saves, so it is worth only CPU nothing else wants; an addition reads
        and writes the whole sum, so only an interval with a quarter of
        :data:`FLUSH_COLUMNS` waiting is worth it (1 took 1.6× the CPU of 16 over the bench's
        round, for the same close)."""
        if not idle:
            return False
        least = FLUSH_COLUMNS // 4
        with self._lock:
            sums = self._sums
            if sums is None or self._taken or self._closing:
                return False
            try:
                if not sums.sketch(limit=1, max_columns=_SKETCH_COLUMNS):
                    sums.flush(least, limit=1, max_columns=FLUSH_COLUMNS)
            except Exception as exc:
                self._give_up(f"its sums could not be added to: {exc}")
                return False
            return sums.unsketched_columns > 0 or sums.flush_ready(least)

    def closing(self, claimed: bool = True) -> None:
        """The round's close is claimed (``False``: it failed and the round collects again).
        Called on the event loop, so it never waits for the lock: a flush under way finishes,
        none starts after it."""
        self._closing = claimed

    def take(self, state: GlobalState, records: Sequence[UploadRecord]) -> RoundSums | None:
        """At the close (after every upload's parse): the sums, if they hold exactly
        ``records``, else None."""
        with self._lock:
            if self._sums is None or state is not self._sums.state:
                return None
            if {r.client_id: r.sha256 for r in records} != self._digests:
                return None
            self._taken = True
            return self._sums

    def release(self) -> None:
        """The round is over: give the sums' memory back (on the event loop: it waits at most
        for one flush of one interval under way)."""
        self._closing = True
        with self._lock:
            self._drop()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(r.size for r in self._reservations)

    def _give_up(self, reason: str) -> None:
        log.info("round %d: summing stops (%s); the close runs one-shot", self.round, reason)
        self.gave_up = reason
        self._drop()

    def _drop(self) -> None:
        self._sums = None
        self._digests = {}
        for reservation in self._reservations:
            reservation.release()
        self._reservations = []
