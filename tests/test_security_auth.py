"""Authentication and isolation against the real server (auth on: an admin token is set).

The admin token guards AdminService; a federation's enrolment secret guards Join; the client
token Join returns is bound to (federation, client id, rank) and checked by Pull, Push,
GetRound and WatchRounds. Wrong federation, client or rank: PERMISSION_DENIED; missing, forged,
expired or revoked: UNAUTHENTICATED. Refused calls change nothing, and the clients that hold
the right credentials complete their rounds.
"""

from __future__ import annotations

import base64
import json
import logging
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import SecretStr

from raflora.client_sdk import (
    AdminClient,
    PermissionDeniedError,
    RafloraClient,
    RafloraError,
    RetryPolicy,
    UnauthenticatedError,
    pb,
)
from raflora.server.settings import ServerSettings
from raflora.server.testing import ThreadedServer, threaded_server
from raflora.v1 import aggregation_pb2_grpc as pb_grpc
from raflora.v1.wire import ErrorReason, iter_chunks

from .helpers.adapters import factors, push_header
from .helpers.federations import spec
from .helpers.rpc import refusal

ADMIN_TOKEN = "admin-0123456789abcdef-test"
MODULES = {"m0": (16, 12), "m1": (8, 20)}
NO_RETRY = RetryPolicy(attempts=1)
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def bearer(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    data = tmp_path_factory.mktemp("auth")
    with threaded_server(data, admin_token=ADMIN_TOKEN) as handle:
        yield handle


@pytest.fixture
def admin(server: ThreadedServer) -> Iterator[AdminClient]:
    with AdminClient(server.target, admin_token=ADMIN_TOKEN) as client:
        yield client


_count = iter(range(1000))


def new_federation(admin: AdminClient, **policy: Any) -> tuple[str, str]:
    fid = f"fed-{next(_count)}"
    policy.setdefault("min_clients", 2)
    policy.setdefault("expected_clients", 2)
    created = admin.create_federation(spec(fid, MODULES, max_rank=8, **policy), open_enrolment=True)
    assert created.enrolment_secret
    return fid, created.enrolment_secret


def joined(
    stack: ExitStack, server: ThreadedServer, fid: str, cid: str, secret: str, rank: int
) -> RafloraClient:
    client = stack.enter_context(
        RafloraClient(server.target, fid, cid, enrolment_secret=secret, retry=NO_RETRY)
    )
    client.join(rank=rank, num_examples=10)
    assert client.token and client.token.startswith("rft1.")
    return client


def push_messages(fid: str, cid: str, rank: int, round_: int, seed: int) -> list[pb.PushRequest]:
    from safetensors.torch import save

    data = save(factors(rank, seed, MODULES))
    header = push_header(fid, cid, data, rank=rank, num_examples=10, round=round_)
    return [pb.PushRequest(header=header)] + [
        pb.PushRequest(data=c) for c in iter_chunks(data, 4096)
    ]


def test_admin_rpcs_need_the_admin_token(server: ThreadedServer, admin: AdminClient) -> None:
    fid, secret = new_federation(admin)
    attempts: list[Callable[[AdminClient], object]] = [
        lambda a: a.create_federation(spec("intruder", MODULES)),
        lambda a: a.get_federation(fid),
        lambda a: a.list_federations(),
        lambda a: a.rotate_enrolment_secret(fid),
    ]
    with RafloraClient(server.target, fid, "c", enrolment_secret=secret) as client:
        client.join(rank=2, num_examples=1)
        assert client.token is not None
        for credential, expected in [
            (None, UNAUTH),
            ("not-the-admin-token!!", UNAUTH),
            (secret, UNAUTH),  # an enrolment secret is not an admin credential either
            (client.token, DENIED),  # authenticated, but as a client
        ]:
            with AdminClient(server.target, admin_token=credential) as other:
                for attempt in attempts:
                    code, details, _ = refusal(lambda a=attempt, o=other: a(o))  # type: ignore[misc]
                    assert code == expected, details
                    assert details.startswith("authorization: ")
    assert [f.spec.federation_id for f in admin.list_federations()].count("intruder") == 0
    assert admin.get_federation(fid).status.joined_clients == 1


def test_create_returns_the_secret_once_and_stores_only_a_hash(
    server: ThreadedServer, admin: AdminClient
) -> None:
    fid, secret = new_federation(admin)
    assert len(secret) >= 32
    assert admin.get_federation(fid).enrolment_secret == ""
    assert all(f.enrolment_secret == "" for f in admin.list_federations())
    data_dir = server.server.settings.data_dir
    stored = data_dir / "federations" / fid / "enrolment.json"
    assert secret not in stored.read_text()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    key = data_dir / "token.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for path in (data_dir / "federations" / fid).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    # An admin-chosen secret must be long enough; a refused one creates nothing.
    with pytest.raises(RafloraError) as short:
        admin.create_federation(
            spec("short-secret", MODULES), enrolment_secret="too-short", open_enrolment=True
        )
    assert short.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert short.value.field == "enrolment_secret"
    assert not (data_dir / "federations" / "short-secret").exists()
    chosen = "x" * 40
    made = admin.create_federation(
        spec("chosen-secret", MODULES), enrolment_secret=chosen, open_enrolment=True
    )
    assert made.enrolment_secret == chosen


def test_join_needs_the_federation_secret(server: ThreadedServer, admin: AdminClient) -> None:
    fid, secret = new_federation(admin)
    other_fid, other_secret = new_federation(admin)
    for fed, credential in [
        (fid, None),
        (fid, "wrong-" * 8),
        (fid, other_secret),  # another federation's secret
        ("no-such-federation", secret),  # unknown ids read like a wrong secret: not revealed
    ]:
        with RafloraClient(
            server.target, fed, "c", enrolment_secret=credential, retry=NO_RETRY
        ) as client:
            with pytest.raises(UnauthenticatedError) as info:
                client.join(rank=2, num_examples=1)
            assert info.value.field == "authorization"
            assert client.token is None
    assert admin.get_federation(fid).status.joined_clients == 0
    with RafloraClient(server.target, fid, "c", enrolment_secret=secret) as client:
        info_ = client.join(rank=2, num_examples=1)
        assert info_.round == 0 and client.token
        assert client.token_expires_unix > time.time() + 3000  # default TTL: one hour
    assert admin.get_federation(other_fid).status.joined_clients == 0


def test_client_tokens_are_bound_to_federation_client_and_rank(
    server: ThreadedServer, admin: AdminClient
) -> None:
    fid, secret = new_federation(admin)
    other_fid, other_secret = new_federation(admin, min_clients=1, expected_clients=1)
    with ExitStack() as stack:
        a = joined(stack, server, fid, "a", secret, rank=2)
        b = joined(stack, server, fid, "b", secret, rank=4)
        c = joined(stack, server, other_fid, "c", other_secret, rank=2)
        assert a.token and b.token and c.token
        channel = stack.enter_context(grpc.insecure_channel(server.target))
        stub: Any = pb_grpc.AggregationServiceStub(channel)

        def pull(fed: str, cid: str, token: str | None) -> object:
            md = bearer(token) if token else None
            return list(stub.Pull(pb.PullRequest(federation_id=fed, client_id=cid), metadata=md))

        def push(fed: str, cid: str, rank: int, token: str | None) -> object:
            md = bearer(token) if token else None
            return stub.Push(iter(push_messages(fed, cid, rank, 0, seed=1)), metadata=md)

        def status(fed: str, token: str | None) -> object:
            md = bearer(token) if token else None
            return stub.GetRound(pb.GetRoundRequest(federation_id=fed), metadata=md)

        def watch(fed: str, token: str | None) -> object:
            md = bearer(token) if token else None
            return next(
                iter(stub.WatchRounds(pb.WatchRoundsRequest(federation_id=fed), metadata=md))
            )

        forged = a.token[:-6] + ("AAAAAA" if not a.token.endswith("AAAAAA") else "BBBBBB")
        prefix, payload, mac = a.token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["c"] = "b"  # claims to be b, signed with a's MAC: the signature no longer fits
        raised = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        cases: list[tuple[str, Callable[[], object], grpc.StatusCode, str]] = [
            ("pull as another client", lambda: pull(fid, "b", a.token), DENIED, "client_id"),
            ("push as another client", lambda: push(fid, "b", 4, a.token), DENIED, "client_id"),
            ("push at another rank", lambda: push(fid, "a", 4, a.token), DENIED, "rank"),
            ("push elsewhere", lambda: push(other_fid, "a", 2, a.token), DENIED, "federation_id"),
            ("pull elsewhere", lambda: pull(other_fid, "c", a.token), DENIED, "federation_id"),
            ("status elsewhere", lambda: status(other_fid, a.token), DENIED, "federation_id"),
            ("watch elsewhere", lambda: watch(other_fid, a.token), DENIED, "federation_id"),
            ("no token: pull", lambda: pull(fid, "a", None), UNAUTH, "authorization"),
            ("no token: push", lambda: push(fid, "a", 2, None), UNAUTH, "authorization"),
            ("no token: status", lambda: status(fid, None), UNAUTH, "authorization"),
            ("no token: watch", lambda: watch(fid, None), UNAUTH, "authorization"),
            ("forged mac", lambda: pull(fid, "a", forged), UNAUTH, "authorization"),
            ("edited claims", lambda: pull(fid, "b", f"{prefix}.{raised}.{mac}"), UNAUTH, "auth"),
            ("secret as token", lambda: pull(fid, "a", secret), UNAUTH, "authorization"),
            ("admin as token", lambda: status(fid, ADMIN_TOKEN), UNAUTH, "authorization"),
        ]
        for name, action, expected, field in cases:
            code, details, _ = refusal(action)
            assert code == expected, (name, details)
            assert details.startswith(field), (name, details)
        # Nothing the refused calls sent was counted; the right tokens still work.
        assert a.status().uploads == 0 and c.status().uploads == 0
        assert a.push(factors(2, 1, MODULES), round=0, num_examples=10).uploads_in_round == 1
        assert b.push(factors(4, 2, MODULES), round=0, num_examples=10).uploads_in_round == 2
        assert a.wait_for_round(0, timeout=30).round == 1
        assert (a.pull().rank, b.pull().rank) == (2, 4)
        assert c.status().round == 0  # the other federation saw none of it


def test_expired_tokens_are_refused_and_the_sdk_joins_again(
    server: ThreadedServer, admin: AdminClient
) -> None:
    fid, secret = new_federation(admin)
    authority = server.server.authority
    authority.ttl_seconds = 1.0
    try:
        with ExitStack() as stack:
            client = joined(stack, server, fid, "a", secret, rank=2)
            first = client.token
            assert first is not None
            time.sleep(1.2)
            channel = stack.enter_context(grpc.insecure_channel(server.target))
            stub: Any = pb_grpc.AggregationServiceStub(channel)
            code, details, _ = refusal(
                lambda: stub.GetRound(pb.GetRoundRequest(federation_id=fid), metadata=bearer(first))
            )
            assert code == UNAUTH and "expired" in details
            # Reactive: the SDK sees "expired", joins again with its secret, and retries.
            client.token_expires_unix = 0.0  # (no proactive refresh: exercise the retry path)
            assert client.status().round == 0
            assert client.token != first
            # Proactive: a token near its end is replaced before the call.
            second = client.token
            time.sleep(0.85)  # inside the last quarter of its 1 s life
            assert client.pull().round == 0
            assert client.token != second
            # A client that holds only a token, no secret, cannot renew it.
            stale = stack.enter_context(
                RafloraClient(server.target, fid, "a", token=first, retry=NO_RETRY)
            )
            with pytest.raises(UnauthenticatedError, match="expired"):
                stale.status()
    finally:
        authority.ttl_seconds = server.server.settings.token_ttl_seconds


def test_a_token_from_before_a_rank_change_is_refused(
    server: ThreadedServer, admin: AdminClient
) -> None:
    fid, secret = new_federation(admin)
    with ExitStack() as stack:
        client = joined(stack, server, fid, "a", secret, rank=2)
        rank2 = client.token
        assert rank2 is not None
        client.join(rank=4, num_examples=10)  # no upload yet: the rank may change
        assert client.pull().rank == 4
        client.token = rank2
        client.token_expires_unix = 0.0
        with pytest.raises(PermissionDeniedError) as info:
            client.pull()
        assert info.value.field == "rank"


def test_rotation_revokes_tokens_and_the_old_secret(
    server: ThreadedServer, admin: AdminClient
) -> None:
    fid, secret = new_federation(admin)
    with ExitStack() as stack:
        client = joined(stack, server, fid, "a", secret, rank=2)
        old_token = client.token
        assert client.client_credential and client.client_credential.startswith("rfc1.")
        new_secret = admin.rotate_enrolment_secret(fid)
        assert new_secret and new_secret != secret
        # Every token is revoked; "a" joins again by itself with its own credential (the shared
        # secret enrolled it once), so it keeps working with a new token.
        assert client.status().round == 0
        assert client.token != old_token
        with pytest.raises(UnauthenticatedError, match="revoked"):
            stack.enter_context(
                RafloraClient(server.target, fid, "a", token=old_token, retry=NO_RETRY)
            ).status()
        # The old secret admits nobody new; the new one does, once per client id.
        with pytest.raises(UnauthenticatedError) as stale:
            joined(stack, server, fid, "b", secret, rank=4)
        assert stale.value.reason == ErrorReason.ENROLMENT_REJECTED
        assert joined(stack, server, fid, "b", new_secret, rank=4).status().joined_clients == 2
        with pytest.raises(PermissionDeniedError) as taken:
            joined(stack, server, fid, "a", new_secret, rank=2)
        assert taken.value.reason == ErrorReason.CLIENT_ID_TAKEN
    with pytest.raises(RafloraError) as missing:
        admin.rotate_enrolment_secret("no-such-federation")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_tokens_and_secrets_survive_a_restart(tmp_path: Path) -> None:
    with threaded_server(tmp_path, admin_token=ADMIN_TOKEN) as first:
        with AdminClient(first.target, admin_token=ADMIN_TOKEN) as admin:
            fid, secret = new_federation(admin)
        with RafloraClient(first.target, fid, "a", enrolment_secret=secret) as client:
            client.join(rank=2, num_examples=3)
            token = client.token
    key = (tmp_path / "token.key").read_text()
    with threaded_server(tmp_path, admin_token=ADMIN_TOKEN) as second:
        assert (tmp_path / "token.key").read_text() == key  # not regenerated
        with RafloraClient(second.target, fid, "a", token=token, retry=NO_RETRY) as client:
            assert client.status().joined_clients == 1
        with RafloraClient(second.target, fid, "b", enrolment_secret=secret) as other:
            other.join(rank=2, num_examples=3)


def test_open_mode_warns_and_require_auth_refuses_to_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="raflora.server"),
        threaded_server(tmp_path / "open") as server,
    ):
        with AdminClient(server.target) as admin:  # no credentials needed
            created = admin.create_federation(spec("open", MODULES), open_enrolment=True)
            assert created.enrolment_secret == ""
        with RafloraClient(server.target, "open", "c") as client:
            client.join(rank=2, num_examples=1)
            assert client.token is None and client.pull().round == 0
    assert "AUTHENTICATION IS OFF" in caplog.text
    assert not (tmp_path / "open" / "token.key").exists()
    with pytest.raises(ValueError, match="require_auth"):
        ServerSettings(data_dir=tmp_path, require_auth=True)
    with pytest.raises(ValueError, match="16 characters"):
        ServerSettings(data_dir=tmp_path, admin_token=SecretStr("short"))
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    settings = ServerSettings(data_dir=tmp_path, admin_token_file=token_file, require_auth=True)
    assert settings.resolved_admin_token() == ADMIN_TOKEN
    assert ADMIN_TOKEN not in repr(
        ServerSettings(data_dir=tmp_path, admin_token=SecretStr(ADMIN_TOKEN))
    )


def test_federations_file_sets_enrolment_secrets_from_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The deployment path: federations and their secrets come from mounted files."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "fed-a.secret").write_text("a" * 40 + "\n")
    entries = [
        {
            "federation_id": "from-file",
            "modules": [{"name": "m0", "d_out": 16, "d_in": 12}],
            "enrolment_secret_file": "fed-a.secret",
        },
        {"federation_id": "no-secret", "modules": [{"name": "m0", "d_out": 16, "d_in": 12}]},
    ]
    feds = config / "federations.json"
    feds.write_text(json.dumps(entries))
    data = tmp_path / "data"
    with (
        caplog.at_level(logging.INFO, logger="raflora.server"),
        threaded_server(data, admin_token=ADMIN_TOKEN, federations_file=feds) as server,
        RafloraClient(server.target, "from-file", "c", enrolment_secret="a" * 40) as c,
    ):
        c.join(rank=2, num_examples=1)
        old_token = c.token
    assert "federation no-secret enrols clients with per-client credentials only" in caplog.text
    # The operator replaces the secret file and restarts: the new secret is stored, tokens
    # issued under the old one are revoked, and the old secret no longer admits anyone.
    (config / "fed-a.secret").write_text("b" * 40)
    with threaded_server(data, admin_token=ADMIN_TOKEN, federations_file=feds) as server:
        with (
            RafloraClient(server.target, "from-file", "c", token=old_token, retry=NO_RETRY) as c,
            pytest.raises(UnauthenticatedError, match="revoked"),
        ):
            c.status()
        with (
            RafloraClient(
                server.target, "from-file", "d", enrolment_secret="a" * 40, retry=NO_RETRY
            ) as c,
            pytest.raises(UnauthenticatedError),
        ):
            c.join(rank=2, num_examples=1)
        with RafloraClient(server.target, "from-file", "d", enrolment_secret="b" * 40) as c:
            assert c.join(rank=2, num_examples=1).round == 0
    # An unchanged file keeps the stored secret (and so every token) as it is.
    stored = (data / "federations" / "from-file" / "enrolment.json").read_text()
    with threaded_server(data, admin_token=ADMIN_TOKEN, federations_file=feds):
        pass
    assert (data / "federations" / "from-file" / "enrolment.json").read_text() == stored
