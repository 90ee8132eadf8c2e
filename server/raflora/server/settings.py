"""Server settings: defaults that run out of the box, overridable by file and environment.

Precedence: explicit arguments > environment (``RAFLORA_*``) > JSON/TOML file > defaults.

Every field carries a description: ``raflora-server --help`` is generated from this model
(one flag per field, named after it; env ``RAFLORA_<FIELD>``), so a new setting documents itself.
A setting that cannot be used raises :class:`ConfigError`, one line naming the setting, where its
value came from and what is wrong.
"""

from __future__ import annotations

import difflib
import errno
import json
import re
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from raflora.v1.wire import DEFAULT_CHUNK_SIZE

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (the server extra installs it there)
    import tomli as tomllib


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAFLORA_", extra="forbid")

    host: str = Field(
        default="127.0.0.1",
        description="Interface the gRPC server listens on (0.0.0.0: every IPv4 interface)",
    )
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_host: str = Field(default="127.0.0.1", description="Interface of /metrics")
    metrics_port: int = Field(
        default=9464, ge=-1, le=65535, description="Prometheus /metrics port; -1 disables, 0 picks"
    )
    data_dir: Path = Field(
        default=Path("raflora-data"),
        description="Durable federation state: uploads, rounds, credentials (created if absent)",
    )
    storage: Literal["file", "s3"] = Field(
        default="file",
        description="Where durable state lives: file (data_dir) or s3 (an S3-compatible bucket; "
        "data_dir then holds only scratch files and pull views). docs/operations.md, "
        "'Object-store mode'",
    )
    s3_bucket: str | None = Field(
        default=None, description="storage=s3: the bucket (it must exist)"
    )
    s3_prefix: str = Field(
        default="raflora",
        description="storage=s3: key prefix of this server's objects; two servers that must "
        "not share federations use two prefixes",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="storage=s3: endpoint of an S3-compatible service (unset: AWS). "
        "Credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a mounted "
        "AWS_SHARED_CREDENTIALS_FILE, never from these settings",
    )
    s3_region: str | None = Field(default=None, description="storage=s3: the bucket's region")
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="storage=s3, data_plane=direct federations: the endpoint clients reach the "
        "bucket at, which pre-signed URLs name (unset: s3_endpoint_url)",
    )
    direct_url_seconds: float = Field(
        default=900.0,
        ge=1,
        le=86400,
        description="data_plane=direct: how long a pre-signed upload or download URL works",
    )
    device: str = Field(
        default="auto",
        description="Aggregation device: auto (CUDA when present), cpu, cuda, cuda:N",
    )
    chunk_size: int = Field(
        default=DEFAULT_CHUNK_SIZE, ge=1024, le=4 << 20, description="Bytes per Push/Pull chunk"
    )
    max_message_bytes: int = Field(
        default=8 << 20,
        ge=64 << 10,
        description="Largest gRPC message either way; at least chunk_size + 16 KiB",
    )
    federations_file: Path | None = Field(
        default=None, description="JSON list of federations created at start if absent"
    )
    grace_seconds: float = Field(
        default=5.0, ge=0, description="On SIGTERM, how long running RPCs may take to finish"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Lowest level logged"
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: one human-readable line per record; json: one JSON object per line "
        "(ts, level, logger, message and the record's fields) for log collectors",
    )

    # -- health and monitoring (docs/operations.md) ----------------------------------------
    health_port: int = Field(
        default=-1,
        ge=-1,
        le=65535,
        description="Plaintext HTTP port (on metrics_host) of /healthz and /readyz, which "
        "answer 503 when the event loop stops beating; -1 serves them on the metrics port, "
        "0 picks a free port",
    )
    health_heartbeat_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="/healthz and /readyz fail once the event loop's heartbeat (every second) "
        "is older than this",
    )
    collapse_e_min_threshold: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="A published round whose E_min is above this counts towards "
        "raflora_rank_collapse_rounds (the RafloraRankCollapse alert)",
    )

    # -- transport security (docs/security.md) ---------------------------------------------
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate chain of the server; with tls_key_file: TLS"
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of the server")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle; when set, mutual TLS: clients must present a certificate "
        "it signed",
    )

    # -- authentication --------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        default=None,
        description="Admin credential (>= 16 characters); setting it (or admin_token_file) "
        "turns authentication on",
    )
    admin_token_file: Path | None = Field(
        default=None, description="File holding the admin token (preferred over admin_token)"
    )
    require_auth: bool = Field(
        default=False, description="Refuse to start without an admin token (production)"
    )
    token_key_file: Path | None = Field(
        default=None,
        description="HMAC key signing client tokens; default <data_dir>/token.key, created "
        "with mode 0600 if absent",
    )
    token_ttl_seconds: float = Field(
        default=3600.0, ge=1.0, le=30 * 86400, description="Lifetime of a client token"
    )

    # -- limits ----------------------------------------------------------------------------
    max_concurrent_rpcs: int = Field(
        default=1024,
        ge=1,
        description="raflora RPCs in flight server-wide (health checks never count); more: "
        "RESOURCE_EXHAUSTED",
    )
    max_rpcs_per_client: int = Field(
        default=64, ge=1, description="RPCs in flight per authenticated client"
    )
    max_watches_per_client: int = Field(
        default=4, ge=1, description="WatchRounds streams open per authenticated client"
    )
    max_rpcs_per_host: int = Field(
        default=512, ge=1, description="RPCs in flight per peer host without a client token"
    )
    push_header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="A Push must send its header this soon after opening"
    )
    max_concurrent_streams: int = Field(
        default=128, ge=1, description="HTTP/2 streams per connection (grpc.max_concurrent_streams)"
    )
    max_pushes_per_round: int = Field(
        default=10,
        ge=1,
        description="Push attempts per client per round, refused ones included",
    )
    idle_stream_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A Push or Pull stream with no message moving for this long is aborted",
    )
    max_request_seconds: float = Field(
        default=3600.0, gt=0, description="Longest a single Push or Pull may take"
    )
    aggregation_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Rounds of different federations aggregated at once. One aggregation "
        "already uses every core, so 1 suits one busy federation; raise it (with CPU or GPUs "
        "to match) so that many federations do not queue behind a heavy one "
        "(raflora_aggregation_queue_seconds shows the wait)",
    )
    ray_address: str | None = Field(
        default=None,
        description="Aggregate each round's modules as tasks on this Ray cluster "
        "(docs/operations.md): ray://HEAD:10001 (Ray Client, for a server outside the "
        "cluster), HOST:6379 (a server on a cluster node) or local (a one-machine cluster "
        "started by the server, for trials). Unset: in process. The workers must run this "
        "raflora; private federations always aggregate in process",
    )
    ray_task_timeout_seconds: float = Field(
        default=900.0,
        gt=0,
        description="A round whose Ray tasks take longer is aggregated in process instead "
        "(raflora_ray_fallbacks_total counts it)",
    )
    fold_memory_mib: int = Field(
        default=0,
        ge=0,
        description="Memory each federation's open round may hold for the uploads folded as "
        "they arrive (docs/design.md §2.10). Folding pays only when clients' uploads share "
        "directions; on independent uploads it slows the round, so 0 (off) is the default. "
        "Past the budget the round closes one-shot",
    )
    preload_memory_mib: int = Field(
        default=256,
        ge=0,
        description="Memory the server may hold, over every federation's open round, of "
        "uploads kept in memory as their pushes checked them, so that the round's close need "
        "not read them back (docs/design.md §4.2). Uploads past it are read by the close, as "
        "with 0 (off)",
    )
    preload_max_upload_mib: int = Field(
        default=16,
        ge=0,
        description="The largest upload preload_memory_mib keeps: larger ones stream in a few "
        "chunks of memory whatever their size, and the close reads them back",
    )
    round_sums_memory_mib: int = Field(
        default=256,
        ge=0,
        description="Memory the server may hold, over every federation's open round, of the "
        "dense sums of the uploads kept in memory (one d_out × d_in matrix per module and rank "
        "interval), so that a round of many clients closes by combining them instead of "
        "stacking every upload (docs/design.md §2.11). A round past it closes one-shot, as "
        "with 0 (off)",
    )
    hot_view_memory_mib: int = Field(
        default=512,
        ge=0,
        description="Memory the server may hold of pull views as the messages a pull sends, "
        "so that a cached pull neither reads, hashes nor frames its view again (docs/design.md "
        "§4.3); no one view above a quarter of it. Views past it stream from storage, as with "
        "0 (off)",
    )
    debug_aggregation_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Test hook: sleep this long before persisting each aggregated round "
        "(fault tests kill the server in that window). Leave 0 in production.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("set admin_token or admin_token_file, not both")
        token = self.admin_token.get_secret_value() if self.admin_token is not None else None
        if token is not None and len(token.strip()) < 16:
            raise ValueError("admin_token must have at least 16 characters")
        if self.require_auth and self.admin_token is None and self.admin_token_file is None:
            raise ValueError("require_auth is set but no admin_token or admin_token_file is")
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("storage is s3 but s3_bucket is not set")
        if self.max_message_bytes < self.chunk_size + (16 << 10):
            raise ValueError("max_message_bytes must exceed chunk_size by at least 16 KiB")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def mutual_tls(self) -> bool:
        return self.tls_client_ca_file is not None

    def resolved_admin_token(self) -> str | None:
        """The admin token, read from ``admin_token_file`` when that is how it is given."""
        if self.admin_token_file is not None:
            token = self.admin_token_file.read_text().strip()
            if len(token) < 16:
                raise ValueError(f"the admin token in {self.admin_token_file} is under 16 chars")
            return token
        if self.admin_token is not None:
            return self.admin_token.get_secret_value().strip()
        return None


# -- loading, with errors an operator can act on -------------------------------------------------

ENV_PREFIX = "RAFLORA_"
#: ``RAFLORA_*`` variables that other programs of the package read (the container's health check
#: script), not settings: no unknown-variable warning for them.
OTHER_ENV_PREFIXES = ("RAFLORA_HEALTHCHECK_",)
#: Files named by settings that need not exist at start (the server creates them).
CREATED_IF_ABSENT = frozenset({"token_key_file"})
#: The ports the server listens on, each with the setting naming its interface.
LISTENERS = (("port", "host"), ("metrics_port", "metrics_host"), ("health_port", "metrics_host"))


class ConfigError(ValueError):
    """Settings the server cannot start with. ``str()`` is one line: the setting, where its
    value came from (flag, ``RAFLORA_*`` variable or config file) and what is wrong."""


def env_name(field: str) -> str:
    """The environment variable of a setting: ``RAFLORA_`` + its name in capitals."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line option of a setting: ``--`` + its name with dashes."""
    return "--" + field.replace("_", "-")


def is_secret(field: str) -> bool:
    """A credential (``SecretStr``): never a command-line value, which ``ps`` would show."""
    annotation = ServerSettings.model_fields[field].annotation
    return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(ServerSettings.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``RAFLORA_*`` variable that is no setting: a typo, most likely, that
    pydantic-settings would silently ignore. Names match case-insensitively, as settings do."""
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(OTHER_ENV_PREFIXES):
            continue
        field = upper[len(ENV_PREFIX) :].lower()
        if field in ServerSettings.model_fields:
            continue
        close = difflib.get_close_matches(field, list(ServerSettings.model_fields), n=1)
        hint = f"; did you mean {env_name(close[0])}?" if close else ""
        warnings.append(f"{name} is not a raflora-server setting and is ignored{hint}")
    return warnings


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a ``--config`` file: TOML if it ends in ``.toml``, else JSON; an object
    whose keys are setting names. Unreadable, unparsable files and unknown keys: ConfigError."""
    kind = "TOML" if path.suffix == ".toml" else "JSON"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    try:
        values = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"config file {path}: not valid {kind}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path}: expected an object of settings, not {kind} "
            f"{type(values).__name__}"
        )
    unknown = [key for key in values if key not in ServerSettings.model_fields]
    if unknown:
        names = ", ".join(f"{key!r}{_did_you_mean(key)}" for key in unknown)
        raise ConfigError(f"config file {path}: unknown setting {names}")
    return values


def _shown(field: str, value: Any) -> str:
    return "'***'" if is_secret(field) else repr(str(value))


def _validation_error(exc: ValidationError, origins: Mapping[str, str]) -> ConfigError:
    problems = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = error["loc"]
        if loc:
            field = str(loc[0])
            origin = origins.get(field)
            problems.append(f"{field}: {message}" + (f" ({origin})" if origin else ""))
        else:  # a cross-field check: name where the settings it mentions came from
            named = [
                origins[f]
                for f in ServerSettings.model_fields
                if f in origins and re.search(rf"\b{f}\b", message)
            ]
            problems.append(message + (f" ({'; '.join(named)})" if named else ""))
    return ConfigError("; ".join(problems))


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServerSettings:
    """Build settings from an optional JSON/TOML file, then environment, then ``overrides``
    (the command line's options; None means not given).

    Raises ConfigError (a ValueError) naming the setting, where its value came from and what
    is wrong.
    """
    file_values = read_config_file(config_file) if config_file is not None else {}
    # pydantic-settings gives init kwargs precedence over env; apply env on top of the file.
    # The raw environment only: the cross-field checks run once, on the merged values.
    try:
        env_set = EnvSettingsSource(ServerSettings)()
    except ValueError as exc:  # pydantic-settings' SettingsError: a value it could not decode
        raise ConfigError(f"environment: {exc}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    origins = {k: f"{k} = {_shown(k, v)} in {config_file}" for k, v in file_values.items()}
    origins |= {k: f"{env_name(k)}={_shown(k, v)}" for k, v in env_set.items()}
    origins |= {k: f"{flag_name(k)} {_shown(k, v)}" for k, v in given.items()}
    try:
        return ServerSettings(**{**file_values, **env_set, **given})
    except ValidationError as exc:
        raise _validation_error(exc, origins) from None


def check_startup(settings: ServerSettings) -> None:
    """What valid settings can still get wrong before the server starts: files it must read
    (TLS material, the admin token, the federations file) and ports it must listen on.

    Raises ConfigError naming the setting, its flag and variable, and the problem.
    """
    fields = ServerSettings.model_fields
    for name in fields:
        path = getattr(settings, name)
        if not name.endswith("_file") or not isinstance(path, Path) or name in CREATED_IF_ABSENT:
            continue
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigError(
                f"{name} ({flag_name(name)} / {env_name(name)}): cannot read {path}: "
                f"{exc.strerror or exc}"
            ) from None
    try:
        settings.resolved_admin_token()
    except ValueError as exc:
        raise ConfigError(f"admin_token_file: {exc}") from None
    taken: dict[tuple[str, int], str] = {}
    for port_field, host_field in LISTENERS:
        if port_field not in fields:
            continue
        host, port = str(getattr(settings, host_field)), int(getattr(settings, port_field))
        if port <= 0:  # 0: the OS picks a free port; -1: off
            continue
        where = f"{port_field} ({flag_name(port_field)} / {env_name(port_field)})"
        other = taken.setdefault((host, port), port_field)
        if other != port_field:
            raise ConfigError(f"{where}: {host}:{port} is also {other}")
        problem = port_problem(host, port)
        if problem is not None:
            raise ConfigError(f"{where}: cannot listen on {host}:{port}: {problem}")


def port_problem(host: str, port: int) -> str | None:
    """Why a TCP listener on ``host:port`` would fail now (None: it would not).

    A probe bind, with SO_REUSEADDR (so TIME_WAIT leftovers of a previous run do not count) and
    without SO_REUSEPORT, which gRPC sets: a second server on the same port, which gRPC would
    let share it silently, is refused here. Racy by nature; the real bind still reports.
    """
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    failures: list[OSError] = []
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "address already in use"
                failures.append(exc)
    if failures and len(failures) == len(dict.fromkeys(addresses)):
        return str(failures[0].strerror or failures[0])
    return None
