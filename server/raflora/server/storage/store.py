"""Durable federation state: the store protocol and its filesystem implementation.

The store owns its files end to end: the rounds layer never sees a path. Layout under
``<data_dir>/federations/<id>/``::

    federation.json                 the FederationConfig
    clients/<client>.json           one joined client each (written atomically)
    rounds/<t>/state.safetensors    published global state t (t >= 1) ...
    rounds/<t>/manifest.json        ... and its manifest (written last, inside the temporary
                                    directory; the directory is renamed into place)
    rounds/.deleted-<t>-<uuid>/     a round being deleted (retention): renamed, then removed
    uploads/<t>/<client>.safetensors + <client>.json
                                    acknowledged uploads of the open round t; the .json,
                                    written last, is the commit point
    quarantine/<t>/...              uploads removed from a round: kept for inspection
    views/<t>/...                   cached per-rank pull payloads (disposable)
    enrolment.json                  the federation's enrolment mode and shared-secret hash
    credentials/<client>.json       salted hash of each client's own credential (0600)

Every write is file-then-fsync-then-rename-then-fsync-directory, so an acknowledged upload
or a published round survives a crash and a half-written one is never seen. Deletions go the
other way round: rename out of the way first (``<data_dir>/federations/.deleted-<id>-<uuid>``,
``<data_dir>/archive/<id>-<unix time>``, ``rounds/.deleted-…``), then remove, so a crash
half-way leaves a tombstone that nothing resumes and the next start removes. Every read of an
upload or a published state is checked against its recorded SHA-256 (docs/design.md, "The
storage commit protocol").
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
from torch import Tensor

from raflora.server.engine import AdapterSchema, FactorPair, GlobalState, LowRank, ModuleState

from .fs import (
    atomic_write_json,
    disk_full_guard,
    fsync_dir,
    fsync_file,
    read_json,
    start_writeback,
)
from .manifest import ManifestError, RoundManifest
from .records import ClientRecord, UploadRecord
from .tensorio import Tee, TensorReader, open_file, read_factors, write_safetensors

log = logging.getLogger("raflora.server")

_ROUND_DIGITS = 8
# Tombstones: renamed out of the way, removed next (and at start, after a crash in between).
_DELETED_PREFIX = ".deleted-"
_HASH_BLOCK = 1 << 20
TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]


class CorruptDataError(Exception):
    """Bytes on disk that do not match what was recorded (a bit flip, a truncation, junk)."""

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(f"{what}: {problem}")
        self.what = what
        self.problem = problem


@dataclass(frozen=True)
class StoredView:
    """A pull payload the store holds: name it by ``key`` to open it."""

    round: int
    key: str
    size: int
    sha256: str


@dataclass
class ResumeReport:
    """What the store found wrong, and repaired or set aside, while loading a federation."""

    problems: list[str] = field(default_factory=list)


class UploadSink(Protocol):
    """Where an upload's bytes go while they arrive: counted and written, in order, from one
    thread at a time (the intake hashes and checks them on its own)."""

    @property
    def received(self) -> int: ...

    def write(self, chunk: bytes | memoryview) -> None: ...

    def tensors(self) -> AbstractContextManager[TensorReader]:
        """The received payload as the aggregation will open it."""
        ...

    def abort(self) -> None:
        """Forget the bytes (idempotent; a no-op once committed)."""
        ...


class FederationStore(Protocol):
    """One federation's durable state. Blocking: the rounds layer calls it in threads."""

    def create(self, config: Mapping[str, Any]) -> None: ...

    def read_config(self) -> dict[str, Any]: ...

    def load_clients(self) -> dict[str, ClientRecord]: ...

    def save_client(self, record: ClientRecord) -> None: ...

    def load_enrolment(self) -> dict[str, Any] | None: ...

    def save_enrolment(self, record: Mapping[str, Any]) -> None: ...

    def load_client_credentials(self) -> dict[str, dict[str, Any]]: ...

    def save_client_credential(self, client_id: str, record: Mapping[str, Any]) -> None: ...

    def open_upload(self, round_: int) -> UploadSink: ...

    def commit_upload(self, sink: UploadSink, record: UploadRecord) -> None:
        """Make a received, validated payload durable; after this returns it may be acked."""
        ...

    def load_uploads(self, round_: int, report: ResumeReport) -> dict[str, UploadRecord]:
        """The acknowledged uploads of ``round_``; unreadable records are quarantined."""
        ...

    def read_upload(self, record: UploadRecord, schema: AdapterSchema) -> dict[str, FactorPair]:
        """An acknowledged upload's factors; CorruptDataError unless its digest matches."""
        ...

    def quarantine_upload(self, record: UploadRecord, reason: str) -> None: ...

    def latest_round(self, report: ResumeReport) -> int:
        """The newest round with a complete publication; incomplete ones are removed."""
        ...

    def publish(
        self,
        state: GlobalState,
        manifest: RoundManifest,
        before_commit: Callable[[], None] | None = None,
    ) -> RoundManifest:
        """Write state and manifest atomically; returns the manifest with the state digest."""
        ...

    def read_manifest(self, round_: int) -> RoundManifest: ...

    def published_rounds(self) -> list[int]:
        """The published rounds held, oldest first (complete or not: what retention may drop)."""
        ...

    def delete_round(self, round_: int) -> None:
        """Drop published round ``round_`` and its views (retention); absent: nothing to do.

        Crash-safe: the round is renamed away first, so it is either published or gone."""
        ...

    def load_published(
        self, round_: int, schema: AdapterSchema
    ) -> tuple[GlobalState, RoundManifest]:
        """A published round; CorruptDataError unless the state matches its manifest."""
        ...

    def write_view(
        self,
        round_: int,
        key: str,
        specs: list[TensorSpec],
        tensors: Iterable[tuple[str, Tensor]],
        metadata: Mapping[str, str],
        tee: Tee | None = None,
    ) -> StoredView:
        """Write a pull view; ``tee`` is handed its bytes as they are written and hashed."""
        ...

    def open_view(self, view: StoredView) -> BinaryIO:
        """The view's bytes; FileNotFoundError if it was pruned meanwhile."""
        ...

    def delete_view(self, view: StoredView) -> None: ...

    def prune(self, keep_round: int) -> None:
        """Drop uploads of rounds before ``keep_round`` and views older than the one before."""
        ...


class Storage(Protocol):
    """All federations of one server."""

    def federation(self, federation_id: str) -> FederationStore: ...

    def federation_ids(self) -> list[str]: ...

    def delete_federation(self, federation_id: str, *, archive: bool = False) -> str | None:
        """Delete a federation's stored state, or with ``archive`` set it aside (readable, never
        resumed); returns the archive's name. FileNotFoundError if there is no such federation.

        Crash-safe: one rename takes the federation out of :meth:`federation_ids` first."""
        ...


# -- the filesystem implementation -----------------------------------------------------------
def _round_name(t: int) -> str:
    return f"{t:0{_ROUND_DIGITS}d}"


def file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class FileUploadSink:
    """An upload being received into a temporary file next to its final place.

    Every ``WRITEBACK_EVERY_BYTES`` the kernel is asked to start writing the new part to disk
    (``start_writeback``, which does not wait), so the disk works while the rest still
    arrives and the fsync before the acknowledgement finds little left to write.
    """

    WRITEBACK_EVERY_BYTES = 4 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = path.open("wb")
        self._received = 0
        self._flushed_to = 0
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
            if self._received - self._flushed_to >= self.WRITEBACK_EVERY_BYTES:
                self._file.flush()
                start_writeback(self._file.fileno(), self._flushed_to, self._received)
                self._flushed_to = self._received

    def finish(self) -> None:
        """Flush and fsync the bytes (before validation reads them back and before commit)."""
        if self._file is not None:
            with disk_full_guard("receiving an upload"):
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def move_to(self, final: Path) -> None:
        """Make the bytes durable under ``final`` (fsync, rename, fsync the folder)."""
        self.finish()
        os.replace(self.path, final)
        self._committed = True
        fsync_dir(final.parent)

    @contextmanager
    def tensors(self) -> Iterator[TensorReader]:
        self.finish()
        with open_file(self.path) as reader:
            yield reader

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._committed:
            self.path.unlink(missing_ok=True)


class FileFederationStore:
    """One federation's directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rounds = root / "rounds"
        self.uploads = root / "uploads"
        self.views = root / "views"
        self.clients_dir = root / "clients"
        self.quarantine = root / "quarantine"

    # -- config, clients, enrolment --------------------------------------------------------
    def create(self, config: Mapping[str, Any]) -> None:
        for d in (self.root, self.rounds, self.uploads, self.views, self.clients_dir):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "federation.json", dict(config))
        fsync_dir(self.root.parent)

    def read_config(self) -> dict[str, Any]:
        value = read_json(self.root / "federation.json")
        if not isinstance(value, dict):
            raise ValueError("federation.json is not a JSON object")
        return value

    def load_clients(self) -> dict[str, ClientRecord]:
        out: dict[str, ClientRecord] = {}
        legacy = self.root / "clients.json"  # before one file per client
        if legacy.exists():
            for raw in read_json(legacy):
                record = ClientRecord.from_json(raw)
                out[record.client_id] = record
        if self.clients_dir.exists():
            for path in sorted(self.clients_dir.glob("*.json")):
                try:
                    record = ClientRecord.from_json(read_json(path))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error(
                        "federation %s: unreadable client record %s: %s",
                        self.root.name,
                        path.name,
                        exc,
                    )
                    continue
                out[record.client_id] = record
        return out

    def save_client(self, record: ClientRecord) -> None:
        self.clients_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.clients_dir / f"{record.client_id}.json", record.to_json())

    def load_enrolment(self) -> dict[str, Any] | None:
        path = self.root / "enrolment.json"
        if not path.exists():
            return None
        value = read_json(path)
        if not isinstance(value, dict):
            raise ValueError("enrolment.json is not a JSON object")
        return value

    def save_enrolment(self, record: Mapping[str, Any]) -> None:
        atomic_write_json(self.root / "enrolment.json", dict(record), mode=0o600)

    def load_client_credentials(self) -> dict[str, dict[str, Any]]:
        folder = self.root / "credentials"
        out: dict[str, dict[str, Any]] = {}
        if folder.exists():
            for path in sorted(folder.glob("*.json")):
                value = read_json(path)
                if isinstance(value, dict):
                    out[path.stem] = value
        return out

    def save_client_credential(self, client_id: str, record: Mapping[str, Any]) -> None:
        folder = self.root / "credentials"
        folder.mkdir(mode=0o700, exist_ok=True)
        atomic_write_json(folder / f"{client_id}.json", dict(record), mode=0o600)

    # -- uploads ---------------------------------------------------------------------------
    def _upload_dir(self, round_: int) -> Path:
        return self.uploads / _round_name(round_)

    def _upload_path(self, round_: int, client_id: str) -> Path:
        return self._upload_dir(round_) / f"{client_id}.safetensors"

    def open_upload(self, round_: int) -> FileUploadSink:
        folder = self._upload_dir(round_)
        with disk_full_guard("receiving an upload"):
            folder.mkdir(parents=True, exist_ok=True)
            return FileUploadSink(folder / f".incoming-{uuid.uuid4().hex}")

    def commit_upload(self, sink: UploadSink, record: UploadRecord) -> None:
        if not isinstance(sink, FileUploadSink):
            raise TypeError("a FileFederationStore commits only its own sinks")
        final = self._upload_path(record.round, record.client_id)
        with disk_full_guard("storing an upload"):
            sink.move_to(final)
        try:
            atomic_write_json(final.with_suffix(".json"), record.to_json())
        except BaseException:  # not committed: the .json is the commit point
            final.unlink(missing_ok=True)
            raise

    def load_uploads(self, round_: int, report: ResumeReport) -> dict[str, UploadRecord]:
        folder = self._upload_dir(round_)
        if not folder.exists():
            return {}
        for stray in folder.glob(".incoming-*"):
            stray.unlink(missing_ok=True)
        out: dict[str, UploadRecord] = {}
        for meta in sorted(folder.glob("*.json")):
            payload = meta.with_suffix(".safetensors")
            try:
                record = UploadRecord.from_json(read_json(meta))
                if record.round != round_ or meta.stem != record.client_id:
                    raise ValueError("record names another round or client")
            except (ValueError, KeyError, TypeError) as exc:
                report.problems.append(f"upload record {meta.name} of round {round_}: {exc}")
                self._move_to_quarantine(round_, meta.stem, [meta, payload], str(exc))
                continue
            if payload.exists():
                out[record.client_id] = record
        return out

    def read_upload(self, record: UploadRecord, schema: AdapterSchema) -> dict[str, FactorPair]:
        path = self._upload_path(record.round, record.client_id)
        what = f"upload of {record.client_id!r} for round {record.round} ({path.name})"
        try:
            size, digest = file_digest(path)
        except FileNotFoundError:
            raise CorruptDataError(what, "payload file is missing") from None
        if size != record.size or digest != record.sha256:
            raise CorruptDataError(
                what,
                f"{size} bytes hashing to {digest[:12]}…, recorded {record.size} bytes "
                f"hashing to {record.sha256[:12]}…",
            )
        with open_file(path) as reader:
            return read_factors(reader, schema)

    def quarantine_upload(self, record: UploadRecord, reason: str) -> None:
        path = self._upload_path(record.round, record.client_id)
        self._move_to_quarantine(
            record.round, record.client_id, [path.with_suffix(".json"), path], reason
        )

    def _move_to_quarantine(self, round_: int, name: str, paths: list[Path], reason: str) -> None:
        folder = self.quarantine / _round_name(round_)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = uuid.uuid4().hex[:8]
        for path in paths:  # the .json first: once it is gone the upload is no longer acked
            if path.exists():
                os.replace(path, folder / f"{name}.{stamp}{path.suffix}")
        (folder / f"{name}.{stamp}.reason.txt").write_text(reason + "\n")
        fsync_dir(folder)
        if paths:
            fsync_dir(paths[0].parent)

    # -- published rounds ------------------------------------------------------------------
    def _round_dir(self, round_: int) -> Path:
        return self.rounds / _round_name(round_)

    def latest_round(self, report: ResumeReport) -> int:
        """Newest first, stopping at the first complete round: start-up reads one manifest,
        not all of them (an older damaged round is found when it is read, like any other)."""
        self.rounds.mkdir(parents=True, exist_ok=True)
        for t in sorted(
            (int(d.name) for d in self.rounds.iterdir() if d.name.isdigit()), reverse=True
        ):
            try:
                self.read_manifest(t)
            except (OSError, ManifestError, ValueError) as exc:
                # Renamed into place only once complete, so an incomplete one was damaged on
                # disk; set it aside so that publishing that round again writes it afresh.
                report.problems.append(f"round {t} is incomplete ({exc}); set aside")
                d = self._round_dir(t)
                shutil.move(str(d), str(self.rounds / f".damaged-{d.name}-{uuid.uuid4().hex}"))
                continue
            return t
        return 0

    def publish(
        self,
        state: GlobalState,
        manifest: RoundManifest,
        before_commit: Callable[[], None] | None = None,
    ) -> RoundManifest:
        final = self._round_dir(state.round)
        tmp = self.rounds / f".tmp-{_round_name(state.round)}-{uuid.uuid4().hex}"
        try:
            with disk_full_guard(f"publishing round {state.round}"):
                tmp.mkdir(parents=True)
                tensors = state_tensors(state)
                size, digest = write_safetensors(
                    tmp / "state.safetensors",
                    [(n, t.dtype, tuple(t.shape)) for n, t in tensors],
                    iter(tensors),
                )
                fsync_file(tmp / "state.safetensors")
                complete = replace(manifest, state_sha256=digest, state_bytes=size)
                atomic_write_json(tmp / "manifest.json", complete.to_json())
                fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if before_commit is not None:
            before_commit()
        if final.exists():
            try:  # a crash after rename but before the caller moved on: keep the complete one
                existing = self.read_manifest(state.round)
            except (OSError, ManifestError, ValueError):
                shutil.rmtree(final)  # incomplete: replace it
            else:
                shutil.rmtree(tmp)
                return existing
        os.replace(tmp, final)
        fsync_dir(self.rounds)
        return complete

    def published_rounds(self) -> list[int]:
        if not self.rounds.exists():
            return []
        return sorted(int(d.name) for d in self.rounds.iterdir() if d.name.isdigit())

    def delete_round(self, round_: int) -> None:
        final = self._round_dir(round_)
        tomb = self.rounds / f"{_DELETED_PREFIX}{final.name}-{uuid.uuid4().hex}"
        try:
            os.replace(final, tomb)
        except FileNotFoundError:
            pass
        else:
            fsync_dir(self.rounds)
            shutil.rmtree(tomb, ignore_errors=True)
        shutil.rmtree(self.views / _round_name(round_), ignore_errors=True)

    def read_manifest(self, round_: int) -> RoundManifest:
        manifest = RoundManifest.from_json(read_json(self._round_dir(round_) / "manifest.json"))
        if manifest.round != round_:
            raise ManifestError(f"manifest of round {round_} names round {manifest.round}")
        return manifest

    def load_published(
        self, round_: int, schema: AdapterSchema
    ) -> tuple[GlobalState, RoundManifest]:
        what = f"published round {round_}"
        try:
            manifest = self.read_manifest(round_)
        except FileNotFoundError:
            raise
        except (OSError, ManifestError, ValueError) as exc:
            raise CorruptDataError(what, f"manifest unreadable: {exc}") from None
        path = self._round_dir(round_) / "state.safetensors"
        try:
            size, digest = file_digest(path)
        except FileNotFoundError:
            raise CorruptDataError(what, "state file is missing") from None
        return verified_state(path, size, digest, manifest, schema), manifest

    # -- views -----------------------------------------------------------------------------
    def write_view(
        self,
        round_: int,
        key: str,
        specs: list[TensorSpec],
        tensors: Iterable[tuple[str, Tensor]],
        metadata: Mapping[str, str],
        tee: Tee | None = None,
    ) -> StoredView:
        folder = self.views / _round_name(round_)
        path = folder / f"{key}.safetensors"
        tmp = folder / f".{key}.{uuid.uuid4().hex}.tmp"
        try:
            with disk_full_guard("building a pull view"):
                folder.mkdir(parents=True, exist_ok=True)
                size, digest = write_safetensors(tmp, specs, tensors, metadata, tee)
                tmp.replace(path)
        except FileExistsError:  # mkdir raced a prune removing the folder: pruned meanwhile
            tmp.unlink(missing_ok=True)
            raise FileNotFoundError(f"views of round {round_} were pruned meanwhile") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredView(round_, key, size, digest)

    def open_view(self, view: StoredView) -> BinaryIO:
        return self._view_path(view).open("rb")

    def delete_view(self, view: StoredView) -> None:
        self._view_path(view).unlink(missing_ok=True)

    def _view_path(self, view: StoredView) -> Path:
        return self.views / _round_name(view.round) / f"{view.key}.safetensors"

    def prune(self, keep_round: int) -> None:
        for parent, keep in ((self.uploads, keep_round), (self.views, keep_round - 1)):
            if not parent.exists():
                continue
            for d in parent.iterdir():
                if d.name.isdigit() and int(d.name) < keep:
                    shutil.rmtree(d, ignore_errors=True)
        for pattern in (".tmp-*", f"{_DELETED_PREFIX}*"):
            for d in self.rounds.glob(pattern):
                shutil.rmtree(d, ignore_errors=True)


def state_tensors(state: GlobalState) -> list[tuple[str, Tensor]]:
    out: list[tuple[str, Tensor]] = []
    for name, module in state.modules.items():
        if isinstance(module, LowRank):
            parts = {"U": module.U, "S": module.S, "V": module.V}
        else:
            parts = {"B": module.B, "A": module.A}
        for key, tensor in parts.items():
            out.append((f"{name}::{key}", tensor.detach().to("cpu", torch.float32).contiguous()))
    return out


def verified_state(
    path: Path, size: int, digest: str, manifest: RoundManifest, schema: AdapterSchema
) -> GlobalState:
    """The published state in ``path`` (of ``size`` bytes hashing to ``digest``), once they
    match its manifest; CorruptDataError otherwise. Every store's load_published ends here."""
    what = f"published round {manifest.round}"
    if size != manifest.state_bytes or digest != manifest.state_sha256:
        raise CorruptDataError(what, "state does not match the digest in its manifest")
    try:
        with open_file(path) as reader:
            modules = read_state(reader, schema)
    except (ValueError, KeyError) as exc:
        raise CorruptDataError(what, f"state unreadable: {exc}") from None
    return GlobalState(manifest.round, modules, manifest.participant_ranks)


def read_state(reader: TensorReader, schema: AdapterSchema) -> dict[str, ModuleState]:
    keys = set(reader.keys())
    modules: dict[str, ModuleState] = {}
    for name in schema.modules:
        if f"{name}::U" in keys:
            modules[name] = LowRank(
                U=reader.get(f"{name}::U"), S=reader.get(f"{name}::S"), V=reader.get(f"{name}::V")
            )
        elif f"{name}::B" in keys:
            modules[name] = FactorPair(B=reader.get(f"{name}::B"), A=reader.get(f"{name}::A"))
        else:
            raise KeyError(f"module {name!r} is missing from the state")
    return modules


class FileStorage:
    """All federations under one data directory; deleted ones go to ``archive/`` or away."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.federations_dir = data_dir / "federations"
        self.archive_dir = data_dir / "archive"
        self.federations_dir.mkdir(parents=True, exist_ok=True)
        for tomb in self.federations_dir.glob(f"{_DELETED_PREFIX}*"):  # a deletion cut short
            log.info("removing %s, a federation whose deletion was interrupted", tomb.name)
            shutil.rmtree(tomb, ignore_errors=True)

    def federation(self, federation_id: str) -> FileFederationStore:
        return FileFederationStore(self.federations_dir / federation_id)

    def federation_ids(self) -> list[str]:
        # Ids start with a letter or digit: a dot-name is a tombstone, never a federation.
        return sorted(
            d.name
            for d in self.federations_dir.iterdir()
            if not d.name.startswith(".") and (d / "federation.json").exists()
        )

    def delete_federation(self, federation_id: str, *, archive: bool = False) -> str | None:
        if federation_id not in self.federation_ids():  # also keeps the id a plain name
            raise FileNotFoundError(f"no stored federation {federation_id!r}")
        source = self.federations_dir / federation_id
        if archive:
            self.archive_dir.mkdir(exist_ok=True)
            stamp = f"{federation_id}-{int(time.time())}"
            name, n = stamp, 1
            while (self.archive_dir / name).exists():  # deleted twice within a second
                name, n = f"{stamp}.{n}", n + 1
            os.rename(source, self.archive_dir / name)  # the commit point: no longer resumed
            fsync_dir(self.federations_dir)
            fsync_dir(self.archive_dir)
            return name
        tomb = self.federations_dir / f"{_DELETED_PREFIX}{federation_id}-{uuid.uuid4().hex}"
        os.rename(source, tomb)  # the commit point: no longer resumed, removed at next start
        fsync_dir(self.federations_dir)
        shutil.rmtree(tomb, ignore_errors=True)
        return None
