"""The direct data plane's HTTP half (docs/design.md §5.3): the payload goes to the server's
bucket with the pre-signed POST that BeginDirectPush returned, and comes back with the
pre-signed GET of DirectPull. Standard library only: a training job needs nothing new.

Errors map onto the SDK's own: a bucket that cannot be reached, answers 5xx, or refuses an
expired URL is ``UnavailableError`` (the call is retried: the SDK reuses what it can); any other
refusal is ``FailedPreconditionError`` carrying the bucket's own words.
"""

from __future__ import annotations

import hashlib
import http.client
import uuid
from collections.abc import Generator, Iterator, Sequence
from urllib.parse import urlsplit

from raflora.v1 import aggregation_pb2 as pb

from .errors import FailedPreconditionError, RafloraError, UnavailableError
from .payload import ProgressCallback

_BLOCK = 1 << 20
_MAX_ERROR_BYTES = 2048


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FailedPreconditionError(
            f"url: the server handed out {parts.scheme or 'a schemeless'} URL; want http(s)",
            field="url",
        )
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return kind(parts.hostname, parts.port, timeout=timeout), target


def _refusal(what: str, status: int, body: bytes) -> RafloraError:
    text = body[:_MAX_ERROR_BYTES].decode(errors="replace")
    message = f"url: the bucket refused the {what} with HTTP {status}: {text}"
    if status >= 500 or status in (403, 404, 408, 429):  # busy, or the grant ran out: again
        return UnavailableError(message, field="url")
    return FailedPreconditionError(message, field="url")


def post_payload(
    grant: pb.DirectUpload,
    pieces: Sequence[memoryview],
    total_bytes: int,
    timeout: float,
    progress: ProgressCallback | None = None,
) -> str:
    """POST the payload (``pieces``, in order) as the grant's form; its SHA-256, hashed while
    it was sent."""
    boundary = uuid.uuid4().hex
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in sorted(grant.fields.items())
    )
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="payload"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    digest = hashlib.sha256()

    def body() -> Iterator[bytes | memoryview]:
        yield head
        sent = 0
        for piece in pieces:
            for start in range(0, len(piece), _BLOCK):
                block = piece[start : start + _BLOCK]
                digest.update(block)
                sent += len(block)
                yield block
                if progress is not None:
                    progress(sent, total_bytes)
        yield tail

    connection, target = _connection(grant.url, timeout)
    try:
        connection.request(
            "POST",
            target,
            body=body(),
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + total_bytes + len(tail)),
            },
            encode_chunked=False,
        )
        response = connection.getresponse()
        answer = response.read(_MAX_ERROR_BYTES)
        if response.status >= 300:
            raise _refusal("upload", response.status, answer)
    except (OSError, http.client.HTTPException) as exc:
        raise UnavailableError(f"url: the bucket could not be reached: {exc}", field="url") from exc
    finally:
        connection.close()
    return digest.hexdigest()


def get_payload(
    download: pb.DirectDownload, timeout: float
) -> Generator[pb.PullChunk | memoryview, None, None]:
    """The download as a Pull-shaped stream (its header, then data chunks) for the SDK's
    usual receiver, which checks the size and the digest. Never reads past the declared size."""
    total = download.header.total_bytes
    connection, target = _connection(download.url, timeout)
    try:
        try:
            connection.request("GET", target)
            response = connection.getresponse()
            if response.status != 200:
                raise _refusal("download", response.status, response.read(_MAX_ERROR_BYTES))
            yield pb.PullChunk(header=download.header)
            left = total + 1  # one byte more: a longer object is refused, not truncated
            while left > 0 and (block := response.read(min(_BLOCK, left))):
                left -= len(block)
                yield memoryview(block)
        except (OSError, http.client.HTTPException) as exc:
            raise UnavailableError(
                f"url: the bucket could not be reached: {exc}", field="url"
            ) from exc
    finally:
        connection.close()
