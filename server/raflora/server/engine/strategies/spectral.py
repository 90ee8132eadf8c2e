"""SVD-redistribution strategies: FlexLoRA (the baseline) and raFLoRA (the paper's fix).

Both form ``ΔW' = Σ_i Σ_j w_ij · s_i · B_i[:, j] A_i[j, :]`` and keep its top-R SVD; they
differ only in the per-index weights w_ij (docs/design.md §2.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..distribution import split_lowrank
from ..errors import ConfigError
from ..lowrank import truncated_svd_of_sum
from ..privacy import (
    PrivacyOutcome,
    PrivateRound,
    boosted_norms,
    contribution_gains,
    noise_std,
    noisy_truncated_svd,
)
from ..types import FactorPair, GlobalState, LowRank
from ..weights import (
    holder_aware_index_weights,
    holder_normalized_index_weights,
    uniform_index_weights,
)
from .base import PreparedRound, Strategy, StrategyConfig


class SpectralStrategy(Strategy):
    """Shared machinery; subclasses choose the per-index weights.

    Option ``carry_over`` (docs/design.md §2.7): the rank indices no participant of the round
    holds, ``j > r_max = max_i r_i``, keep the previous global state's components: the previous
    adapter is their holder, with weight 1, so
    ``ΔW' = top-R SVD(Σ_i Σ_{j ≤ r_i} w_ij s_i B_i[:, j] A_i[j, :] + Σ_{j > r_max} σ_j u_j v_jᵀ)``.
    Under partial participation this is what keeps raFLoRA's pass-through fixed point.
    """

    known_options: ClassVar[frozenset[str]] = frozenset({"carry_over"})
    carry_over_default: ClassVar[bool] = False
    supports_privacy = True

    def __init__(self, config: StrategyConfig) -> None:
        super().__init__(config)
        value = config.options.get("carry_over", self.carry_over_default)
        if not isinstance(value, bool):
            raise ConfigError("options.carry_over", f"must be true or false, got {value!r}")
        self.carry_over = value

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
        init = lambda: self.init_rows(name, rank)  # noqa: E731  # drawn only for dead slots
        return split_lowrank(module, rank, scale, self.config.split, init), None

    def _aggregate_module(self, name: str, state: GlobalState, round_: PreparedRound) -> LowRank:
        weights = self.index_weights(round_.ranks, round_.p)
        terms = []
        for u, w in zip(round_.updates, weights, strict=True):
            f = u.factors[name]
            col = w.to(dtype=self.dtype, device=self.device) * u.scale
            terms.append(FactorPair(B=f.B * col, A=f.A))
        carried = self.carried(state, name, max(round_.ranks))
        if carried is not None:
            terms.append(carried)
        return truncated_svd_of_sum(terms, self.config.max_rank, self.config.svd_method)

    def carried(self, state: GlobalState, name: str, r_max: int) -> FactorPair | None:
        """The previous state's components past ``r_max`` as one term in the compute dtype,
        if this strategy carries them over (None: none)."""
        if not self.carry_over:
            return None
        carried = carried_components(state.modules[name], r_max)
        if carried is None:
            return None
        return FactorPair(
            B=carried.B.to(dtype=self.dtype, device=self.device),
            A=carried.A.to(dtype=self.dtype, device=self.device),
        )

    def _aggregate_private(
        self, state: GlobalState, round_: PreparedRound, private: PrivateRound
    ) -> GlobalState:
        """docs/design.md §2.9: clip each boosted update u_i to C, sum over m̄, add N(0, σ²).

        With uniform p_i = 1/n the strategy's index weights are w_ij = m_j / n, so
        u_i's columns are n · w_ij · s_i; without clipping and with m̄ = n this is the
        strategy's own aggregate plus the noise.
        """
        policy = self.config.privacy
        n = len(round_.updates)
        weights = self.index_weights(round_.ranks, round_.p)
        columns = [
            w.to(dtype=self.dtype, device=self.device) * (u.scale * n)
            for u, w in zip(round_.updates, weights, strict=True)
        ]
        norms = boosted_norms([u.factors for u in round_.updates], columns)
        gains = contribution_gains(norms, policy, private.denominator)
        std = noise_std(policy, private.denominator)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(private.noise_seed)
        modules = {}
        for name, shape in self.schema.modules.items():
            terms = [
                FactorPair(B=u.factors[name].B * (col * float(g)), A=u.factors[name].A)
                for u, col, g in zip(round_.updates, columns, gains, strict=True)
            ]
            modules[name] = noisy_truncated_svd(
                terms,
                (shape.d_out, shape.d_in),
                std,
                self.config.max_rank,
                generator,
                self.carried(state, name, max(round_.ranks)),
            )
        clip = tuple(float(g) * private.denominator for g in gains)
        return GlobalState(
            round=state.round + 1,
            modules=modules,
            participant_ranks=round_.ranks,
            weights=(1.0 / private.denominator,) * n,
            clip=clip,
            trust=(),
            privacy=PrivacyOutcome(
                noise_multiplier=policy.noise_multiplier,
                clip_norm=policy.clip_norm,
                denominator=private.denominator,
                noise_std=std,
                norms=tuple(float(x) for x in norms),
                clip=clip,
            ),
        )


def carried_components(previous: object, r_max: int) -> FactorPair | None:
    """The previous state's components beyond ``r_max`` as one factor term (None: none)."""
    assert isinstance(previous, LowRank)
    k = previous.rank
    if k <= r_max:
        return None
    return FactorPair(B=previous.U[:, r_max:k] * previous.S[r_max:k], A=previous.V[:, r_max:k].T)


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


RECOMMENDED_SHRINKAGE = 2.0


class HolderAwareRaFLoRA(SpectralStrategy):
    """raFLoRA with tempered partition weights (options ``gamma``, ``shrinkage``, ``max_boost``).

    The project's default strategy. Its defaults (γ = 1, κ = 2) are the setting that was never
    worse than FlexLoRA beyond noise over the evaluation grid (docs/evaluation.md);
    ``shrinkage = 0`` is raFLoRA exactly and ``gamma = 0`` FlexLoRA exactly. See
    :func:`~raflora.server.engine.weights.holder_aware_index_weights`.
    """

    name = "raflora_ha"
    known_options = frozenset({"gamma", "shrinkage", "max_boost", "carry_over"})
    carry_over_default = True

    def __init__(self, config: StrategyConfig) -> None:
        super().__init__(config)
        opts = config.options
        try:
            self.gamma = float(opts.get("gamma", 1.0))
            self.shrinkage = float(opts.get("shrinkage", RECOMMENDED_SHRINKAGE))
            self.max_boost = float(opts.get("max_boost", float("inf")))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                "options", f"gamma, shrinkage and max_boost are numbers: {exc}"
            ) from None
        for field, value, low in (
            ("gamma", self.gamma, 0.0),
            ("shrinkage", self.shrinkage, 0.0),
            ("max_boost", self.max_boost, 1.0),
        ):
            if not value >= low:
                raise ConfigError(f"options.{field}", f"must be >= {low}, got {value}")

    def index_weights(self, ranks: Sequence[int], p: Tensor) -> list[Tensor]:
        return holder_aware_index_weights(
            ranks, p, gamma=self.gamma, shrinkage=self.shrinkage, max_boost=self.max_boost
        )
