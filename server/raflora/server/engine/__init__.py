"""The aggregation engine: pure, device-agnostic torch functions with no I/O.

The service layers (transport, rounds, storage, metrics) call into this package, never the
other way round. Start with :func:`make_strategy` and :class:`StrategyConfig`.
"""

from .distribution import FactorSplit, split_lowrank, truncate_factors
from .energy import AdapterEnergy, RankEnergy, adapter_energy, module_spectrum, spectrum_energy
from .errors import (
    AggregationError,
    ConfigError,
    DtypeError,
    EmptyRoundError,
    InvalidUpdateError,
    MissingModuleError,
    NonFiniteError,
    RankError,
    ShapeMismatchError,
    UnknownModuleError,
    UnknownStrategyError,
    ZeroWeightError,
)
from .initialization import orthogonal_fresh_rows, shared_init_rows
from .lowrank import SvdMethod, choose_method, dense_svd, factored_svd, truncated_svd_of_sum
from .privacy import PrivacyOutcome, PrivacyPolicy, PrivateRound
from .strategies import (
    STRATEGIES,
    ModuleJob,
    ModuleMap,
    Strategy,
    StrategyConfig,
    make_strategy,
    run_here,
)
from .types import (
    AdapterSchema,
    ClientAdapter,
    ClientUpdate,
    FactorPair,
    GlobalState,
    LowRank,
    ModuleShape,
    ModuleState,
    ScalingRule,
    lora_scaling,
)
from .weights import Weighting, client_weights, partition_holders, rank_partitions

__all__ = [
    "STRATEGIES",
    "AdapterEnergy",
    "AdapterSchema",
    "AggregationError",
    "ClientAdapter",
    "ClientUpdate",
    "ConfigError",
    "DtypeError",
    "EmptyRoundError",
    "FactorPair",
    "FactorSplit",
    "GlobalState",
    "InvalidUpdateError",
    "LowRank",
    "MissingModuleError",
    "ModuleJob",
    "ModuleMap",
    "ModuleShape",
    "ModuleState",
    "NonFiniteError",
    "PrivacyOutcome",
    "PrivacyPolicy",
    "PrivateRound",
    "RankEnergy",
    "RankError",
    "ScalingRule",
    "ShapeMismatchError",
    "Strategy",
    "StrategyConfig",
    "SvdMethod",
    "UnknownModuleError",
    "UnknownStrategyError",
    "Weighting",
    "ZeroWeightError",
    "adapter_energy",
    "choose_method",
    "client_weights",
    "dense_svd",
    "factored_svd",
    "lora_scaling",
    "make_strategy",
    "module_spectrum",
    "orthogonal_fresh_rows",
    "partition_holders",
    "rank_partitions",
    "run_here",
    "shared_init_rows",
    "spectrum_energy",
    "split_lowrank",
    "truncate_factors",
    "truncated_svd_of_sum",
]
