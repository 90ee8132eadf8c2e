"""Adapters on the wire as safetensors, with no whole-payload copy at either end.

A push sends the safetensors header and then each tensor's own memory, cut into chunk-sized
data messages and hashed as they go; the digest follows in a trailer. A pull copies each
arriving chunk once, into a buffer of the payload's declared size, and returns tensors that
are views of that buffer. So a client's peak is about one payload, not two or three.

torch is imported inside the functions: the admin CLI uses this SDK without it.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from raflora.v1 import aggregation_pb2 as pb
from raflora.v1.framing import encode_data
from raflora.v1.layout import (
    MAX_HEADER_BYTES,
    PREFIX_BYTES,
    LayoutError,
    encode_header,
    header_length,
    parse_header,
)
from raflora.v1.wire import ErrorReason

from .errors import DataLossError

if TYPE_CHECKING:
    from torch import Tensor

ProgressCallback = Callable[[int, int], None]
_HASH_ASIDE_FROM_BYTES = 4 << 20
_POPULATE_FROM_BYTES = 4 << 20  # smaller buffers come from the allocator's warm pages
_POPULATE_UP_TO_BYTES = 1 << 30


def _codes() -> dict[Any, str]:
    import torch

    return {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }


class PushPayload:
    """The safetensors form of ``tensors``, as a header and views of the tensors' memory."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        import torch

        codes = _codes()
        flat: list[memoryview] = []
        specs = []
        # Widest dtype first, as safetensors' own writer does: every tensor then starts on a
        # multiple of its element size (the server refuses unaligned data).
        ordered = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
        for name, tensor in ordered:
            t = tensor.detach().contiguous().cpu()
            if t.dtype not in codes:
                raise ValueError(f"{name}: dtype {t.dtype} has no safetensors code")
            specs.append((name, codes[t.dtype], tuple(t.shape)))
            flat.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
        self.prefix, self.layout = encode_header(specs)
        self._pieces = [memoryview(self.prefix), *flat]
        self.total_bytes = self.layout.total_bytes

    @property
    def pieces(self) -> list[memoryview]:
        """The payload as its header and each tensor's memory, in order."""
        return list(self._pieces)

    def to_bytes(self) -> bytes:
        """The whole payload in one buffer (what ``messages`` streams; for tools and tests)."""
        return b"".join(self._pieces)

    def messages(
        self, chunk_size: int, progress: ProgressCallback | None = None
    ) -> Iterator[bytes | pb.PushRequest]:
        """Encoded data messages of ``chunk_size`` bytes, then the SHA-256 trailer."""
        digest = hashlib.sha256()
        sent = 0
        parts: list[memoryview] = []
        room = chunk_size
        for piece in self._pieces:
            if parts and len(piece) > room and len(piece) <= chunk_size:
                # A tensor that fits in one message is never cut: the server checks it in
                # place instead of gathering it.
                sent += chunk_size - room
                yield encode_data(parts)
                parts, room = [], chunk_size
                if progress is not None:
                    progress(sent, self.total_bytes)
            while len(piece):
                part, piece = piece[:room], piece[room:]
                digest.update(part)
                parts.append(part)
                room -= len(part)
                if room == 0:
                    sent += chunk_size
                    yield encode_data(parts)
                    parts, room = [], chunk_size
                    if progress is not None:
                        progress(sent, self.total_bytes)
        if parts:
            sent += chunk_size - room
            yield encode_data(parts)
            if progress is not None:
                progress(sent, self.total_bytes)
        yield pb.PushRequest(trailer=pb.PushTrailer(sha256=digest.hexdigest()))


def receive_adapter(
    stream: Iterable[Any], progress: ProgressCallback | None = None
) -> tuple[pb.PullHeader, dict[str, Tensor]]:
    """A Pull-shaped stream (Pull, ExportAdapter): its header and tensors, checked against the
    header's size and SHA-256, which the header carries or a trailer after the data
    (DataLossError otherwise).

    Items are data chunks as memoryviews (the SDK's fast deserializer) or ``PullChunk``
    messages. Each chunk is hashed as it arrives and copied once into the payload's buffer.
    """
    import torch

    header: pb.PullHeader | None = None
    buffer: Any = None
    dest: memoryview | None = None
    digest = hashlib.sha256()
    received = 0
    trailer: str | None = None  # the digest, when it follows the data
    # One worker hashes the buffer's filled regions in order while this thread receives.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="raflora-pull-hash") as hasher:
        for message in stream:
            if isinstance(message, memoryview):
                data = message
            elif (kind := message.WhichOneof("payload")) == "header":
                if header is not None:
                    raise _short("a second header arrived", received)
                header = message.header
                buffer = _allocate(header.total_bytes)
                dest = memoryview(buffer.numpy())
                continue
            elif kind == "trailer":
                if header is None or header.sha256 or trailer is not None:
                    raise _unexpected_trailer(received)
                trailer = message.trailer.sha256
                continue
            else:
                data = memoryview(message.data)
            if dest is None or header is None:
                raise _short("data arrived before the header", received)
            if trailer is not None:
                raise _short("data arrived after the digest trailer", received)
            if received + len(data) > header.total_bytes:
                raise _short(f"more than the declared {header.total_bytes} bytes arrived", received)
            region = dest[received : received + len(data)]
            region[:] = data
            if header.total_bytes >= _HASH_ASIDE_FROM_BYTES:
                hasher.submit(digest.update, region)
            else:  # a small download: a thread hop per chunk costs more than it hides
                digest.update(region)
            received += len(data)
            if progress is not None:
                progress(received, header.total_bytes)
    if header is None or received != header.total_bytes:
        raise _short(f"the stream ended after {received} bytes", received)
    expected = header.sha256 or trailer
    if expected is None:
        raise DataLossError(
            "sha256: the stream ended without the digest its header promised in a trailer",
            reason=ErrorReason.CHECKSUM_MISMATCH,
            field="sha256",
        )
    if digest.hexdigest() != expected:
        raise DataLossError(
            "sha256: the download does not match its checksum",
            reason=ErrorReason.CHECKSUM_MISMATCH,
            field="sha256",
        )
    return header, _tensors_of(buffer, header.total_bytes, torch)


def _unexpected_trailer(received: int) -> DataLossError:
    return DataLossError(
        f"trailer: a digest trailer arrived after {received} bytes where none was due "
        "(before the header, a second one, or the header carried the digest)",
        reason=ErrorReason.CHECKSUM_MISMATCH,
        field="trailer",
    )


def _short(what: str, received: int) -> DataLossError:
    return DataLossError(f"data: {what}", reason=ErrorReason.SIZE_MISMATCH, field="data")


def _allocate(total_bytes: int) -> Any:
    """The download's buffer. A large one is mapped with its pages populated at once (Linux):
    faulting 64 MiB in one call costs about two thirds of touching it page by page as the
    chunks are copied in, and the copy is on the pull's critical path. The tensors returned
    keep the mapping alive (``torch.frombuffer`` holds it) and unmap it when they go. Only up
    to ``_POPULATE_UP_TO_BYTES``: a header that declares more than the client can hold must
    fail as the download arrives (DataLossError), not commit all of it at once."""
    import torch

    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate and _POPULATE_FROM_BYTES <= total_bytes <= _POPULATE_UP_TO_BYTES:
        try:
            mapped = mmap.mmap(
                -1, total_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
            )
            return torch.frombuffer(mapped, dtype=torch.uint8)
        except (OSError, ValueError):
            pass  # fall back to the allocator, which says clearly if it cannot hold it either
    try:
        return torch.empty(total_bytes, dtype=torch.uint8)
    except (RuntimeError, MemoryError):
        raise DataLossError(
            f"total_bytes: cannot hold a download of {total_bytes} bytes",
            reason=ErrorReason.SIZE_MISMATCH,
            field="total_bytes",
        ) from None


def _tensors_of(buffer: Any, total_bytes: int, torch: Any) -> dict[str, Tensor]:
    """The payload's tensors as views of ``buffer`` (a copy only for a misaligned one)."""
    raw = memoryview(buffer.numpy())
    try:
        n = header_length(raw[:PREFIX_BYTES], total_bytes, MAX_HEADER_BYTES)
        layout = parse_header(raw[: PREFIX_BYTES + n], total_bytes)
    except LayoutError as exc:
        raise DataLossError(
            f"payload: not a valid safetensors file: {exc}",
            reason=ErrorReason.CHECKSUM_MISMATCH,
            field="payload",
        ) from None
    dtypes = {code: dtype for dtype, code in _codes().items()}
    out: dict[str, Tensor] = {}
    for e in layout.entries:
        if e.dtype not in dtypes:
            raise DataLossError(
                f"payload: {e.name[:200]} has dtype {e.dtype}, which torch cannot load here",
                reason=ErrorReason.CHECKSUM_MISMATCH,
                field="payload",
            )
        dtype = dtypes[e.dtype]
        start = layout.data_start + e.start
        piece = buffer[start : layout.data_start + e.end]
        if start % dtype.itemsize:  # not on an element boundary: the view needs its own copy
            piece = piece.clone()
        out[e.name] = piece.view(dtype).reshape(e.shape)
    return out
