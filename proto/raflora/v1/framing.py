"""Data messages encoded and decoded without the protobuf runtime's copies.

``PushRequest`` and ``PullChunk`` carry payload bytes in field 2 (``bytes data = 2``). A message
that holds only that field is, on the wire, the tag byte 0x12, a varint length and the bytes.
Both ends build such messages directly from their pieces (one join, no intermediate message
object) and read them back as a memoryview of the received buffer. Any other encoding, such as
a header, a trailer, or data with extra or repeated fields, goes through the protobuf parser, so
the accepted language is exactly protobuf's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

DATA_FIELD = 2
_DATA_TAG = bytes([DATA_FIELD << 3 | 2])  # field 2, wire type 2 (length-delimited)
_MAX_VARINT_BYTES = 10


class _Serializable(Protocol):
    def SerializeToString(self) -> bytes: ...


def varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_data(pieces: Sequence[bytes | memoryview]) -> bytes:
    """The wire form of a data-only message whose payload is ``pieces`` concatenated."""
    total = sum(len(p) for p in pieces)
    return b"".join([_DATA_TAG, varint(total), *pieces])


class Framer:
    """Data messages of ``chunk_size`` payload bytes each (the last one shorter) from a byte
    stream fed in pieces: what a pull of the same bytes sends, read ``chunk_size`` at a time.
    A message is joined from the pieces as soon as it is complete; the part of a piece that
    starts the next message is copied before :meth:`feed` returns, so that what is framed is
    what was fed, even if the caller reuses or changes that memory afterwards."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.chunk_size = chunk_size
        self.messages: list[bytes] = []
        self._parts: list[memoryview] = []
        self._room = chunk_size

    def feed(self, piece: memoryview) -> None:
        fresh = 0  # parts of this piece still waiting for their message
        while len(piece):
            part, piece = piece[: self._room], piece[self._room :]
            self._parts.append(part)
            fresh += 1
            self._room -= len(part)
            if self._room == 0:
                self._flush()
                fresh = 0
        for i in range(len(self._parts) - fresh, len(self._parts)):
            self._parts[i] = memoryview(bytes(self._parts[i]))  # less than one message

    def close(self) -> list[bytes]:
        """The messages, the last partial one included."""
        if self._parts:
            self._flush()
        return self.messages

    def _flush(self) -> None:
        self.messages.append(encode_data(self._parts))
        self._parts, self._room = [], self.chunk_size


def data_of(raw: bytes) -> memoryview | None:
    """The payload of ``raw`` if it is exactly one field-2 record; None for any other form."""
    if len(raw) < 2 or raw[0] != _DATA_TAG[0]:
        return None
    length, shift, pos = 0, 0, 1
    while True:
        if pos >= len(raw) or pos > _MAX_VARINT_BYTES:
            return None
        byte = raw[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if pos + length != len(raw):
        return None
    return memoryview(raw)[pos:]


def serializer(message_type: Any) -> Callable[[Any], bytes]:
    """A request/response serializer that sends bytes as they are (an :func:`encode_data`
    message) and serialises any message of ``message_type``."""

    def serialize(value: bytes | _Serializable) -> bytes:
        if isinstance(value, bytes):
            return value
        if not isinstance(value, message_type):
            raise TypeError(f"expected {message_type.__name__} or encoded bytes")
        encoded: bytes = value.SerializeToString()
        return encoded

    return serialize


def data_or_message(message_type: Any) -> Callable[[bytes], Any]:
    """A deserializer: a data-only message as a memoryview of the received bytes, anything
    else parsed as ``message_type`` (which raises on bytes that are not one)."""

    def parse(raw: bytes) -> Any:
        data = data_of(raw)
        if data is not None:
            return data
        return message_type.FromString(raw)

    return parse
