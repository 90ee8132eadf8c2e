"""Server assembly and the ``raflora-server`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from raflora.server.engine.strategies import resolve_device
from raflora.v1 import aggregation_pb2 as pb

from .api import AdminService, AggregationService, Limits, ServiceInterceptor, add_services
from .api.admission import Admission, AdmissionLimits
from .auth import Authority, load_or_create_key
from .config import FederationConfig
from .errors import ServiceError
from .metrics import ServerMetrics
from .rounds import FederationHub, RuntimeLimits
from .settings import ServerSettings, load_settings
from .storage import FileStorage

log = logging.getLogger("raflora.server")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["AdminService"].full_name,
    pb.DESCRIPTOR.services_by_name["AggregationService"].full_name,
)


class RafloraServer:
    """The aggregation service: gRPC API, health, reflection and /metrics."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.device = str(resolve_device(settings.device))
        self.metrics = ServerMetrics()
        self.storage = FileStorage(settings.data_dir)
        self.hub = FederationHub(
            self.storage,
            self.metrics,
            self.device,
            RuntimeLimits(
                max_pushes_per_round=settings.max_pushes_per_round,
                aggregation_delay_seconds=settings.debug_aggregation_delay_seconds,
            ),
        )
        admin_token = settings.resolved_admin_token()
        key = None
        if admin_token is not None:
            key = load_or_create_key(settings.token_key_file or settings.data_dir / "token.key")
        self.authority = Authority(admin_token, key, settings.token_ttl_seconds)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: aio.Server | None = None

    async def start(self) -> None:
        s = self.settings
        self.hub.resume_all()
        self.authority.load(self.storage, list(self.hub.federations))
        if s.federations_file is not None:
            await self._create_from_file(s.federations_file)
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        ]
        # No maximum_concurrent_rpcs: gRPC would count health checks too. Admission counts
        # only the raflora services, per caller and server-wide (api/admission.py).
        admission = Admission(
            AdmissionLimits(
                max_rpcs=s.max_concurrent_rpcs,
                max_rpcs_per_client=s.max_rpcs_per_client,
                max_watches_per_client=s.max_watches_per_client,
                max_rpcs_per_host=s.max_rpcs_per_host,
            ),
            self.authority,
        )
        server = aio.server(
            options=options,
            interceptors=[ServiceInterceptor(self.metrics, frozenset(SERVICE_NAMES), admission)],
        )
        limits = Limits(
            s.chunk_size,
            s.idle_stream_timeout_seconds,
            s.max_request_seconds,
            s.push_header_timeout_seconds,
        )
        add_services(
            server,
            ("AdminService", AdminService(self.hub, self.metrics, self.authority)),
            (
                "AggregationService",
                AggregationService(self.hub, self.metrics, limits, self.authority),
            ),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{s.host}:{s.port}"
        if s.tls_cert_file is not None and s.tls_key_file is not None:
            self.port = server.add_secure_port(address, server_credentials(s))
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        tls = "mtls" if s.mutual_tls else "tls" if s.tls else "off"
        self.metrics.security.labels("on" if self.authority.enabled else "off", tls).set(1)
        log.info(
            "raflora server on %s:%d (device %s, data %s, metrics port %s, %d federations, "
            "auth %s, tls %s)",
            s.host,
            self.port,
            self.device,
            s.data_dir,
            self.metrics_port or "off",
            len(self.hub.federations),
            "on" if self.authority.enabled else "off",
            tls,
        )
        if not self.authority.enabled:
            log.warning(
                "AUTHENTICATION IS OFF: anyone who can reach %s can create federations, join, "
                "push and pull. Set admin_token_file (and TLS) before exposing this server; "
                "see docs/security.md",
                f"{s.host}:{self.port}",
            )
        elif not s.tls:
            log.warning(
                "authentication is on but TLS is off: tokens and secrets cross the network in "
                "clear text; set tls_cert_file/tls_key_file unless a TLS proxy fronts the server"
            )

    async def _create_from_file(self, path: Path) -> None:
        """Create the federations a JSON file lists (if absent); apply their enrolment secrets.

        Besides the FederationConfig fields an entry may name ``enrolment_secret_file`` (a path,
        relative to the file's folder): open enrolment with that shared secret (one that differs
        from the stored one replaces it). Without it, clients join with per-client credentials.
        """
        for raw in json.loads(path.read_text()):
            entry: dict[str, Any] = dict(raw)
            secret_file = entry.pop("enrolment_secret_file", None)
            secret = entry.pop("enrolment_secret", None)
            config = FederationConfig.parse(entry)
            await self.hub.create(config, exist_ok=True)
            if secret_file is not None:
                secret = (path.parent / str(secret_file)).read_text().strip()
            if not self.authority.enabled:
                continue
            fid = config.federation_id
            if secret is not None and not self.authority.secret_matches(fid, str(secret)):
                try:
                    await asyncio.to_thread(self.authority.set_secret, fid, str(secret))
                except ServiceError as exc:
                    log.error("federation %s: %s ignored: %s", fid, path, exc)
                    continue
                log.info("federation %s: enrolment secret set from %s", fid, path)
            elif secret is None and not self.authority.has_record(fid):
                await asyncio.to_thread(
                    self.authority.configure, fid, open_enrolment=False, secret=None
                )
                log.info(
                    "federation %s enrols clients with per-client credentials only "
                    "(IssueClientCredential); give it enrolment_secret_file in %s for open "
                    "enrolment",
                    fid,
                    path,
                )

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let running ones finish within ``grace``, then close."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_seconds if grace is None else grace)
        await self.hub.close()
        self.metrics.close()
        log.info("raflora server stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: ServerSettings, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = RafloraServer(settings)
    await server.start()
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown requested")
    await server.stop()


def server_credentials(s: ServerSettings) -> grpc.ServerCredentials:
    """TLS from the settings' PEM files; mutual TLS (client certificates required) with a CA."""
    assert s.tls_cert_file is not None and s.tls_key_file is not None
    chain = s.tls_cert_file.read_bytes()
    key = s.tls_key_file.read_bytes()
    client_ca = s.tls_client_ca_file.read_bytes() if s.tls_client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raflora-server", description="raFLoRA federated LoRA aggregation server"
    )
    p.add_argument("--config", type=Path, help="JSON or TOML settings file")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--metrics-host")
    p.add_argument("--metrics-port", type=int, help="-1 disables /metrics")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--federations-file", type=Path, help="JSON list of federations to create")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--tls-cert-file", type=Path, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key-file", type=Path, help="PEM private key of --tls-cert-file")
    p.add_argument("--tls-client-ca-file", type=Path, help="PEM CA: require client certificates")
    p.add_argument("--admin-token-file", type=Path, help="admin token: turns authentication on")
    p.add_argument("--token-key-file", type=Path, help="client-token HMAC key (default in data)")
    p.add_argument(
        "--require-auth",
        action="store_true",
        default=None,
        help="refuse to start without an admin token",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    settings = load_settings(args.config, **overrides)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
