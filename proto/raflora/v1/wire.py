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
