"""Durable federation state on the local filesystem.

Layout under ``<data_dir>/federations/<id>/``::

    federation.json                 the FederationConfig
    clients.json                    joined clients (rewritten atomically)
    rounds/<t>/state.safetensors    published global state t (t >= 1) ...
    rounds/<t>/manifest.json        ... and its manifest; the directory appears atomically
    uploads/<t>/<client>.safetensors + <client>.json
                                    acknowledged uploads for the open round t; the .json,
                                    written last, is the commit point
    views/<t>/...                   cached per-rank pull payloads (disposable)
    enrolment.json                  salted hash of the enrolment secret (auth on; mode 0600)

Every write is file-then-fsync-then-rename-then-fsync-directory, so an acknowledged upload
or a published round survives a crash and a half-written one is never seen. A write that runs
out of space (ENOSPC, EDQUOT) removes its temporaries and raises ResourceExhaustedError
("storage: disk full ..."): nothing already acknowledged is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from raflora.server.engine import FactorPair, GlobalState, LowRank, ModuleState

from .errors import DISK_FULL_ERRNOS, ResourceExhaustedError
from .tensorio import write_safetensors

_ROUND_DIGITS = 8


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def disk_full_is_resource_exhausted(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into the documented RESOURCE_EXHAUSTED; other errors pass through."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise ResourceExhaustedError(
                "storage", f"disk full on the server while {what}"
            ) from None
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with disk_full_is_resource_exhausted(f"writing {path.name}"):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode(), mode)


@dataclass(frozen=True)
class UploadRecord:
    """Metadata of an acknowledged upload (its payload lies beside it)."""

    client_id: str
    round: int
    rank: int
    num_examples: int
    lora_alpha: float
    scale: float
    sha256: str
    size: int


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    rank: int
    num_examples: int
    lora_alpha: float
    scale: float


def _round_name(t: int) -> str:
    return f"{t:0{_ROUND_DIGITS}d}"


class FederationStore:
    """One federation's directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rounds = root / "rounds"
        self.uploads = root / "uploads"
        self.views = root / "views"

    # -- config and clients ----------------------------------------------------------------
    def create(self, config: Mapping[str, Any]) -> None:
        for d in (self.root, self.rounds, self.uploads, self.views):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "federation.json", dict(config))
        fsync_dir(self.root.parent)

    def read_config(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads((self.root / "federation.json").read_text())
        return value

    def save_clients(self, clients: Mapping[str, ClientRecord]) -> None:
        atomic_write_json(self.root / "clients.json", [asdict(c) for c in clients.values()])

    def save_enrolment(self, record: Mapping[str, Any]) -> None:
        atomic_write_json(self.root / "enrolment.json", dict(record), mode=0o600)

    def load_enrolment(self) -> dict[str, Any] | None:
        path = self.root / "enrolment.json"
        if not path.exists():
            return None
        value: dict[str, Any] = json.loads(path.read_text())
        return value

    def load_clients(self) -> dict[str, ClientRecord]:
        path = self.root / "clients.json"
        if not path.exists():
            return {}
        return {c["client_id"]: ClientRecord(**c) for c in json.loads(path.read_text())}

    # -- uploads ---------------------------------------------------------------------------
    def incoming_path(self, round_: int) -> Path:
        """A fresh temporary file for an upload being received (not yet acknowledged)."""
        folder = self.uploads / _round_name(round_)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".incoming-{uuid.uuid4().hex}"

    def upload_path(self, round_: int, client_id: str) -> Path:
        return self.uploads / _round_name(round_) / f"{client_id}.safetensors"

    def commit_upload(self, received: Path, record: UploadRecord) -> Path:
        """Make a received, validated payload durable; after this returns it may be acked."""
        final = self.upload_path(record.round, record.client_id)
        with disk_full_is_resource_exhausted("storing an upload"):
            fsync_file(received)
            os.replace(received, final)
            fsync_dir(final.parent)
        try:
            atomic_write_json(final.with_suffix(".json"), asdict(record))
        except BaseException:  # not committed: the .json is the commit point
            final.unlink(missing_ok=True)
            raise
        return final

    def load_uploads(self, round_: int) -> dict[str, UploadRecord]:
        """Acknowledged uploads of ``round_``; stray temporaries from a crash are removed."""
        folder = self.uploads / _round_name(round_)
        if not folder.exists():
            return {}
        for stray in folder.glob(".incoming-*"):
            stray.unlink(missing_ok=True)
        out = {}
        for meta in sorted(folder.glob("*.json")):
            record = UploadRecord(**json.loads(meta.read_text()))
            if meta.with_suffix(".safetensors").exists():
                out[record.client_id] = record
        return out

    # -- published rounds ------------------------------------------------------------------
    def latest_round(self) -> int:
        done = [
            int(d.name)
            for d in self.rounds.iterdir()
            if d.name.isdigit() and (d / "manifest.json").exists()
        ]
        return max(done, default=0)

    def publish(
        self,
        state: GlobalState,
        manifest: Mapping[str, Any],
        before_commit: Callable[[], None] | None = None,
    ) -> Path:
        """Write state ``state.round`` atomically: a temporary directory renamed into place.

        ``before_commit`` (a test hook) runs once the temporary directory is complete.
        """
        final = self.rounds / _round_name(state.round)
        tmp = self.rounds / f".tmp-{_round_name(state.round)}-{uuid.uuid4().hex}"
        try:
            with disk_full_is_resource_exhausted(f"publishing round {state.round}"):
                tmp.mkdir(parents=True)
                tensors = _state_tensors(state)
                size, digest = write_safetensors(
                    tmp / "state.safetensors",
                    [(n, t.dtype, tuple(t.shape)) for n, t in tensors],
                    iter(tensors),
                )
                fsync_file(tmp / "state.safetensors")
                body = {
                    **manifest,
                    "round": state.round,
                    "participant_ranks": list(state.participant_ranks),
                }
                body.update(state_sha256=digest, state_bytes=size)
                atomic_write_json(tmp / "manifest.json", body)
                fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if before_commit is not None:
            before_commit()
        if final.exists():  # a crash after rename but before cleanup: keep the complete one
            shutil.rmtree(tmp)
            return final
        os.replace(tmp, final)
        fsync_dir(self.rounds)
        return final

    def read_manifest(self, round_: int) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(
            (self.rounds / _round_name(round_) / "manifest.json").read_text()
        )
        return value

    def load_state(self, round_: int, module_names: list[str]) -> GlobalState:
        manifest = self.read_manifest(round_)
        path = self.rounds / _round_name(round_) / "state.safetensors"
        modules: dict[str, ModuleState] = {}
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for name in module_names:
                if f"{name}::U" in keys:
                    modules[name] = LowRank(
                        U=f.get_tensor(f"{name}::U"),
                        S=f.get_tensor(f"{name}::S"),
                        V=f.get_tensor(f"{name}::V"),
                    )
                else:
                    modules[name] = FactorPair(
                        B=f.get_tensor(f"{name}::B"), A=f.get_tensor(f"{name}::A")
                    )
        return GlobalState(
            round=round_,
            modules=modules,
            participant_ranks=tuple(manifest.get("participant_ranks", ())),
        )

    def prune(self, keep_round: int) -> None:
        """Drop uploads and views of rounds before ``keep_round`` (they are aggregated)."""
        for parent in (self.uploads, self.views):
            for d in parent.iterdir():
                if d.name.isdigit() and int(d.name) < keep_round:
                    shutil.rmtree(d, ignore_errors=True)
        for d in self.rounds.glob(".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)

    def view_dir(self, round_: int) -> Path:
        path = self.views / _round_name(round_)
        path.mkdir(parents=True, exist_ok=True)
        return path


def _state_tensors(state: GlobalState) -> list[tuple[str, Tensor]]:
    out: list[tuple[str, Tensor]] = []
    for name, module in state.modules.items():
        if isinstance(module, LowRank):
            parts = {"U": module.U, "S": module.S, "V": module.V}
        else:
            parts = {"B": module.B, "A": module.A}
        for key, tensor in parts.items():
            out.append((f"{name}::{key}", tensor.detach().to("cpu", torch.float32).contiguous()))
    return out


class Storage:
    """All federations under one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.federations_dir = data_dir / "federations"
        self.federations_dir.mkdir(parents=True, exist_ok=True)

    def federation(self, federation_id: str) -> FederationStore:
        return FederationStore(self.federations_dir / federation_id)

    def federation_ids(self) -> list[str]:
        return sorted(
            d.name for d in self.federations_dir.iterdir() if (d / "federation.json").exists()
        )
