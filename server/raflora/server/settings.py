"""Server settings: defaults that run out of the box, overridable by file and environment.

Precedence: explicit arguments > environment (``RAFLORA_*``) > JSON/TOML file > defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServerSettings:
    """Build settings from an optional JSON/TOML file, then environment, then ``overrides``."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        text = config_file.read_text()
        file_values = tomllib.loads(text) if config_file.suffix == ".toml" else json.loads(text)
    # pydantic-settings gives init kwargs precedence over env; apply env on top of the file.
    env_view = ServerSettings()
    env_set = {k: getattr(env_view, k) for k in env_view.model_fields_set}
    merged = {**file_values, **env_set, **{k: v for k, v in overrides.items() if v is not None}}
    return ServerSettings(**merged)
