"""Server assembly and the ``raflora-server`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import os
import signal
import sys
import textwrap
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

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
from .cluster.ray_modules import RayModuleMap, RayUnavailableError
from .config import FederationConfig
from .errors import ServiceError
from .metrics import Heartbeat, ServerMetrics
from .rounds import FederationHub, RuntimeLimits
from .settings import (
    ConfigError,
    ServerSettings,
    check_startup,
    env_name,
    flag_name,
    is_secret,
    load_settings,
    unknown_environment,
)
from .storage import FileStorage, Storage

log = logging.getLogger("raflora.server")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["AdminService"].full_name,
    pb.DESCRIPTOR.services_by_name["AggregationService"].full_name,
)


def open_storage(settings: ServerSettings) -> Storage:
    """The durable store the settings name: the data directory, or a bucket (issue 13)."""
    if settings.storage == "file":
        return FileStorage(settings.data_dir)
    from .storage.s3 import BucketUnreachableError, connect

    assert settings.s3_bucket is not None  # the settings validator requires it
    if settings.token_key_file is None:
        log.warning(
            "storage is s3 but token_key_file is unset: the token key stays in %s, so a "
            "replacement server signs new tokens and clients must authenticate again; mount "
            "the key from a Secret (docs/operations.md)",
            settings.data_dir,
        )
    try:
        return connect(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            scratch=settings.data_dir,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            public_endpoint_url=settings.s3_public_endpoint_url,
        )
    except BucketUnreachableError as exc:
        raise ConfigError(f"s3_bucket: cannot use {exc}") from None


def open_module_map(settings: ServerSettings, metrics: ServerMetrics) -> RayModuleMap | None:
    """The Ray cluster of ``ray_address``, joined and checked; None: aggregate in process."""
    if settings.ray_address is None:
        return None
    device = resolve_device(settings.device)
    if device.type != "cpu":
        raise ConfigError(
            f"ray_address: module tasks run on the Ray workers' CPUs, but device resolves to "
            f"{device}; set device=cpu (or unset ray_address)"
        )
    module_map = RayModuleMap(
        settings.ray_address,
        task_timeout_seconds=settings.ray_task_timeout_seconds,
        on_tasks=metrics.ray_tasks.inc,
        on_fallback=lambda _reason: metrics.ray_fallbacks.inc(),
    )
    try:
        summary = module_map.connect()
    except RayUnavailableError as exc:
        raise ConfigError(f"ray_address: cannot use {exc}") from None
    log.info("aggregating modules on the Ray cluster %s", summary)
    return module_map


class RafloraServer:
    """The aggregation service: gRPC API, health, reflection and /metrics."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.device = str(resolve_device(settings.device))
        self.metrics = ServerMetrics(settings.collapse_e_min_threshold)
        self.heartbeat = Heartbeat(settings.health_heartbeat_timeout_seconds)
        self.health_port = 0
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.storage = open_storage(settings)
        self.module_map = open_module_map(settings, self.metrics)
        self.hub = FederationHub(
            self.storage,
            self.metrics,
            self.device,
            RuntimeLimits(
                max_pushes_per_round=settings.max_pushes_per_round,
                fold_memory_bytes=settings.fold_memory_mib << 20,
                preload_memory_bytes=settings.preload_memory_mib << 20,
                preload_max_upload_bytes=settings.preload_max_upload_mib << 20,
                round_sums_memory_bytes=settings.round_sums_memory_mib << 20,
                hot_view_memory_bytes=settings.hot_view_memory_mib << 20,
                chunk_size=settings.chunk_size,
                aggregation_workers=settings.aggregation_workers,
                aggregation_delay_seconds=settings.debug_aggregation_delay_seconds,
            ),
            self.module_map,
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
            # A second server on the same port must fail to start, not share it silently.
            ("grpc.so_reuseport", 0),
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
            s.direct_url_seconds,
        )
        add_services(
            server,
            ("AdminService", AdminService(self.hub, self.metrics, self.authority, limits)),
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
        self._serve_http()
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

    def _serve_http(self) -> None:
        """The plaintext HTTP side: /metrics, and /healthz and /readyz from a thread of their
        own that reads the event loop's heartbeat (so that probes catch a hung loop in every
        mode, TLS included), on the metrics port or on health_port."""
        s = self.settings
        self.metrics.record_build(self.device)
        self._heartbeat_task = asyncio.get_running_loop().create_task(self.heartbeat.run())
        on_metrics_port = s.health_port < 0
        if s.metrics_port >= 0:
            beat = self.heartbeat if on_metrics_port else None
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port, beat)
        if not on_metrics_port:
            self.health_port = self.metrics.serve_health(
                s.metrics_host, s.health_port, self.heartbeat
            )
        elif s.metrics_port >= 0:
            self.health_port = self.metrics_port
        else:
            log.warning("metrics_port and health_port are both -1: no /healthz or /readyz")
        self.heartbeat.ready = True

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
        self.heartbeat.ready = False  # /readyz: 503 while draining
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_seconds if grace is None else grace)
        await self.hub.close()
        if self.module_map is not None:
            self.module_map.close()
        self.metrics.close()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        log.info("raflora server stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: ServerSettings, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = RafloraServer(settings)
    try:
        await server.start()
    except BaseException:  # e.g. a port taken: close what did start, then report
        with contextlib.suppress(Exception):
            await server.stop(0)
        raise
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


# -- logging -----------------------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, the record's
    ``extra`` fields (e.g. the access log's method, peer, status, reason, federation, client)
    and, when there is one, the exception with its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger to stderr, as ``text`` lines or ``json`` objects (settings.log_format);
    Python warnings go through it too, so that a JSON log stays JSON line by line."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


# -- the raflora-server command ----------------------------------------------------------------

#: The version --version prints when the package's metadata cannot be read (a bare source tree);
#: tests/test_server_cli.py keeps it equal to pyproject.toml's.
__version__ = "0.1.0"

_EPILOG = """\
Every setting is an option, an environment variable and a --config key:
  --metrics-port 9000  =  RAFLORA_METRICS_PORT=9000  =  metrics_port = 9000 (TOML)
(RAFLORA_ + the setting's name in capitals). Options beat the environment, which beats the
file, which beats the defaults. A RAFLORA_* variable that names no setting is reported with
a warning. A setting the server cannot use (a bad value, an unknown --config key, a file it
cannot read, a port in use) stops it before it starts: one line on stderr, exit status 2.
See docs/operations.md.
"""


def package_version() -> str:
    """The installed distribution's version, else :data:`__version__`."""
    try:
        return importlib.metadata.version("raflora")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def _shown_default(field: str) -> str:
    value = ServerSettings.model_fields[field].get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _setting_help(field: str) -> str:
    """A setting's description, default and environment variable (``%`` escaped for argparse)."""
    description = (ServerSettings.model_fields[field].description or "").rstrip(".")
    text = f"{description}. Default: {_shown_default(field)}. Env: {env_name(field)}."
    return text.replace("%", "%%")


def _kinds(field: str) -> set[Any]:
    """The types a setting's value may have, None left out (``Path | None``: {Path})."""
    annotation = ServerSettings.model_fields[field].annotation
    return set(typing.get_args(annotation)) - {type(None)} or {annotation}


def _metavar(field: str) -> str:
    annotation = ServerSettings.model_fields[field].annotation
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    kinds = _kinds(field)
    if Path in kinds:
        return "PATH"
    if int in kinds:
        return "N"
    if float in kinds:
        return "SECONDS" if field.endswith("_seconds") else "X"
    return "HOST" if field.endswith("host") else "TEXT"


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from :class:`ServerSettings`: one option per setting,
    ``--name-with-dashes``, its help the field's description, default and variable. Values stay
    strings here; the settings model validates them, like the environment's. Credentials
    (``SecretStr`` fields) get no option: a value on the command line is visible in ``ps``."""
    p = argparse.ArgumentParser(
        prog="raflora-server",
        description="raFLoRA federated LoRA aggregation server",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument("--config", type=Path, metavar="FILE", help="JSON or TOML (.toml) settings")
    group = p.add_argument_group("settings")
    secrets = []
    for field in ServerSettings.model_fields:
        if is_secret(field):
            secrets.append(field)
            continue
        flag = flag_name(field)
        if bool in _kinds(field):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=_setting_help(field)
            )
            continue
        group.add_argument(flag, metavar=_metavar(field), help=_setting_help(field))
    if secrets:
        lines = [
            "Credentials: environment or --config file only, never an option (ps shows options).",
            "Prefer the *_file settings.",
        ]
        for field in secrets:
            wrapped = textwrap.wrap(
                f"{env_name(field)} ({field}): {_setting_help(field).replace('%%', '%')}",
                width=96,
                initial_indent="  ",
                subsequent_indent="      ",
            )
            lines.extend(wrapped)
        p.add_argument_group("environment-only settings", "\n".join(lines))
    return p


def _fail(message: str, warnings: Sequence[str] = ()) -> int:
    for warning in warnings:
        print(f"raflora-server: warning: {warning}", file=sys.stderr)
    print(f"raflora-server: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


async def _serve_checked(settings: ServerSettings) -> None:
    """:func:`serve`, with a failure to start (a port taken since the checks, a data directory
    it cannot write) raised as ConfigError; failures once serving propagate as they are."""
    ready = asyncio.Event()
    try:
        await serve(settings, ready)
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        if ready.is_set() or "Failed to bind" not in str(exc):
            raise
        where = f"port ({flag_name('port')} / {env_name('port')})"
        raise ConfigError(f"{where}: {str(exc).split(';')[0]}") from None
    except OSError as exc:
        if ready.is_set():
            raise
        raise ConfigError(f"cannot start: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings = unknown_environment(os.environ)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        settings = load_settings(args.config, **overrides)
        check_startup(settings)
    except ConfigError as exc:
        return _fail(str(exc), warnings)
    configure_logging(settings.log_level, settings.log_format)
    for warning in warnings:
        log.warning("%s", warning)
    try:
        asyncio.run(_serve_checked(settings))
    except ConfigError as exc:
        return _fail(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
