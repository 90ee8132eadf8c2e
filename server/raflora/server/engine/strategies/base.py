"""The one interface every aggregation strategy implements, and its shared plumbing."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..distribution import FactorSplit
from ..errors import AggregationError, ConfigError, EmptyRoundError
from ..initialization import shared_init_rows
from ..lowrank import SvdMethod
from ..privacy import PrivacyPolicy, PrivateRound
from ..robust import RobustOutcome, RobustPolicy, defend
from ..types import AdapterSchema, ClientAdapter, ClientUpdate, FactorPair, GlobalState
from ..validation import validate_rank, validate_round, validate_update
from ..weights import Weighting, client_weights

_COMPUTE_DTYPES = (torch.float32, torch.float64)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class StrategyConfig:
    """What a federation declares that the math depends on."""

    schema: AdapterSchema
    max_rank: int
    seed: int = 0
    weighting: Weighting = Weighting.EXAMPLES
    split: FactorSplit = FactorSplit.ORTHONORMAL_A
    svd_method: SvdMethod = SvdMethod.AUTO
    allowed_ranks: Collection[int] | None = None
    device: str | torch.device = "cpu"
    compute_dtype: torch.dtype = torch.float32
    options: Mapping[str, Any] = field(default_factory=dict)
    robust: RobustPolicy = field(default_factory=RobustPolicy)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise ConfigError("max_rank", f"must be >= 1, got {self.max_rank}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError("compute_dtype", "aggregation runs in float32 or float64")
        if self.allowed_ranks is not None:
            bad = [r for r in self.allowed_ranks if not 1 <= r <= self.max_rank]
            if bad or not self.allowed_ranks:
                raise ConfigError("allowed_ranks", f"must be non-empty within 1..{self.max_rank}")
        if self.privacy.active:  # docs/design.md §2.9: no weight may depend on the data
            if self.weighting is not Weighting.UNIFORM:
                raise ConfigError(
                    "weighting",
                    "must be uniform with privacy on: weights from declared examples would "
                    "make one client's share, and so the sensitivity, its own choice",
                )
            if self.robust.active:
                raise ConfigError(
                    "robust",
                    "must be off with privacy on: trust and quantile clipping depend on the "
                    "other clients' updates, so one client's data would move everyone's "
                    "weight; privacy.clip_norm bounds each client instead",
                )


@dataclass(frozen=True)
class PreparedRound:
    """A validated round: updates on the compute device and dtype, with normalised weights."""

    updates: Sequence[ClientUpdate]
    ranks: tuple[int, ...]
    p: Tensor  # float64, sums to 1
    robust: RobustOutcome | None = None  # what the federation's defences did, if any


@dataclass(frozen=True)
class ModuleJob:
    """One module's aggregation holding only what it reads: the module's previous state and
    the round with that module's factors alone, so it can run in another process as it is.

    Each module's aggregation is independent of every other's (docs/design.md §5.2), so a
    round is the same whether its jobs run here one by one or anywhere in any order.
    """

    strategy: Strategy
    name: str
    state: GlobalState
    round: PreparedRound

    def run(self) -> Any:
        return self.strategy._aggregate_module(self.name, self.state, self.round)


#: Runs a round's module jobs and returns their results in order (in-process: one by one).
ModuleMap = Callable[[Sequence[ModuleJob]], Sequence[Any]]


def run_here(jobs: Sequence[ModuleJob]) -> list[Any]:
    return [job.run() for job in jobs]


class Strategy(ABC):
    """Give the global adapter to a client; turn a round's uploads into the next state."""

    name: ClassVar[str]
    known_options: ClassVar[frozenset[str]] = frozenset()
    supports_privacy: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig) -> None:
        unknown = sorted(set(config.options) - self.known_options)
        if unknown:
            raise ConfigError(
                f"options.{unknown[0]}",
                f"unknown option for strategy {self.name!r}; known: {sorted(self.known_options)}",
            )
        if config.privacy.active and not self.supports_privacy:
            raise ConfigError(
                "privacy",
                f"strategy {self.name!r} has no private mechanism; use flexlora, raflora or "
                "raflora_ha",
            )
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = config.compute_dtype

    # -- the interface ---------------------------------------------------------------------
    @abstractmethod
    def initial_state(self) -> GlobalState:
        """Round 0: ΔW = 0."""

    def distribute(self, state: GlobalState, rank: int, scale: float) -> ClientAdapter:
        """The adapter a client of this rank and scaling loads before training."""
        self.check_client_rank(rank, scale)
        parts = {name: self.distribute_module(state, name, rank, scale) for name in self.schema}
        merge = {name: m for name, (_, m) in parts.items() if m is not None}
        return ClientAdapter(
            rank=rank,
            scale=scale,
            factors={name: f for name, (f, _) in parts.items()},
            merge=merge or None,
        )

    def merge_rank(self, state: GlobalState, name: str) -> int | None:
        """Rank of the delta a client must merge before training (None: nothing to merge).

        Known before :meth:`distribute_module` runs, so a server can lay out a payload first.
        """
        return None

    @abstractmethod
    def distribute_module(
        self, state: GlobalState, name: str, rank: int, scale: float
    ) -> tuple[FactorPair, FactorPair | None]:
        """One module of :meth:`distribute` (lets callers stream a large adapter module-wise).

        Returns the client's LoRA factors and, for stacking strategies, the delta to merge.
        Callers must have checked ``rank`` and ``scale`` with :meth:`check_client_rank`.
        """

    def aggregate(
        self,
        state: GlobalState,
        updates: Sequence[ClientUpdate],
        private: PrivateRound | None = None,
        map_modules: ModuleMap | None = None,
    ) -> GlobalState:
        """Validate the round's uploads, then combine them into the next global state.

        A private federation's round needs ``private`` (its fixed denominator and secret noise
        seed); other federations ignore it. ``map_modules`` runs the per-module work (on a Ray
        cluster, say); a private round's noise is drawn from one stream across modules, so it
        always runs here.
        """
        prepared = self.prepare(updates)
        if self.config.privacy.active:
            if private is None:
                raise ConfigError("privacy", "a private federation's round needs a PrivateRound")
            return self._aggregate_private(state, prepared, private)
        jobs = self.module_jobs(state, prepared)
        results = list((map_modules or run_here)(jobs))
        if len(results) != len(jobs):
            raise AggregationError(
                "map_modules", f"returned {len(results)} results for {len(jobs)} modules"
            )
        modules = {job.name: result for job, result in zip(jobs, results, strict=True)}
        robust = prepared.robust
        return GlobalState(
            round=state.round + 1,
            modules=modules,
            participant_ranks=prepared.ranks,
            weights=tuple(float(x) for x in prepared.p),
            clip=robust.clip if robust is not None else (),
            trust=robust.trust if robust is not None else (),
        )

    def _aggregate_private(
        self, state: GlobalState, round_: PreparedRound, private: PrivateRound
    ) -> GlobalState:
        raise ConfigError("privacy", f"strategy {self.name!r} has no private mechanism")

    @abstractmethod
    def _aggregate_module(self, name: str, state: GlobalState, round_: PreparedRound) -> Any:
        """One module's next state from a prepared round."""

    def module_jobs(self, state: GlobalState, round_: PreparedRound) -> list[ModuleJob]:
        """The round cut into one self-contained job per module (see :class:`ModuleJob`)."""
        jobs = []
        for name in self.schema:
            only = GlobalState(
                round=state.round,
                modules={name: state.modules[name]},
                participant_ranks=state.participant_ranks,
            )
            updates = [
                ClientUpdate(u.client_id, u.rank, u.num_examples, u.scale, {name: u.factors[name]})
                for u in round_.updates
            ]
            jobs.append(ModuleJob(self, name, only, replace(round_, updates=updates)))
        return jobs

    # -- shared plumbing -------------------------------------------------------------------
    @property
    def schema(self) -> AdapterSchema:
        return self.config.schema

    def check_client_rank(self, rank: int, scale: float) -> None:
        validate_rank(rank, self.config.max_rank, self.config.allowed_ranks)
        if not scale > 0:
            raise ConfigError("scale", f"must be > 0, got {scale}")

    def init_rows(self, name: str, rows: int, salt: str = "") -> Tensor:
        d_in = self.schema.modules[name].d_in
        return shared_init_rows(
            name + salt, d_in, rows, self.config.seed, dtype=self.dtype, device=self.device
        )

    def prepare(self, updates: Sequence[ClientUpdate]) -> PreparedRound:
        if not updates:
            raise EmptyRoundError("updates", "a round needs at least one upload to aggregate")
        validate_round(updates)
        for u in updates:
            validate_update(u, self.schema, self.config.max_rank, self.config.allowed_ranks)
        moved = [self.to_compute(u) for u in updates]
        p = client_weights([u.num_examples for u in updates], self.config.weighting)
        outcome = None
        if self.config.robust.active:  # docs/design.md §2.8: clip scales, reweigh clients
            scales, p, outcome = defend(
                [u.factors for u in moved],
                [u.scale for u in moved],
                [u.rank for u in moved],
                p,
                self.config.robust,
            )
            moved = [
                ClientUpdate(u.client_id, u.rank, u.num_examples, s, u.factors)
                for u, s in zip(moved, scales, strict=True)
            ]
        return PreparedRound(
            updates=moved, ranks=tuple(u.rank for u in updates), p=p, robust=outcome
        )

    def to_compute(self, u: ClientUpdate) -> ClientUpdate:
        """``u`` with its factors in the compute dtype, on the compute device."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=self.device, dtype=self.dtype)

        factors = {n: FactorPair(B=move(f.B), A=move(f.A)) for n, f in u.factors.items()}
        return ClientUpdate(u.client_id, u.rank, u.num_examples, u.scale, factors)

    def compute_scalar(self, value: Tensor | float) -> Tensor:
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)
