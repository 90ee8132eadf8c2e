"""The docs' examples run as written against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raflora.server.testing import python_env, threaded_server

from .helpers import ROOT


@pytest.mark.parametrize("script", ["plain_pytorch.py", "peft_model.py"])
def test_example_runs(tmp_path: Path, script: str) -> None:
    if script == "peft_model.py":
        pytest.importorskip("peft")
    with threaded_server(tmp_path) as server:
        run = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / script),
                "--target",
                server.target,
                "--rounds",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=python_env(extra_dirs=("demo",)),
        )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("round")]
    assert len(lines) == 2 and "round 2 published" in lines[-1]
