"""The ``raflora-server`` command line, run as the real entry point in a child process.

``--help`` is generated from :class:`ServerSettings` (every setting, with its description,
default and ``RAFLORA_*`` variable); ``--version``; a setting the server cannot use ends it with
one line on stderr and exit status 2, no traceback; a misspelt ``RAFLORA_*`` variable is
warned about without stopping the server.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from raflora.server import app
from raflora.server.settings import ServerSettings, env_name, flag_name, is_secret
from raflora.server.testing import LOOPBACK, ServerProcess, python_env

from .helpers import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def run_server(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m raflora.server.app ARGS`` with no ``RAFLORA_*`` but ``env``'s."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("RAFLORA_")}
    return subprocess.run(
        [sys.executable, "-m", "raflora.server.app", *args],
        env=python_env({"COLUMNS": "100", **(env or {})}, base=clean),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def squeezed(text: str) -> str:
    """Without whitespace: argparse wraps help lines (and breaks them after hyphens)."""
    return re.sub(r"\s+", "", text)


def shown_default(field: str) -> str:
    value = ServerSettings.model_fields[field].get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def assert_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2 and exactly one line on stderr, naming every needle; no traceback."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("raflora-server: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def test_help_lists_every_setting_with_its_description_default_and_variable() -> None:
    result = run_server("--help")
    assert result.returncode == 0, result.stderr
    text = squeezed(result.stdout)
    for field, info in ServerSettings.model_fields.items():
        assert info.description, f"{field} has no description: --help would show none"
        entry = squeezed(
            f"{info.description.rstrip('.')}. Default: {shown_default(field)}. "
            f"Env: {env_name(field)}."
        )
        assert entry in text, field
        if is_secret(field):  # a credential: no option, whose value `ps` would show
            assert not re.search(re.escape(flag_name(field)) + r"(?![\w-])", result.stdout), field
        else:
            assert flag_name(field) in result.stdout, field
    # The options that existed before --help was generated still do.
    for flag in ("--config", "--host", "--port", "--metrics-port", "--data-dir", "--device"):
        assert flag in result.stdout
    for flag in ("--admin-token-file", "--require-auth", "--no-require-auth", "--log-level"):
        assert flag in result.stdout
    assert "RAFLORA_ADMIN_TOKEN " in result.stdout


def test_version_is_the_packages() -> None:
    result = run_server("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"raflora-server {importlib.metadata.version('raflora')}"
    # The fallback for a bare source tree (no installed metadata) is kept in step.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert app.__version__ == pyproject["project"]["version"]


def test_a_bad_environment_value_is_one_line_naming_the_variable() -> None:
    result = run_server(env={"RAFLORA_PORT": "abc"})
    assert_config_error(result, "RAFLORA_PORT", "'abc'", "port")


def test_an_unknown_config_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('host = "127.0.0.1"\nprot = 6000\n')
    line = assert_config_error(run_server("--config", str(config)), "'prot'", str(config))
    assert "'port'" in line  # the closest real setting


def test_an_unreadable_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert_config_error(run_server("--config", str(missing)), str(missing), "cannot read")


@pytest.mark.parametrize("setting", ["port", "metrics_port"])
def test_a_port_in_use_is_named(tmp_path: Path, setting: str) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"port": "0", "metrics_port": "-1", setting: str(port)}
        result = run_server(
            "--port",
            ports["port"],
            "--metrics-port",
            ports["metrics_port"],
            "--data-dir",
            str(tmp_path / "data"),
            "--device",
            "cpu",
        )
    assert_config_error(result, f"{LOOPBACK}:{port}", flag_name(setting), "in use")
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_a_misspelt_variable_is_warned_about_and_the_server_runs(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", env={"RAFLORA_PROT": "1"})
    with server:
        pass  # started, SERVING (health check), then stopped with SIGTERM
    assert server.process.returncode == 0, server.log_text()
    (warning,) = [line for line in server.log_text().splitlines() if "RAFLORA_PROT" in line]
    assert "WARNING" in warning and "RAFLORA_PORT" in warning, warning
