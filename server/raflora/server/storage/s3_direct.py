"""The direct data plane (issue 13, part 2; docs/design.md §5.3): payloads move between a
client and the bucket over pre-signed HTTP, while the server keeps the meaning of an ack.

Keys under the federation's ``<prefix>/federations/<id>/``::

    staging/<t>/<client>/<upload_id>.safetensors   what a client POSTed (it can write here)
    views/<t>/<view key>-<sha256>.safetensors       pull views, content-addressed

An upload is **copied before it is read**: the staged object is copied server-side to a fresh
payload key the client has no URL for, and only that copy is hashed and checked. So a client
that posts again after its commit began cannot change what was checked. The POST policy
accepts exactly the declared size, and the copy's size is checked again (a bucket that ignores
policies still cannot hand the checks a larger object).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .store import StoredView, UploadSink, _round_name

if TYPE_CHECKING:
    from .s3 import Bucket

log = logging.getLogger("raflora.server")

UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_READ_BLOCK = 4 << 20


@dataclass(frozen=True)
class UploadGrant:
    """Where a client POSTs one payload: an S3 POST policy for its own staging key."""

    upload_id: str
    url: str
    fields: dict[str, str]
    expires_unix: float


@dataclass(frozen=True)
class DownloadGrant:
    url: str
    expires_unix: float


class StagedUploadMissingError(FileNotFoundError):
    """No object was posted under the upload id (or it was removed)."""


class StagedSizeError(ValueError):
    """The staged object does not have the declared size."""

    def __init__(self, size: int, expected: int) -> None:
        super().__init__(f"the posted object has {size} bytes, the header declared {expected}")
        self.size = size
        self.expected = expected


class DamagedViewError(ValueError):
    """A local pull view no longer hashes to its digest (it was not published)."""


class DirectStore(Protocol):
    """A federation store with a direct data plane (the S3 store)."""

    @property
    def direct(self) -> S3DirectPlane: ...

    def adopt_direct_upload(
        self, round_: int, client_id: str, upload_id: str, size: int
    ) -> tuple[UploadSink, Generator[bytes, None, None]]: ...


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _HashingReader:
    """A file's bytes as boto3 reads them, hashed on the way."""

    def __init__(self, source: Readable) -> None:
        self._source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        block = self._source.read(n)
        self.digest.update(block)
        self.size += len(block)
        return block


class S3DirectPlane:
    """Grants and adoptions for one federation's direct transfers."""

    def __init__(self, bucket: Bucket, base: str) -> None:
        self.bucket = bucket
        self.base = base
        # (round, key) of the views put into the bucket; guarded: grants run in worker threads.
        self._published_views: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def _key(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def staging_key(self, round_: int, client_id: str, upload_id: str) -> str:
        if not UPLOAD_ID.fullmatch(upload_id):
            raise ValueError("upload_id is not one this server issued (32 hex digits)")
        return self._key("staging", _round_name(round_), client_id, f"{upload_id}.safetensors")

    # -- uploads ---------------------------------------------------------------------------
    def grant_upload(self, round_: int, client_id: str, size: int, ttl: float) -> UploadGrant:
        upload_id = uuid.uuid4().hex
        key = self.staging_key(round_, client_id, upload_id)
        post = self.bucket.presigner.generate_presigned_post(
            self.bucket.name,
            key,
            Conditions=[["content-length-range", size, size]],
            ExpiresIn=int(ttl),
        )
        return UploadGrant(
            upload_id,
            post["url"],
            {k: str(v) for k, v in post["fields"].items()},
            time.time() + ttl,
        )

    def adopt(self, round_: int, client_id: str, upload_id: str, target: str, size: int) -> None:
        """Copy the staged object to ``target`` (a payload key no client can write); the copy
        must have ``size`` bytes. On failure nothing is left at ``target``. The staged object
        stays: the caller drops it once the commit is decided (a bucket that did not answer
        decides nothing, and the client may commit again)."""
        staged = self.staging_key(round_, client_id, upload_id)
        try:
            self.bucket.copy(staged, target)
        except FileNotFoundError:
            raise StagedUploadMissingError(upload_id) from None
        try:
            actual = self.bucket.size(target)
            if actual != size:
                raise StagedSizeError(actual, size)
        except BaseException:
            self._delete_quietly(target)
            raise

    def forget_staged(self, round_: int, client_id: str, upload_id: str) -> None:
        """Drop a staged object that will not be adopted (a duplicate's)."""
        self._delete_quietly(self.staging_key(round_, client_id, upload_id))

    def read_blocks(self, key: str, max_bytes: int) -> Generator[bytes, None, None]:
        """The object's bytes in blocks, stopping at the first block past ``max_bytes`` (the
        ticket refuses it)."""
        return self.bucket.read_blocks(key, _READ_BLOCK, max_bytes)

    def _delete_quietly(self, key: str) -> None:
        try:
            self.bucket.delete_keys([key])
        except OSError as exc:  # the prune of the round removes it later
            log.warning("could not delete %s: %s", key, exc)

    # -- downloads -------------------------------------------------------------------------
    def view_key(self, view: StoredView) -> str:
        return self._key("views", _round_name(view.round), f"{view.key}-{view.sha256}.safetensors")

    def published(self, view: StoredView) -> bool:
        """Known to be in the bucket already (no I/O)."""
        with self._lock:
            return (view.round, self.view_key(view)) in self._published_views

    def sign_download(self, view: StoredView, ttl: float) -> DownloadGrant:
        url = self.bucket.presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket.name, "Key": self.view_key(view)},
            ExpiresIn=int(ttl),
        )
        return DownloadGrant(url, time.time() + ttl)

    def grant_download(self, view: StoredView, source: Readable, ttl: float) -> DownloadGrant:
        """A GET URL of ``view``'s bytes, put into the bucket from ``source`` first unless they
        are there already: the bytes go to a temporary key, hashed on the way, and only bytes
        that match the view's digest are copied to its content-addressed key. A local view
        damaged at rest raises :class:`DamagedViewError` and never reaches that key. Callers
        run one grant per view at a time (rounds/direct.py holds a lock per view)."""
        key = self.view_key(view)
        if not self.published(view) and not self._holds(key, view.size):
            self._publish_view(view, source, key)
        with self._lock:
            self._published_views.add((view.round, key))
        return self.sign_download(view, ttl)

    def _holds(self, key: str, size: int) -> bool:
        """Is an object of ``size`` bytes at ``key``? (Only this plane writes there, and only
        verified bytes; the size check catches an object someone else truncated.)"""
        try:
            return self.bucket.size(key) == size
        except FileNotFoundError:
            return False

    def _publish_view(self, view: StoredView, source: Readable, key: str) -> None:
        staging = self._key("views", _round_name(view.round), f".up-{uuid.uuid4().hex}")
        reader = _HashingReader(source)
        try:
            self.bucket.upload_fileobj(reader, staging)
            if reader.size != view.size or reader.digest.hexdigest() != view.sha256:
                raise DamagedViewError(f"view {view.key} of round {view.round}")
            self.bucket.copy(staging, key)
        finally:
            self._delete_quietly(staging)

    # -- retention -------------------------------------------------------------------------
    def prune(self, keep_round: int) -> None:
        """Staging of rounds before ``keep_round``, views before ``keep_round - 1`` (as the
        local views)."""
        for folder, keep in (("staging", keep_round), ("views", keep_round - 1)):
            base = self._key(folder) + "/"
            for name in self.bucket.list_dirs(base):
                if name.isdigit() and int(name) < keep:
                    self.bucket.delete_keys(self.bucket.list_keys(f"{base}{name}/"))
        with self._lock:
            self._published_views = {v for v in self._published_views if v[0] >= keep_round - 1}

    def delete_round(self, round_: int) -> None:
        prefix = self._key("views", _round_name(round_)) + "/"
        self.bucket.delete_keys(self.bucket.list_keys(prefix))
        with self._lock:
            self._published_views = {v for v in self._published_views if v[0] != round_}
