"""Safetensors on disk: validate uploads tensor by tensor, write views without a full copy.

Neither direction holds more than one tensor in memory beyond what the caller already has,
so a 200 MB adapter streams through the server in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
from raflora.server.engine.validation import validate_update
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


def validate_upload_file(path: Path, schema: AdapterSchema, rank: int, client_id: str) -> None:
    """Check names, dtypes, shapes and finiteness of an upload, one tensor at a time.

    Raises the engine's typed errors (their ``field`` names the tensor) or InvalidUpdateError
    for a payload that is not safetensors at all.
    """
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidUpdateError("payload", f"not a valid safetensors file: {exc}") from None
    with handle as f:
        names = list(f.keys())
        seen: dict[str, set[str]] = {}
        for name in names:
            try:
                module, factor, merge = split_tensor_name(name)
            except ValueError as exc:
                raise UnknownModuleError(name, str(exc)) from None
            if merge or module not in schema.modules:
                raise UnknownModuleError(name, "tensor is not part of the federation's schema")
            code = f.get_slice(name).get_dtype()
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
                B=f.get_tensor(tensor_name(module, LORA_B)),
                A=f.get_tensor(tensor_name(module, LORA_A)),
            )
            # One module at a time through the engine's own checks.
            single = AdapterSchema({module: ModuleShape(shape.d_out, shape.d_in)})
            update = ClientUpdate(client_id, rank, 1, 1.0, {module: pair})
            validate_update(update, single, max_rank=rank)


def load_factors(path: Path, schema: AdapterSchema) -> dict[str, FactorPair]:
    """Read a validated upload back as raw factors, in the upload's dtype."""
    with safe_open(str(path), framework="pt") as f:
        return {
            m: FactorPair(
                B=f.get_tensor(tensor_name(m, LORA_B)), A=f.get_tensor(tensor_name(m, LORA_A))
            )
            for m in schema.modules
        }


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Write a safetensors file from lazily produced tensors; returns (size, sha256 hex).

    ``specs`` fixes the header up front; ``tensors`` must then yield the same names in the
    same order, each produced only when it is written.
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
    with path.open("wb") as out:
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
