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
longer grows with the number of clients (docs/design.md §2.11).

The randomized close's first product ΔW Ω and its certificate's probes ΔW G are linear in
ΔW too, and cheap per column (O(d·k), against O(d²) for the dense sum): each interval keeps
S_I [Ω G] as well. The close starts from those sketches, then runs on the dense sums or,
when too many columns still wait to be added to them (a burst of uploads just before the
close), on the uploads' own factors; columns not sketched yet are sketched there, in one
product. Pure: no I/O, no threads.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import AggregationError, InvalidUpdateError
from .lowrank import (
    OVERSAMPLE,
    PROBES,
    Sketched,
    SvdMethod,
    close_cost,
    dense_close_cost,
    probe_rounding,
    sketch_basis,
    sketched_close_cost,
    truncated_svd_of_dense,
    truncated_svd_of_sum,
)
from .strategies import Strategy
from .strategies.spectral import SpectralStrategy
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


def _batch(waiting: int, width: int, max_columns: int | None) -> int:
    """How many of ``waiting`` uploads (``width`` columns each in an interval) one turn takes:
    about ``max_columns`` columns, whole uploads, at least one (None: all)."""
    if max_columns is None:
        return waiting
    return max(1, min(waiting, max_columns // width))


def _magnitude(B: Tensor, A: Tensor, gains: Tensor, width: int) -> float:
    """Σ_s |g_s|·‖B_s‖_F·‖A_s‖_F over uploads s whose ``width`` columns of B and rows of A
    are stacked side by side."""
    b = B.square().sum(0).view(-1, width).sum(1).sqrt()
    a = A.square().sum(1).view(-1, width).sum(1).sqrt()
    return float((gains.abs() * b * a).sum())


class RoundSums:
    """The dense sums and sketches of one open round (not thread-safe: one caller at a
    time)."""

    def __init__(self, strategy: Strategy, state: GlobalState) -> None:
        if not can_sum(strategy):
            raise SumsMismatchError("strategy", f"{strategy.name!r} rounds cannot be summed")
        assert isinstance(strategy, SpectralStrategy)
        self.strategy = strategy
        self.state = state
        self.bounds: list[int] = []  # the distinct ranks summed, ascending
        # Per module and interval; None until a column is added (a round that never idles
        # between pushes never touches the memory of its sums).
        self._sums: dict[str, list[Tensor | None]] = {name: [] for name in strategy.schema}
        self._pending: list[list[_Summed]] = []  # per interval: summed, not yet added
        self._summed: dict[str, _Summed] = {}
        # Per module and interval S_I [Ω G] of the columns sketched so far (the others wait
        # in _unsketched), and Σ_i |a_i s_i|·‖B_i,I‖_F·‖A_i,I‖_F over them, which weighted by
        # the close's |c_I| bounds what rounding in the sketches can hide. One [Ω G] per
        # input width: Ω public, G drawn now and never shown.
        self._k = strategy.config.max_rank + OVERSAMPLE
        self._basis: dict[int, Tensor] = {}
        for shape in strategy.schema.modules.values():
            if shape.d_in not in self._basis:
                self._basis[shape.d_in] = sketch_basis(
                    shape.d_in, self._k, strategy.dtype, strategy.device
                )
        self._sketches: dict[str, list[Tensor]] = {name: [] for name in strategy.schema}
        self._unsketched: list[list[_Summed]] = []  # per interval, as _pending
        self._magnitude: dict[str, list[float]] = {name: [] for name in strategy.schema}

    # -- as uploads arrive ------------------------------------------------------------------
    @property
    def _element_bytes(self) -> int:
        return torch.empty(0, dtype=self.strategy.dtype).element_size()

    @property
    def _interval_bytes(self) -> int:
        """One d_out × d_in sum and its d_out × (k + probes) sketch for every module."""
        width = self._k + PROBES
        modules = self.strategy.schema.modules.values()
        return sum(s.d_out * (s.d_in + width) for s in modules) * self._element_bytes

    @property
    def _basis_bytes(self) -> int:
        return sum(b.numel() for b in self._basis.values()) * self._element_bytes

    def bytes_with(self, rank: int) -> int:
        """What the sums hold once an upload of ``rank`` is added."""
        intervals = len(self.bounds) + (rank not in self.bounds)
        return intervals * self._interval_bytes + self._basis_bytes

    @property
    def held_bytes(self) -> int:
        if not self.bounds:
            return 0
        return len(self.bounds) * self._interval_bytes + self._basis_bytes

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
        columns wait beside the sums and the sketches until :meth:`flush` and :meth:`sketch`,
        so that an upload costs no products while others still stream in (``flush``: both at
        once)."""
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
                self._unsketched[i].append(entry)
        if flush:
            self.sketch()
            self.flush()

    def sketch(self, limit: int | None = None, max_columns: int | None = None) -> int:
        """Add the columns waiting for them to the sketches, in one product per interval and
        module (about a sixth of what adding them to the sums costs), for at most ``limit``
        intervals (None: all) and about ``max_columns`` columns of each (whole uploads, at
        least one; None: all); returns how many intervals were sketched."""
        done = 0
        for i, (lo, hi) in enumerate(self._intervals()):
            if not self._unsketched[i] or (limit is not None and done >= limit):
                continue
            waiting = self._unsketched[i]
            take = _batch(len(waiting), hi - lo, max_columns)
            batch, self._unsketched[i] = waiting[:take], waiting[take:]
            done += 1
            gains = torch.tensor(
                [s.weight * s.scale for s in batch],
                dtype=self.strategy.dtype,
                device=self.strategy.device,
            )
            per_row = gains.repeat_interleave(hi - lo)[:, None]
            for name, shape in self.strategy.schema.modules.items():
                B = torch.cat([s.factors[name].B[:, lo:hi] for s in batch], dim=1)
                A = torch.cat([s.factors[name].A[lo:hi] for s in batch], dim=0)
                self._sketches[name][i].addmm_(B, (A @ self._basis[shape.d_in]) * per_row)
                self._magnitude[name][i] += _magnitude(B, A, gains, hi - lo)
        return done

    @property
    def unsketched_columns(self) -> int:
        return sum(
            len(waiting) * (hi - lo)
            for waiting, (lo, hi) in zip(self._unsketched, self._intervals(), strict=True)
        )

    def flush(
        self,
        min_columns: int | None = None,
        limit: int | None = None,
        max_columns: int | None = None,
    ) -> int:
        """Add pending columns to their interval's sum where at least ``min_columns`` (default
        :data:`FLUSH_COLUMNS`) are pending, the fullest interval first, at most ``limit``
        intervals (None: all) and about ``max_columns`` columns of each (whole uploads, at
        least one; None: all); returns how many intervals were added to."""
        ready = self._ready(min_columns)
        ready.sort(reverse=True)
        for _, i, lo, hi in ready[:limit]:
            waiting = self._pending[i]
            take = _batch(len(waiting), hi - lo, max_columns)
            self._accumulate(i, lo, hi, waiting[:take])
            self._pending[i] = waiting[take:]
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
        the uploads that hold it wait again for both halves, for their sums and sketches
        (none if it lies past every bound). Nothing is recomputed here: :meth:`flush` and
        :meth:`sketch` add them in their turns, or the close does, so a late new rank costs
        the close no densifying."""
        at = bisect.bisect_left(self.bounds, rank)
        self.bounds.insert(at, rank)
        hi = self.bounds[at + 1] if at + 1 < len(self.bounds) else rank
        holders = [s for s in self._summed.values() if s.rank >= hi] if hi > rank else []
        cut = at < len(self._pending)
        dtype, device = self.strategy.dtype, self.strategy.device
        for name, shape in self.strategy.schema.modules.items():
            width = self._k + PROBES
            zeros = torch.zeros(shape.d_out, width, dtype=dtype, device=device)
            sums, sketches, magnitude = (
                self._sums[name],
                self._sketches[name],
                self._magnitude[name],
            )
            if cut:  # the cut interval's lower half; its upper half follows
                sums[at] = None
                sums.insert(at + 1, None)
                sketches[at] = zeros
                sketches.insert(at + 1, zeros.clone())
                magnitude[at] = 0.0
                magnitude.insert(at + 1, 0.0)
            else:
                sums.insert(at, None)
                sketches.insert(at, zeros)
                magnitude.insert(at, 0.0)
        for waiting in (self._pending, self._unsketched):
            if cut:
                waiting[at] = list(holders)
                waiting.insert(at + 1, list(holders))
            else:
                waiting.insert(at, [])

    def _accumulate(self, index: int, lo: int, hi: int, entries: Sequence[_Summed]) -> None:
        for name in self.strategy.schema:
            B, A = self._stacked(name, [(s, lo, hi, 1.0) for s in entries])
            S = self._sums[name][index]
            if S is None:
                self._sums[name][index] = B @ A
            else:
                S.addmm_(B, A)

    def _columns(
        self, coefficients: Sequence[float], entries: Sequence[Sequence[_Summed]]
    ) -> list[tuple[_Summed, int, int, float]]:
        """Interval by interval, the columns of ``entries`` that hold it, with its weight."""
        return [
            (s, lo, hi, c)
            for (lo, hi), c, held in zip(self._intervals(), coefficients, entries, strict=True)
            for s in held
            if c and s.rank >= hi
        ]

    def _weighted(self, name: str, coefficients: Sequence[float]) -> list[FactorPair]:
        """Each upload's factors with its columns weighted as the close weighs them (its
        interval's coefficient times a·s): the terms the one-shot close would aggregate."""
        by_column = torch.tensor(
            [
                c
                for (lo, hi), c in zip(self._intervals(), coefficients, strict=True)
                for _ in range(lo, hi)
            ],
            dtype=self.strategy.dtype,
            device=self.strategy.device,
        )
        return [
            FactorPair(
                s.factors[name].B * (by_column[: s.rank] * (s.weight * s.scale)), s.factors[name].A
            )
            for s in self._summed.values()
        ]

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
        """Whether closing from the sums, or from the factors with the sketches held, costs
        less than the one-shot close (all AUTO)."""
        max_rank, n = self.strategy.config.max_rank, self.width
        shapes = self.strategy.schema.modules.values()
        waiting, width = self.unsketched_columns, self._k + PROBES
        from_sums = sum(
            min(self._close_costs(s.d_out, s.d_in)) + 2.0 * (s.d_out + s.d_in) * waiting * width
            for s in shapes
        )
        one_shot = sum(close_cost(s.d_out, s.d_in, n, max_rank) for s in shapes)
        return from_sums < one_shot

    def _close_costs(self, d_out: int, d_in: int) -> tuple[float, float]:
        """(from the dense sums and the columns not added, from the factors), both starting
        from the sketches. From the factors with more than a quarter of the columns not
        sketched, the close sketches them all itself: the one-shot close's own work, with this
        path's overhead on top (1.1–1.2× in the bench's bursts), so it is never chosen."""
        max_rank = self.strategy.config.max_rank
        dense = dense_close_cost(d_out, d_in, max_rank, self.pending_columns, sketched=True)
        if 4 * self.unsketched_columns > self.width:
            return dense, math.inf
        return dense, sketched_close_cost(d_out, d_in, self.width, max_rank)

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
        config, shape = self.strategy.config, self.strategy.schema.modules[name]
        dense_cost, factored_cost = self._close_costs(shape.d_out, shape.d_in)
        from_sums = dense_cost <= factored_cost
        terms = self._close_factors(name, coefficients, from_sums)
        sketch, allowance = self._close_sketch(name, coefficients)
        W = self._combined(name, coefficients) if from_sums else None
        # Any NaN or infinity makes the sums non-finite (as can an overflow of finite uploads,
        # which only sends the close to the one-shot path): e.g. examples × factors past fp32.
        finite = math.isfinite(float(sketch.sum()))
        for t in terms:
            finite = finite and math.isfinite(float(t.B.sum() + t.A.sum()))
        if W is not None:
            finite = finite and math.isfinite(float(W.sum()))
        if not finite:
            raise SumsMismatchError("sums", f"module {name}'s sums are not finite")
        width = self.width
        carried = self.strategy.carried(state, name, r_max)
        if carried is not None:  # the previous state's components past this round's ranks
            sketch.addmm_(carried.B, carried.A @ self._basis[shape.d_in])
            allowance += float(torch.linalg.norm(carried.B)) * float(torch.linalg.norm(carried.A))
            width += carried.rank
        rounding = probe_rounding(self.strategy.dtype, allowance, shape.d_out, shape.d_in)
        given = Sketched(sketch[:, : self._k], sketch[:, self._k :], rounding)
        if W is not None:
            if carried is not None:
                W.addmm_(carried.B, carried.A)
            plus = terms[0] if terms else None
            found = truncated_svd_of_dense(
                W, config.max_rank, config.svd_method, rank_bound=width, plus=plus, given=given
            )
        else:
            terms += [] if carried is None else [carried]
            found = truncated_svd_of_sum(terms, config.max_rank, config.svd_method, given)
        if not math.isfinite(float(found.U.sum() + found.S.sum() + found.V.sum())):
            raise SumsMismatchError("sums", f"module {name}'s close is not finite")
        return found

    def _close_factors(
        self, name: str, coefficients: Sequence[float], from_sums: bool
    ) -> list[FactorPair]:
        """What the close takes as factors: the columns not added to the sums yet (at most one
        term), or, closing from the factors, every upload's columns weighted as the one-shot
        close weighs them (one stacked term)."""
        if from_sums:
            pending = self._columns(coefficients, self._pending)
            return [FactorPair(*self._stacked(name, pending))] if pending else []
        B = torch.cat([t.B for t in self._weighted(name, coefficients)], dim=1)
        return [FactorPair(B, torch.cat([s.factors[name].A for s in self._summed.values()]))]

    def _close_sketch(self, name: str, coefficients: Sequence[float]) -> tuple[Tensor, float]:
        """ΔW [Ω G] and its rounding magnitude, from the intervals' sketches; columns not
        sketched yet (the last uploads before the close) are sketched now, in one product."""
        basis = self._basis[self.strategy.schema.modules[name].d_in]
        sketch = sum(c * Y for c, Y in zip(coefficients, self._sketches[name], strict=True))
        assert isinstance(sketch, Tensor)
        magnitude = sum(
            abs(c) * m for c, m in zip(coefficients, self._magnitude[name], strict=True)
        )
        if late := self._columns(coefficients, self._unsketched):
            B, A = self._stacked(name, late)
            sketch.addmm_(B, A @ basis)
            # ‖B‖_F·‖A‖_F of the weighted columns bounds Σ of each piece's (Cauchy–Schwarz).
            magnitude += float(torch.linalg.norm(B)) * float(torch.linalg.norm(A))
        return sketch, magnitude

    def _combined(self, name: str, coefficients: Sequence[float]) -> Tensor:
        """Σ_I c_I S_I, in a fresh matrix."""
        W: Tensor | None = None
        for c, S in zip(coefficients, self._sums[name], strict=True):
            if not c or S is None:
                continue
            if W is None:
                W = S * c
            else:
                W.add_(S, alpha=c)
        if W is None:
            shape = self.strategy.schema.modules[name]
            dtype, device = self.strategy.dtype, self.strategy.device
            W = torch.zeros(shape.d_out, shape.d_in, dtype=dtype, device=device)
        return W
