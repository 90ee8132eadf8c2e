"""Safetensors payloads: validate uploads module by module, write files without a full copy.

Neither direction holds more than one tensor in memory beyond what the caller already has,
so a 200 MB adapter streams through the server in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from torch import Tensor

from raflora.server.engine import (
    AdapterSchema,
    ClientUpdate,
    DtypeError,
    FactorPair,
    InvalidUpdateError,
    MissingModuleError,
    ModuleShape,
    UnknownModuleError,
)
from raflora.server.engine.validation import validate_effective_update, validate_update
from raflora.v1.wire import LORA_A, LORA_B, split_tensor_name, tensor_name

ACCEPTED_CODES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
_CODE_OF = {v: k for k, v in ACCEPTED_CODES.items()}
_HEADER_SLACK = 1 << 16


def max_upload_bytes(schema: AdapterSchema, rank: int) -> int:
    """The largest legitimate payload for ``rank``: fp64 tensors plus a generous header."""
    elements = sum(rank * (s.d_in + s.d_out) for s in schema.modules.values())
    names = sum(2 * (len(n) + 64) for n in schema.modules)
    return elements * 8 + names + _HEADER_SLACK


class TensorReader(Protocol):
    """Read access to one safetensors payload, wherever the store keeps it."""

    def keys(self) -> list[str]: ...

    def dtype_code(self, name: str) -> str: ...

    def get(self, name: str) -> Tensor: ...


class _FileReader:
    def __init__(self, handle: Any) -> None:
        self._f = handle

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def dtype_code(self, name: str) -> str:
        return str(self._f.get_slice(name).get_dtype())

    def get(self, name: str) -> Tensor:
        tensor: Tensor = self._f.get_tensor(name)
        return tensor


class _DictReader:
    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def dtype_code(self, name: str) -> str:
        return _CODE_OF.get(self._t[name].dtype, str(self._t[name].dtype))

    def get(self, name: str) -> Tensor:
        return self._t[name]


def _not_safetensors(exc: BaseException) -> InvalidUpdateError:
    # An OSError's text names the server's path: say what, never where.
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:300]
    return InvalidUpdateError("payload", f"not a valid safetensors file: {reason}")


@contextmanager
def open_file(path: Path) -> Iterator[TensorReader]:
    """A payload on disk; a file that is not safetensors is InvalidUpdateError("payload")."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _not_safetensors(exc) from None
    with handle as f:
        yield _FileReader(f)


@contextmanager
def open_bytes(data: bytes) -> Iterator[TensorReader]:
    """A payload held in memory (the in-memory store)."""
    try:
        tensors = load_safetensors(bytes(data))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _not_safetensors(exc) from None
    yield _DictReader(tensors)


@dataclass(frozen=True)
class UpdateBounds:
    """How an upload is checked before it is acknowledged: as aggregation will use it."""

    compute_dtype: torch.dtype = torch.float32
    max_update_norm: float = 1e6


def validate_upload(
    reader: TensorReader,
    schema: AdapterSchema,
    rank: int,
    client_id: str,
    scale: float,
    bounds: UpdateBounds,
) -> None:
    """Check names, dtypes, shapes, finiteness and magnitude, one module at a time.

    Raises the engine's typed errors (their ``field`` names the tensor or module). The checks
    run at the compute dtype and at the client's real scale, so an acknowledged upload cannot
    make the aggregation fail on its numbers.
    """
    seen: dict[str, set[str]] = {}
    for name in reader.keys():  # noqa: SIM118 (a TensorReader, not a dict)
        try:
            module, factor, merge = split_tensor_name(name)
        except ValueError as exc:
            raise UnknownModuleError(name[:200], str(exc)[:300]) from None
        if merge or module not in schema.modules:
            raise UnknownModuleError(name[:200], "tensor is not part of the federation's schema")
        code = reader.dtype_code(name)
        if code not in ACCEPTED_CODES:
            raise DtypeError(name, f"dtype {code} is not F32, F16, BF16 or F64")
        seen.setdefault(module, set()).add(factor)
    for module in schema.modules:
        for factor in (LORA_A, LORA_B):
            if factor not in seen.get(module, set()):
                raise MissingModuleError(
                    tensor_name(module, factor), "tensor of the schema is missing"
                )
    for module, shape in schema.modules.items():
        pair = FactorPair(
            B=reader.get(tensor_name(module, LORA_B)), A=reader.get(tensor_name(module, LORA_A))
        )
        # One module at a time through the engine's own checks, then as aggregation sees it.
        single = AdapterSchema({module: ModuleShape(shape.d_out, shape.d_in)})
        update = ClientUpdate(client_id, rank, 1, scale, {module: pair})
        validate_update(update, single, rank, check_finite=False)  # finiteness just below
        validate_effective_update(module, pair, scale, bounds.compute_dtype, bounds.max_update_norm)


def read_factors(reader: TensorReader, schema: AdapterSchema) -> dict[str, FactorPair]:
    """Read a validated upload back as raw factors, in the upload's dtype."""
    return {
        m: FactorPair(B=reader.get(tensor_name(m, LORA_B)), A=reader.get(tensor_name(m, LORA_A)))
        for m in schema.modules
    }


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Write a safetensors file from lazily produced tensors; returns (size, sha256 hex)."""
    with path.open("wb") as out:
        return write_safetensors_to(out, specs, tensors, metadata)


def write_safetensors_to(
    out: BinaryIO,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Write safetensors to ``out`` from lazily produced tensors; returns (size, sha256 hex).

    ``specs`` fixes the header up front; ``tensors`` must then yield the same names in the
    same order, each produced only when it is written, so at most one tensor is held.
    """
    header: dict[str, object] = {}
    offset = 0
    order = []
    for name, dtype, shape in specs:
        nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {
            "dtype": _CODE_OF[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        order.append((name, dtype, tuple(shape)))
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    digest = hashlib.sha256()
    size = 0
    for piece in (struct.pack("<Q", len(blob)), blob):
        out.write(piece)
        digest.update(piece)
        size += len(piece)
    produced = iter(tensors)
    for name, dtype, shape in order:
        got_name, tensor = next(produced)
        if got_name != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {got_name} does not match its header entry {name}")
        raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        out.write(raw.data)
        digest.update(raw.data)
        size += raw.nbytes
    out.flush()
    return size, digest.hexdigest()
