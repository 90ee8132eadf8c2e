"""Strategies selected by name."""

from __future__ import annotations

from ..errors import UnknownStrategyError
from .base import Strategy, StrategyConfig
from .factor_level import RBLA, FedIT, HetLoRA
from .spectral import FlexLoRA, HolderAwareRaFLoRA, RaFLoRA
from .stacking import FLoRA

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RaFLoRA, FlexLoRA, HolderAwareRaFLoRA, HetLoRA, RBLA, FLoRA, FedIT)
}


def make_strategy(name: str, config: StrategyConfig) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            "strategy", f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"
        ) from None
    return cls(config)
