"""Each acknowledged upload folded into the open round's bases while the round goes on.

The close then aggregates the compressed problem (engine/compression.py, docs/design.md
§2.10) instead of reading every upload back and starting from scratch. Folding is an
optimisation, never a requirement: an upload that cannot be folded (unreadable, a failed
digest, memory over budget, a server restarted mid-round) makes the close fall back to the
one-shot path, which reads the uploads back and quarantines what fails.

Folds run on the federation's aggregation executor, submitted under the runtime's lock in
commit order, so the job that closes a round is queued behind every fold it needs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from raflora.server.engine import ClientUpdate, GlobalState, Strategy
from raflora.server.engine.compression import CompressedAggregation, RoundBases, can_fold

from ..storage import FederationStore, UploadRecord

log = logging.getLogger("raflora.server")


@dataclass(frozen=True)
class FoldedRound:
    """What the close needs: the compressed aggregation and the uploads in its bases."""

    aggregation: CompressedAggregation
    updates: dict[str, ClientUpdate]  # client id -> folded upload


class RoundFolder:
    """The bases of one open round and the uploads folded into them so far."""

    def __init__(
        self,
        strategy: Strategy,
        store: FederationStore,
        state: GlobalState,
        memory_budget_bytes: int,
    ) -> None:
        self.strategy = strategy
        self.store = store
        self.state = state
        self.round = state.round
        self.budget = memory_budget_bytes
        self._lock = threading.Lock()  # folds may run on a multi-threaded executor
        self._bases: RoundBases | None = None
        self._folded: dict[str, tuple[str, ClientUpdate]] = {}  # client -> (sha256, folded)
        self._futures: dict[str, Future[None]] = {}
        self.gave_up = ""  # why this round no longer folds (the close goes one-shot)

    @staticmethod
    def enabled(strategy: Strategy, budget_bytes: int) -> bool:
        return budget_bytes > 0 and can_fold(strategy)

    def track(self, client_id: str, future: Future[None]) -> None:
        self._futures[client_id] = future

    def fold(self, record: UploadRecord) -> None:
        """Read one acknowledged upload back (digest checked) and fold it (a worker thread)."""
        if record.round != self.round:
            return
        try:
            factors = self.store.read_upload(record, self.strategy.schema)
            update = ClientUpdate(
                record.client_id, record.rank, record.num_examples, record.scale, factors
            )
            with self._lock:
                if self.gave_up:
                    return
                if self._bases is None:
                    self._bases = RoundBases(
                        self.strategy.schema, self.state, self.strategy.dtype, self.strategy.device
                    )
                self._folded[record.client_id] = (record.sha256, self._bases.fold(update))
                if self._memory_bytes() > self.budget:
                    self._give_up(
                        f"its bases passed the fold memory budget ({self.budget >> 20} MiB)"
                    )
        except Exception as exc:  # the one-shot close reads it again and decides
            with self._lock:
                self._give_up(f"the upload of {record.client_id} could not be folded: {exc}")

    def _give_up(self, reason: str) -> None:
        if not self.gave_up:
            log.info("round %d: folding stops (%s); the close runs one-shot", self.round, reason)
        self.gave_up = reason
        self._bases = None
        self._folded = {}

    def _memory_bytes(self) -> int:
        assert self._bases is not None
        item = self.strategy.compute_scalar(0).element_size()
        total = 0
        for name, (k_b, k_a) in self._bases.widths().items():
            shape = self.strategy.schema.modules[name]
            total += (shape.d_out * k_b + shape.d_in * k_a) * item
        for _, u in self._folded.values():
            total += sum(f.B.numel() + f.A.numel() for f in u.factors.values()) * item
        return total

    def take(self, state: GlobalState, records: Sequence[UploadRecord]) -> FoldedRound | None:
        """At the close (a worker thread): the folded round if it covers exactly ``records``."""
        if state.round != self.round or state is not self.state:
            return None
        for record in records:
            future = self._futures.get(record.client_id)
            if future is None:  # acknowledged before a restart: never folded
                return None
            future.result()  # queued before this job; fold() itself never raises
        with self._lock:
            if self.gave_up or self._bases is None:
                return None
            folded = {}
            for r in records:
                sha256, update = self._folded.get(r.client_id, ("", None))
                if update is None or sha256 != r.sha256:
                    return None
                folded[r.client_id] = update
            aggregation = CompressedAggregation(self.strategy, self._bases, self.state)
            return FoldedRound(aggregation, folded)
