"""The engine demo runs and shows collapse under FlexLoRA but not raFLoRA."""

from __future__ import annotations

import pytest

from raflora.server.engine_demo import main


def test_demo_shows_collapse(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rounds", "4", "--dim", "32", "--local-steps", "5"]) == 0
    out = capsys.readouterr().out
    final = {
        line.split()[0]: float(line.split()[1])
        for line in out.splitlines()
        if line.startswith(("flexlora ", "raflora "))
    }
    assert set(final) == {"flexlora", "raflora"}
    assert final["flexlora"] > final["raflora"] + 0.2
