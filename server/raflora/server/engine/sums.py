"""A round's uploads summed into dense matrices as they arrive, one per rank interval.

Every spectral strategy weighs index j of client i by p_i · m_j, with p_i = a_i / Σ a (a_i the
client's examples, or 1 under uniform weighting) and m_j a function of the round's ranks and
weights, known only at its close. m_j is constant between two consecutive distinct ranks of
the round, so

    ΔW = Σ_I (m_I / Σ a) · S_I,   S_I = Σ_i a_i s_i B_i[:, I] A_i[I, :],

over the intervals I that the round's distinct ranks cut [0, r_max) into. Those sums can be
kept as uploads arrive, exactly, whatever else the round will hold: a new distinct rank only
cuts one interval in two (its holders' columns wait again for both halves). The close
then combines a few dense matrices and takes their certified top-R SVD, at a cost that no
longer grows with the number of clients (docs/design.md §2.11). Pure: no I/O, no threads.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import AggregationError, InvalidUpdateError
from .lowrank import SvdMethod, close_cost, dense_close_cost, truncated_svd_of_dense
from .strategies import Strategy
from .strategies.spectral import SpectralStrategy, carried_components
from .types import ClientUpdate, FactorPair, GlobalState, LowRank
from .validation import validate_round, validate_update
from .weights import Weighting, client_weights

# How closely the close's weights must factor as p_i · m_j (relative): they do exactly for
# every spectral strategy; a strategy that did not would be refused here, never approximated.
_FACTOR_TOLERANCE = 1e-9
# Columns an interval collects before :meth:`RoundSums.flush` adds them to its sum in one
# product: each addition reads and writes the whole d_out × d_in sum, which costs more than
# the product of a few columns. What is pending at the close stays factored: the close's
# products take it beside the sums (lowrank._Dense), so a burst of uploads just before the
# close is not first summed densely on its critical path.
FLUSH_COLUMNS = 64


class SumsMismatchError(AggregationError):
    """The sums cannot stand for this close (other uploads, other weights): aggregate the
    uploads themselves."""


def can_sum(strategy: Strategy) -> bool:
    """Spectral strategies whose round is a weighted sum of the uploads: neither privacy (noise
    and clipping per upload) nor the robust defences (weights from all uploads together), and
    not a forced factored path."""
    config = strategy.config
    return (
        isinstance(strategy, SpectralStrategy)
        and not config.privacy.active
        and not config.robust.active
        and config.svd_method is not SvdMethod.FACTORED
    )


@dataclass(frozen=True)
class _Summed:
    rank: int
    weight: float  # a_i
    scale: float
    factors: Mapping[str, FactorPair]  # in the compute dtype, until its columns are added


class RoundSums:
    """The dense sums of one open round (not thread-safe: one caller at a time)."""

    def __init__(self, strategy: Strategy, state: GlobalState) -> None:
        if not can_sum(strategy):
            raise SumsMismatchError("strategy", f"{strategy.name!r} rounds cannot be summed")
        assert isinstance(strategy, SpectralStrategy)
        self.strategy = strategy
        self.state = state
        self.bounds: list[int] = []  # the distinct ranks summed, ascending
        self._sums: dict[str, list[Tensor]] = {name: [] for name in strategy.schema}
        self._pending: list[list[_Summed]] = []  # per interval: summed, not yet added
        self._summed: dict[str, _Summed] = {}

    # -- as uploads arrive ------------------------------------------------------------------
    @property
    def _element_bytes(self) -> int:
        return torch.empty(0, dtype=self.strategy.dtype).element_size()

    @property
    def _interval_bytes(self) -> int:
        """One d_out × d_in sum for every module."""
        modules = self.strategy.schema.modules.values()
        return sum(s.d_out * s.d_in for s in modules) * self._element_bytes

    def bytes_with(self, rank: int) -> int:
        """What the sums hold once an upload of ``rank`` is added."""
        return (len(self.bounds) + (rank not in self.bounds)) * self._interval_bytes

    @property
    def held_bytes(self) -> int:
        return len(self.bounds) * self._interval_bytes

    def copy_bytes(self, update: ClientUpdate) -> int:
        """What keeping ``update`` costs beyond its own tensors: a copy of each factor that is
        not in the compute dtype and device already (fp16 uploads, a GPU server)."""
        return sum(
            t.numel() * self._element_bytes
            for f in update.factors.values()
            for t in (f.B, f.A)
            if t.dtype != self.strategy.dtype or t.device != self.strategy.device
        )

    @property
    def width(self) -> int:
        """N = Σ r_i of the uploads summed."""
        return sum(s.rank for s in self._summed.values())

    def clients(self) -> set[str]:
        return set(self._summed)

    def add(self, update: ClientUpdate, flush: bool = True) -> None:
        """Sum one upload in; it is checked as the strategy checks a round's uploads. Its
        columns wait beside the sums until :meth:`flush` (``flush``: at once, if enough are
        pending)."""
        config = self.strategy.config
        validate_update(update, self.strategy.schema, config.max_rank, config.allowed_ranks)
        if update.client_id in self._summed:
            raise InvalidUpdateError("client_id", f"{update.client_id!r} is summed already")
        moved = self.strategy.to_compute(update)
        weight = 1.0 if config.weighting is Weighting.UNIFORM else float(update.num_examples)
        if update.rank not in self.bounds:
            self._cut(update.rank)
        entry = _Summed(update.rank, weight, update.scale, moved.factors)
        self._summed[update.client_id] = entry
        for i, (_, hi) in enumerate(self._intervals()):
            if hi <= update.rank:
                self._pending[i].append(entry)
        if flush:
            self.flush()

    def flush(self, min_columns: int | None = None, limit: int | None = None) -> int:
        """Add pending columns to their interval's sum where at least ``min_columns`` (default
        :data:`FLUSH_COLUMNS`) are pending, the fullest interval first, at most ``limit``
        intervals (None: all); returns how many were added."""
        ready = self._ready(min_columns)
        ready.sort(reverse=True)
        for _, i, lo, hi in ready[:limit]:
            self._accumulate(i, lo, hi, self._pending[i])
            self._pending[i] = []
        return len(ready[:limit])

    def flush_ready(self, min_columns: int | None = None) -> bool:
        """Whether :meth:`flush` with ``min_columns`` would add anything."""
        return bool(self._ready(min_columns))

    @property
    def pending_columns(self) -> int:
        """Columns summed but not yet added to a sum (the close takes them factored)."""
        return sum(columns for columns, *_ in self._ready(1))

    def _ready(self, min_columns: int | None) -> list[tuple[int, int, int, int]]:
        """(columns waiting, interval, lo, hi) for each interval with at least ``min_columns``
        (default :data:`FLUSH_COLUMNS`) waiting."""
        least = max(1, FLUSH_COLUMNS if min_columns is None else min_columns)
        out = []
        for i, (waiting, (lo, hi)) in enumerate(zip(self._pending, self._intervals(), strict=True)):
            columns = len(waiting) * (hi - lo)
            if columns >= least:
                out.append((columns, i, lo, hi))
        return out

    def _intervals(self) -> list[tuple[int, int]]:
        return list(zip([0, *self.bounds[:-1]], self.bounds, strict=True))

    def _cut(self, rank: int) -> None:
        """Make ``rank`` a bound: the interval it falls in is cut in two, and the columns of
        the uploads that hold it wait again for both halves (none if it lies past every bound).
        Nothing is recomputed here: :meth:`flush` adds them in its turns, or the close takes
        them as they are, so a late new rank costs the close no densifying."""
        at = bisect.bisect_left(self.bounds, rank)
        self.bounds.insert(at, rank)
        hi = self.bounds[at + 1] if at + 1 < len(self.bounds) else rank
        holders = [s for s in self._summed.values() if s.rank >= hi] if hi > rank else []
        for name, shape in self.strategy.schema.modules.items():
            zeros = torch.zeros(
                shape.d_out, shape.d_in, dtype=self.strategy.dtype, device=self.strategy.device
            )
            sums = self._sums[name]
            if at < len(sums):
                sums[at] = zeros  # the cut interval's lower half; its upper half follows
                sums.insert(at + 1, zeros.clone())
            else:
                sums.insert(at, zeros)
        if at < len(self._pending):
            self._pending[at] = list(holders)
            self._pending.insert(at + 1, list(holders))
        else:
            self._pending.insert(at, [])

    def _accumulate(self, index: int, lo: int, hi: int, entries: Sequence[_Summed]) -> None:
        for name in self.strategy.schema:
            B, A = self._stacked(name, [(s, lo, hi, 1.0) for s in entries])
            self._sums[name][index].addmm_(B, A)

    @staticmethod
    def _stacked(
        name: str, pieces: Sequence[tuple[_Summed, int, int, float]]
    ) -> tuple[Tensor, Tensor]:
        """Columns lo:hi of each upload's a·s·B (times a factor) beside each other, and the
        matching rows of its A: their product is the pieces' sum."""
        B = torch.cat(
            [s.factors[name].B[:, lo:hi] * (s.weight * s.scale * c) for s, lo, hi, c in pieces],
            dim=1,
        )
        A = torch.cat([s.factors[name].A[lo:hi] for s, lo, hi, _ in pieces], dim=0)
        return B, A

    # -- at the close -------------------------------------------------------------------------
    def pays(self) -> bool:
        """Whether closing from the sums costs less than from the factors (both AUTO)."""
        max_rank, n = self.strategy.config.max_rank, self.width
        shapes = self.strategy.schema.modules.values()
        plus = self.pending_columns
        from_sums = sum(dense_close_cost(s.d_out, s.d_in, max_rank, plus) for s in shapes)
        from_factors = sum(close_cost(s.d_out, s.d_in, n, max_rank) for s in shapes)
        return from_sums < from_factors

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        """What ``strategy.aggregate(state, updates)`` returns (to its SVD's tolerance), from
        the sums; :class:`SumsMismatchError` if they do not stand for exactly these uploads
        with these weights. ``updates`` need no factors: only who, rank, scale and examples."""
        if state is not self.state:
            raise SumsMismatchError("state", "the sums belong to another round's state")
        validate_round(updates)
        if {u.client_id for u in updates} != set(self._summed):
            raise SumsMismatchError("updates", "the round's uploads are not the ones summed")
        for u in updates:
            s = self._summed[u.client_id]
            if (u.rank, u.scale) != (s.rank, s.scale):
                raise SumsMismatchError("updates", f"{u.client_id!r} was summed with another rank")
        config = self.strategy.config
        ranks = tuple(u.rank for u in updates)
        p = client_weights([u.num_examples for u in updates], config.weighting)
        raw = torch.tensor([self._summed[u.client_id].weight for u in updates], dtype=p.dtype)
        total = float(raw.sum())
        if total <= 0 or not torch.allclose(p, raw / total, rtol=_FACTOR_TOLERANCE, atol=0.0):
            raise SumsMismatchError("weights", "the close weighs clients unlike their examples")
        coefficients = [m / total for m in self._interval_boosts(ranks, p)]
        modules: dict[str, LowRank] = {}
        for name in self.strategy.schema:
            modules[name] = self._module(name, state, coefficients, max(ranks))
        return GlobalState(
            round=state.round + 1,
            modules=modules,
            participant_ranks=ranks,
            weights=tuple(float(x) for x in p),
        )

    def _interval_boosts(self, ranks: Sequence[int], p: Tensor) -> list[float]:
        """m_I per interval, from the strategy's own index weights w_ij = p_i · m_j."""
        weights = self.strategy.index_weights(ranks, p)
        top = max(ranks)
        w = torch.stack([torch.nn.functional.pad(x, (0, top - int(x.shape[0]))) for x in weights])
        held = torch.arange(top)[None, :] < torch.tensor(ranks)[:, None]
        held &= (p > 0)[:, None]
        ratio = w / torch.where(p > 0, p, torch.ones_like(p))[:, None]
        boosts = []
        for lo, hi in self._intervals():
            m = ratio[:, lo:hi][held[:, lo:hi]]
            if m.numel() == 0:  # held by clients of no weight only: their sum is zero
                boosts.append(0.0)
                continue
            first = float(m[0])
            same = m.new_full(m.shape, first)
            if not torch.allclose(m, same, rtol=_FACTOR_TOLERANCE, atol=0.0):
                raise SumsMismatchError(
                    "strategy", f"index weights of {self.strategy.name!r} are not p_i · m_j"
                )
            boosts.append(first)
        return boosts

    def _module(
        self, name: str, state: GlobalState, coefficients: Sequence[float], r_max: int
    ) -> LowRank:
        sums = self._sums[name]
        W = sums[0] * coefficients[0]
        for c, S in zip(coefficients[1:], sums[1:], strict=True):
            if c:
                W.add_(S, alpha=c)
        pending = [
            (s, lo, hi, c)
            for (lo, hi), c, entries in zip(
                self._intervals(), coefficients, self._pending, strict=True
            )
            for s in entries
            if c
        ]
        plus = FactorPair(*self._stacked(name, pending)) if pending else None
        # Any NaN or infinity makes the sum non-finite (as can an overflow of a finite one,
        # which only sends the close to the factors): e.g. examples × factors past fp32's range.
        if not math.isfinite(float(W.sum())) or (
            plus is not None and not math.isfinite(float(plus.B.sum() + plus.A.sum()))
        ):
            raise SumsMismatchError("sums", f"module {name}'s sum is not finite in {W.dtype}")
        width = self.width
        if self.strategy.carry_over:
            carried = carried_components(state.modules[name], r_max)
            if carried is not None:
                B = carried.B.to(dtype=W.dtype, device=W.device)
                W.addmm_(B, carried.A.to(dtype=W.dtype, device=W.device))
                width += int(B.shape[1])
        config = self.strategy.config
        found = truncated_svd_of_dense(
            W, config.max_rank, config.svd_method, rank_bound=width, plus=plus
        )
        if not math.isfinite(float(found.U.sum() + found.S.sum() + found.V.sum())):
            raise SumsMismatchError("sums", f"module {name}'s close is not finite in {W.dtype}")
        return found
