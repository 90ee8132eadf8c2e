"""Safetensors payloads: validate uploads module by module, write files without a full copy.

Neither direction holds more than one tensor in memory beyond what the caller already has,
so a 200 MB adapter streams through the server in bounded memory.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    ShapeMismatchError,
    UnknownModuleError,
)
from raflora.server.engine.validation import (
    check_compute_dtype,
    check_factor_magnitude,
    check_update_norm,
    factor_gram,
    norm_from_grams,
    validate_effective_update,
    validate_rank,
    validate_update,
)
from raflora.v1.layout import Layout, LayoutError, TensorEntry, TensorSplitter, encode_header
from raflora.v1.wire import LORA_A, LORA_B, split_tensor_name, tensor_name

ACCEPTED_CODES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
_CODE_OF = {v: k for k, v in ACCEPTED_CODES.items()}
_HEADER_SLACK = 1 << 16
# torch warns (once) that a tensor over read-only bytes could be written to; ours never are.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


# Receives each piece of a file being written, in order (write_safetensors_to).
Tee = Callable[[memoryview], None]


def max_header_bytes(schema: AdapterSchema) -> int:
    """The largest safetensors header a legitimate upload needs: each tensor's entry (name,
    dtype, shape, offsets) with room to spare, plus metadata slack."""
    return sum(2 * (len(n) + 200) for n in schema.modules) + _HEADER_SLACK


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
    _check_names(((n, reader.dtype_code(n)) for n in reader.keys()), schema)  # noqa: SIM118
    for module, shape in schema.modules.items():
        pair = FactorPair(
            B=reader.get(tensor_name(module, LORA_B)), A=reader.get(tensor_name(module, LORA_A))
        )
        # One module at a time through the engine's own checks, then as aggregation sees it.
        single = AdapterSchema({module: ModuleShape(shape.d_out, shape.d_in)})
        update = ClientUpdate(client_id, rank, 1, scale, {module: pair})
        validate_update(update, single, rank, check_finite=False)  # finiteness just below
        validate_effective_update(module, pair, scale, bounds.compute_dtype, bounds.max_update_norm)


def _check_names(names: Iterable[tuple[str, str]], schema: AdapterSchema) -> dict[str, set[str]]:
    """(name, dtype code) pairs against the schema: known modules, accepted dtypes, none
    missing. Returns the factors seen per module."""
    seen: dict[str, set[str]] = {}
    for name, code in names:
        try:
            module, factor, merge = split_tensor_name(name)
        except ValueError as exc:
            raise UnknownModuleError(name[:200], str(exc)[:300]) from None
        if merge or module not in schema.modules:
            raise UnknownModuleError(name[:200], "tensor is not part of the federation's schema")
        if code not in ACCEPTED_CODES:
            raise DtypeError(name, f"dtype {code} is not F32, F16, BF16 or F64")
        seen.setdefault(module, set()).add(factor)
    for module in schema.modules:
        for factor in (LORA_A, LORA_B):
            if factor not in seen.get(module, set()):
                raise MissingModuleError(
                    tensor_name(module, factor), "tensor of the schema is missing"
                )
    return seen


@dataclass
class _Factor:
    """One factor as a module's norm check needs it: its squared Frobenius norm (cheap), and
    the tensor or its r×r Gram for the exact check when the cheap bound does not settle it."""

    sq_norm: float
    rel_error: float  # a bound on |computed − exact| / exact of sq_norm
    rows: bool
    tensor: Tensor | None
    gram: Tensor | None = None

    @staticmethod
    def of(tensor: Tensor, *, rows: bool) -> _Factor:
        flat = tensor.reshape(-1)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # exact
        # A dot product of n terms errs by at most about n·u relative (u the unit roundoff,
        # every term non-negative); twice that leaves room for the summation order.
        unit = 2.0**-53 if flat.dtype == torch.float64 else 2.0**-24
        return _Factor(float(torch.dot(flat, flat)), 2 * flat.numel() * unit, rows, tensor)

    def with_gram(self) -> _Factor:
        assert self.tensor is not None
        gram = factor_gram(self.tensor, rows=self.rows)
        return _Factor(self.sq_norm, self.rel_error, self.rows, None, gram)

    def exact_gram(self) -> Tensor:
        if self.gram is not None:
            return self.gram
        assert self.tensor is not None
        return factor_gram(self.tensor, rows=self.rows)


@dataclass
class _Waiting:
    factor: str
    value: _Factor
    held_bytes: int

    def pair_member(self) -> tuple[str, _Factor]:
        return self.factor, self.value


# Beyond the dot products' own rounding, what the cheap bound must clear the limit by.
_BOUND_MARGIN = 1e-6


def check_module_norm(
    module: str, b: _Factor, a: _Factor, scale: float, bounds: UpdateBounds
) -> None:
    """‖s·B·A‖_F ≤ max_update_norm, decided as the exact check would decide it.

    ‖BA‖_F ≤ ‖B‖_F·‖A‖_F: when that product (two dot products, no matrix product) is within
    the bound, so is the exact norm. Only otherwise are the Grams formed and the exact
    ‖s·B·A‖_F (:func:`norm_from_grams`) checked, so every verdict is the exact one.
    """
    bound = math.sqrt(max(b.sq_norm, 0.0)) * math.sqrt(max(a.sq_norm, 0.0)) * abs(scale)
    margin = b.rel_error + a.rel_error + _BOUND_MARGIN  # √ halves each, so this is ample
    if margin < 0.5 and math.isfinite(bound) and bound * (1 + margin) <= bounds.max_update_norm:
        return
    norm = norm_from_grams(b.exact_gram(), a.exact_gram(), scale)
    check_update_norm(module, norm, bounds.max_update_norm)


class StreamingUploadCheck:
    """:func:`validate_upload`'s checks, run on a payload while it arrives.

    The header is checked as soon as it is complete: names, dtypes and shapes, so a wrong
    upload is refused at its first chunk. Each tensor is checked as its bytes complete (NaN,
    Inf and magnitude after scaling). Each module's ‖s·B·A‖_F is checked once both of its
    factors are in (:func:`check_module_norm`). Nothing is read back; beyond the chunk in
    hand, at most ``HOLD_BUDGET_BYTES`` of first factors wait for their partners (past that,
    a first factor leaves only its r×r Gram).
    """

    HOLD_BUDGET_BYTES = 16 << 20

    def __init__(
        self,
        schema: AdapterSchema,
        rank: int,
        client_id: str,
        scale: float,
        bounds: UpdateBounds,
        total_bytes: int,
    ) -> None:
        check_compute_dtype(bounds.compute_dtype)
        # The scalar terms validate_update checks (the tensors are checked as they arrive).
        if not client_id:
            raise InvalidUpdateError("client_id", "must be non-empty")
        validate_rank(rank, rank, None)
        if not math.isfinite(scale) or scale <= 0:
            raise InvalidUpdateError("scale", f"must be a positive finite number, got {scale}")
        self.schema, self.rank, self.scale, self.bounds = schema, rank, scale, bounds
        self._splitter = TensorSplitter(total_bytes, max_header_bytes(schema), self._check_layout)
        self._waiting: dict[str, _Waiting] = {}  # modules with one factor in
        self._held = 0
        self.checked_modules = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        try:
            completed = self._splitter.feed(chunk)  # runs _check_layout before any data
        except LayoutError as exc:
            raise InvalidUpdateError("payload", f"not a valid safetensors file: {exc}") from None
        for entry, data in completed:
            self._check_tensor(entry, data)

    def _check_layout(self, layout: Layout) -> None:
        _check_names(((e.name, e.dtype) for e in layout.entries), self.schema)
        # Aligned as every safetensors writer aligns (the header padded to 8, each tensor on
        # its element size): so the aggregation's loader can map each tensor in place.
        if layout.data_start % 8:
            raise InvalidUpdateError("payload", "the data section does not start 8-aligned")
        for e in layout.entries:
            if e.start % ACCEPTED_CODES[e.dtype].itemsize:
                raise InvalidUpdateError(e.name, "the tensor's data is not aligned to its dtype")
        r = self.rank
        found = {e.name: e.shape for e in layout.entries}
        for module, shape in self.schema.modules.items():  # in validate_update's order
            for factor, expected in ((LORA_A, (r, shape.d_in)), (LORA_B, (shape.d_out, r))):
                name = tensor_name(module, factor)
                if found[name] != expected:
                    raise ShapeMismatchError(
                        name, f"shape {found[name]} != expected {expected} for rank {r}"
                    )

    def _check_tensor(self, entry: TensorEntry, data: memoryview) -> None:
        module, factor, _ = split_tensor_name(entry.name)
        tensor = tensor_view(data, ACCEPTED_CODES[entry.dtype], entry.shape)
        multiplier = self.scale if factor == LORA_B else 1.0
        check_factor_magnitude(entry.name, tensor, multiplier, self.bounds.compute_dtype)
        partner = self._waiting.pop(module, None)
        if partner is None:  # the module's first factor: keep what its partner will need
            self._waiting[module] = self._keep(factor, tensor, data)
            return
        first = dict([partner.pair_member(), (factor, _Factor.of(tensor, rows=factor == LORA_A))])
        self._held -= partner.held_bytes
        check_module_norm(module, first[LORA_B], first[LORA_A], self.scale, self.bounds)
        self.checked_modules += 1

    def _keep(self, factor: str, tensor: Tensor, data: memoryview) -> _Waiting:
        """The tensor itself while the budget allows (a view: it keeps the received buffer it
        lies in alive, and its Gram may never be needed), else its Gram now, so what first
        factors leave for their partners stays bounded."""
        rows = factor == LORA_A
        base = data.obj if isinstance(data.obj, (bytes, bytearray)) else data
        held = max(len(base), tensor.nbytes)
        if self._held + held <= self.HOLD_BUDGET_BYTES:
            self._held += held
            return _Waiting(factor, _Factor.of(tensor, rows=rows), held)
        return _Waiting(factor, _Factor.of(tensor, rows=rows).with_gram(), 0)

    def close(self) -> Layout:
        """The layout once every byte is in and every module passed; raises otherwise."""
        try:
            layout = self._splitter.close()
        except LayoutError as exc:
            raise InvalidUpdateError("payload", f"not a valid safetensors file: {exc}") from None
        if self.checked_modules != len(self.schema.modules):  # unreachable after the layout
            raise InvalidUpdateError("payload", "not every module of the schema was checked")
        return layout


def confirm_readable(sink: Any, layout: Layout | None) -> None:
    """Open the received payload as aggregation will (``sink.tensors()``) and check that it
    names the tensors the streaming checks saw: the two parsers agree on what was accepted."""
    if layout is None:
        raise InvalidUpdateError("payload", "the payload was not checked")
    with sink.tensors() as reader:
        found = {(name, reader.dtype_code(name)) for name in reader.keys()}  # noqa: SIM118
    if found != {(e.name, e.dtype) for e in layout.entries}:
        raise InvalidUpdateError("payload", "the safetensors header reads differently")


def tensor_view(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """A read-only tensor over ``data`` (no copy): only ever read, never written."""
    if not len(data):
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def factors_in_payload(
    chunks: Iterable[bytes | memoryview], layout: Layout, schema: AdapterSchema
) -> dict[str, FactorPair]:
    """The factors of a payload the streaming check accepted with ``layout``: one copy of the
    chunks into a buffer of its own, each tensor a (writable) view of it; no parser runs again,
    the layout is the one the check proved (offsets aligned, sizes exact)."""
    buffer = bytearray().join(chunks)
    if len(buffer) != layout.total_bytes:
        raise InvalidUpdateError("payload", "the kept chunks do not add up to the payload")
    data = memoryview(buffer)[layout.data_start :]
    entries = {e.name: e for e in layout.entries}

    def get(name: str) -> Tensor:
        e = entries[name]
        return tensor_view(data[e.start : e.end], ACCEPTED_CODES[e.dtype], e.shape)

    return {
        m: FactorPair(B=get(tensor_name(m, LORA_B)), A=get(tensor_name(m, LORA_A)))
        for m in schema.modules
    }


def read_factors(reader: TensorReader, schema: AdapterSchema) -> dict[str, FactorPair]:
    """Read a validated upload back as raw factors, in the upload's dtype."""
    return {
        m: FactorPair(B=reader.get(tensor_name(m, LORA_B)), A=reader.get(tensor_name(m, LORA_A)))
        for m in schema.modules
    }


def safetensors_size(
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """The size of the file :func:`write_safetensors_to` writes for ``specs``, known before
    any tensor is produced (a pull can announce it while the view is still being built)."""
    order = [(name, _CODE_OF[dtype], tuple(shape)) for name, dtype, shape in specs]
    prefix, layout = encode_header(order, dict(metadata or {}))
    return len(prefix) + (layout.entries[-1].end if layout.entries else 0)


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
    tee: Tee | None = None,
) -> tuple[int, str]:
    """Write a safetensors file from lazily produced tensors; returns (size, sha256 hex)."""
    with path.open("wb") as out:
        return write_safetensors_to(out, specs, tensors, metadata, tee)


def write_safetensors_to(
    out: BinaryIO,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
    tee: Tee | None = None,
) -> tuple[int, str]:
    """Write safetensors to ``out`` from lazily produced tensors; returns (size, sha256 hex).

    ``specs`` fixes the header up front; ``tensors`` must then yield the same names in the
    same order, each produced only when it is written, so at most one tensor is held.
    ``tee`` is handed every byte written, in order, as it is hashed (a view's framed copy).
    """
    order = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
    prefix, _ = encode_header(
        ((name, _CODE_OF[dtype], shape) for name, dtype, shape in order), dict(metadata or {})
    )
    out.write(prefix)
    if tee is not None:
        tee(memoryview(prefix))
    digest = hashlib.sha256(prefix)
    size = len(prefix)
    produced = iter(tensors)
    for name, dtype, shape in order:
        got_name, tensor = next(produced)
        if got_name != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {got_name} does not match its header entry {name}")
        raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        out.write(raw.data)
        digest.update(raw.data)
        if tee is not None:
            tee(raw.data)
        size += raw.nbytes
    out.flush()
    return size, digest.hexdigest()
