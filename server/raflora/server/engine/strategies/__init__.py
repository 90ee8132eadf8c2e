"""Aggregation strategies behind one interface, selected by name."""

from .base import (
    ModuleJob,
    ModuleMap,
    PreparedRound,
    Strategy,
    StrategyConfig,
    resolve_device,
    run_here,
)
from .factor_level import RBLA, FedIT, HetLoRA
from .registry import STRATEGIES, make_strategy
from .spectral import FlexLoRA, HolderAwareRaFLoRA, RaFLoRA, SpectralStrategy
from .stacking import FLoRA

__all__ = [
    "RBLA",
    "STRATEGIES",
    "FLoRA",
    "FedIT",
    "FlexLoRA",
    "HetLoRA",
    "HolderAwareRaFLoRA",
    "ModuleJob",
    "ModuleMap",
    "PreparedRound",
    "RaFLoRA",
    "SpectralStrategy",
    "Strategy",
    "StrategyConfig",
    "make_strategy",
    "resolve_device",
    "run_here",
]
