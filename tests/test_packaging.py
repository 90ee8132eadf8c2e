"""The package list in pyproject.toml covers every Python package of the source tree."""

from __future__ import annotations

import tomllib

from .helpers import ROOT


def test_every_source_package_is_declared() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = set()
    for prefix, folder in config["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((prefix, *rel)))
    assert found == declared


def test_engine_has_no_io_imports() -> None:
    """The math stays pure: no sockets, files, gRPC or metrics inside the engine."""
    banned = ("import grpc", "import socket", "prometheus", "open(", "import os", "pathlib")
    for source in (ROOT / "server/raflora/server/engine").rglob("*.py"):
        text = source.read_text()
        for needle in banned:
            assert needle not in text, f"{source.name} uses {needle!r}"
