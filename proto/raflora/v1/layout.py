"""The safetensors byte layout, written and read in pieces instead of as one copied buffer.

A safetensors payload is an 8-byte little-endian header length N, N bytes of JSON (each
tensor's dtype, shape and [start, end) offsets into the data section), then the data section.
The SDK writes the header and then each tensor's own memory. The server cuts arriving bytes into
tensors as they land and checks each one while the rest is still in flight, with no
``safetensors.save`` copy and no read-back from disk.

Parsing is at least as strict as the safetensors library itself. The header must be a JSON
object starting with ``{``; duplicate or unknown keys are refused; offsets must tile the data
section exactly, in order from 0; each tensor's byte length must equal its element count times
its dtype's size. Every error is a :class:`LayoutError` that says what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Element sizes of the safetensors dtype codes.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
PREFIX_BYTES = 8
METADATA_KEY = "__metadata__"
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class LayoutError(ValueError):
    """The bytes are not a well-formed safetensors payload."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    """A parsed header: the tensors in data order, and where the data section begins."""

    entries: tuple[TensorEntry, ...]
    data_start: int  # 8 + N
    metadata: dict[str, str]

    @property
    def total_bytes(self) -> int:
        return self.data_start + (self.entries[-1].end if self.entries else 0)


def encode_header(
    specs: Iterable[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, Layout]:
    """The prefix and padded JSON header for tensors laid out in the order given."""
    header: dict[str, Any] = {}
    entries = []
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in DTYPE_SIZES:
            raise LayoutError(f"{name}: dtype {dtype} has no safetensors code")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, offset + nbytes))
        offset += nbytes
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-aligned data section, as the format's writers do
    prefix = struct.pack("<Q", len(blob)) + blob
    return prefix, Layout(tuple(entries), len(prefix), dict(metadata or {}))


def header_length(first8: bytes | bytearray | memoryview, total_bytes: int, limit: int) -> int:
    """N from the first 8 bytes, checked against the payload's size and ``limit``."""
    if len(first8) < PREFIX_BYTES:
        raise LayoutError("payload is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(first8[:PREFIX_BYTES]))
    if n > min(limit, MAX_HEADER_BYTES):
        raise LayoutError(
            f"header of {n} bytes exceeds the limit of {min(limit, MAX_HEADER_BYTES)}"
        )
    if PREFIX_BYTES + n > total_bytes:
        raise LayoutError(f"header of {n} bytes runs past the payload's {total_bytes} bytes")
    return int(n)


def _unsigned(text: str) -> int:
    """JSON integers as the format's u64: no sign, at most 2⁶⁴ − 1."""
    if text.startswith("-") or len(text) > 20 or int(text) >= 1 << 64:
        raise LayoutError(f"{text[:40]} is not an unsigned 64-bit integer")
    return int(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise LayoutError("a header key is not valid Unicode (a lone surrogate)") from None
        if key in out:
            raise LayoutError(f"header names {key[:200]!r} twice")
        out[key] = value
    return out


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
    ):
        raise LayoutError(f"{what} must be a list of non-negative integers")
    return value


def _entry(name: str, raw: Any) -> TensorEntry:
    label = name[:200]
    if not isinstance(raw, dict) or set(raw) != _ENTRY_KEYS:
        raise LayoutError(f"{label}: an entry has exactly dtype, shape and data_offsets")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise LayoutError(f"{label}: unknown dtype {str(dtype)[:40]!r}")
    shape = tuple(_int_list(raw["shape"], f"{label}: shape"))
    offsets = _int_list(raw["data_offsets"], f"{label}: data_offsets")
    if len(offsets) != 2 or offsets[1] < offsets[0]:
        raise LayoutError(f"{label}: data_offsets must be [start, end] with end >= start")
    entry = TensorEntry(name, dtype, shape, offsets[0], offsets[1])
    if math.prod(shape) * DTYPE_SIZES[dtype] != entry.nbytes:
        raise LayoutError(
            f"{label}: {entry.nbytes} bytes do not hold shape {list(shape)} of {dtype}"
        )
    return entry


def parse_header(prefix: bytes | bytearray | memoryview, total_bytes: int) -> Layout:
    """The layout of a payload of ``total_bytes`` from its first 8 + N bytes."""
    n = header_length(prefix, total_bytes, MAX_HEADER_BYTES)
    if len(prefix) < PREFIX_BYTES + n:
        raise LayoutError("the header is incomplete")
    blob = bytes(prefix[PREFIX_BYTES : PREFIX_BYTES + n])
    if not blob.startswith(b"{"):
        raise LayoutError("the header does not start with '{'")
    try:
        raw = json.loads(
            blob.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_int=_unsigned
        )
    except LayoutError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise LayoutError(f"the header is not UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise LayoutError("the header is not a JSON object")
    metadata = raw.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LayoutError("__metadata__ must map strings to strings")
    entries = sorted((_entry(name, value) for name, value in raw.items()), key=lambda e: e.start)
    position = 0
    for e in entries:
        if e.start != position:
            raise LayoutError(f"{e.name[:200]}: data starts at {e.start}, expected {position}")
        position = e.end
    data_start = PREFIX_BYTES + n
    if data_start + position != total_bytes:
        raise LayoutError(
            f"the tensors hold {position} bytes but the data section has {total_bytes - data_start}"
        )
    return Layout(tuple(entries), data_start, metadata)


class TensorSplitter:
    """Cuts a payload arriving in chunks into whole tensors, each handed over once complete.

    A tensor that lies inside one chunk is handed over as a view of that chunk (no copy); one
    that spans chunks is gathered into a buffer of its own size. So the splitter holds at most
    the header and one tensor, whatever the payload's size.
    """

    def __init__(
        self,
        total_bytes: int,
        header_limit: int,
        on_layout: Callable[[Layout], None] | None = None,
    ) -> None:
        """``on_layout`` sees the parsed header before any data byte is consumed (and may
        raise): no buffer is sized from a header it has not accepted."""
        self.total_bytes = total_bytes
        self.header_limit = header_limit
        self._on_layout = on_layout
        self.layout: Layout | None = None
        self._prefix = bytearray()
        self._position = 0  # bytes of the payload consumed
        self._index = 0  # the next tensor to complete
        self._partial: bytearray | None = None
        self._filled = 0

    def feed(self, chunk: bytes | memoryview) -> list[tuple[TensorEntry, memoryview]]:
        """Consume ``chunk``; returns the tensors it completed (views valid until the next
        call). Raises LayoutError on the first malformed byte."""
        view = memoryview(chunk).cast("B")
        if self._position + len(view) > self.total_bytes:
            raise LayoutError(f"the payload runs past its declared {self.total_bytes} bytes")
        done: list[tuple[TensorEntry, memoryview]] = []
        if self.layout is None:
            view = self._take_header(view)
            if self.layout is None:
                return done
            done += self._empty_tensors()
        entries = self.layout.entries
        while len(view):
            entry = entries[self._index]
            if self._partial is None and len(view) >= entry.nbytes:  # all of it is here
                piece, view = view[: entry.nbytes], view[entry.nbytes :]
                self._position += entry.nbytes
            else:  # gather it across chunks
                if self._partial is None:
                    self._partial = bytearray(entry.nbytes)
                take = min(entry.nbytes - self._filled, len(view))
                self._partial[self._filled : self._filled + take] = view[:take]
                self._filled += take
                self._position += take
                view = view[take:]
                if self._filled < entry.nbytes:
                    continue
                piece = memoryview(self._partial)
                self._partial, self._filled = None, 0
            done.append((entry, piece))
            self._index += 1
            done += self._empty_tensors()
        return done

    def _take_header(self, view: memoryview) -> memoryview:
        while self.layout is None and len(view):
            want = PREFIX_BYTES
            if len(self._prefix) >= PREFIX_BYTES:
                want += header_length(self._prefix, self.total_bytes, self.header_limit)
            take = min(want - len(self._prefix), len(view))
            self._prefix += view[:take]
            self._position += take
            view = view[take:]
            if len(self._prefix) < PREFIX_BYTES:
                continue
            n = header_length(self._prefix, self.total_bytes, self.header_limit)
            if len(self._prefix) == PREFIX_BYTES + n:
                layout = parse_header(self._prefix, self.total_bytes)
                if self._on_layout is not None:
                    self._on_layout(layout)
                self.layout = layout
                self._prefix = bytearray()
        return view

    def _empty_tensors(self) -> list[tuple[TensorEntry, memoryview]]:
        """Zero-byte tensors are complete as soon as the data before them is."""
        assert self.layout is not None
        out = []
        entries = self.layout.entries
        while self._index < len(entries) and entries[self._index].nbytes == 0:
            out.append((entries[self._index], memoryview(b"")))
            self._index += 1
        return out

    def close(self) -> Layout:
        """The layout, once every byte has arrived; LayoutError if the payload is short."""
        if self.layout is None or self._position != self.total_bytes:
            raise LayoutError(
                f"the payload ended after {self._position} of {self.total_bytes} bytes"
            )
        return self.layout
