"""Conventions on top of the protobuf messages that both ends must agree on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message limit
LORA_A = "lora_A"
LORA_B = "lora_B"
MERGE_PREFIX = "merge."


def tensor_name(module: str, factor: str, *, merge: bool = False) -> str:
    """PEFT's state-dict name, e.g. ``layers.0.q_proj.lora_A.weight``."""
    return f"{module}.{MERGE_PREFIX if merge else ''}{factor}.weight"


def split_tensor_name(name: str) -> tuple[str, str, bool]:
    """Inverse of :func:`tensor_name`: (module, factor, merge). Raises ValueError if malformed."""
    for factor in (LORA_A, LORA_B):
        for merge in (True, False):
            suffix = f".{MERGE_PREFIX if merge else ''}{factor}.weight"
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)], factor, merge
    raise ValueError(f"{name!r} is not '<module>.lora_A.weight' or '<module>.lora_B.weight'")


def iter_chunks(data: bytes | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        yield bytes(view[start : start + chunk_size])


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# -- errors ------------------------------------------------------------------------------------
# Every refused RPC carries a google.rpc.Status in the ``grpc-status-details-bin`` trailer with
# an ErrorInfo (domain ERROR_DOMAIN, a stable ``reason`` below, metadata {"field": ...}) and,
# for a bad field, a BadRequest.FieldViolation. Clients branch on the reason, never on text.
ERROR_DOMAIN = "raflora.v1"
FIELD_METADATA_KEY = "field"


class ErrorReason:
    """The stable reasons of ErrorInfo (strings, so unknown future reasons pass through)."""

    # INVALID_ARGUMENT
    INVALID_FIELD = "INVALID_FIELD"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    INVALID_UPDATE = "INVALID_UPDATE"
    # NOT_FOUND
    FEDERATION_NOT_FOUND = "FEDERATION_NOT_FOUND"
    ROUND_NOT_FOUND = "ROUND_NOT_FOUND"
    # FAILED_PRECONDITION
    NOT_JOINED = "NOT_JOINED"
    ROUND_CLOSED = "ROUND_CLOSED"
    ROUND_NOT_OPEN = "ROUND_NOT_OPEN"
    ROUND_AGGREGATING = "ROUND_AGGREGATING"
    ROUND_NOT_PUBLISHED = "ROUND_NOT_PUBLISHED"
    NOT_SELECTED = "NOT_SELECTED"
    SELECTION_PENDING = "SELECTION_PENDING"
    OBSERVER = "OBSERVER"
    JOIN_LOCKED = "JOIN_LOCKED"
    AUTH_DISABLED = "AUTH_DISABLED"
    OPEN_ENROLMENT_OFF = "OPEN_ENROLMENT_OFF"
    NOT_EXPORTABLE = "NOT_EXPORTABLE"
    DIRECT_DISABLED = "DIRECT_DISABLED"
    # ALREADY_EXISTS
    FEDERATION_EXISTS = "FEDERATION_EXISTS"
    UPLOAD_CONFLICT = "UPLOAD_CONFLICT"
    # DATA_LOSS
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    SIZE_MISMATCH = "SIZE_MISMATCH"
    UPLOAD_MISSING = "UPLOAD_MISSING"
    # UNAUTHENTICATED
    CREDENTIAL_MISSING = "CREDENTIAL_MISSING"
    TOKEN_INVALID = "TOKEN_INVALID"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_REVOKED = "TOKEN_REVOKED"
    ENROLMENT_REJECTED = "ENROLMENT_REJECTED"
    NOT_ADMIN = "NOT_ADMIN"
    # PERMISSION_DENIED
    WRONG_FEDERATION = "WRONG_FEDERATION"
    WRONG_CLIENT = "WRONG_CLIENT"
    WRONG_RANK = "WRONG_RANK"
    ADMIN_ONLY = "ADMIN_ONLY"
    CLIENT_ID_TAKEN = "CLIENT_ID_TAKEN"
    # RESOURCE_EXHAUSTED
    PUSH_LIMIT = "PUSH_LIMIT"
    DISK_FULL = "DISK_FULL"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    TOO_MANY_CLIENTS = "TOO_MANY_CLIENTS"
    JOIN_LIMIT = "JOIN_LIMIT"
    # UNAVAILABLE
    FEDERATION_DEGRADED = "FEDERATION_DEGRADED"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    # DEADLINE_EXCEEDED
    STREAM_IDLE = "STREAM_IDLE"
    REQUEST_TOO_LONG = "REQUEST_TOO_LONG"
    # INTERNAL
    INTERNAL = "INTERNAL"
