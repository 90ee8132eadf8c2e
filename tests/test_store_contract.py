"""One contract, three stores: the filesystem store, the in-memory twin and the S3 store (on a
real SeaweedFS server) behave the same.

The pattern of Flower's linkstate tests: every test takes a ``store`` fixture parametrised over
every implementation, so the runtime unit tests (in-memory) mean what the service (on disk or
in a bucket) does. Damage specific to one backend (bit flips, deleted manifests, leftovers of
a crash) is tested at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from raflora.server.engine import AdapterSchema, GlobalState, LowRank, RankEnergy
from raflora.server.storage import (
    ClientRecord,
    CorruptDataError,
    FederationStore,
    FileFederationStore,
    FileStorage,
    ManifestUpload,
    MemoryStorage,
    ResumeReport,
    RoundManifest,
    Storage,
    UploadRecord,
    UploadSink,
)
from tests.helpers.adapters import factors

MODULES = {"q": (6, 5), "v": (4, 5)}
SCHEMA = AdapterSchema.from_shapes(MODULES)


STORES = ["file", "memory", "s3"]


@pytest.fixture(params=STORES)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return FileStorage(tmp_path / "data")
    if request.param == "memory":
        return MemoryStorage()
    s3: Storage = request.getfixturevalue("s3_storage")  # a real SeaweedFS bucket
    return s3


@pytest.fixture
def store(storage: Storage) -> FederationStore:
    s = storage.federation("fed")
    s.create({"federation_id": "fed"})
    return s


def payload(rank: int = 2, seed: int = 0) -> bytes:
    return save(factors(rank, seed, MODULES))


def receive(
    store: FederationStore, data: bytes, round_: int = 0
) -> tuple[UploadSink, UploadRecord]:
    sink = store.open_upload(round_)
    for start in range(0, len(data), 100):
        sink.write(data[start : start + 100])
    record = UploadRecord(
        "c1", round_, 2, 10, 16.0, 8.0, hashlib.sha256(data).hexdigest(), len(data)
    )
    assert sink.received == len(data)
    return sink, record


def state(round_: int) -> GlobalState:
    g = torch.Generator().manual_seed(round_)
    modules = {
        name: LowRank(
            torch.linalg.qr(torch.randn(d_out, 2, generator=g))[0],
            torch.tensor([2.0, 1.0]),
            torch.linalg.qr(torch.randn(d_in, 2, generator=g))[0],
        )
        for name, (d_out, d_in) in MODULES.items()
    }
    return GlobalState(round_, modules, (2,))


def manifest(round_: int) -> RoundManifest:
    energy = RankEnergy((2,), (1.0,), 0.0, 1.0, 1.8, 5.0)
    return RoundManifest(
        "fed",
        round_,
        "raflora",
        (ManifestUpload("c1", 2, 10, 8.0, "ab" * 32, 1.0),),
        energy,
        ((2, 1, 1.0),),
        (2,),
        time.time(),
    )


def test_clients_are_saved_one_by_one(store: FederationStore) -> None:
    a = ClientRecord("a", 2, 10, 16.0, 8.0)
    b = ClientRecord("b", 4, 5, 16.0, 4.0)
    store.save_client(a)
    store.save_client(b)
    store.save_client(ClientRecord("a", 4, 10, 16.0, 4.0))
    assert store.load_clients() == {"a": ClientRecord("a", 4, 10, 16.0, 4.0), "b": b}


def test_an_upload_is_acknowledged_only_once_committed(store: FederationStore) -> None:
    data = payload()
    sink, record = receive(store, data)
    with sink.tensors() as reader:
        assert sorted(reader.keys()) == sorted(factors(2, 0, MODULES))
    store.commit_upload(sink, record)
    assert store.load_uploads(0, ResumeReport()) == {"c1": record}
    loaded = store.read_upload(record, SCHEMA)
    expected = factors(2, 0, MODULES)
    assert torch.equal(loaded["q"].A, expected["q.lora_A.weight"])
    assert torch.equal(loaded["v"].B, expected["v.lora_B.weight"])


def test_an_aborted_upload_leaves_nothing(store: FederationStore) -> None:
    sink, _ = receive(store, payload())
    assert store.load_uploads(0, ResumeReport()) == {}  # received is not acknowledged
    sink.abort()
    sink.abort()  # idempotent
    assert store.load_uploads(0, ResumeReport()) == {}


def test_a_record_that_lies_about_its_digest_is_refused_on_read(store: FederationStore) -> None:
    data = payload()
    sink, record = receive(store, data)
    store.commit_upload(sink, record)
    forged = dataclasses.replace(record, sha256="0" * 64)
    with pytest.raises(CorruptDataError, match="c1"):
        store.read_upload(forged, SCHEMA)


def test_quarantine_removes_an_upload_from_the_round(store: FederationStore) -> None:
    sink, record = receive(store, payload())
    store.commit_upload(sink, record)
    store.quarantine_upload(record, "test")
    assert store.load_uploads(0, ResumeReport()) == {}


def test_publish_then_load_round_trips_and_is_verified(store: FederationStore) -> None:
    assert store.latest_round(ResumeReport()) == 0
    written = store.publish(state(1), manifest(1))
    assert written.state_bytes > 0 and len(written.state_sha256) == 64
    assert store.latest_round(ResumeReport()) == 1
    loaded, read = store.load_published(1, SCHEMA)
    assert read == written
    for name in MODULES:
        assert torch.allclose(loaded.dense(name), state(1).dense(name), atol=1e-6)
    with pytest.raises(FileNotFoundError):
        store.load_published(2, SCHEMA)


def test_publishing_a_round_twice_keeps_the_first(store: FederationStore) -> None:
    first = store.publish(state(1), manifest(1))
    second = store.publish(state(2).__class__(1, state(2).modules, (2,)), manifest(1))
    assert second.state_sha256 == first.state_sha256


def test_views_are_written_opened_and_pruned(store: FederationStore) -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    view = store.write_view(3, "rank-2", [("x", torch.float32, (2, 3))], iter([("x", t)]), {})
    with store.open_view(view) as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == view.sha256 and len(data) == view.size
    store.prune(4)  # the views of the round before the newest survive (pulls in flight)
    store.open_view(view).close()
    store.prune(5)
    with pytest.raises(FileNotFoundError):
        store.open_view(view)


def test_retention_deletes_one_published_round_and_its_views(store: FederationStore) -> None:
    for t in (1, 2, 3):
        store.publish(state(t), manifest(t))
    x = torch.zeros(2, 3)
    view = store.write_view(2, "rank-2", [("x", torch.float32, (2, 3))], iter([("x", x)]), {})
    assert store.published_rounds() == [1, 2, 3]
    store.delete_round(2)
    store.delete_round(7)  # absent: nothing to do
    assert store.published_rounds() == [1, 3]
    with pytest.raises(FileNotFoundError):
        store.load_published(2, SCHEMA)
    with pytest.raises(FileNotFoundError):
        store.open_view(view)
    assert store.latest_round(ResumeReport()) == 3
    store.load_published(1, SCHEMA)
    store.delete_round(3)  # the store does what it is told; the runtime keeps the newest
    assert store.latest_round(ResumeReport()) == 1


def test_a_deleted_federation_is_gone_and_its_id_free(storage: Storage) -> None:
    for fid in ("a", "b"):
        storage.federation(fid).create({"federation_id": fid})
    storage.federation("a").publish(state(1), manifest(1))
    assert storage.federation_ids() == ["a", "b"]
    assert storage.delete_federation("a") is None
    assert storage.federation_ids() == ["b"]
    with pytest.raises(FileNotFoundError):
        storage.delete_federation("a")
    with pytest.raises(FileNotFoundError):
        storage.delete_federation("never")
    again = storage.federation("a")
    again.create({"federation_id": "a", "again": True})
    assert again.read_config() == {"federation_id": "a", "again": True}
    assert again.latest_round(ResumeReport()) == 0  # nothing of the old one comes back


def test_an_archived_federation_is_out_of_service(storage: Storage) -> None:
    storage.federation("a").create({"federation_id": "a"})
    first = storage.delete_federation("a", archive=True)
    storage.federation("a").create({"federation_id": "a"})
    second = storage.delete_federation("a", archive=True)
    assert first is not None and second is not None and first != second
    assert first.startswith("a-") and second.startswith("a-")
    assert storage.federation_ids() == []


# -- damage on disk (filesystem only) ---------------------------------------------------------
def flip_a_bit(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def fs(tmp_path: Path) -> FileFederationStore:
    s = FileFederationStore(tmp_path / "fed")
    s.create({"federation_id": "fed"})
    return s


def committed(fs: FileFederationStore) -> UploadRecord:
    sink, record = receive(fs, payload())
    fs.commit_upload(sink, record)
    return record


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: flip_a_bit(p),
        lambda p: p.write_bytes(p.read_bytes()[:-7]),
        lambda p: p.unlink(),
    ],
    ids=["bit-flip", "truncated", "deleted"],
)
def test_a_damaged_upload_is_never_read_back(
    fs: FileFederationStore, damage: Callable[[Path], None]
) -> None:
    record = committed(fs)
    damage(fs.uploads / "00000000" / "c1.safetensors")
    with pytest.raises(CorruptDataError, match="'c1'"):
        fs.read_upload(record, SCHEMA)


def test_a_garbage_upload_record_is_quarantined_not_fatal(fs: FileFederationStore) -> None:
    committed(fs)
    (fs.uploads / "00000000" / "c1.json").write_text("{not json")
    report = ResumeReport()
    assert fs.load_uploads(0, report) == {}
    assert len(report.problems) == 1 and "c1.json" in report.problems[0]
    assert any((fs.quarantine / "00000000").iterdir())


def test_a_bit_flip_in_a_published_state_is_detected(fs: FileFederationStore) -> None:
    fs.publish(state(1), manifest(1))
    flip_a_bit(fs.rounds / "00000001" / "state.safetensors")
    with pytest.raises(CorruptDataError, match="round 1"):
        fs.load_published(1, SCHEMA)


def test_a_round_without_its_manifest_is_set_aside_and_republished(fs: FileFederationStore) -> None:
    fs.publish(state(1), manifest(1))
    fs.publish(state(2), manifest(2))
    (fs.rounds / "00000002" / "manifest.json").unlink()
    report = ResumeReport()
    assert fs.latest_round(report) == 1  # a rollback: reported, not silent
    assert len(report.problems) == 1 and "round 2" in report.problems[0]
    # Redoing round 2 writes it afresh (it used to see the old directory and skip it).
    fs.publish(state(2), manifest(2))
    assert fs.latest_round(ResumeReport()) == 2
    fs.load_published(2, SCHEMA)


def test_an_archive_is_a_readable_federation_folder(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    storage.federation("a").create({"federation_id": "a"})
    storage.federation("a").publish(state(1), manifest(1))
    name = storage.delete_federation("a", archive=True)
    assert name is not None
    archived = FileFederationStore(tmp_path / "data" / "archive" / name)
    assert archived.read_config() == {"federation_id": "a"}
    archived.load_published(1, SCHEMA)
    assert not (tmp_path / "data" / "federations" / "a").exists()


def test_an_interrupted_federation_deletion_is_finished_at_start(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    storage.federation("a").create({"federation_id": "a"})
    storage.federation("b").create({"federation_id": "b"})
    # A crash after the tombstone rename, before the folder was removed.
    tomb = storage.federations_dir / ".deleted-a-0123"
    (storage.federations_dir / "a").rename(tomb)
    assert storage.federation_ids() == ["b"]  # never resumed
    FileStorage(tmp_path / "data")  # the next start
    assert not tomb.exists()
    assert sorted(p.name for p in storage.federations_dir.iterdir()) == ["b"]


def test_an_interrupted_round_deletion_is_not_a_round(fs: FileFederationStore) -> None:
    fs.publish(state(1), manifest(1))
    fs.publish(state(2), manifest(2))
    (fs.rounds / "00000001").rename(fs.rounds / ".deleted-00000001-0123")
    assert fs.published_rounds() == [2]
    assert fs.latest_round(ResumeReport()) == 2
    fs.prune(3)  # removes the leftover
    assert sorted(p.name for p in fs.rounds.iterdir()) == ["00000002"]
