"""An in-memory store: the same contract as the filesystem one, for fast unit tests.

Nothing survives the process; "durable" means "kept in this object". Payloads are kept as the
bytes that arrived, so digests, corruption and quarantine behave as on disk.
"""

from __future__ import annotations

import copy
import hashlib
import io
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from torch import Tensor

from raflora.server.engine import AdapterSchema, FactorPair, GlobalState

from .manifest import RoundManifest
from .records import ClientRecord, UploadRecord
from .store import (
    CorruptDataError,
    ResumeReport,
    StoredView,
    TensorSpec,
    UploadSink,
    read_state,
    state_tensors,
)
from .tensorio import Tee, TensorReader, open_bytes, read_factors, write_safetensors_to


class MemoryUploadSink:
    def __init__(self) -> None:
        self.buffer = bytearray()

    @property
    def received(self) -> int:
        return len(self.buffer)

    def write(self, chunk: bytes | memoryview) -> None:
        self.buffer += chunk

    @contextmanager
    def tensors(self) -> Iterator[TensorReader]:
        with open_bytes(bytes(self.buffer)) as reader:
            yield reader

    def abort(self) -> None:
        self.buffer = bytearray()


@dataclass
class _Published:
    state_bytes: bytes
    manifest: RoundManifest


@dataclass
class MemoryFederationStore:
    config: dict[str, Any] | None = None
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    enrolment: dict[str, Any] | None = None
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: dict[int, dict[str, tuple[UploadRecord, bytes]]] = field(default_factory=dict)
    quarantined: list[tuple[UploadRecord, str]] = field(default_factory=list)
    rounds: dict[int, _Published] = field(default_factory=dict)
    views: dict[tuple[int, str], bytes] = field(default_factory=dict)

    def create(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def read_config(self) -> dict[str, Any]:
        if self.config is None:
            raise FileNotFoundError("federation was never created")
        return dict(self.config)

    def load_clients(self) -> dict[str, ClientRecord]:
        return dict(self.clients)

    def save_client(self, record: ClientRecord) -> None:
        self.clients[record.client_id] = record

    def load_enrolment(self) -> dict[str, Any] | None:
        return copy.deepcopy(self.enrolment)

    def save_enrolment(self, record: Mapping[str, Any]) -> None:
        self.enrolment = dict(record)

    def load_client_credentials(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self.credentials)

    def save_client_credential(self, client_id: str, record: Mapping[str, Any]) -> None:
        self.credentials[client_id] = dict(record)

    def open_upload(self, round_: int) -> MemoryUploadSink:
        return MemoryUploadSink()

    def commit_upload(self, sink: UploadSink, record: UploadRecord) -> None:
        if not isinstance(sink, MemoryUploadSink):
            raise TypeError("a MemoryFederationStore commits only its own sinks")
        self.uploads.setdefault(record.round, {})[record.client_id] = (record, bytes(sink.buffer))

    def load_uploads(self, round_: int, report: ResumeReport) -> dict[str, UploadRecord]:
        return {c: r for c, (r, _) in self.uploads.get(round_, {}).items()}

    def read_upload(self, record: UploadRecord, schema: AdapterSchema) -> dict[str, FactorPair]:
        entry = self.uploads.get(record.round, {}).get(record.client_id)
        what = f"upload of {record.client_id!r} for round {record.round}"
        if entry is None:
            raise CorruptDataError(what, "payload is missing")
        data = entry[1]
        if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.sha256:
            raise CorruptDataError(what, "payload does not match its recorded digest")
        with open_bytes(data) as reader:
            return read_factors(reader, schema)

    def quarantine_upload(self, record: UploadRecord, reason: str) -> None:
        self.uploads.get(record.round, {}).pop(record.client_id, None)
        self.quarantined.append((record, reason))

    def latest_round(self, report: ResumeReport) -> int:
        return max(self.rounds, default=0)

    def publish(
        self,
        state: GlobalState,
        manifest: RoundManifest,
        before_commit: Callable[[], None] | None = None,
    ) -> RoundManifest:
        tensors = state_tensors(state)
        out = io.BytesIO()
        size, digest = write_safetensors_to(
            out, [(n, t.dtype, tuple(t.shape)) for n, t in tensors], iter(tensors)
        )
        complete = replace(manifest, state_sha256=digest, state_bytes=size)
        if before_commit is not None:
            before_commit()
        existing = self.rounds.get(state.round)
        if existing is not None:
            return existing.manifest
        self.rounds[state.round] = _Published(out.getvalue(), complete)
        return complete

    def published_rounds(self) -> list[int]:
        return sorted(self.rounds)

    def delete_round(self, round_: int) -> None:
        self.rounds.pop(round_, None)
        for key in [k for k in self.views if k[0] == round_]:
            del self.views[key]

    def read_manifest(self, round_: int) -> RoundManifest:
        if round_ not in self.rounds:
            raise FileNotFoundError(f"round {round_} is not published")
        return self.rounds[round_].manifest

    def load_published(
        self, round_: int, schema: AdapterSchema
    ) -> tuple[GlobalState, RoundManifest]:
        published = self.rounds.get(round_)
        if published is None:
            raise FileNotFoundError(f"round {round_} is not published")
        m = published.manifest
        data = published.state_bytes
        if len(data) != m.state_bytes or hashlib.sha256(data).hexdigest() != m.state_sha256:
            raise CorruptDataError(f"published round {round_}", "state does not match digest")
        with open_bytes(data) as reader:
            modules = read_state(reader, schema)
        return GlobalState(round_, modules, m.participant_ranks), m

    def write_view(
        self,
        round_: int,
        key: str,
        specs: list[TensorSpec],
        tensors: Iterable[tuple[str, Tensor]],
        metadata: Mapping[str, str],
        tee: Tee | None = None,
    ) -> StoredView:
        out = io.BytesIO()
        size, digest = write_safetensors_to(out, specs, tensors, metadata, tee)
        self.views[(round_, key)] = out.getvalue()
        return StoredView(round_, key, size, digest)

    def open_view(self, view: StoredView) -> BinaryIO:
        data = self.views.get((view.round, view.key))
        if data is None:
            raise FileNotFoundError(f"view {view.key} of round {view.round} was pruned")
        return io.BytesIO(data)

    def delete_view(self, view: StoredView) -> None:
        self.views.pop((view.round, view.key), None)

    def prune(self, keep_round: int) -> None:
        for t in [t for t in self.uploads if t < keep_round]:
            del self.uploads[t]
        for key in [k for k in self.views if k[0] < keep_round - 1]:
            del self.views[key]


class MemoryStorage:
    def __init__(self) -> None:
        self.stores: dict[str, MemoryFederationStore] = {}
        self.archive: dict[str, MemoryFederationStore] = {}

    def federation(self, federation_id: str) -> MemoryFederationStore:
        return self.stores.setdefault(federation_id, MemoryFederationStore())

    def federation_ids(self) -> list[str]:
        return sorted(f for f, s in self.stores.items() if s.config is not None)

    def delete_federation(self, federation_id: str, *, archive: bool = False) -> str | None:
        if federation_id not in self.federation_ids():
            raise FileNotFoundError(f"no stored federation {federation_id!r}")
        store = self.stores.pop(federation_id)
        if not archive:
            return None
        stamp = f"{federation_id}-{int(time.time())}"
        name, n = stamp, 1
        while name in self.archive:
            name, n = f"{stamp}.{n}", n + 1
        self.archive[name] = store
        return name
