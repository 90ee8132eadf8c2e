from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScalingRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCALING_RULE_UNSPECIFIED: _ClassVar[ScalingRule]
    SCALING_RULE_STANDARD: _ClassVar[ScalingRule]
    SCALING_RULE_RSLORA: _ClassVar[ScalingRule]

class Weighting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHTING_UNSPECIFIED: _ClassVar[Weighting]
    WEIGHTING_EXAMPLES: _ClassVar[Weighting]
    WEIGHTING_UNIFORM: _ClassVar[Weighting]

class FactorSplit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACTOR_SPLIT_UNSPECIFIED: _ClassVar[FactorSplit]
    FACTOR_SPLIT_FLEXLORA: _ClassVar[FactorSplit]
    FACTOR_SPLIT_BALANCED: _ClassVar[FactorSplit]

class RoundPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_PHASE_UNSPECIFIED: _ClassVar[RoundPhase]
    ROUND_PHASE_COLLECTING: _ClassVar[RoundPhase]
    ROUND_PHASE_AGGREGATING: _ClassVar[RoundPhase]

class RoundEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_EVENT_TYPE_UNSPECIFIED: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_STATUS: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_UPLOAD: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_AGGREGATING: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_PUBLISHED: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_FAILED: _ClassVar[RoundEventType]
SCALING_RULE_UNSPECIFIED: ScalingRule
SCALING_RULE_STANDARD: ScalingRule
SCALING_RULE_RSLORA: ScalingRule
WEIGHTING_UNSPECIFIED: Weighting
WEIGHTING_EXAMPLES: Weighting
WEIGHTING_UNIFORM: Weighting
FACTOR_SPLIT_UNSPECIFIED: FactorSplit
FACTOR_SPLIT_FLEXLORA: FactorSplit
FACTOR_SPLIT_BALANCED: FactorSplit
ROUND_PHASE_UNSPECIFIED: RoundPhase
ROUND_PHASE_COLLECTING: RoundPhase
ROUND_PHASE_AGGREGATING: RoundPhase
ROUND_EVENT_TYPE_UNSPECIFIED: RoundEventType
ROUND_EVENT_TYPE_STATUS: RoundEventType
ROUND_EVENT_TYPE_UPLOAD: RoundEventType
ROUND_EVENT_TYPE_AGGREGATING: RoundEventType
ROUND_EVENT_TYPE_PUBLISHED: RoundEventType
ROUND_EVENT_TYPE_FAILED: RoundEventType

class ModuleSpec(_message.Message):
    __slots__ = ("name", "d_out", "d_in")
    NAME_FIELD_NUMBER: _ClassVar[int]
    D_OUT_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    name: str
    d_out: int
    d_in: int
    def __init__(self, name: _Optional[str] = ..., d_out: _Optional[int] = ..., d_in: _Optional[int] = ...) -> None: ...

class RoundPolicy(_message.Message):
    __slots__ = ("min_clients", "expected_clients", "deadline_seconds")
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    min_clients: int
    expected_clients: int
    deadline_seconds: float
    def __init__(self, min_clients: _Optional[int] = ..., expected_clients: _Optional[int] = ..., deadline_seconds: _Optional[float] = ...) -> None: ...

class FederationSpec(_message.Message):
    __slots__ = ("federation_id", "modules", "strategy", "strategy_options", "max_rank", "allowed_ranks", "lora_alpha", "scaling_rule", "weighting", "factor_split", "round_policy", "init_seed", "min_partition_holders")
    class StrategyOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_RANKS_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SCALING_RULE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    FACTOR_SPLIT_FIELD_NUMBER: _ClassVar[int]
    ROUND_POLICY_FIELD_NUMBER: _ClassVar[int]
    INIT_SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_PARTITION_HOLDERS_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    modules: _containers.RepeatedCompositeFieldContainer[ModuleSpec]
    strategy: str
    strategy_options: _containers.ScalarMap[str, str]
    max_rank: int
    allowed_ranks: _containers.RepeatedScalarFieldContainer[int]
    lora_alpha: float
    scaling_rule: ScalingRule
    weighting: Weighting
    factor_split: FactorSplit
    round_policy: RoundPolicy
    init_seed: int
    min_partition_holders: int
    def __init__(self, federation_id: _Optional[str] = ..., modules: _Optional[_Iterable[_Union[ModuleSpec, _Mapping]]] = ..., strategy: _Optional[str] = ..., strategy_options: _Optional[_Mapping[str, str]] = ..., max_rank: _Optional[int] = ..., allowed_ranks: _Optional[_Iterable[int]] = ..., lora_alpha: _Optional[float] = ..., scaling_rule: _Optional[_Union[ScalingRule, str]] = ..., weighting: _Optional[_Union[Weighting, str]] = ..., factor_split: _Optional[_Union[FactorSplit, str]] = ..., round_policy: _Optional[_Union[RoundPolicy, _Mapping]] = ..., init_seed: _Optional[int] = ..., min_partition_holders: _Optional[int] = ...) -> None: ...

class RankEnergy(_message.Message):
    __slots__ = ("partition_upper_ranks", "partition_energy", "e_min", "effective_rank", "tail_energy", "partition_holders", "partition_holder_weight")
    PARTITION_UPPER_RANKS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_ENERGY_FIELD_NUMBER: _ClassVar[int]
    E_MIN_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RANK_FIELD_NUMBER: _ClassVar[int]
    TAIL_ENERGY_FIELD_NUMBER: _ClassVar[int]
    PARTITION_HOLDERS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_HOLDER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    partition_upper_ranks: _containers.RepeatedScalarFieldContainer[int]
    partition_energy: _containers.RepeatedScalarFieldContainer[float]
    e_min: float
    effective_rank: float
    tail_energy: float
    partition_holders: _containers.RepeatedScalarFieldContainer[int]
    partition_holder_weight: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, partition_upper_ranks: _Optional[_Iterable[int]] = ..., partition_energy: _Optional[_Iterable[float]] = ..., e_min: _Optional[float] = ..., effective_rank: _Optional[float] = ..., tail_energy: _Optional[float] = ..., partition_holders: _Optional[_Iterable[int]] = ..., partition_holder_weight: _Optional[_Iterable[float]] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("federation_id", "round", "published_round", "phase", "uploads", "min_clients", "expected_clients", "deadline_unix", "energy", "joined_clients")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    JOINED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    round: int
    published_round: int
    phase: RoundPhase
    uploads: int
    min_clients: int
    expected_clients: int
    deadline_unix: float
    energy: RankEnergy
    joined_clients: int
    def __init__(self, federation_id: _Optional[str] = ..., round: _Optional[int] = ..., published_round: _Optional[int] = ..., phase: _Optional[_Union[RoundPhase, str]] = ..., uploads: _Optional[int] = ..., min_clients: _Optional[int] = ..., expected_clients: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., energy: _Optional[_Union[RankEnergy, _Mapping]] = ..., joined_clients: _Optional[int] = ...) -> None: ...

class Federation(_message.Message):
    __slots__ = ("spec", "status", "enrolment_secret")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    spec: FederationSpec
    status: RoundStatus
    enrolment_secret: str
    def __init__(self, spec: _Optional[_Union[FederationSpec, _Mapping]] = ..., status: _Optional[_Union[RoundStatus, _Mapping]] = ..., enrolment_secret: _Optional[str] = ...) -> None: ...

class CreateFederationRequest(_message.Message):
    __slots__ = ("spec", "enrolment_secret")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    spec: FederationSpec
    enrolment_secret: str
    def __init__(self, spec: _Optional[_Union[FederationSpec, _Mapping]] = ..., enrolment_secret: _Optional[str] = ...) -> None: ...

class GetFederationRequest(_message.Message):
    __slots__ = ("federation_id",)
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    def __init__(self, federation_id: _Optional[str] = ...) -> None: ...

class ListFederationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFederationsResponse(_message.Message):
    __slots__ = ("federations",)
    FEDERATIONS_FIELD_NUMBER: _ClassVar[int]
    federations: _containers.RepeatedCompositeFieldContainer[Federation]
    def __init__(self, federations: _Optional[_Iterable[_Union[Federation, _Mapping]]] = ...) -> None: ...

class RotateEnrolmentSecretRequest(_message.Message):
    __slots__ = ("federation_id", "enrolment_secret")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    enrolment_secret: str
    def __init__(self, federation_id: _Optional[str] = ..., enrolment_secret: _Optional[str] = ...) -> None: ...

class RotateEnrolmentSecretResponse(_message.Message):
    __slots__ = ("federation_id", "enrolment_secret")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    enrolment_secret: str
    def __init__(self, federation_id: _Optional[str] = ..., enrolment_secret: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("federation_id", "client_id", "rank", "num_examples", "lora_alpha")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    client_id: str
    rank: int
    num_examples: int
    lora_alpha: float
    def __init__(self, federation_id: _Optional[str] = ..., client_id: _Optional[str] = ..., rank: _Optional[int] = ..., num_examples: _Optional[int] = ..., lora_alpha: _Optional[float] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("spec", "status", "scale", "chunk_size", "client_token", "token_expires_unix")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    spec: FederationSpec
    status: RoundStatus
    scale: float
    chunk_size: int
    client_token: str
    token_expires_unix: float
    def __init__(self, spec: _Optional[_Union[FederationSpec, _Mapping]] = ..., status: _Optional[_Union[RoundStatus, _Mapping]] = ..., scale: _Optional[float] = ..., chunk_size: _Optional[int] = ..., client_token: _Optional[str] = ..., token_expires_unix: _Optional[float] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("federation_id", "client_id", "round")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    client_id: str
    round: int
    def __init__(self, federation_id: _Optional[str] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("round", "rank", "scale", "total_bytes", "sha256", "has_merge", "energy")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    HAS_MERGE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    round: int
    rank: int
    scale: float
    total_bytes: int
    sha256: str
    has_merge: bool
    energy: RankEnergy
    def __init__(self, round: _Optional[int] = ..., rank: _Optional[int] = ..., scale: _Optional[float] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., has_merge: _Optional[bool] = ..., energy: _Optional[_Union[RankEnergy, _Mapping]] = ...) -> None: ...

class PullChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("federation_id", "client_id", "round", "rank", "num_examples", "lora_alpha", "total_bytes", "sha256")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    client_id: str
    round: int
    rank: int
    num_examples: int
    lora_alpha: float
    total_bytes: int
    sha256: str
    def __init__(self, federation_id: _Optional[str] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ..., rank: _Optional[int] = ..., num_examples: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("round", "duplicate", "received_bytes", "uploads_in_round")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_IN_ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    duplicate: bool
    received_bytes: int
    uploads_in_round: int
    def __init__(self, round: _Optional[int] = ..., duplicate: _Optional[bool] = ..., received_bytes: _Optional[int] = ..., uploads_in_round: _Optional[int] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("federation_id",)
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    def __init__(self, federation_id: _Optional[str] = ...) -> None: ...

class WatchRoundsRequest(_message.Message):
    __slots__ = ("federation_id", "after_round")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    after_round: int
    def __init__(self, federation_id: _Optional[str] = ..., after_round: _Optional[int] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("type", "status", "message", "warnings")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    type: RoundEventType
    status: RoundStatus
    message: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, type: _Optional[_Union[RoundEventType, str]] = ..., status: _Optional[_Union[RoundStatus, _Mapping]] = ..., message: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
