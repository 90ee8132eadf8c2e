"""Durable federation state in an S3-compatible bucket (issue 13; docs/design.md §5.1).

The same contract as :class:`~raflora.server.storage.store.FileFederationStore`, on a store
that has atomic single-object writes and conditional creates but no rename. Layout under
``<prefix>/federations/<id>/`` (the filesystem layout, minus what needed a rename)::

    federation.json, enrolment.json, clients/<c>.json, credentials/<c>.json
    uploads/<t>/.payload-<uuid>.safetensors   the bytes, multipart-uploaded as they arrive
    uploads/<t>/<client>.json                 {"record": …, "payload": key}: the commit point
    rounds/<t>/state-<sha256>.safetensors     content-addressed, so rewriting it is harmless
    rounds/<t>/manifest.json                  written last with If-None-Match: * (first wins)
    quarantine/<t>/<client>.<stamp>.{json,safetensors,reason.txt}

Pull views stay on the local scratch disk (``data_dir``): they are rebuilt from the published
state on demand, so a replacement server needs nothing of them. Every object read back is
hostile: sizes are bounded, records parsed field by field, keys checked against the layout,
payloads and states hashed against their recorded SHA-256 before anything opens them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from torch import Tensor

from raflora.server.engine import AdapterSchema, FactorPair, GlobalState

from .fs import disk_full_guard
from .manifest import ManifestError, RoundManifest
from .records import ClientRecord, UploadRecord
from .s3_direct import S3DirectPlane
from .store import (
    CorruptDataError,
    FileFederationStore,
    ResumeReport,
    StoredView,
    TensorSpec,
    UploadSink,
    state_tensors,
    verified_state,
)
from .tensorio import (
    Tee,
    TensorReader,
    max_upload_bytes,
    open_file,
    read_factors,
    write_safetensors,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("raflora.server")

_ROUND_DIGITS = 8
_MAX_JSON_BYTES = 16 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PAYLOAD_NAME = re.compile(r"\.payload-[0-9a-f]{32}\.safetensors")
_DOWNLOAD_BLOCK = 1 << 20
# Multipart parts of every upload in flight go up from here, off the intake's writer lane.
_PART_SENDERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="raflora-s3-part")
# A manifest-less round or a record-less payload younger than this may belong to a server that
# is still publishing or committing it (a failover overlap): left alone until then.
ORPHAN_GRACE_SECONDS = 3600.0


def _round_name(t: int) -> str:
    return f"{t:0{_ROUND_DIGITS}d}"


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class BucketError(OSError):
    """The bucket could not be reached or answered with an error (a timeout, a 5xx, access
    denied): transient as far as the rounds layer is concerned, never evidence of damage. An
    OSError, so that a publication failing on it is retried like one failing on a full disk.
    ``refused``: the bucket refused the server itself (credentials, policy, no such bucket),
    which retrying a client's call will not change."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


# Answers that say the server's own access is wrong, not that the bucket is busy.
_REFUSED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "403",
    }
)


class PreconditionFailedError(Exception):
    """A conditional create found the object already there."""


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """botocore's errors as the store's: absent → FileNotFoundError, 412 →
    PreconditionFailedError, anything else from the client or the transport → BucketError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        if code in {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}:
            raise FileNotFoundError(what) from None
        if code in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
            raise PreconditionFailedError(what) from None
        raise BucketError(f"{what}: {exc}", refused=code in _REFUSED_CODES) from exc
    except BotoCoreError as exc:
        raise BucketError(f"{what}: {exc}") from exc


@dataclass(frozen=True)
class Bucket:
    """One bucket and key prefix, with the local scratch folder for spools and views. Every
    call translates botocore's errors (:func:`_translated`). ``presigner`` signs the direct
    data plane's URLs for the endpoint clients reach (``s3_public_endpoint_url``)."""

    client: S3Client
    name: str
    prefix: str
    scratch: Path
    presigner: S3Client

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def get_json(self, key: str) -> Any:
        """A JSON object of bounded size; FileNotFoundError if absent, ValueError if junk."""
        data = self.get_bytes(key, _MAX_JSON_BYTES)
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError(f"{key} nests too deeply to be a record") from None

    def get_bytes(self, key: str, max_bytes: int) -> bytes:
        with _translated(key):
            obj = self.client.get_object(Bucket=self.name, Key=key)
            body = obj["Body"]
            try:
                if obj["ContentLength"] > max_bytes:
                    raise ValueError(f"{key} is larger than {max_bytes} bytes")
                return body.read(max_bytes + 1)
            finally:
                body.close()

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        with _translated(key):
            if create_only:
                self.client.put_object(Bucket=self.name, Key=key, Body=data, IfNoneMatch="*")
            else:
                self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def put_json(self, key: str, value: Any, *, create_only: bool = False) -> None:
        data = json.dumps(value, indent=2, sort_keys=True).encode()
        self.put(key, data, create_only=create_only)

    def upload_file(self, path: Path, key: str) -> None:
        with _translated(key):
            self.client.upload_file(str(path), self.name, key)

    def upload_fileobj(self, source: Any, key: str) -> None:
        with _translated(key):
            self.client.upload_fileobj(source, self.name, key)

    def size(self, key: str) -> int:
        with _translated(key):
            return int(self.client.head_object(Bucket=self.name, Key=key)["ContentLength"])

    def read_blocks(self, key: str, block: int, max_bytes: int) -> Generator[bytes, None, None]:
        """The object's bytes in blocks of ``block``, stopping at the first block past
        ``max_bytes``; a transfer error mid-body is a BucketError like any other."""
        with _translated(key):
            body = self.client.get_object(Bucket=self.name, Key=key)["Body"]
        try:
            read = 0
            while read <= max_bytes:
                with _translated(key):
                    data = body.read(block)
                if not data:
                    return
                read += len(data)
                yield data
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            with _translated(key):
                self.client.head_object(Bucket=self.name, Key=key)
        except FileNotFoundError:
            return False
        return True

    def list_objects(self, prefix: str) -> list[tuple[str, float]]:
        """(key, age in seconds) of every object under ``prefix``."""
        out: list[tuple[str, float]] = []
        now = time.time()
        with _translated(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix
            ):
                out.extend(
                    (obj["Key"], now - obj["LastModified"].timestamp())
                    for obj in page.get("Contents", [])
                )
        return out

    def list_keys(self, prefix: str) -> list[str]:
        return [key for key, _ in self.list_objects(prefix)]

    def list_dirs(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (which ends with ``/``)."""
        out: list[str] = []
        with _translated(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix, Delimiter="/"
            ):
                out.extend(
                    p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
                )
        return out

    def has_objects(self, prefix: str) -> bool:
        """Whether any object lies under ``prefix`` (some stores list emptied folders)."""
        with _translated(prefix):
            page = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix, MaxKeys=1)
        return bool(page.get("Contents"))

    def delete_keys(self, keys: Iterable[str]) -> None:
        batch = list(keys)
        for start in range(0, len(batch), 1000):
            with _translated(batch[start]):
                self.client.delete_objects(
                    Bucket=self.name,
                    Delete={
                        "Objects": [{"Key": k} for k in batch[start : start + 1000]],
                        "Quiet": True,
                    },
                )

    def copy(self, source: str, target: str) -> None:
        with _translated(source):
            self.client.copy({"Bucket": self.name, "Key": source}, self.name, target)

    def abort_multipart(self, prefix: str, older_than: float = 0.0) -> None:
        """Abort the unfinished multipart uploads under ``prefix`` begun more than
        ``older_than`` seconds ago (receives cut short by a crash; a younger one may still be
        streaming on another server during a failover)."""
        now = time.time()
        with _translated(prefix):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.name, Prefix=prefix
            ):
                for upload in page.get("Uploads", []):
                    if now - upload["Initiated"].timestamp() < older_than:
                        continue
                    with suppress(FileNotFoundError), _translated(upload["Key"]):
                        self.client.abort_multipart_upload(
                            Bucket=self.name, Key=upload["Key"], UploadId=upload["UploadId"]
                        )

    def download(self, key: str, path: Path, max_bytes: int) -> tuple[int, str]:
        """Copy an object to a local file, hashing it; refused unless it has at most
        ``max_bytes`` (checked before a byte is read)."""
        digest, size = hashlib.sha256(), 0
        with _translated(key):
            obj = self.client.get_object(Bucket=self.name, Key=key)
            body = obj["Body"]
            try:
                if obj["ContentLength"] > max_bytes:
                    return obj["ContentLength"], "(not read: larger than recorded)"
                with disk_full_guard("reading from the bucket"), path.open("wb") as out:
                    while size <= max_bytes and (block := body.read(_DOWNLOAD_BLOCK)):
                        out.write(block)
                        digest.update(block)
                        size += len(block)
            finally:
                body.close()
        return size, digest.hexdigest()

    @contextmanager
    def spool(self, what: str) -> Iterator[Path]:
        """A scratch file removed afterwards."""
        folder = self.scratch / "spool"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{what}-{uuid.uuid4().hex}"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


class S3UploadSink:
    """An upload spooled to local scratch (where the checks read it back) and sent to the
    bucket as a multipart upload while it arrives; the object appears only at commit.

    Parts go up from a pool of their own, at most ``PARTS_IN_FLIGHT`` at a time per upload,
    while the intake's writer keeps spooling: the bucket's PUTs overlap the receive instead of
    each one holding it up. A part that failed surfaces at the next write or at commit."""

    PART_BYTES = 8 << 20  # S3's smallest part is 5 MiB (the last one excepted)
    SENDS_PARTS = True  # False: the bytes are in the bucket already (S3AdoptedSink)
    PARTS_IN_FLIGHT = 2  # per upload: memory is this many parts, the receive never waits long

    def __init__(self, bucket: Bucket, key: str) -> None:
        self._bucket = bucket
        self.key = key
        folder = bucket.scratch / "spool"
        folder.mkdir(parents=True, exist_ok=True)
        self._path = folder / f"upload-{uuid.uuid4().hex}"
        self._file: BinaryIO | None = self._path.open("w+b")
        self._received = 0
        self._queued = 0  # bytes handed to part uploads
        self._upload_id: str | None = None
        self._in_flight: deque[Future[dict[str, Any]]] = deque()
        self._parts: list[dict[str, Any]] = []
        self._committed = False

    @property
    def received(self) -> int:
        return self._received

    def write(self, chunk: bytes | memoryview) -> None:
        if self._file is None:
            raise ValueError("upload sink is closed")
        with disk_full_guard("receiving an upload"):
            self._file.write(chunk)
        self._received += len(chunk)
        while self.SENDS_PARTS and self._received - self._queued >= self.PART_BYTES:
            self._queue_part(self.PART_BYTES)

    def _queue_part(self, size: int) -> None:
        assert self._file is not None
        self._file.flush()  # the part's bytes are in the file before its thread reads them
        if self._upload_id is None:
            with _translated(self.key):
                created = self._bucket.client.create_multipart_upload(
                    Bucket=self._bucket.name, Key=self.key
                )
            self._upload_id = created["UploadId"]
        while len(self._in_flight) >= self.PARTS_IN_FLIGHT:
            self._parts.append(self._in_flight.popleft().result())  # raises its BucketError
        number = len(self._parts) + len(self._in_flight) + 1
        self._in_flight.append(
            _PART_SENDERS.submit(self._send_part, self._upload_id, number, self._queued, size)
        )
        self._queued += size

    def _send_part(self, upload_id: str, number: int, offset: int, size: int) -> dict[str, Any]:
        assert self._file is not None  # closed only once no part is in flight
        data = os.pread(self._file.fileno(), size, offset)
        with _translated(self.key):
            part = self._bucket.client.upload_part(
                Bucket=self._bucket.name,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
            )
        return {"ETag": part["ETag"], "PartNumber": number}

    def _settle(self) -> None:
        """Wait for every part in flight; the first failure is raised after all are done."""
        error: BaseException | None = None
        while self._in_flight:
            try:
                self._parts.append(self._in_flight.popleft().result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    @contextmanager
    def tensors(self) -> Iterator[TensorReader]:
        if self._file is not None:
            self._file.flush()
        with open_file(self._path) as reader:
            yield reader

    def commit(self) -> None:
        """Make the object exist in the bucket (durable once this returns)."""
        if self._file is None:
            raise ValueError("upload sink is closed")
        client, name = self._bucket.client, self._bucket.name
        if self._upload_id is None:
            self._file.flush()
            self._file.seek(0)
            self._bucket.put(self.key, self._file.read())
        else:
            if self._received > self._queued:
                self._queue_part(self._received - self._queued)
            self._settle()
            with _translated(self.key):
                client.complete_multipart_upload(
                    Bucket=name,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
                )
        self._committed = True
        self._close_spool()

    def _close_spool(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path.unlink(missing_ok=True)

    def abort(self) -> None:
        with suppress(Exception):  # their errors no longer matter; their reads must end
            self._settle()
        self._close_spool()
        if self._upload_id is not None and not self._committed:
            upload_id, self._upload_id = self._upload_id, None
            try:
                with _translated(self.key):
                    self._bucket.client.abort_multipart_upload(
                        Bucket=self._bucket.name, Key=self.key, UploadId=upload_id
                    )
            except (
                OSError,
                PreconditionFailedError,
            ) as exc:  # best effort: resume aborts what is left over
                log.warning("could not abort the multipart upload of %s: %s", self.key, exc)


class S3AdoptedSink(S3UploadSink):
    """A payload already at its key (a direct upload, copied there by
    :meth:`S3DirectPlane.adopt`): the bytes the server reads back from it are only spooled
    for the checks; commit writes nothing, abort deletes the object."""

    SENDS_PARTS = False

    def commit(self) -> None:
        if self._file is None:
            raise ValueError("upload sink is closed")
        self._committed = True
        self._close_spool()

    def abort(self) -> None:
        self._close_spool()
        if not self._committed:
            self._committed = True  # idempotent: deleted once
            try:
                self._bucket.delete_keys([self.key])
            except OSError as exc:  # the prune of the round removes it later
                log.warning("could not delete the direct upload %s: %s", self.key, exc)


class S3FederationStore:
    """One federation's objects under ``<prefix>/federations/<id>/``."""

    def __init__(self, bucket: Bucket, federation_id: str) -> None:
        self.bucket = bucket
        self.id = federation_id
        self.base = bucket.key("federations", federation_id)
        # Views are disposable: kept on the local scratch disk, never in the bucket.
        self._local = FileFederationStore(bucket.scratch / "views" / federation_id)
        # Filled by commits (the intake's threads) and resume, emptied by prune (the
        # aggregation pool): guarded.
        self._payload_keys: dict[tuple[int, str], str] = {}
        self._payload_lock = threading.Lock()
        self.direct = S3DirectPlane(bucket, self.base)

    def _key(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    # -- config, clients, enrolment --------------------------------------------------------
    def create(self, config: Mapping[str, Any]) -> None:
        if not self.bucket.exists(self._key("federation.json")):
            # What an interrupted deletion left behind must not become the new federation's.
            self.bucket.abort_multipart(self.base + "/")
            self.bucket.delete_keys(self.bucket.list_keys(self.base + "/"))
        self.bucket.put_json(self._key("federation.json"), dict(config))

    def read_config(self) -> dict[str, Any]:
        value = self.bucket.get_json(self._key("federation.json"))
        if not isinstance(value, dict):
            raise ValueError("federation.json is not a JSON object")
        return value

    def load_clients(self) -> dict[str, ClientRecord]:
        out: dict[str, ClientRecord] = {}
        for key in sorted(self.bucket.list_keys(self._key("clients") + "/")):
            try:
                record = ClientRecord.from_json(self.bucket.get_json(key))
                if key != self._key("clients", f"{record.client_id}.json"):
                    raise ValueError("record names another client")
            except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
                log.error("federation %s: unreadable client record %s: %s", self.id, key, exc)
                continue
            out[record.client_id] = record
        return out

    def save_client(self, record: ClientRecord) -> None:
        self.bucket.put_json(self._key("clients", f"{record.client_id}.json"), record.to_json())

    def load_enrolment(self) -> dict[str, Any] | None:
        try:
            value = self.bucket.get_json(self._key("enrolment.json"))
        except FileNotFoundError:
            return None
        if not isinstance(value, dict):
            raise ValueError("enrolment.json is not a JSON object")
        return value

    def save_enrolment(self, record: Mapping[str, Any]) -> None:
        self.bucket.put_json(self._key("enrolment.json"), dict(record))

    def load_client_credentials(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        folder = self._key("credentials") + "/"
        for key in sorted(self.bucket.list_keys(folder)):
            name = key[len(folder) :]
            if not name.endswith(".json") or "/" in name:
                continue
            value = self.bucket.get_json(key)
            if isinstance(value, dict):
                out[name[: -len(".json")]] = value
        return out

    def save_client_credential(self, client_id: str, record: Mapping[str, Any]) -> None:
        self.bucket.put_json(self._key("credentials", f"{client_id}.json"), dict(record))

    # -- uploads ---------------------------------------------------------------------------
    def _uploads(self, round_: int) -> str:
        return self._key("uploads", _round_name(round_)) + "/"

    def open_upload(self, round_: int) -> S3UploadSink:
        return S3UploadSink(self.bucket, self._new_payload_key(round_))

    def _new_payload_key(self, round_: int) -> str:
        return f"{self._uploads(round_)}.payload-{uuid.uuid4().hex}.safetensors"

    def adopt_direct_upload(
        self, round_: int, client_id: str, upload_id: str, size: int
    ) -> tuple[S3AdoptedSink, Generator[bytes, None, None]]:
        """A direct upload copied to a payload key of its round, as a sink to check and
        commit, and the copy's bytes to feed it (see :class:`S3DirectPlane`)."""
        key = self._new_payload_key(round_)
        self.direct.adopt(round_, client_id, upload_id, key, size)
        return S3AdoptedSink(self.bucket, key), self.direct.read_blocks(key, size)

    def commit_upload(self, sink: UploadSink, record: UploadRecord) -> None:
        if not isinstance(sink, S3UploadSink):
            raise TypeError("an S3FederationStore commits only its own sinks")
        sink.commit()
        commit = {"record": record.to_json(), "payload": sink.key}
        try:
            self.bucket.put_json(self._uploads(record.round) + f"{record.client_id}.json", commit)
        except BaseException:  # not committed: the record is the commit point
            self.bucket.delete_keys([sink.key])
            raise
        with self._payload_lock:
            self._payload_keys[(record.round, record.client_id)] = sink.key

    def _read_commit(self, key: str, round_: int) -> tuple[UploadRecord, str]:
        raw = self.bucket.get_json(key)
        if not isinstance(raw, dict):
            raise TypeError("upload record is not a JSON object")
        record = UploadRecord.from_json(raw["record"])
        payload = raw["payload"]
        prefix = self._uploads(round_)
        if record.round != round_ or key != f"{prefix}{record.client_id}.json":
            raise ValueError("record names another round or client")
        if not (
            isinstance(payload, str)
            and payload.startswith(prefix)
            and _PAYLOAD_NAME.fullmatch(payload[len(prefix) :])
        ):
            raise ValueError("record names a payload outside its round")
        return record, payload

    def load_uploads(self, round_: int, report: ResumeReport) -> dict[str, UploadRecord]:
        prefix = self._uploads(round_)
        # Receives cut short by a crash. Only old ones: during a failover the server being
        # replaced may still be finishing one (docs/design.md §5.1).
        self.bucket.abort_multipart(prefix, older_than=ORPHAN_GRACE_SECONDS)
        ages = dict(self.bucket.list_objects(prefix))
        keys = set(ages)
        out: dict[str, UploadRecord] = {}
        referenced: set[str] = set()
        for key in sorted(k for k in keys if k.endswith(".json")):
            try:
                record, payload = self._read_commit(key, round_)
            except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
                name = key[len(prefix) :]
                report.problems.append(f"upload record {name} of round {round_}: {exc}")
                self._move_to_quarantine(round_, name[: -len(".json")], [(key, ".json")], str(exc))
                continue
            referenced.add(payload)
            if payload in keys:
                out[record.client_id] = record
                with self._payload_lock:
                    self._payload_keys[(round_, record.client_id)] = payload
        # Payloads whose record was never written were never acknowledged (old ones only, as
        # above; the prune of the round removes the rest).
        self.bucket.delete_keys(
            k
            for k in keys
            if not k.endswith(".json") and k not in referenced and ages[k] > ORPHAN_GRACE_SECONDS
        )
        return out

    def _payload_key(self, record: UploadRecord) -> str:
        with self._payload_lock:
            key = self._payload_keys.get((record.round, record.client_id))
        if key is None:
            commit = self._uploads(record.round) + f"{record.client_id}.json"
            try:
                key = self._read_commit(commit, record.round)[1]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptDataError(
                    f"upload of {record.client_id!r} for round {record.round}",
                    f"record unreadable: {exc}",
                ) from None
        return key

    def read_upload(self, record: UploadRecord, schema: AdapterSchema) -> dict[str, FactorPair]:
        what = f"upload of {record.client_id!r} for round {record.round}"
        try:
            key = self._payload_key(record)
        except FileNotFoundError:
            raise CorruptDataError(what, "upload record is missing") from None
        if record.size > max_upload_bytes(schema, record.rank):
            raise CorruptDataError(what, f"record claims {record.size} bytes, over the bound")
        with self.bucket.spool("read") as path:
            try:
                size, digest = self.bucket.download(key, path, record.size)
            except FileNotFoundError:
                raise CorruptDataError(what, "payload object is missing") from None
            if size != record.size or digest != record.sha256:
                raise CorruptDataError(
                    what,
                    f"{size} bytes hashing to {digest[:12]}…, recorded {record.size} bytes "
                    f"hashing to {record.sha256[:12]}…",
                )
            with open_file(path) as reader:  # tensors own their memory: the spool may go
                return read_factors(reader, schema)

    def quarantine_upload(self, record: UploadRecord, reason: str) -> None:
        commit = self._uploads(record.round) + f"{record.client_id}.json"
        moves = [(commit, ".json")]
        with suppress(FileNotFoundError, CorruptDataError):
            moves.append((self._payload_key(record), ".safetensors"))
        self._move_to_quarantine(record.round, record.client_id, moves, reason)
        with self._payload_lock:
            self._payload_keys.pop((record.round, record.client_id), None)

    def _move_to_quarantine(
        self, round_: int, name: str, moves: list[tuple[str, str]], reason: str
    ) -> None:
        """Copy, then delete: the record first, so that once it is gone the upload is no
        longer acknowledged."""
        folder = self._key("quarantine", _round_name(round_))
        stamp = uuid.uuid4().hex[:8]
        for key, suffix in moves:
            with suppress(FileNotFoundError):
                self.bucket.copy(key, f"{folder}/{name}.{stamp}{suffix}")
            self.bucket.delete_keys([key])
        self.bucket.put(f"{folder}/{name}.{stamp}.reason.txt", (reason + "\n").encode())

    # -- published rounds ------------------------------------------------------------------
    def _round(self, round_: int) -> str:
        return self._key("rounds", _round_name(round_)) + "/"

    def _state_key(self, round_: int, sha256: str) -> str:
        if not _SHA256_HEX.fullmatch(sha256):
            raise ManifestError("state_sha256 is not a SHA-256 hex digest")
        return f"{self._round(round_)}state-{sha256}.safetensors"

    def latest_round(self, report: ResumeReport) -> int:
        """Newest first. A BucketError (timeout, 5xx) propagates: an unreachable round is not
        a damaged one, and resume fails loudly rather than roll a federation back."""
        for t in sorted(self._round_numbers(), reverse=True):
            try:
                self.read_manifest(t)
            except FileNotFoundError:
                # A publication cut short before its commit point, or one a server being
                # replaced is about to commit: not a round; prune removes it once old.
                continue
            except BucketError:
                raise
            except (ManifestError, ValueError, TypeError, KeyError) as exc:
                report.problems.append(f"round {t} is incomplete ({exc}); set aside")
                self._set_aside(t)
                continue
            return t
        return 0

    def _set_aside(self, round_: int) -> None:
        """Move a round whose manifest does not parse to ``rounds/.damaged-<t>-<uuid>/``."""
        prefix = self._round(round_)
        aside = self._key("rounds", f".damaged-{_round_name(round_)}-{uuid.uuid4().hex}")
        keys = self.bucket.list_keys(prefix)
        for key in keys:
            self.bucket.copy(key, f"{aside}/{key[len(prefix) :]}")
        self.bucket.delete_keys([prefix + "manifest.json"])  # the commit point first
        self.bucket.delete_keys(keys)

    def _round_numbers(self) -> list[int]:
        base = self._key("rounds") + "/"
        names = {key[len(base) :].split("/", 1)[0] for key in self.bucket.list_keys(base)}
        return [int(name) for name in names if name.isdigit()]

    def publish(
        self,
        state: GlobalState,
        manifest: RoundManifest,
        before_commit: Callable[[], None] | None = None,
    ) -> RoundManifest:
        with self.bucket.spool("state") as path:
            tensors = state_tensors(state)
            with disk_full_guard(f"publishing round {state.round}"):
                size, digest = write_safetensors(
                    path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors], iter(tensors)
                )
            self.bucket.upload_file(path, self._state_key(state.round, digest))
        complete = replace(manifest, state_sha256=digest, state_bytes=size)
        if before_commit is not None:
            before_commit()
        key = self._round(state.round) + "manifest.json"
        for _ in range(2):
            try:
                self.bucket.put_json(key, complete.to_json(), create_only=True)
            except PreconditionFailedError:
                pass
            else:
                return complete
            try:  # published before (a retry, a failover overlap): the first publication wins
                existing = self.read_manifest(state.round)
            except FileNotFoundError:  # deleted meanwhile (retention): try again
                continue
            except (ManifestError, ValueError, TypeError, KeyError):
                self._set_aside(state.round)  # damaged: set aside, then replace it
                continue
            if existing.state_sha256 != digest and self.bucket.exists(
                self._state_key(state.round, existing.state_sha256)
            ):
                self.bucket.delete_keys([self._state_key(state.round, digest)])
            return existing
        raise BucketError(f"round {state.round}: its manifest could not be written")

    def published_rounds(self) -> list[int]:
        return sorted(self._round_numbers())

    def delete_round(self, round_: int) -> None:
        prefix = self._round(round_)
        self.bucket.delete_keys([prefix + "manifest.json"])  # the commit point first
        self.bucket.delete_keys(self.bucket.list_keys(prefix))
        self._local.delete_round(round_)
        self.direct.delete_round(round_)

    def read_manifest(self, round_: int) -> RoundManifest:
        raw = self.bucket.get_json(self._round(round_) + "manifest.json")
        manifest = RoundManifest.from_json(raw)
        if manifest.round != round_:
            raise ManifestError(f"manifest of round {round_} names round {manifest.round}")
        return manifest

    def load_published(
        self, round_: int, schema: AdapterSchema
    ) -> tuple[GlobalState, RoundManifest]:
        what = f"published round {round_}"
        try:
            manifest = self.read_manifest(round_)
            key = self._state_key(round_, manifest.state_sha256)
        except (FileNotFoundError, BucketError):
            raise
        except (ManifestError, ValueError, TypeError, KeyError) as exc:
            raise CorruptDataError(what, f"manifest unreadable: {exc}") from None
        with self.bucket.spool("state") as path:
            try:
                size, digest = self.bucket.download(key, path, manifest.state_bytes)
            except FileNotFoundError:
                if not self.bucket.exists(self._round(round_) + "manifest.json"):
                    raise  # deleted by retention meanwhile: gone, not damaged
                raise CorruptDataError(what, "state object is missing") from None
            return verified_state(path, size, digest, manifest, schema), manifest

    # -- views (local scratch) -------------------------------------------------------------
    def write_view(
        self,
        round_: int,
        key: str,
        specs: list[TensorSpec],
        tensors: Iterable[tuple[str, Tensor]],
        metadata: Mapping[str, str],
        tee: Tee | None = None,
    ) -> StoredView:
        return self._local.write_view(round_, key, specs, tensors, metadata, tee)

    def open_view(self, view: StoredView) -> BinaryIO:
        return self._local.open_view(view)

    def delete_view(self, view: StoredView) -> None:
        self._local.delete_view(view)

    def prune(self, keep_round: int) -> None:
        """Uploads of rounds before ``keep_round``; multipart uploads and manifest-less rounds
        only once older than ORPHAN_GRACE_SECONDS (a receive of the round just closed may still
        be streaming: a client retrying an acknowledged upload gets its duplicate ack)."""
        base = self._key("uploads") + "/"
        for name in self.bucket.list_dirs(base):
            if name.isdigit() and int(name) < keep_round:
                self.bucket.delete_keys(self.bucket.list_keys(f"{base}{name}/"))
        self.bucket.abort_multipart(base, older_than=ORPHAN_GRACE_SECONDS)
        rounds = self._key("rounds") + "/"
        by_round: dict[str, list[tuple[str, float]]] = {}
        for key, age in self.bucket.list_objects(rounds):
            by_round.setdefault(key[len(rounds) :].split("/", 1)[0], []).append((key, age))
        for name, objects in by_round.items():
            if not name.isdigit() or int(name) >= keep_round:
                continue
            keys = [k for k, _ in objects]
            if f"{rounds}{name}/manifest.json" not in keys and all(
                age > ORPHAN_GRACE_SECONDS for _, age in objects
            ):
                self.bucket.delete_keys(keys)
        with self._payload_lock:
            self._payload_keys = {k: v for k, v in self._payload_keys.items() if k[0] >= keep_round}
        self._local.prune(keep_round)
        self.direct.prune(keep_round)


class S3Storage:
    """All federations of one server under ``<prefix>/federations/``; archives under
    ``<prefix>/archive/<id>-<unix time>/``."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self._federations = bucket.key("federations") + "/"
        bucket.scratch.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(bucket.scratch / "spool", ignore_errors=True)  # a crash's leftovers
        for name in self.bucket.list_dirs(self._federations):
            folder = f"{self._federations}{name}/"
            if not self.bucket.exists(folder + "federation.json") and self.bucket.has_objects(
                folder
            ):
                log.info("removing %s, a federation whose deletion was interrupted", name)
                self.bucket.delete_keys(self.bucket.list_keys(folder))
                self.bucket.abort_multipart(folder)

    def federation(self, federation_id: str) -> S3FederationStore:
        return S3FederationStore(self.bucket, federation_id)

    def federation_ids(self) -> list[str]:
        return sorted(
            name
            for name in self.bucket.list_dirs(self._federations)
            if not name.startswith(".")
            and self.bucket.exists(f"{self._federations}{name}/federation.json")
        )

    def delete_federation(self, federation_id: str, *, archive: bool = False) -> str | None:
        if federation_id not in self.federation_ids():
            raise FileNotFoundError(f"no stored federation {federation_id!r}")
        source = f"{self._federations}{federation_id}/"
        keys = self.bucket.list_keys(source)
        config = source + "federation.json"
        name = None
        if archive:
            stamp = f"{federation_id}-{int(time.time())}"
            name, n = stamp, 1
            archive_dir = self.bucket.key("archive") + "/"
            while self.bucket.list_keys(f"{archive_dir}{name}/"):
                name, n = f"{stamp}.{n}", n + 1
            for key in sorted(keys, key=lambda k: k == config):  # federation.json last
                self.bucket.copy(key, f"{archive_dir}{name}/{key[len(source) :]}")
        self.bucket.delete_keys([config])  # the commit point: no longer resumed
        self.bucket.delete_keys(k for k in keys if k != config)
        self.bucket.abort_multipart(source)
        self._drop_local(federation_id)
        return name

    def _drop_local(self, federation_id: str) -> None:
        shutil.rmtree(self.bucket.scratch / "views" / federation_id, ignore_errors=True)


class BucketUnreachableError(RuntimeError):
    """The configured bucket cannot be used (absent, no access, endpoint down)."""


def connect(
    *,
    bucket: str,
    prefix: str,
    scratch: Path,
    endpoint_url: str | None = None,
    region: str | None = None,
    public_endpoint_url: str | None = None,
) -> S3Storage:
    """An :class:`S3Storage` on a bucket that must already exist. Credentials come from the
    environment or a mounted credentials file (boto3's usual chain), never from settings."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
        ),
    )
    # Signing happens locally: this client never sends a request of its own.
    presigner = boto3.client(
        "s3",
        endpoint_url=public_endpoint_url or endpoint_url,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        raise BucketUnreachableError(
            f"bucket {bucket!r} at {endpoint_url or 'AWS'}: {exc}"
        ) from None
    return S3Storage(Bucket(client, bucket, prefix.strip("/"), scratch, presigner))
