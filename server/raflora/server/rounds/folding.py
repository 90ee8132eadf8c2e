"""Each acknowledged upload folded into the open round's bases while the round goes on.

The close then aggregates the compressed problem (engine/compression.py, docs/design.md
§2.10) instead of reading every upload back and starting from scratch. Folding is an
optimisation, never a requirement: an upload that cannot be folded (unreadable, a failed
digest, memory over budget, a server restarted mid-round) makes the close fall back to the
one-shot path, which reads the uploads back and quarantines what fails.

Folds run on a thread of their own (:data:`FOLDS`), submitted under the runtime's lock in
commit order; the close, on the aggregation thread, waits for its round's folds. A fold job
takes every upload queued so far (up to a batch): uploads that arrive while the executor is
busy are folded together, in fewer and larger products.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

from raflora.server.engine import ClientUpdate, GlobalState, ModuleShape, Strategy
from raflora.server.engine.compression import CompressedAggregation, RoundBases, can_fold
from raflora.server.engine.lowrank import exact_cost

from ..storage import FederationStore, UploadRecord

log = logging.getLogger("raflora.server")
# One thread for every federation's folds: closes, on the aggregation thread, never queue
# behind them, and a close waits only for the folds of its own round.
FOLDS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raflora-fold")
_BATCH = 16  # uploads folded as one block at most: fewer products, a bounded residual SVD
# Past this share of a module's dimension the compressed close costs nearly what the one-shot
# close does, and the folds' CPU slows the pushes still arriving (docs/benchmarks.md).
MAX_SPAN_FRACTION = 0.25
SMALL_DIMENSION = 256  # smaller modules close in microseconds either way: always fold them
# Folding costs O(d·N²) over a round and the compressed close still scales with N: it pays only
# if the uploads share directions. Judged once 4·max_rank ranks are folded: past half a
# direction per folded rank it stops (measured at LLaMA-7B shapes, 32 clients whose uploads
# each add their own: 68 s of folds and a 2.7 s close after the last one's 8.5 s fold, against
# a 9.6 s one-shot close; docs/benchmarks.md).
JUDGE_AFTER_RANKS = 4
MAX_SPAN_PER_RANK = 0.5


def _large(shape: ModuleShape) -> bool:
    return max(shape.d_out, shape.d_in) >= SMALL_DIMENSION


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
        self._lock = threading.Lock()  # the bases and what was folded: worker threads only
        self._queue_lock = threading.Lock()  # _pending: held briefly, also on the event loop
        self._bases: RoundBases | None = None
        self._folded: dict[str, tuple[str, ClientUpdate]] = {}  # client -> (sha256, folded)
        self._futures: dict[str, Future[None]] = {}
        self._pending: list[UploadRecord] = []  # committed, not folded yet
        self._folded_rank = 0  # Σ r of the folded uploads
        self._folded_bytes = 0  # what their compressed factors hold
        self.gave_up = ""  # why this round no longer folds (the close goes one-shot)
        self.closing = False  # the round's close is claimed: it waits only for a short backlog

    @staticmethod
    def enabled(strategy: Strategy, budget_bytes: int) -> bool:
        return budget_bytes > 0 and can_fold(strategy)

    def submit(self, record: UploadRecord, executor: Executor) -> None:
        """Queue ``record`` for folding (on the loop, under the runtime's lock)."""
        if record.round != self.round:
            return
        with self._queue_lock:
            self._pending.append(record)
        self._futures[record.client_id] = executor.submit(self._fold_through, record)

    def _fold_through(self, record: UploadRecord) -> None:
        """Fold every upload queued up to ``record`` (a worker thread), in batches."""
        with self._lock:  # held throughout: a close never sees a batch half folded
            while True:
                with self._queue_lock:
                    if record not in self._pending:
                        return
                    backlog = len(self._pending)
                    batch = self._pending[:_BATCH]
                    del self._pending[:_BATCH]
                if self.closing and not self.gave_up and self._backlog_too_long(batch):
                    self._give_up(
                        f"the close found {backlog} uploads still to fold, more work than "
                        "half the one-shot close; it reads them back rather than wait"
                    )
                if not self.gave_up:
                    self._fold_batch(batch)

    def _fold_batch(self, batch: list[UploadRecord]) -> None:
        """Read uploads back (digest checked) and fold them as one block per module."""
        try:
            updates = [
                ClientUpdate(
                    r.client_id,
                    r.rank,
                    r.num_examples,
                    r.scale,
                    self.store.read_upload(r, self.strategy.schema),
                )
                for r in batch
            ]
            if self._bases is None:
                self._bases = RoundBases(
                    self.strategy.schema, self.state, self.strategy.dtype, self.strategy.device
                )
            for r, folded in zip(batch, self._bases.fold_many(updates), strict=True):
                if r.client_id in self._folded:  # pushed again after a failed close
                    self._count(self._folded[r.client_id][1], -1)
                self._folded[r.client_id] = (r.sha256, folded)
                self._count(folded, 1)
        except Exception as exc:  # the one-shot close reads them again and decides
            names = ", ".join(r.client_id for r in batch)
            log.warning(
                "round %d: the uploads of %s could not be folded", self.round, names, exc_info=True
            )
            self._give_up(f"the uploads of {names} could not be folded: {exc}")
            return
        reason = self._why_stop()
        if reason:
            self._give_up(reason)

    def _count(self, folded: ClientUpdate, sign: int) -> None:
        self._folded_rank += sign * folded.rank
        self._folded_bytes += sign * sum(
            (f.B.numel() + f.A.numel()) * f.B.element_size() for f in folded.factors.values()
        )

    def _why_stop(self) -> str:
        """Why folding no longer pays for this round, after a batch ("" while it does)."""
        assert self._bases is not None
        if self._memory_bytes() > self.budget:
            return f"its bases passed the fold memory budget ({self.budget >> 20} MiB)"
        judged = self._folded_rank >= JUDGE_AFTER_RANKS * self.strategy.config.max_rank
        for name, (k_b, k_a) in self._bases.widths().items():
            shape = self.strategy.schema.modules[name]
            if any(
                k > d * MAX_SPAN_FRACTION and d >= SMALL_DIMENSION
                for k, d in ((k_b, shape.d_out), (k_a, shape.d_in))
            ):
                return (
                    f"the round spans {k_b}×{k_a} of module {name}'s {shape.d_out}×{shape.d_in}: "
                    "too little left to compress for folding to pay"
                )
            if judged and _large(shape) and max(k_b, k_a) > MAX_SPAN_PER_RANK * self._folded_rank:
                return (
                    f"every upload adds its own directions (module {name} spans "
                    f"{max(k_b, k_a)} of {self._folded_rank} folded ranks): the close would "
                    "cost what it does one-shot"
                )
        return ""

    def _backlog_too_long(self, batch: list[UploadRecord]) -> bool:
        """Whether folding what is queued (``batch`` and the rest) would cost the close more
        than half of what an exact one-shot close costs, by the engine's flop models. (Rounds
        whose uploads share no directions stop folding earlier, on their span.)"""
        with self._queue_lock:
            queued = [*batch, *self._pending]
        if self._bases is None:
            return False
        rank = sum(r.rank for r in queued)
        total = rank + self._folded_rank
        fold = one_shot = 0.0
        for name, (k_b, k_a) in self._bases.widths().items():
            shape = self.strategy.schema.modules[name]
            if not _large(shape):
                continue  # folded in microseconds either way
            fold += 8.0 * (shape.d_out * k_b + shape.d_in * k_a) * rank
            one_shot += exact_cost(shape.d_out, shape.d_in, total)
        return fold > 0.5 * one_shot

    def close_claimed(self, closing: bool = True) -> None:
        """The round closes (on the loop): from now on a long fold backlog is not waited for.
        ``False``: the close failed and the round collects again."""
        self.closing = closing

    def _give_up(self, reason: str) -> None:
        if not self.gave_up:
            log.info("round %d: folding stops (%s); the close runs one-shot", self.round, reason)
        self.gave_up = reason
        self._bases = None
        self._folded = {}
        self._folded_rank = self._folded_bytes = 0

    def _memory_bytes(self) -> int:
        """The bases' buffers (with their spare capacity) and the folded uploads."""
        assert self._bases is not None
        bases = sum(
            self._bases.out[name].held_bytes() + self._bases.inp[name].held_bytes()
            for name in self.strategy.schema
        )
        return bases + self._folded_bytes

    def take(self, state: GlobalState, records: Sequence[UploadRecord]) -> FoldedRound | None:
        """At the close (a worker thread): the folded round if it covers exactly ``records``."""
        if state.round != self.round or state is not self.state or self.gave_up:
            return None  # (a round that gave up does not wait for its fold jobs to drain)
        for record in records:
            future = self._futures.get(record.client_id)
            if future is None or future.exception() is not None:  # never queued, or broken
                return None
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
