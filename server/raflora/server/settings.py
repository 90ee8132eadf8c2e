"""Server settings: defaults that run out of the box, overridable by file and environment.

Precedence: explicit arguments > environment (``RAFLORA_*``) > JSON/TOML file > defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from raflora.v1.wire import DEFAULT_CHUNK_SIZE


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAFLORA_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535, description="0 picks a free port")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=-1, le=65535, description="-1 disables, 0 picks")
    data_dir: Path = Path("raflora-data")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1024, le=4 << 20)
    max_message_bytes: int = Field(default=8 << 20, ge=64 << 10)
    federations_file: Path | None = Field(
        default=None, description="JSON list of federations created at start if absent"
    )
    grace_seconds: float = Field(default=5.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

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


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServerSettings:
    """Build settings from an optional JSON/TOML file, then environment, then ``overrides``."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        text = config_file.read_text()
        file_values = tomllib.loads(text) if config_file.suffix == ".toml" else json.loads(text)
    # pydantic-settings gives init kwargs precedence over env; apply env on top of the file.
    # The raw environment only: the cross-field checks run once, on the merged values.
    env_set = EnvSettingsSource(ServerSettings)()
    merged = {**file_values, **env_set, **{k: v for k, v in overrides.items() if v is not None}}
    return ServerSettings(**merged)
