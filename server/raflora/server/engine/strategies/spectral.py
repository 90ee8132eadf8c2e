"""SVD-redistribution strategies: FlexLoRA (the baseline) and raFLoRA (the paper's fix).

Both form ``ΔW' = Σ_i Σ_j w_ij · s_i · B_i[:, j] A_i[j, :]`` and keep its top-R SVD; they
differ only in the per-index weights w_ij (DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..distribution import split_lowrank
from ..lowrank import truncated_svd_of_sum
from ..types import FactorPair, GlobalState, LowRank
from ..weights import holder_normalized_index_weights, uniform_index_weights
from .base import PreparedRound, Strategy


class SpectralStrategy(Strategy):
    """Shared machinery; subclasses choose the per-index weights."""

    def index_weights(self, ranks: Sequence[int], p: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def initial_state(self) -> GlobalState:
        modules = {}
        for name, shape in self.schema.modules.items():
            modules[name] = LowRank(
                U=self.compute_scalar(0).new_zeros(shape.d_out, 0),
                S=self.compute_scalar(0).new_zeros(0),
                V=self.compute_scalar(0).new_zeros(shape.d_in, 0),
            )
        return GlobalState(round=0, modules=modules)

    def distribute_module(
        self, state: GlobalState, name: str, rank: int, scale: float
    ) -> tuple[FactorPair, FactorPair | None]:
        module = state.modules[name]
        assert isinstance(module, LowRank)
        init = self.init_rows(name, rank)
        return split_lowrank(module, rank, scale, self.config.split, init), None

    def _aggregate_module(self, name: str, state: GlobalState, round_: PreparedRound) -> LowRank:
        weights = self.index_weights(round_.ranks, round_.p)
        terms = []
        for u, w in zip(round_.updates, weights, strict=True):
            f = u.factors[name]
            col = w.to(dtype=self.dtype, device=self.device) * u.scale
            terms.append(FactorPair(B=f.B * col, A=f.A))
        return truncated_svd_of_sum(terms, self.config.max_rank, self.config.svd_method)


class FlexLoRA(SpectralStrategy):
    """ΔW' = Σ_i p_i s_i B_i A_i: rank-agnostic weights, hence rank collapse."""

    name = "flexlora"

    def index_weights(self, ranks: Sequence[int], p: Tensor) -> list[Tensor]:
        return uniform_index_weights(ranks, p)


class RaFLoRA(SpectralStrategy):
    """Each rank partition averaged over the clients that hold it (index j: p_i / Σ_{r_l≥j} p_l)."""

    name = "raflora"

    def index_weights(self, ranks: Sequence[int], p: Tensor) -> list[Tensor]:
        return holder_normalized_index_weights(ranks, p)
