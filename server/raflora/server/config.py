"""A federation's declaration, validated once, convertible to and from the wire."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raflora.server.engine import (
    STRATEGIES,
    AdapterSchema,
    ConfigError,
    FactorSplit,
    ScalingRule,
    StrategyConfig,
    Weighting,
)
from raflora.v1 import aggregation_pb2 as pb

# Ids become directory names: keep them to a safe, portable alphabet.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(ID_PATTERN)

_SCALING = {
    ScalingRule.STANDARD: pb.SCALING_RULE_STANDARD,
    ScalingRule.RSLORA: pb.SCALING_RULE_RSLORA,
}
_WEIGHTING = {Weighting.EXAMPLES: pb.WEIGHTING_EXAMPLES, Weighting.UNIFORM: pb.WEIGHTING_UNIFORM}
_SPLIT = {
    FactorSplit.ORTHONORMAL_A: pb.FACTOR_SPLIT_FLEXLORA,
    FactorSplit.BALANCED: pb.FACTOR_SPLIT_BALANCED,
}


def check_id(field: str, value: str) -> str:
    if not _ID_RE.match(value):
        raise ConfigError(field, f"{value!r} must match {ID_PATTERN}")
    return value


class ModuleConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1)
    d_out: int = Field(gt=0)
    d_in: int = Field(gt=0)


class FederationConfig(BaseModel):
    """Everything a federation declares; defaults run out of the box."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation_id: str = Field(pattern=ID_PATTERN)
    modules: tuple[ModuleConfig, ...] = Field(min_length=1)
    # The holder-aware raFLoRA (κ = 2): docs/evaluation.md. The paper's method is "raflora".
    strategy: str = "raflora_ha"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    max_rank: int = Field(default=16, ge=1)
    allowed_ranks: tuple[int, ...] = ()
    lora_alpha: float = Field(default=16.0, gt=0)
    scaling_rule: ScalingRule = ScalingRule.STANDARD
    weighting: Weighting = Weighting.EXAMPLES
    factor_split: FactorSplit = FactorSplit.ORTHONORMAL_A
    min_clients: int = Field(default=1, ge=1)
    expected_clients: int = Field(default=0, ge=0, description="0: same as min_clients")
    deadline_seconds: float = Field(default=0.0, ge=0)
    init_seed: int = Field(default=0, ge=0)
    min_partition_holders: int = Field(default=2, ge=1)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; choose one of {sorted(STRATEGIES)}")
        return value

    @field_validator("modules")
    @classmethod
    def _unique_modules(cls, value: tuple[ModuleConfig, ...]) -> tuple[ModuleConfig, ...]:
        names = [m.name for m in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"module names must be unique; repeated: {dupes}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        bad = [r for r in self.allowed_ranks if not 1 <= r <= self.max_rank]
        if bad:
            raise ConfigError("allowed_ranks", f"{bad} are outside 1..max_rank={self.max_rank}")
        if self.expected_clients and self.expected_clients < self.min_clients:
            raise ConfigError("expected_clients", "must be 0 or >= min_clients")
        if self.strategy == "fedit" and len(set(self.allowed_ranks)) != 1:
            raise ConfigError("allowed_ranks", "strategy 'fedit' needs exactly one allowed rank")
        return self

    # -- derived ---------------------------------------------------------------------------
    @property
    def target_clients(self) -> int:
        return self.expected_clients or self.min_clients

    def adapter_schema(self) -> AdapterSchema:
        return AdapterSchema.from_shapes({m.name: (m.d_out, m.d_in) for m in self.modules})

    def strategy_config(self, device: str) -> StrategyConfig:
        return StrategyConfig(
            schema=self.adapter_schema(),
            max_rank=self.max_rank,
            seed=self.init_seed,
            weighting=self.weighting,
            split=self.factor_split,
            allowed_ranks=frozenset(self.allowed_ranks) or None,
            device=device,
            options=dict(self.strategy_options),
        )

    # -- wire ------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: dict[str, Any]) -> FederationConfig:
        """Validate, turning pydantic's errors into a ConfigError naming the first bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            cause = first.get("ctx", {}).get("error")
            if isinstance(cause, ConfigError):  # a cross-field check names its own field
                raise ConfigError(cause.field, cause.detail) from None
            field = ".".join(str(p) for p in first["loc"]) or "spec"
            raise ConfigError(field, first["msg"]) from None

    @classmethod
    def from_proto(cls, spec: pb.FederationSpec) -> FederationConfig:
        policy = spec.round_policy
        data: dict[str, Any] = {
            "federation_id": spec.federation_id,
            "modules": [{"name": m.name, "d_out": m.d_out, "d_in": m.d_in} for m in spec.modules],
            "strategy_options": {k: _parse_option(v) for k, v in spec.strategy_options.items()},
            "allowed_ranks": tuple(spec.allowed_ranks),
            "init_seed": spec.init_seed,
            "min_partition_holders": spec.min_partition_holders or 2,
            "expected_clients": policy.expected_clients,
            "deadline_seconds": policy.deadline_seconds,
        }
        if spec.strategy:
            data["strategy"] = spec.strategy
        if spec.max_rank:
            data["max_rank"] = spec.max_rank
        elif spec.allowed_ranks:
            data["max_rank"] = max(spec.allowed_ranks)
        if spec.lora_alpha:
            data["lora_alpha"] = spec.lora_alpha
        if policy.min_clients:
            data["min_clients"] = policy.min_clients
        for key, table, value in (
            ("scaling_rule", _SCALING, spec.scaling_rule),
            ("weighting", _WEIGHTING, spec.weighting),
            ("factor_split", _SPLIT, spec.factor_split),
        ):
            if value:
                matches = [k for k, v in table.items() if v == value]
                if not matches:
                    raise ConfigError(key, f"unknown enum value {value}")
                data[key] = matches[0]
        return cls.parse(data)

    def to_proto(self) -> pb.FederationSpec:
        return pb.FederationSpec(
            federation_id=self.federation_id,
            modules=[pb.ModuleSpec(name=m.name, d_out=m.d_out, d_in=m.d_in) for m in self.modules],
            strategy=self.strategy,
            strategy_options={k: _format_option(v) for k, v in self.strategy_options.items()},
            max_rank=self.max_rank,
            allowed_ranks=list(self.allowed_ranks),
            lora_alpha=self.lora_alpha,
            scaling_rule=_SCALING[self.scaling_rule],
            weighting=_WEIGHTING[self.weighting],
            factor_split=_SPLIT[self.factor_split],
            round_policy=pb.RoundPolicy(
                min_clients=self.min_clients,
                expected_clients=self.expected_clients,
                deadline_seconds=self.deadline_seconds,
            ),
            init_seed=self.init_seed,
            min_partition_holders=self.min_partition_holders,
        )


def _parse_option(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
