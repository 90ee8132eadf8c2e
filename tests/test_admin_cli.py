"""The ``raflora`` admin CLI, run as real processes against a real server process.

``python -m raflora.client_sdk.cli`` (what the ``raflora`` console script runs) creates
federations from JSON and TOML spec files and from flags, lists and gets them (JSON output
parsed), lists clients, rotates secrets, exports adapters and deletes; refusals are one line
on stderr naming the reason, exit status 1 and no traceback; usage errors exit with 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from raflora.client_sdk import RafloraClient, RetryPolicy
from raflora.client_sdk.cli import main
from raflora.server.testing import ServerProcess, python_env

from .helpers.adapters import factors

MODULES = {"q": (8, 6), "v": (4, 6)}
ADMIN_TOKEN = "admin-cli-0123456789abcdef-test"


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


def cli(
    target: str, *args: str, env: Mapping[str, str] | None = None, token_file: Path | None = None
) -> Run:
    command = [sys.executable, "-m", "raflora.client_sdk.cli", "--target", target]
    if token_file is not None:
        command += ["--admin-token-file", str(token_file)]
    extra = {"RAFLORA_ADMIN_TOKEN": "", "RAFLORA_TARGET": "", **(env or {})}
    done = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=python_env(extra),
    )
    return Run(done.returncode, done.stdout, done.stderr)


def refused(run: Run, *needles: str) -> None:
    """Exit status 1, one line on stderr that names every needle, no traceback."""
    assert run.code == 1, (run.code, run.out, run.err)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert "Traceback" not in run.err and lines[0].startswith("raflora: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("cli")
    with ServerProcess(folder / "data", folder / "server.log") as handle:
        yield handle


def test_federations_from_files_and_flags_then_export_and_delete(
    server: ServerProcess, tmp_path: Path
) -> None:
    t = server.target
    spec_file = tmp_path / "fed.json"
    spec_file.write_text(
        json.dumps(
            {
                "federation_id": "cli-json",
                "strategy": "raflora",
                "max_rank": 4,
                "modules": [{"name": n, "d_out": o, "d_in": i} for n, (o, i) in MODULES.items()],
                "min_clients": 1,
                "keep_rounds": 2,
                "scaling_rule": "rslora",
            }
        )
    )
    created = cli(t, "federations", "create", "--spec", str(spec_file), "--format", "json").json()
    assert created["spec"]["federation_id"] == "cli-json"
    assert created["spec"]["round_policy"]["keep_rounds"] == 2
    assert created["spec"]["scaling_rule"] == "SCALING_RULE_RSLORA"
    assert created["status"]["round"] == 0  # an integer, not proto JSON's "0"

    toml_file = tmp_path / "fed.toml"
    toml_file.write_text(
        'federation_id = "cli-toml"\nmax_rank = 2\n'
        '[[modules]]\nname = "q"\nd_out = 8\nd_in = 6\n'
        "[strategy_options]\ngamma = 0.5\n"
    )
    toml = cli(t, "--format", "json", "federations", "create", "-f", str(toml_file)).json()
    assert toml["spec"]["strategy_options"] == {"gamma": "0.5"}

    flags = cli(
        t,
        "federations",
        "create",
        "--id",
        "cli-flags",
        "--modules",
        "q:8:6",
        "v:4:6",
        "--max-rank",
        "4",
        "--strategy",
        "flexlora",
        "--expected-clients",
        "2",
    )
    assert flags.code == 0, flags.err
    assert "cli-flags" in flags.out and "flexlora" in flags.out

    listed = cli(t, "federations", "list", "--format", "json").json()
    assert [f["spec"]["federation_id"] for f in listed] == ["cli-flags", "cli-json", "cli-toml"]
    table = cli(t, "federations", "list")
    assert table.code == 0 and table.out.splitlines()[0].split()[:3] == ["ID", "STRATEGY", "R"]
    assert len(table.out.splitlines()) == 4

    with RafloraClient(t, "cli-json", "c1", retry=RetryPolicy(attempts=1)) as c:
        c.join(rank=4, num_examples=10, lora_alpha=8)
        c.push(factors(4, 0, MODULES), round=0, num_examples=10)
        c.wait_for_round(0, timeout=30)
    got = cli(t, "federations", "get", "cli-json", "--format", "json").json()
    assert got["status"]["round"] == 1 and got["status"]["joined_clients"] == 1
    assert "cli-json" in cli(t, "federations", "get", "cli-json").out

    clients = cli(t, "clients", "list", "cli-json", "--format", "json").json()
    assert [(c["client_id"], c["rank"], c["last_round_uploaded"]) for c in clients] == [
        ("c1", 4, 0)
    ]
    assert cli(t, "clients", "list", "cli-json").out.split()[:2] == ["CLIENT_ID", "RANK"]

    refused(cli(t, "federations", "rotate-secret", "cli-json"), "AUTH_DISABLED")

    out = tmp_path / "adapter"
    exported = cli(
        t, "federations", "export", "cli-json", "--out", str(out), "--rank", "2", "--format", "json"
    ).json()
    assert exported["path"] == str(out) and exported["r"] == 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 2
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    refused(cli(t, "federations", "export", "cli-json", "--out", str(out)), "not an empty")

    deleted = cli(t, "federations", "delete", "cli-json", "--archive", "--format", "json").json()
    assert deleted["archive"].startswith("cli-json-")
    assert (server.data_dir / "archive" / deleted["archive"] / "federation.json").exists()
    refused(cli(t, "federations", "get", "cli-json"), "NOT_FOUND", "FEDERATION_NOT_FOUND")
    refused(cli(t, "clients", "list", "cli-json"), "FEDERATION_NOT_FOUND")
    plain = cli(t, "federations", "delete", "cli-flags")
    assert plain.code == 0 and "deleted federation cli-flags" in plain.out
    assert not (server.data_dir / "federations" / "cli-flags").exists()
    names = [
        f["spec"]["federation_id"] for f in cli(t, "federations", "list", "--format", "json").json()
    ]
    assert names == ["cli-toml"]


def test_usage_and_local_errors(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process ``main()`` (the same code as the console script; fewer interpreters)."""
    t = server.target
    assert cli(t, "federations", "create", "--id", "x").code == 2  # one real process

    def main_exit(*args: str) -> int:
        try:
            return main(["--target", t, *args])
        except SystemExit as exc:  # argparse's own usage errors
            return int(exc.code or 0)

    for args in (
        ("federations",),
        ("federations", "get"),
        ("federations", "create"),
        ("federations", "create", "--id", "x", "--modules", "q:8"),
        ("federations", "list", "--format", "yaml"),
        ("federations", "list", "--tls-cert", "c.pem"),
    ):
        assert main_exit(*args) == 2, args
    capsys.readouterr()

    def local_refusal(*needles: str, args: tuple[str, ...]) -> None:
        code = main_exit(*args)
        refused(Run(code, *capsys.readouterr()), *needles)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"federation_id": "b", "modules": [], "max_rnak": 4}))
    local_refusal("max_rnak", args=("federations", "create", "--spec", str(bad)))
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps({"federation_id": "b", "max_rank": "four"}))
    local_refusal("max_rank", args=("federations", "create", "--spec", str(wrong_type)))
    invalid = tmp_path / "invalid.json"  # parses, but the server refuses it (no modules)
    invalid.write_text(json.dumps({"federation_id": "b", "max_rank": 4}))
    local_refusal("INVALID_ARGUMENT", args=("federations", "create", "--spec", str(invalid)))
    missing = str(tmp_path / "missing.json")
    local_refusal("missing.json", args=("federations", "create", "--spec", missing))
    local_refusal(
        "UNAVAILABLE", args=("--target", "127.0.0.1:1", "federations", "list", "--timeout", "5")
    )


def test_with_authentication_on(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-admin-token-at-all\n")
    args = ["--admin-token-file", str(token_file)]
    with ServerProcess(tmp_path / "data", tmp_path / "server.log", extra_args=args) as server:
        t = server.target
        created = cli(
            t,
            "federations",
            "create",
            "--id",
            "secure",
            "--modules",
            "q:8:6",
            "--max-rank",
            "4",
            "--open-enrolment",
            "--format",
            "json",
            token_file=token_file,
        ).json()
        secret = created["enrolment_secret"]
        assert len(secret) >= 32
        refused(cli(t, "federations", "list", token_file=wrong), "UNAUTHENTICATED", "NOT_ADMIN")
        refused(cli(t, "federations", "list"), "CREDENTIAL_MISSING")
        by_env = cli(
            t, "federations", "list", "--format", "json", env={"RAFLORA_ADMIN_TOKEN": ADMIN_TOKEN}
        ).json()
        assert [f["spec"]["federation_id"] for f in by_env] == ["secure"]
        rotated = cli(
            t, "federations", "rotate-secret", "secure", "--format", "json", token_file=token_file
        ).json()
        assert rotated["enrolment_secret"] not in ("", secret)
        issued = cli(
            t, "clients", "credential", "secure", "c9", "--format", "json", token_file=token_file
        ).json()
        assert issued["client_credential"].startswith("rfc1.")
        refused(cli(t, "federations", "delete", "secure", token_file=wrong), "NOT_ADMIN")
        assert cli(t, "federations", "delete", "secure", token_file=token_file).code == 0
        refused(
            cli(t, "federations", "get", "secure", token_file=token_file), "FEDERATION_NOT_FOUND"
        )


def test_a_private_federation_shows_its_privacy_spent(
    server: ServerProcess, tmp_path: Path
) -> None:
    spec_file = tmp_path / "private.json"
    spec_file.write_text(
        json.dumps(
            {
                "federation_id": "cli-private",
                "modules": [{"name": n, "d_out": o, "d_in": i} for n, (o, i) in MODULES.items()],
                "max_rank": 4,
                "weighting": "uniform",
                "privacy": {"noise_multiplier": 1.1, "clip_norm": 2.5},
            }
        )
    )
    created = cli(server.target, "federations", "create", "-f", str(spec_file), "--format", "json")
    assert created.json()["spec"]["privacy"] == {
        "noise_multiplier": 1.1,
        "clip_norm": 2.5,
        "delta": 1e-05,
    }
    shown = cli(server.target, "federations", "get", "cli-private")
    assert shown.code == 0, shown.err
    assert "z=1.1, clip_norm=2.5" in shown.out
    assert "0 at delta=1e-05 after 0 round(s)" in shown.out
    spec_file.write_text(
        json.dumps(
            {**json.loads(spec_file.read_text()), "federation_id": "x", "weighting": "examples"}
        )
    )
    refused(cli(server.target, "federations", "create", "-f", str(spec_file)), "weighting")
