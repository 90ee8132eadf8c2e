"""The direct data plane (issue 13, part 2; docs/design.md §5.3), through the real server on
a real SeaweedFS bucket: payloads go to the bucket over pre-signed HTTP, the acknowledgement
keeps its meaning, and a client that abuses its URLs gains nothing.

Honest clients use the SDK, which picks the data plane from the federation's spec; attackers
use the raw stubs and plain HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import math
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import grpc
import pytest
import torch
from botocore.config import Config

from raflora.client_sdk import (
    AdminClient,
    RafloraClient,
    RafloraError,
    RetryPolicy,
    lora_state_dict,
    pb,
)
from raflora.client_sdk.direct import post_payload as real_post
from raflora.client_sdk.errors import from_rpc_error
from raflora.client_sdk.payload import PushPayload
from raflora.server.api.serde import config_from_proto, config_to_proto
from raflora.server.config import FederationConfig
from raflora.server.testing import ThreadedServer, federation_spec, threaded_server
from raflora.server.testing_s3 import SeaweedFS
from raflora.v1.wire import ErrorReason

from .conftest import S3_BUCKET
from .test_trust_boundary import (
    ADMIN_TOKEN,
    NO_RETRY,
    POISON_TRUST,
    adapter,
    bearer,
    check,
    metric,
    poisoned,
    spec,
)

C = grpc.StatusCode
R = ErrorReason
DIRECT: dict[str, Any] = {"data_plane": pb.DATA_PLANE_DIRECT}


@pytest.fixture
def s3_server(s3_env: dict[str, str], tmp_path: Path) -> Iterator[ThreadedServer]:
    """A server on a fresh prefix of the test bucket, with authentication on."""
    with threaded_server(
        tmp_path / "scratch",
        storage="s3",
        s3_bucket=S3_BUCKET,
        s3_prefix=s3_env["RAFLORA_S3_PREFIX"],
        s3_endpoint_url=s3_env["RAFLORA_S3_ENDPOINT_URL"],
        admin_token=ADMIN_TOKEN,
    ) as server:
        yield server


def bucket_keys(seaweed: SeaweedFS, server: ThreadedServer, fid: str, folder: str) -> list[str]:
    base = f"{server.server.settings.s3_prefix}/federations/{fid}/{folder}/"
    client = boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint_url,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=base)
    return sorted(o["Key"][len(base) :] for page in pages for o in page.get("Contents", []))


class Federation:
    """One federation of the server, with per-client credentials (auth is on)."""

    def __init__(self, stack: ExitStack, server: ThreadedServer, fid: str, **extra: Any) -> None:
        self.stack, self.target, self.fid = stack, server.target, fid
        self.admin = stack.enter_context(AdminClient(server.target, admin_token=ADMIN_TOKEN))
        self.admin.create_federation(spec(fid, **extra))

    def client(self, cid: str, rank: int, num_examples: int = 10) -> RafloraClient:
        credential = self.admin.issue_client_credential(self.fid, cid)
        client = self.stack.enter_context(
            RafloraClient(self.target, self.fid, cid, enrolment_secret=credential, retry=NO_RETRY)
        )
        client.join(rank=rank, num_examples=num_examples)
        return client


def header(client: RafloraClient, payload: PushPayload, **overrides: Any) -> pb.PushHeader:
    fields: dict[str, Any] = {
        "federation_id": client.federation_id,
        "client_id": client.client_id,
        "round": 0,
        "rank": client.rank,
        "num_examples": 10,
        "total_bytes": payload.total_bytes,
    }
    return pb.PushHeader(**{**fields, **overrides})


def begin(client: RafloraClient, h: pb.PushHeader) -> pb.DirectUpload:
    grant: pb.DirectUpload = client.stub.BeginDirectPush(
        h, timeout=10, metadata=bearer(client.token)
    )
    return grant


def post(grant: pb.DirectUpload, data: bytes) -> int:
    """The HTTP status of a plain form POST of ``data`` to the grant."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in grant.fields.items()
    )
    body += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    url = urlsplit(grant.url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        connection.request(
            "POST",
            url.path,
            body=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def posted(client: RafloraClient, tensors: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """An honest upload granted and posted: its header (digest set) and its grant."""
    payload = PushPayload(tensors)
    data = payload.to_bytes()
    h = header(client, payload)
    grant = begin(client, h)
    assert post(grant, data) in (200, 201, 204)
    h.sha256 = sha(data)
    return h, grant


def commit(client: RafloraClient, h: pb.PushHeader, upload_id: str) -> pb.PushResponse:
    request = pb.CommitDirectPushRequest(header=h, upload_id=upload_id)
    response: pb.PushResponse = client.stub.CommitDirectPush(
        request, timeout=30, metadata=bearer(client.token)
    )
    return response


def refused(action: Any) -> RafloraError:
    try:
        action()
    except grpc.RpcError as exc:
        return from_rpc_error(exc)
    except RafloraError as exc:
        return exc
    pytest.fail("the attack was accepted")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the honest path ---------------------------------------------------------------------------


def test_a_direct_round_publishes_exactly_the_grpc_round(
    s3_server: ThreadedServer, seaweed: SeaweedFS
) -> None:
    """Two federations alike but for the data plane, the same uploads: the published adapters
    are bit-identical, the direct one moved its bytes through the bucket (staging emptied,
    the pull view is an object), and the SDK needed no change from its caller."""
    pulled = {}
    with ExitStack() as stack:
        for fid, extra in (("over-grpc", {}), ("over-bucket", DIRECT)):
            federation = Federation(stack, s3_server, fid, **extra)
            a, b = federation.client("a", 2, 10), federation.client("b", 4, 30)
            assert a.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1
            second = b.push(adapter(4, 2), round=0, num_examples=30)
            assert (second.duplicate, second.received_bytes) == (
                False,
                PushPayload(adapter(4, 2)).total_bytes,
            )
            assert a.wait_for_round(0, timeout=30).round == 1
            again = b.push(adapter(4, 2), round=0, num_examples=30)  # an ack-lost retry
            assert again.duplicate
            pulled[fid] = (a.pull(), b.pull())
    for grpc_pull, direct_pull in zip(pulled["over-grpc"], pulled["over-bucket"], strict=True):
        assert (direct_pull.round, direct_pull.rank) == (grpc_pull.round, grpc_pull.rank)
        assert direct_pull.tensors.keys() == grpc_pull.tensors.keys()
        for name, tensor in grpc_pull.tensors.items():
            assert torch.equal(direct_pull.tensors[name], tensor), name
    # Three pushes (one a retry) and two pulls each way, by the route the spec chose.
    calls = {
        m: metric(s3_server.metrics_url, "raflora_rpcs_total", method=m, code="OK")
        for m in ("Push", "Pull", "BeginDirectPush", "CommitDirectPush", "DirectPull")
    }
    assert calls == {
        "Push": 3,
        "Pull": 2,
        "BeginDirectPush": 3,
        "CommitDirectPush": 3,
        "DirectPull": 2,
    }, calls
    assert bucket_keys(seaweed, s3_server, "over-bucket", "staging") == []
    views = bucket_keys(seaweed, s3_server, "over-bucket", "views")
    assert len(views) == 2 and all(v.startswith("00000001/") for v in views), views
    assert bucket_keys(seaweed, s3_server, "over-grpc", "views") == []


def test_direct_federations_need_an_object_store(tmp_path: Path) -> None:
    with threaded_server(tmp_path / "data") as server, AdminClient(server.target) as admin:
        error = refused(lambda: admin.create_federation(spec("direct-on-disk", **DIRECT)))
    check(error, C.INVALID_ARGUMENT, R.INVALID_FIELD, "data_plane")
    assert "storage = s3" in error.details


def test_direct_calls_are_refused_for_a_grpc_federation(s3_server: ThreadedServer) -> None:
    with ExitStack() as stack:
        client = Federation(stack, s3_server, "grpc-only").client("a", 2)
        payload = PushPayload(adapter(2, 1))
        error = refused(lambda: begin(client, header(client, payload)))
        check(error, C.FAILED_PRECONDITION, R.DIRECT_DISABLED, "data_plane")
        request = pb.PullRequest(federation_id="grpc-only", client_id="a")
        error = refused(
            lambda: client.stub.DirectPull(request, timeout=10, metadata=bearer(client.token))
        )
        check(error, C.FAILED_PRECONDITION, R.DIRECT_DISABLED, "data_plane")


# -- attacks -----------------------------------------------------------------------------------


def test_hostile_direct_uploads_are_refused_and_the_round_goes_on(
    s3_server: ThreadedServer, seaweed: SeaweedFS
) -> None:
    """Poison, lies about the digest or the size, commits of nothing or of another client's
    upload, a second POST after the commit: each refused with its documented status, nothing
    counted or left in the bucket, and the honest round publishes without the attacker."""
    fid = "direct-attacks"
    with ExitStack() as stack:
        federation = Federation(stack, s3_server, fid, trust=POISON_TRUST, **DIRECT)
        honest, other = federation.client("honest", 2), federation.client("other", 4, 30)
        mallory = federation.client("mallory", 2)
        assert honest.push(adapter(2, 1), round=0, num_examples=10).uploads_in_round == 1

        # 1. NaN in a factor, posted straight to the bucket: refused at commit.
        nan = PushPayload(poisoned(2, 14, "m1.lora_A.weight", (1, 3), math.nan)).to_bytes()
        h = header(mallory, PushPayload(adapter(2, 3)))
        grant = begin(mallory, h)
        assert post(grant, nan) in (200, 201, 204)
        h.sha256 = sha(nan)
        check(refused(lambda: commit(mallory, h, grant.upload_id)), *BAD_UPDATE)

        # 2. The bytes are not what the digest says.
        good = PushPayload(adapter(2, 3)).to_bytes()
        grant = begin(mallory, h)
        assert post(grant, good) in (200, 201, 204)
        h.sha256 = sha(good[:-1] + b"\0")
        error = refused(lambda: commit(mallory, h, grant.upload_id))
        check(error, C.DATA_LOSS, R.CHECKSUM_MISMATCH, "sha256")

        # 3. More bytes than declared: the bucket's policy refuses the POST itself.
        grant = begin(mallory, h)
        assert post(grant, good + b"x" * 1024) == 400
        h.sha256 = sha(good)
        error = refused(lambda: commit(mallory, h, grant.upload_id))
        check(error, C.DATA_LOSS, R.UPLOAD_MISSING, "upload_id")

        # 4. A commit of something never posted, and of an id that is not one.
        error = refused(lambda: commit(mallory, h, uuid.uuid4().hex))
        check(error, C.DATA_LOSS, R.UPLOAD_MISSING, "upload_id")
        error = refused(lambda: commit(mallory, h, "../honest/" + "0" * 32))
        check(error, C.INVALID_ARGUMENT, R.INVALID_FIELD, "upload_id")

        # 5. Another client's posted upload, committed under mallory's own name: its id names
        # a staging key under mallory's folder, where nothing was posted.
        other_payload = PushPayload(adapter(4, 2))
        other_header = header(other, other_payload, num_examples=30)
        other_grant = begin(other, other_header)
        other_bytes = other_payload.to_bytes()
        assert post(other_grant, other_bytes) in (200, 201, 204)
        stolen = header(mallory, other_payload, rank=2, sha256=sha(other_bytes))
        error = refused(lambda: commit(mallory, stolen, other_grant.upload_id))
        check(error, C.DATA_LOSS, R.UPLOAD_MISSING, "upload_id")
        # ... and with other's identity in the header, mallory's token is refused.
        as_other = header(other, other_payload, num_examples=30, sha256=sha(other_bytes))
        error = refused(lambda: commit(mallory, as_other, other_grant.upload_id))
        assert error.code == C.PERMISSION_DENIED, error.details

        status = honest.status()
        assert (status.round, status.uploads) == (0, 1)
        payloads = [k for k in bucket_keys(seaweed, s3_server, fid, "uploads") if ".payload-" in k]
        assert len(payloads) == 1, payloads  # the honest upload only: every copy was removed

        # 6. other's own commit of its posted upload is untouched by all that; a second POST to
        # its grant after the commit (poison this time) changes nothing that was counted.
        other_header.sha256 = sha(other_bytes)
        assert commit(other, other_header, other_grant.upload_id).uploads_in_round == 2
        post(other_grant, nan)
        assert honest.wait_for_round(0, timeout=30).round == 1
        manifest = s3_server.server.hub.get(fid).manifest
        assert manifest is not None
        assert sorted(u.client_id for u in manifest.uploads) == ["honest", "other"]
        assert {u.client_id: u.sha256 for u in manifest.uploads}["other"] == sha(other_bytes)
        pulled = other.pull()
        assert pulled.round == 1
        assert all(bool(torch.isfinite(t).all()) for t in pulled.tensors.values())
    # The round's staging (the late POST, the refused ones) goes with the round's prune.
    assert bucket_keys(seaweed, s3_server, fid, "staging") == []


BAD_UPDATE = (C.INVALID_ARGUMENT, R.INVALID_UPDATE, "m1.lora_A.weight")


def test_grants_count_as_push_attempts(s3_server: ThreadedServer) -> None:
    """A client cannot mint URLs for ever: every grant is a push attempt of the round."""
    with ExitStack() as stack:
        mallory = Federation(stack, s3_server, "direct-grants", **DIRECT).client("mallory", 2)
        h = header(mallory, PushPayload(adapter(2, 1)))
        limit = s3_server.server.settings.max_pushes_per_round
        for _ in range(limit):
            begin(mallory, h)
        check(refused(lambda: begin(mallory, h)), C.RESOURCE_EXHAUSTED, R.PUSH_LIMIT, "round")


def test_a_grant_is_for_the_declared_size_and_its_own_key_only(
    s3_server: ThreadedServer,
) -> None:
    """The POST policy: fewer bytes than declared are refused by the bucket too, and the
    policy's key cannot be swapped for another client's."""
    with ExitStack() as stack:
        mallory = Federation(stack, s3_server, "direct-policy", **DIRECT).client("mallory", 2)
        payload = PushPayload(adapter(2, 1))
        grant = begin(mallory, header(mallory, payload))
        assert post(grant, payload.to_bytes()[:-8]) == 400
        elsewhere = pb.DirectUpload()
        elsewhere.CopyFrom(grant)
        elsewhere.fields["key"] = grant.fields["key"].replace("/mallory/", "/honest/")
        assert post(elsewhere, payload.to_bytes()) == 403


def test_a_bucket_the_client_cannot_reach_is_a_clear_retryable_error(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """URLs signed for an endpoint nobody listens on (a wrong s3_public_endpoint_url): the
    SDK says UNAVAILABLE about the url, nothing is counted, the server serves on."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
        with (
            threaded_server(
                tmp_path / "scratch",
                storage="s3",
                s3_bucket=S3_BUCKET,
                s3_prefix=s3_env["RAFLORA_S3_PREFIX"],
                s3_endpoint_url=s3_env["RAFLORA_S3_ENDPOINT_URL"],
                s3_public_endpoint_url=nowhere,
            ) as server,
            AdminClient(server.target) as admin,
            RafloraClient(server.target, "unreachable", "a", retry=NO_RETRY) as client,
        ):
            admin.create_federation(spec("unreachable", **DIRECT))
            client.join(rank=2, num_examples=10)
            error = refused(lambda: client.push(adapter(2, 1), round=0, num_examples=10))
            assert (error.code, error.field) == (C.UNAVAILABLE, "url"), error.details
            assert "could not be reached" in error.details
            status = client.status()
            assert (status.round, status.uploads) == (0, 0)


def test_a_large_adapter_goes_through_the_bucket_whole(s3_server: ThreadedServer) -> None:
    """10 MiB: the bucket copies it in parts and the server reads it back in several blocks;
    the published update of a lone client is its own B·A."""
    modules = {f"big{i}": (2048, 2048) for i in range(10)}
    g = torch.Generator().manual_seed(5)
    pairs = {
        m: (torch.randn(o, 64, generator=g) * 0.01, torch.randn(64, i, generator=g) * 0.01)
        for m, (o, i) in modules.items()
    }
    tensors = lora_state_dict(pairs)
    assert PushPayload(tensors).total_bytes > 10 << 20
    with ExitStack() as stack:
        admin = stack.enter_context(AdminClient(s3_server.target, admin_token=ADMIN_TOKEN))
        admin.create_federation(
            federation_spec("direct-large", modules, max_rank=64, min_clients=1, **DIRECT)
        )
        credential = admin.issue_client_credential("direct-large", "a")
        client = stack.enter_context(
            RafloraClient(s3_server.target, "direct-large", "a", enrolment_secret=credential)
        )
        client.join(rank=64, num_examples=10)
        assert not client.push(tensors, round=0, num_examples=10).duplicate
        client.wait_for_round(0, timeout=60)
        pulled = client.pull()
    assert pulled.round == 1
    for m, (b, a) in pairs.items():
        got = (
            pulled.scale
            * pulled.tensors[f"{m}.lora_B.weight"]
            @ pulled.tensors[f"{m}.lora_A.weight"]
        )
        want = (16.0 / 64) * b @ a
        assert float((got - want).norm() / want.norm()) < 1e-4, m


def test_the_data_plane_is_a_spec_field_like_any_other() -> None:
    """The admin CLI's JSON spec and a federations file name it by value."""
    mapping = {"federation_id": "f", "modules": [{"name": "m", "d_out": 4, "d_in": 4}]}
    as_spec = AdminClient.spec_from_mapping({**mapping, "data_plane": "direct"})
    assert as_spec.data_plane == pb.DATA_PLANE_DIRECT
    assert config_from_proto(as_spec).data_plane == "direct"
    assert config_to_proto(config_from_proto(as_spec)).data_plane == pb.DATA_PLANE_DIRECT
    parsed = FederationConfig.parse({**mapping, "data_plane": "direct"})
    assert parsed.data_plane == "direct"
    assert FederationConfig.parse(mapping).data_plane == "grpc"
    with pytest.raises(Exception, match="data_plane"):
        FederationConfig.parse({**mapping, "data_plane": "carrier-pigeon"})


# -- the review's cases: concurrency, attempts, sizes, bucket faults, damaged views ----------


def test_one_commit_at_a_time_and_each_is_an_attempt(
    s3_server: ThreadedServer, seaweed: SeaweedFS
) -> None:
    """Eight commits of one posted upload at once: the first runs, the others join it (or,
    once it is done, are its duplicate): one upload counted, one payload object in the bucket.
    A commit of other terms while one of the client's runs is refused before any I/O."""
    fid = "direct-commits"
    with ExitStack() as stack:
        mallory = Federation(stack, s3_server, fid, **DIRECT).client("mallory", 2)
        h, grant = posted(mallory, adapter(2, 1))
        runtime = s3_server.server.hub.get(fid)
        running: asyncio.Future[Any] = asyncio.Future(loop=s3_server.loop)  # another commit
        runtime.direct_commits["mallory"] = (("another upload",), running)
        error = refused(lambda: commit(mallory, h, grant.upload_id))
        check(error, C.RESOURCE_EXHAUSTED, R.TOO_MANY_STREAMS, "upload_id")
        del runtime.direct_commits["mallory"]

        outcomes: list[object] = []

        def one() -> None:
            try:
                outcomes.append(commit(mallory, h, grant.upload_id).duplicate)
            except grpc.RpcError as exc:
                outcomes.append(from_rpc_error(exc).reason)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert set(outcomes) <= {False, True}, outcomes  # joined, or a duplicate
        assert False in outcomes
        assert mallory.status().uploads == 1
        payloads = [k for k in bucket_keys(seaweed, s3_server, fid, "uploads") if ".payload-" in k]
        assert len(payloads) == 1, payloads


def test_commits_count_towards_the_attempt_limit(s3_server: ThreadedServer) -> None:
    with ExitStack() as stack:
        mallory = Federation(stack, s3_server, "direct-commit-limit", **DIRECT).client("m", 2)
        h = header(mallory, PushPayload(adapter(2, 1)))
        grant = begin(mallory, h)  # attempt 1
        h.sha256 = "0" * 64
        limit = s3_server.server.settings.max_pushes_per_round
        for _ in range(limit - 1):  # attempts 2..limit: nothing was posted
            error = refused(lambda: commit(mallory, h, grant.upload_id))
            check(error, C.DATA_LOSS, R.UPLOAD_MISSING, "upload_id")
        error = refused(lambda: commit(mallory, h, grant.upload_id))
        check(error, C.RESOURCE_EXHAUSTED, R.PUSH_LIMIT, "round")


def test_the_server_checks_the_size_itself(s3_server: ThreadedServer, seaweed: SeaweedFS) -> None:
    """A bucket that ignored the POST policy: an object of another size at the staging key is
    refused by the server (SIZE_MISMATCH) and its copy removed."""
    fid = "direct-size"
    with ExitStack() as stack:
        mallory = Federation(stack, s3_server, fid, **DIRECT).client("mallory", 2)
        payload = PushPayload(adapter(2, 1))
        h = header(mallory, payload)
        grant = begin(mallory, h)
        longer = payload.to_bytes() + b"\0" * 64
        seaweed.client().put_object(Bucket=S3_BUCKET, Key=grant.fields["key"], Body=longer)
        h.sha256 = sha(longer)
        error = refused(lambda: commit(mallory, h, grant.upload_id))
        check(error, C.DATA_LOSS, R.SIZE_MISMATCH, "total_bytes")
        assert bucket_keys(seaweed, s3_server, fid, "uploads") == []
        assert bucket_keys(seaweed, s3_server, fid, "staging") == []
        assert mallory.status().uploads == 0


def test_a_bucket_fault_is_unavailable_and_the_sdk_resumes_without_a_new_grant(
    s3_server: ThreadedServer, seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's copy fails once with a 503: the commit is UNAVAILABLE (STORAGE_UNAVAILABLE),
    the posted object is kept, and the SDK's retry commits it again: one grant, one POST."""
    from botocore.exceptions import ClientError

    fid = "direct-fault"
    with ExitStack() as stack:
        federation = Federation(stack, s3_server, fid, **DIRECT)
        credential = federation.admin.issue_client_credential(fid, "a")
        client = stack.enter_context(
            RafloraClient(
                s3_server.target,
                fid,
                "a",
                enrolment_secret=credential,
                retry=RetryPolicy(attempts=3, initial_backoff=0.05),
            )
        )
        client.join(rank=2, num_examples=10)
        bucket_client = s3_server.server.hub.get(fid).store.bucket.client  # type: ignore[attr-defined]
        real_copy = bucket_client.copy
        faults = [ClientError({"Error": {"Code": "SlowDown"}}, "CopyObject")]

        def flaky_copy(*args: Any, **kwargs: Any) -> Any:
            if faults:
                raise faults.pop()
            return real_copy(*args, **kwargs)

        monkeypatch.setattr(bucket_client, "copy", flaky_copy)
        posts: list[str] = []

        def counted_post(grant: pb.DirectUpload, *args: Any, **kwargs: Any) -> str:
            posts.append(grant.upload_id)
            return real_post(grant, *args, **kwargs)

        monkeypatch.setattr("raflora.client_sdk.client.post_payload", counted_post)
        assert not client.push(adapter(2, 1), round=0, num_examples=10).duplicate
        assert not faults
        assert len(posts) == 1, posts  # the retry committed what was posted
        url = s3_server.metrics_url
        assert metric(url, "raflora_rpcs_total", method="BeginDirectPush", code="OK") == 1
        assert metric(url, "raflora_rpcs_total", method="CommitDirectPush", code="UNAVAILABLE") == 1
        assert metric(url, "raflora_rpcs_total", method="CommitDirectPush", code="OK") == 1
        assert client.status().uploads == 1
        assert bucket_keys(seaweed, s3_server, fid, "staging") == []


def test_a_view_damaged_on_the_servers_disk_never_reaches_the_bucket(
    s3_server: ThreadedServer, seaweed: SeaweedFS, tmp_path: Path
) -> None:
    fid = "direct-view"
    with ExitStack() as stack:
        client = Federation(stack, s3_server, fid, clients=1, **DIRECT).client("a", 2)
        client.push(adapter(2, 1), round=0, num_examples=10)
        client.wait_for_round(0, timeout=30)
        runtime = s3_server.server.hub.get(fid)
        view = s3_server.run(runtime.view_for("a"))
        local = list((tmp_path / "scratch" / "views" / fid).rglob(f"{view.stored.key}*"))
        assert len(local) == 1, local
        damaged = bytearray(local[0].read_bytes())
        damaged[-3] ^= 0x10
        local[0].write_bytes(bytes(damaged))
        pulled = client.pull()  # rebuilt, then published
        assert pulled.round == 1
        assert all(bool(torch.isfinite(t).all()) for t in pulled.tensors.values())
        views = bucket_keys(seaweed, s3_server, fid, "views")
        assert views == [f"00000001/{view.stored.key}-{view.sha256}.safetensors"], views
        problems = metric(s3_server.metrics_url, "raflora_storage_problems_total", federation=fid)
        assert problems == 1


def test_a_retried_commit_joins_the_one_still_running(
    s3_server: ThreadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer of a slow commit is lost (the client's deadline passes); the retry with the
    same terms gets the running commit's outcome, not a refusal; other terms are refused."""
    fid = "direct-join"
    with ExitStack() as stack:
        client = Federation(stack, s3_server, fid, **DIRECT).client("a", 2)
        h, grant = posted(client, adapter(2, 1))
        store = s3_server.server.hub.get(fid).store
        real_adopt = store.adopt_direct_upload  # type: ignore[attr-defined]
        release = threading.Event()

        def slow_adopt(*args: Any) -> Any:
            release.wait(20)
            return real_adopt(*args)

        monkeypatch.setattr(store, "adopt_direct_upload", slow_adopt)
        request = pb.CommitDirectPushRequest(header=h, upload_id=grant.upload_id)
        with pytest.raises(grpc.RpcError) as lost:
            client.stub.CommitDirectPush(request, timeout=0.5, metadata=bearer(client.token))
        assert lost.value.code() == C.DEADLINE_EXCEEDED
        other = pb.CommitDirectPushRequest(header=h, upload_id=uuid.uuid4().hex)
        error = refused(
            lambda: client.stub.CommitDirectPush(other, timeout=10, metadata=bearer(client.token))
        )
        check(error, C.RESOURCE_EXHAUSTED, R.TOO_MANY_STREAMS, "upload_id")
        threading.Timer(0.5, release.set).start()
        again = client.stub.CommitDirectPush(request, timeout=30, metadata=bearer(client.token))
        assert (again.duplicate, again.uploads_in_round) == (False, 1)  # the first one's answer
        assert client.status().uploads == 1


def test_a_bucket_that_refuses_the_server_is_an_internal_error_not_a_retry(
    s3_server: ThreadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AccessDenied on the server's own copy is the operator's problem: INTERNAL (logged as
    an error), not UNAVAILABLE for clients to retry against."""
    from botocore.exceptions import ClientError

    fid = "direct-denied"
    with ExitStack() as stack:
        client = Federation(stack, s3_server, fid, **DIRECT).client("a", 2)
        h, grant = posted(client, adapter(2, 1))
        bucket_client = s3_server.server.hub.get(fid).store.bucket.client  # type: ignore[attr-defined]

        def denied(*args: Any, **kwargs: Any) -> Any:
            raise ClientError({"Error": {"Code": "AccessDenied"}}, "CopyObject")

        monkeypatch.setattr(bucket_client, "copy", denied)
        error = refused(lambda: commit(client, h, grant.upload_id))
        assert error.code == C.INTERNAL, error.details
        assert client.status().uploads == 0
