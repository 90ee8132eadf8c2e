"""A federation's declaration, validated once. The wire form lives in ``api/serde.py``."""

from __future__ import annotations

import re
from typing import Any, Literal

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
from raflora.server.engine.privacy import PrivacyPolicy
from raflora.server.engine.robust import Combine, RobustPolicy

# Ids become directory names: keep them to a safe, portable alphabet.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_ID_ECHO = 64  # characters of a client-supplied id quoted back in an error message
# Bounds that keep a declared schema within what one server can hold (absurd specs are bad
# input, not an internal error).
MAX_DIMENSION = 1 << 20
MAX_RANK = 4096
MAX_MODULES = 20_000
MAX_ADAPTER_ELEMENTS = 1 << 34  # max_rank · Σ(d_out + d_in)
# A private round holds one module's noisy d_out × d_in aggregate at a time (1 GiB in fp32).
MAX_PRIVATE_MODULE_ELEMENTS = 1 << 28
_ID_RE = re.compile(ID_PATTERN)


def echo_id(value: str) -> str:
    """A client-supplied id as it may appear in a message: quoted and bounded."""
    if len(value) <= MAX_ID_ECHO:
        return repr(value)
    return repr(value[:MAX_ID_ECHO]) + f"… ({len(value)} characters)"


def check_id(field: str, value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ConfigError(field, f"{echo_id(value)} must match {ID_PATTERN}")
    return value


class ModuleConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    d_out: int = Field(gt=0, le=MAX_DIMENSION)
    d_in: int = Field(gt=0, le=MAX_DIMENSION)


class ParticipationConfig(BaseModel):
    """Which joined clients take part in a round; the default is everyone who pushes.

    ``clients_per_round`` (k) or ``fraction`` of the clients joined when the round opens are
    selected, seeded by (``seed``, round) and so reproducible; ``stratify_by_rank`` gives every
    rank present at least one selected holder when k allows; ``over_selection`` selects
    ``ceil(k · (1 + over_selection))`` so that the round closes at k uploads without waiting for
    stragglers (the deadline closes it with ``min_clients``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    clients_per_round: int = Field(default=0, ge=0, le=1_000_000)
    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    stratify_by_rank: bool = False
    over_selection: float = Field(default=0.0, ge=0.0, le=10.0)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_rule(self) -> ParticipationConfig:
        if self.clients_per_round and self.fraction:
            raise ConfigError("participation", "give clients_per_round or fraction, not both")
        return self

    @property
    def active(self) -> bool:
        return bool(self.clients_per_round or self.fraction)


class RobustConfig(BaseModel):
    """Byzantine-robust weighing of a round's clients (docs/design.md §2.8); off by default."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    clip_norm: float = Field(default=0.0, ge=0.0, le=1e12)
    clip_quantile: float = Field(default=0.0, ge=0.0, le=1.0)
    combine: Combine = Combine.MEAN
    trim: int = Field(default=1, ge=1, le=1000)

    def policy(self, max_weight_share: float = 1.0) -> RobustPolicy:
        return RobustPolicy(
            self.clip_norm, self.clip_quantile, self.combine, self.trim, max_weight_share
        )


class PrivacyConfig(BaseModel):
    """Client-level differential privacy (docs/design.md §2.9); off while noise_multiplier = 0."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    noise_multiplier: float = Field(default=0.0, ge=0.0, le=1e6)
    clip_norm: float = Field(default=0.0, ge=0.0, le=1e12)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)

    @property
    def active(self) -> bool:
        return self.noise_multiplier > 0

    def policy(self) -> PrivacyPolicy:
        return PrivacyPolicy(self.noise_multiplier, self.clip_norm, self.delta)


class FederationConfig(BaseModel):
    """Everything a federation declares; defaults run out of the box."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation_id: str = Field(pattern=ID_PATTERN)
    modules: tuple[ModuleConfig, ...] = Field(min_length=1, max_length=MAX_MODULES)
    # The holder-aware raFLoRA (κ = 2): docs/evaluation.md. The paper's method is "raflora".
    strategy: str = "raflora_ha"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    max_rank: int = Field(default=16, ge=1, le=MAX_RANK)
    allowed_ranks: tuple[int, ...] = ()
    lora_alpha: float = Field(default=16.0, gt=0, le=1e6)
    scaling_rule: ScalingRule = ScalingRule.STANDARD
    weighting: Weighting = Weighting.EXAMPLES
    factor_split: FactorSplit = FactorSplit.ORTHONORMAL_A
    min_clients: int = Field(default=1, ge=1)
    expected_clients: int = Field(default=0, ge=0, description="0: same as min_clients")
    deadline_seconds: float = Field(default=0.0, ge=0)
    # Retention: 0 keeps every published round; N > 0 keeps the newest N (docs/operations.md).
    keep_rounds: int = Field(default=0, ge=0)
    init_seed: int = Field(default=0, ge=0)
    min_partition_holders: int = Field(default=2, ge=1)
    # How payloads travel: "grpc" through Push/Pull, or "direct" between the client and the
    # server's bucket over pre-signed URLs (storage = s3 only; docs/design.md §5.3).
    data_plane: Literal["grpc", "direct"] = "grpc"
    # -- trust (docs/security.md) ----------------------------------------------------------
    max_update_norm: float = Field(
        default=1e6, gt=0, description="Largest ‖s·B·A‖_F of one module in an upload"
    )
    max_examples_per_client: int = Field(
        default=10_000_000, ge=1, description="Largest num_examples a client may declare at join"
    )
    max_weight_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Cap on one client's share of a round's weight (applied before normalising)",
    )
    max_clients: int = Field(default=10_000, ge=1, description="Clients that may join")
    participation: ParticipationConfig = Field(default_factory=ParticipationConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

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
        elements = self.max_rank * sum(m.d_out + m.d_in for m in self.modules)
        if elements > MAX_ADAPTER_ELEMENTS:
            raise ConfigError(
                "modules", f"{elements} adapter elements at max_rank exceed {MAX_ADAPTER_ELEMENTS}"
            )
        if self.strategy == "fedit" and len(set(self.allowed_ranks)) != 1:
            raise ConfigError("allowed_ranks", "strategy 'fedit' needs exactly one allowed rank")
        self._check_privacy()
        return self

    def _check_privacy(self) -> None:
        """What a private federation needs (docs/design.md §2.9), each named by its field."""
        if not (self.privacy.active or self.privacy.clip_norm):
            return
        self.privacy.policy()  # noise multiplier and clip bound both set
        if not STRATEGIES[self.strategy].supports_privacy:
            raise ConfigError(
                "privacy",
                f"strategy {self.strategy!r} has no private mechanism; use a spectral one",
            )
        self.strategy_config("cpu")  # the engine's own checks: uniform weighting, no robust
        big = [m.name for m in self.modules if m.d_out * m.d_in > MAX_PRIVATE_MODULE_ELEMENTS]
        if big:
            raise ConfigError(
                "modules",
                f"module {big[0]!r} is too large for a private round, whose noise makes each "
                f"module's aggregate dense (at most {MAX_PRIVATE_MODULE_ELEMENTS} elements)",
            )

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
            robust=self.robust.policy(self.max_weight_share),
            privacy=self.privacy.policy(),
        )

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
