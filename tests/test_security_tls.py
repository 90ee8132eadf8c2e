"""TLS and mutual TLS, with a throwaway CA made by ``cryptography`` (raflora.server.testing).

Also the end-to-end check that no secret reaches the logs or /metrics: a ``raflora-server``
process with TLS, auth and DEBUG logging runs a full round with refused attempts mixed in, and
its whole log and a /metrics scrape are searched for every credential used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raflora.client_sdk import (
    AdminClient,
    RafloraClient,
    RafloraError,
    RetryPolicy,
    UnauthenticatedError,
)
from raflora.server.settings import ServerSettings
from raflora.server.testing import (
    Pki,
    ThreadedServer,
    make_pki,
    scrape,
    start_server_process,
    threaded_server,
)

from .helpers.adapters import factors
from .helpers.federations import every_client_spec, spec

MODULES = {"m0": (16, 12)}
ADMIN_TOKEN = "tls-admin-token-0123456789"
NO_RETRY = RetryPolicy(attempts=1)
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def health_code(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return exc.code()
    return grpc.StatusCode.OK


def round_trip(target: str, credentials: grpc.ChannelCredentials, fid: str) -> None:
    """Create a federation, join, push, and pull the published round, all over TLS."""
    with AdminClient(target, credentials=credentials, admin_token=ADMIN_TOKEN) as admin:
        secret = admin.create_federation(
            spec(fid, MODULES, max_rank=4), open_enrolment=True
        ).enrolment_secret
    with RafloraClient(
        target, fid, "c", credentials=credentials, enrolment_secret=secret
    ) as client:
        client.join(rank=2, num_examples=3)
        client.push(factors(2, 0, MODULES), round=0, num_examples=3)
        assert client.wait_for_round(0, timeout=30).round == 1
        assert client.pull().round == 1


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with threaded_server(
        tmp_path_factory.mktemp("tls"),
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        admin_token=ADMIN_TOKEN,
    ) as handle:
        yield handle


def test_tls_serves_verified_clients_and_refuses_plaintext(
    pki: Pki, tls_server: ThreadedServer, tmp_path: Path
) -> None:
    round_trip(tls_server.target, pki.channel_credentials(), "tls")
    assert health_code(tls_server.target, None) in REFUSED  # plaintext
    # A client that trusts another CA refuses the server's certificate.
    other_ca = grpc.ssl_channel_credentials(root_certificates=pki.other_ca_client.cert.read_bytes())
    assert health_code(tls_server.target, other_ca) in REFUSED
    with RafloraClient(tls_server.target, "tls", "c", retry=NO_RETRY, timeout=5) as plain:
        with pytest.raises(RafloraError) as info:
            plain.status()
        assert info.value.code in REFUSED


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki, tmp_path: Path) -> None:
    with threaded_server(
        tmp_path,
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_client_ca_file=pki.ca_cert,
        admin_token=ADMIN_TOKEN,
    ) as server:
        assert health_code(server.target, None) in REFUSED
        assert health_code(server.target, pki.channel_credentials()) in REFUSED  # no cert
        stranger = pki.channel_credentials(pki.other_ca_client)
        assert health_code(server.target, stranger) in REFUSED  # cert from another CA
        good = pki.channel_credentials(pki.client)
        assert health_code(server.target, good) == grpc.StatusCode.OK
        round_trip(server.target, good, "mtls")
        # mTLS admits the machine; the federation's credentials are still required.
        with (
            RafloraClient(server.target, "mtls", "x", credentials=good, retry=NO_RETRY) as c,
            pytest.raises(UnauthenticatedError),
        ):
            c.join(rank=2, num_examples=1)


def test_tls_settings_must_be_complete(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        ServerSettings(data_dir=tmp_path, tls_cert_file=pki.server.cert)
    with pytest.raises(ValueError, match="together"):
        ServerSettings(data_dir=tmp_path, tls_key_file=pki.server.key)
    with pytest.raises(ValueError, match="mutual TLS"):
        ServerSettings(data_dir=tmp_path, tls_client_ca_file=pki.ca_cert)


def test_secrets_never_reach_logs_or_metrics(pki: Pki, tmp_path: Path) -> None:
    """A TLS + auth server process at DEBUG: no credential in its log or on /metrics."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    credentials = pki.channel_credentials()
    server = start_server_process(
        tmp_path / "data",
        tmp_path / "server.log",
        extra_args=[
            "--admin-token-file",
            str(token_file),
            "--tls-cert-file",
            str(pki.server.cert),
            "--tls-key-file",
            str(pki.server.key),
            "--log-level",
            "DEBUG",
            "--require-auth",
        ],
        credentials=credentials,
    )
    seen: list[str] = [ADMIN_TOKEN]
    try:
        target = f"localhost:{server.port}"  # the certificate's DNS name works too
        with AdminClient(target, credentials=credentials, admin_token=ADMIN_TOKEN) as admin:
            secret = admin.create_federation(
                every_client_spec("quiet", MODULES, 2, max_rank=4), open_enrolment=True
            ).enrolment_secret
            seen.append(secret)
            clients = []
            for i, cid in enumerate(("a", "b")):
                client = RafloraClient(
                    target, "quiet", cid, credentials=credentials, enrolment_secret=secret
                )
                client.join(rank=2, num_examples=3)
                assert client.token is not None and client.client_credential is not None
                seen.append(client.token)
                seen.append(client.client_credential)  # issued at this first join
                clients.append(client)
                client.push(factors(2, i, MODULES), round=0, num_examples=3)
            # Refused attempts with wrong and stolen credentials, which a log might echo.
            wrong = "wrong-secret-" + "z" * 30
            seen.append(wrong)
            with (
                RafloraClient(
                    target, "quiet", "c", credentials=credentials, enrolment_secret=wrong
                ) as intruder,
                pytest.raises(UnauthenticatedError),
            ):
                intruder.join(rank=2, num_examples=1)
            assert clients[0].token is not None
            with (
                RafloraClient(
                    target, "quiet", "b", credentials=credentials, token=clients[0].token
                ) as thief,
                pytest.raises(RafloraError),
            ):
                thief.pull()
            assert clients[0].wait_for_round(0, timeout=30).round == 1
            assert clients[1].pull().round == 1
            old_token = clients[0].token
            rotated = admin.rotate_enrolment_secret("quiet")
            seen.append(rotated)
            with (
                RafloraClient(
                    target, "quiet", "a", credentials=credentials, token=old_token
                ) as revoked,
                pytest.raises(UnauthenticatedError),
            ):
                revoked.status()
            assert clients[0].status().round == 1  # re-joins with its own credential
            for client in clients:
                client.close()
        metrics = scrape(server.metrics_url)
        assert 'raflora_security_info{auth="on",tls="tls"} 1.0' in metrics
        assert 'code="UNAUTHENTICATED"' in metrics and 'code="PERMISSION_DENIED"' in metrics
    finally:
        assert server.terminate() == 0
    log = server.log_text()
    assert "auth on, tls tls" in log and "DEBUG" in log
    fragments: list[str] = []
    for credential in seen:
        fragments.append(credential)
        fragments.extend(p for p in credential.split(".") if len(p) >= 16)  # token parts
    for fragment in fragments:
        assert fragment not in log, "a credential reached the server log"
        assert fragment not in metrics, "a credential reached /metrics"
    data = tmp_path / "data"
    for path in data.rglob("*"):
        if path.is_file() and path.name != "token.key":
            body: Any = path.read_bytes()
            for credential in (ADMIN_TOKEN, *seen[1:]):
                assert credential.encode() not in body, path
