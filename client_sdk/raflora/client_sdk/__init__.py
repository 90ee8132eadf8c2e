"""Thin client SDK for training jobs (grpcio, protobuf, safetensors, torch); see README."""

from raflora.v1 import aggregation_pb2 as pb

from .client import (
    AdminClient,
    JoinInfo,
    ProgressCallback,
    PulledAdapter,
    PushResult,
    RafloraClient,
    RetryPolicy,
    is_selected,
    lora_state_dict,
    module_factors,
)
from .errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RafloraError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AdminClient",
    "AlreadyExistsError",
    "DataLossError",
    "DeadlineExceededError",
    "ErrorReason",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "JoinInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "ProgressCallback",
    "PulledAdapter",
    "PushResult",
    "RafloraClient",
    "RafloraError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "is_selected",
    "lora_state_dict",
    "module_factors",
    "pb",
]
