"""The S3 store against damage and crash leftovers in a real SeaweedFS bucket.

The shared contract runs in tests/test_store_contract.py; here the bucket's objects are
changed behind the store's back, as a crash, a bit flip or someone with write access to the
bucket would, and every object read back must be checked before it is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from safetensors.torch import save

from raflora.server.engine import AdapterSchema
from raflora.server.storage import CorruptDataError, ResumeReport, UploadRecord
from raflora.server.storage.s3 import BucketError, S3FederationStore, S3Storage
from raflora.server.testing_s3 import SeaweedFS
from tests.helpers.adapters import factors
from tests.test_store_contract import SCHEMA, manifest, payload, receive, state

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@pytest.fixture
def fed(s3_storage: S3Storage) -> S3FederationStore:
    store = s3_storage.federation("fed")
    store.create({"federation_id": "fed"})
    return store


@pytest.fixture
def raw(seaweed: SeaweedFS) -> S3Client:
    return seaweed.client()


def keys(store: S3FederationStore, under: str) -> list[str]:
    return sorted(store.bucket.list_keys(f"{store.base}/{under}"))


def get(raw: S3Client, store: S3FederationStore, key: str) -> bytes:
    return raw.get_object(Bucket=store.bucket.name, Key=key)["Body"].read()


def put(raw: S3Client, store: S3FederationStore, key: str, data: bytes) -> None:
    raw.put_object(Bucket=store.bucket.name, Key=key, Body=data)


def committed(store: S3FederationStore, data: bytes | None = None) -> UploadRecord:
    sink, record = receive(store, data if data is not None else payload())
    store.commit_upload(sink, record)
    return record


def payload_key(store: S3FederationStore) -> str:
    (key,) = [k for k in keys(store, "uploads/00000000/") if k.endswith(".safetensors")]
    return key


@pytest.mark.parametrize("damage", ["bit-flip", "truncated", "deleted"])
def test_a_damaged_upload_object_is_never_read_back(
    fed: S3FederationStore, raw: S3Client, damage: str
) -> None:
    record = committed(fed)
    key = payload_key(fed)
    data = bytearray(get(raw, fed, key))
    if damage == "bit-flip":
        data[len(data) // 2] ^= 0x10
        put(raw, fed, key, bytes(data))
    elif damage == "truncated":
        put(raw, fed, key, bytes(data[:-7]))
    else:
        raw.delete_object(Bucket=fed.bucket.name, Key=key)
    with pytest.raises(CorruptDataError, match="'c1'"):
        fed.read_upload(record, SCHEMA)


def test_a_larger_upload_goes_up_in_parts_and_reads_back(fed: S3FederationStore) -> None:
    modules = {"q": (8192, 256)}
    big = save(factors(256, 0, modules))  # 8.6 MiB: one 5 MiB part (S3's smallest), the tail
    sink = fed.open_upload(0)
    sink.PART_BYTES = 5 << 20
    for start in range(0, len(big), 1 << 20):
        sink.write(big[start : start + (1 << 20)])
    record = UploadRecord("c1", 0, 256, 10, 16.0, 8.0, hashlib.sha256(big).hexdigest(), len(big))
    fed.commit_upload(sink, record)
    fresh = S3Storage(fed.bucket).federation("fed")  # no cached payload key: reads the record
    assert fresh.load_uploads(0, ResumeReport()) == {"c1": record}
    loaded = (
        S3Storage(fed.bucket)
        .federation("fed")
        .read_upload(record, AdapterSchema.from_shapes(modules))
    )
    assert torch.equal(loaded["q"].B, factors(256, 0, modules)["q.lora_B.weight"])


def test_a_part_failing_in_the_background_fails_the_upload_and_leaves_nothing(
    fed: S3FederationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts go up while the writer spools on; one the bucket refuses (a 500) surfaces at a
    later write or at commit as a BucketError, and abort leaves no multipart upload behind."""
    from botocore.exceptions import ClientError

    sink = fed.open_upload(0)
    sink.PART_BYTES = 5 << 20
    real = fed.bucket.client.upload_part
    numbers: list[int] = []

    def flaky(**kwargs: Any) -> Any:
        numbers.append(kwargs["PartNumber"])
        if kwargs["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "InternalError"}}, "UploadPart")
        return real(**kwargs)

    monkeypatch.setattr(fed.bucket.client, "upload_part", flaky)
    with pytest.raises(BucketError, match="InternalError"):
        for _ in range(16):
            sink.write(b"\1" * (1 << 20))
        sink.commit()
    sink.abort()
    assert 2 in numbers
    listing = fed.bucket.client.list_multipart_uploads(
        Bucket=fed.bucket.name, Prefix=f"{fed.base}/uploads/"
    )
    assert not listing.get("Uploads")
    assert keys(fed, "uploads/") == []


def test_a_garbage_upload_record_is_quarantined_not_fatal(
    fed: S3FederationStore, raw: S3Client
) -> None:
    committed(fed)
    put(raw, fed, f"{fed.base}/uploads/00000000/c1.json", b"{not json")
    report = ResumeReport()
    assert fed.load_uploads(0, report) == {}
    assert len(report.problems) == 1 and "c1.json" in report.problems[0]
    assert any(k.endswith(".reason.txt") for k in keys(fed, "quarantine/00000000/"))


def test_a_record_naming_another_federations_payload_is_refused(
    s3_storage: S3Storage, fed: S3FederationStore, raw: S3Client
) -> None:
    """Someone with write access points fed's record at a payload of federation "other"."""
    other = s3_storage.federation("other")
    other.create({"federation_id": "other"})
    committed(other, payload(seed=5))
    committed(fed)
    record_key = f"{fed.base}/uploads/00000000/c1.json"
    commit = json.loads(get(raw, fed, record_key))
    commit["payload"] = payload_key(other)
    put(raw, fed, record_key, json.dumps(commit).encode())
    report = ResumeReport()
    assert S3Storage(fed.bucket).federation("fed").load_uploads(0, report) == {}
    assert "outside its round" in report.problems[0]
    assert other.load_uploads(0, ResumeReport()) != {}  # the other federation keeps its own


def test_a_receive_cut_by_a_crash_leaves_nothing_after_resume(
    fed: S3FederationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multipart upload begun but never completed, and a payload whose record was never
    written (a crash between the two), are not uploads: resume removes both."""
    cut = fed.open_upload(0)
    cut.PART_BYTES = 5 << 20
    cut.write(b"\0" * (6 << 20))  # one part sent, then the process dies
    orphan = fed.open_upload(0)
    orphan.write(payload())
    orphan.commit()  # the object exists, its record does not
    listing = fed.bucket.client.list_multipart_uploads(
        Bucket=fed.bucket.name, Prefix=f"{fed.base}/uploads/"
    )
    assert listing.get("Uploads")
    young = S3Storage(fed.bucket).federation("fed")
    assert young.load_uploads(0, ResumeReport()) == {}
    assert len(keys(fed, "uploads/")) == 1  # young: perhaps another server's, left alone
    monkeypatch.setattr("raflora.server.storage.s3.ORPHAN_GRACE_SECONDS", -1.0)
    assert S3Storage(fed.bucket).federation("fed").load_uploads(0, ResumeReport()) == {}
    listing = fed.bucket.client.list_multipart_uploads(
        Bucket=fed.bucket.name, Prefix=f"{fed.base}/uploads/"
    )
    assert not listing.get("Uploads")
    assert keys(fed, "uploads/") == []


def test_a_bit_flip_in_a_published_state_is_detected(fed: S3FederationStore, raw: S3Client) -> None:
    fed.publish(state(1), manifest(1))
    (key,) = [k for k in keys(fed, "rounds/00000001/") if "/state-" in k]
    data = bytearray(get(raw, fed, key))
    data[-3] ^= 0x01
    put(raw, fed, key, bytes(data))
    with pytest.raises(CorruptDataError, match="round 1"):
        fed.load_published(1, SCHEMA)


def test_a_manifest_naming_a_state_outside_the_layout_is_refused(
    fed: S3FederationStore, raw: S3Client
) -> None:
    fed.publish(state(1), manifest(1))
    key = f"{fed.base}/rounds/00000001/manifest.json"
    raw_manifest = json.loads(get(raw, fed, key))
    raw_manifest["state_sha256"] = "../../other/rounds/00000001/state"
    put(raw, fed, key, json.dumps(raw_manifest).encode())
    with pytest.raises(CorruptDataError, match="SHA-256"):
        fed.load_published(1, SCHEMA)


def test_a_publication_cut_before_its_manifest_is_not_a_round(fed: S3FederationStore) -> None:
    fed.publish(state(1), manifest(1))

    def crash() -> None:
        raise KeyboardInterrupt  # the process dies after the state went up

    with pytest.raises(KeyboardInterrupt):
        fed.publish(state(2), manifest(2), before_commit=crash)
    assert fed.latest_round(ResumeReport()) == 1
    # The orphan state stays while young (a server being replaced may be about to commit it);
    # prune removes it once it is older than the grace period.
    assert len(keys(fed, "rounds/00000002/")) == 1
    fed.publish(state(2), manifest(2))
    assert fed.latest_round(ResumeReport()) == 2
    fed.load_published(2, SCHEMA)


def test_a_damaged_manifest_is_set_aside_and_republished(
    fed: S3FederationStore, raw: S3Client
) -> None:
    fed.publish(state(1), manifest(1))
    fed.publish(state(2), manifest(2))
    put(raw, fed, f"{fed.base}/rounds/00000002/manifest.json", b"\x00junk")
    report = ResumeReport()
    assert fed.latest_round(report) == 1  # a rollback: reported, not silent
    assert len(report.problems) == 1 and "round 2" in report.problems[0]
    assert any("/rounds/.damaged-00000002-" in k for k in keys(fed, "rounds/"))
    fed.publish(state(2), manifest(2))
    assert fed.latest_round(ResumeReport()) == 2


def test_the_first_publication_of_a_round_wins(fed: S3FederationStore) -> None:
    """Two servers (a failover that overlapped) publish round 1 with different states: the
    manifest's conditional create lets exactly one in, and both return that one."""
    first = fed.publish(state(1), manifest(1))
    other = state(7)
    second = fed.publish(type(other)(1, other.modules, other.participant_ranks), manifest(1))
    assert second.state_sha256 == first.state_sha256
    assert len([k for k in keys(fed, "rounds/00000001/") if "/state-" in k]) == 1


def test_an_interrupted_federation_deletion_is_finished_at_start(
    s3_storage: S3Storage, raw: S3Client
) -> None:
    a, b = s3_storage.federation("a"), s3_storage.federation("b")
    a.create({"federation_id": "a"})
    b.create({"federation_id": "b"})
    a.publish(state(1), manifest(1))
    # A crash after the commit point (federation.json deleted), before the rest went.
    raw.delete_object(Bucket=a.bucket.name, Key=f"{a.base}/federation.json")
    assert s3_storage.federation_ids() == ["b"]  # never resumed
    S3Storage(s3_storage.bucket)  # the next start
    assert keys(a, "") == []
    # A new federation of the same id starts empty, not with the old rounds.
    a.create({"federation_id": "a"})
    assert a.published_rounds() == []


def test_a_replacement_server_with_an_empty_disk_reads_everything(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    fed = s3_storage.federation("fed")
    fed.create({"federation_id": "fed"})
    record = committed(fed)
    fed.publish(state(1), manifest(1))
    fresh = S3Storage(dataclasses.replace(s3_storage.bucket, scratch=tmp_path / "new-disk"))
    store = fresh.federation("fed")
    assert fresh.federation_ids() == ["fed"]
    assert store.read_config() == {"federation_id": "fed"}
    assert store.latest_round(ResumeReport()) == 1
    store.load_published(1, SCHEMA)
    assert store.load_uploads(0, ResumeReport()) == {"c1": record}
    store.read_upload(record, SCHEMA)


class FlakyClient:
    """The real client, except that GETs time out (a slow or partitioned bucket)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        if name == "get_object":

            def timeout(**_: Any) -> Any:
                from botocore.exceptions import ReadTimeoutError

                raise ReadTimeoutError(endpoint_url="http://bucket")

            return timeout
        return getattr(self._real, name)


def test_a_timeout_is_not_damage_and_deletes_nothing(fed: S3FederationStore) -> None:
    """A bucket that times out at start must not roll the federation back: the error
    propagates as transient (an OSError, retried by the rounds layer) and every round stays."""
    fed.publish(state(1), manifest(1))
    fed.publish(state(2), manifest(2))
    before = keys(fed, "rounds/")
    flaky_client: Any = FlakyClient(fed.bucket.client)
    flaky = S3Storage(dataclasses.replace(fed.bucket, client=flaky_client))
    store = flaky.federation("fed")
    with pytest.raises(BucketError):
        store.latest_round(ResumeReport())
    with pytest.raises(BucketError):
        store.load_published(2, SCHEMA)
    with pytest.raises(BucketError):  # a retried publication must not replace the winner
        store.publish(state(2), manifest(2))
    assert keys(fed, "rounds/") == before
    assert fed.latest_round(ResumeReport()) == 2


def test_prune_removes_uploads_and_old_orphans_only(
    fed: S3FederationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed(fed)
    fed.publish(state(1), manifest(1))

    def crash() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fed.publish(state(2), manifest(2), before_commit=crash)
    fed.prune(3)
    assert keys(fed, "uploads/") == []
    assert len(keys(fed, "rounds/00000002/")) == 1  # young orphan kept
    monkeypatch.setattr("raflora.server.storage.s3.ORPHAN_GRACE_SECONDS", -1.0)
    fed.prune(3)
    assert keys(fed, "rounds/00000002/") == []
    assert fed.published_rounds() == [1]
