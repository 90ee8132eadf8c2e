"""Packaging: the package list in pyproject.toml covers every Python package of the source
tree, `pip install raflora` is the thin SDK (the server behind the `server` extra), the
container's constraints pin the server's dependencies, and the sources stay Python 3.10."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from raflora.server.testing import python_env

from .helpers import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


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


# -- the distribution: a thin SDK, the server behind an extra ----------------------------------

PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "deploy/docker/constraints.txt"
#: Distributions only raflora-server (or the PEFT helpers) import: never in `pip install raflora`.
SERVER_ONLY = {
    "pydantic",
    "pydantic-settings",
    "prometheus-client",
    "grpcio-health-checking",
    "grpcio-reflection",
}
PEFT_ONLY = {"peft", "transformers"}
#: Their import names, hidden from the SDK's interpreter below.
HIDDEN_MODULES = (
    "pydantic",
    "pydantic_settings",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
    "peft",
    "transformers",
    "tomli",
)
SDK_WITHOUT_SERVER = """
import sys
from importlib.abc import MetaPathFinder

HIDDEN = set(sys.argv[1].split(","))


class Refuse(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None


sys.meta_path.insert(0, Refuse())
from raflora.client_sdk import AdminClient, RafloraClient

client = RafloraClient("127.0.0.1:1", "f", "c")
admin = AdminClient("127.0.0.1:1")
client.close()
admin.close()
loaded = [m for m in sys.modules if m.split(".")[0] in HIDDEN or m.startswith("raflora.server")]
assert not loaded, loaded
print("sdk ok")
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(PYPROJECT.read_text())["project"]
    return table


def requirements(entries: list[str]) -> dict[str, Requirement]:
    return {canonical(r.name): r for r in map(Requirement, entries)}


def test_sdk_imports_and_connects_without_the_servers_packages() -> None:
    """`pip install raflora` has no pydantic, prometheus, health/reflection or PEFT: the SDK
    must import and build its clients (channels connect lazily) with all of them missing."""
    result = subprocess.run(
        [sys.executable, "-c", SDK_WITHOUT_SERVER, ",".join(HIDDEN_MODULES)],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "sdk ok" in result.stdout, result.stderr[-3000:]


def test_base_dependencies_are_the_sdks_and_the_server_extra_has_the_rest() -> None:
    table = project()
    base = requirements(table["dependencies"])
    extras = {
        name: requirements(entries) for name, entries in table["optional-dependencies"].items()
    }
    assert not (set(base) & (SERVER_ONLY | PEFT_ONLY)), sorted(set(base))
    assert {"grpcio", "grpcio-status", "protobuf", "safetensors", "torch", "numpy"} <= set(base)
    assert set(extras["server"]) >= SERVER_ONLY
    assert set(extras["peft"]) >= PEFT_ONLY
    tomli = extras["server"]["tomli"]
    assert tomli.marker is not None and "python_version" in str(tomli.marker)
    # torch 2.13.0 (the wheel on our machines) satisfies the range.
    assert base["torch"].specifier.contains("2.13.0")
    # The demo starts a server and trains PEFT clients; `make install` (dev, demo) has both.
    for extra in ("demo", "dev"):
        (self_ref,) = [r for name, r in extras[extra].items() if name == "raflora"]
        assert {"server", "peft"} <= self_ref.extras, (extra, self_ref)
    assert "'.[dev,demo]'" in (ROOT / "Makefile").read_text()
    scripts = table["scripts"]
    assert scripts["raflora-server"] == "raflora.server.app:main"
    assert scripts["raflora"] == "raflora.client_sdk.cli:main"


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the non-stdlib, non-raflora modules a file imports (lazily too; not
    those under ``if TYPE_CHECKING:``, which only the type checker reads)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in {"raflora", "tomli"}}


def closure(reqs: dict[str, Requirement]) -> set[str]:
    """The installed distributions ``reqs`` bring, transitively (markers evaluated here)."""
    seen: set[str] = set()
    todo = [r for r in reqs.values() if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in seen or name == "raflora":
            continue
        seen.add(name)
        for raw in importlib.metadata.requires(req.name) or []:
            sub = Requirement(raw)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return seen


@pytest.mark.parametrize(
    ("folder", "extras", "skip"),
    [
        ("client_sdk", (), {"peft_adapter.py"}),
        ("client_sdk", ("peft",), set()),
        ("proto", (), set()),
        # testing*.py are the test harness (cryptography for make_pki, boto3 for SeaweedFS:
        # dev dependencies).
        ("server", ("server", "s3", "ray"), {"testing.py", "testing_s3.py"}),
    ],
)
def test_imports_are_covered_by_the_declared_dependencies(
    folder: str, extras: tuple[str, ...], skip: set[str]
) -> None:
    table = project()
    declared = requirements(table["dependencies"])
    for extra in extras:
        declared |= requirements(table["optional-dependencies"][extra])
    provided = closure(declared)
    owners = importlib.metadata.packages_distributions()
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.name in skip:
            continue
        for module in third_party_imports(path):
            dists = {canonical(d) for d in owners.get(module, [])}
            assert dists & provided, f"{path.relative_to(ROOT)} imports {module} ({dists})"


def test_container_constraints_pin_the_servers_dependencies() -> None:
    """deploy/docker/constraints.txt pins every direct dependency of raflora[server,s3,ray] but
    torch (the Dockerfile's TORCH_VERSION), exactly and within pyproject.toml's ranges."""
    table = project()
    extras = table["optional-dependencies"]
    wanted = (
        requirements(table["dependencies"])
        | requirements(extras["server"])
        | requirements(extras["s3"])
        | requirements(extras["ray"])
    )
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonical(req.name)] = spec.version
    for name, req in wanted.items():
        if name == "torch" or (req.marker is not None and not req.marker.evaluate()):
            continue
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert "torch" not in pins
    dockerfile = (ROOT / "deploy/docker/Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile and '".[server,s3,ray]"' in dockerfile


# -- Python 3.10 ---------------------------------------------------------------------------------

#: Standard-library names new in 3.11, by module (``from M import NAME`` or ``M.NAME``).
NEW_IN_311 = {
    "typing": {
        "Self",
        "LiteralString",
        "Never",
        "assert_never",
        "reveal_type",
        "Required",
        "NotRequired",
        "TypeVarTuple",
        "Unpack",
        "dataclass_transform",
        "assert_type",
    },
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"},
    "datetime": {"UTC"},
    "enum": {"StrEnum", "ReprEnum", "verify", "member", "nonmember", "global_enum"},
    "hashlib": {"file_digest"},
    "contextlib": {"chdir"},
    "logging": {"getLevelNamesMapping"},
}
NEW_MODULES_311 = {"tomllib", "wsgiref.types"}
NEW_BUILTINS_311 = {"ExceptionGroup", "BaseExceptionGroup"}


def version_guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``if sys.version_info ...:`` or a ``try`` that handles ImportError."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.If) and "version_info" in ast.unparse(parent.test):
            return True
        if isinstance(parent, ast.Try) and child in parent.body:
            handled = " ".join(ast.unparse(h.type) for h in parent.handlers if h.type is not None)
            if "ImportError" in handled or "ModuleNotFoundError" in handled:
                return True
        child, parent = parent, parents.get(parent)
    return False


def py311_only_uses(tree: ast.Module) -> list[str]:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    aliases = {}  # local name -> module, for `import datetime as dt`
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
                if alias.name in NEW_MODULES_311 and not version_guarded(node, parents):
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in NEW_MODULES_311 and not version_guarded(node, parents):
                found.append(f"line {node.lineno}: from {node.module} import")
            new = NEW_IN_311.get(node.module, set())
            for alias in node.names:
                if alias.name in new and not version_guarded(node, parents):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = aliases.get(node.value.id, node.value.id)
            if node.attr in NEW_IN_311.get(module, set()) and not version_guarded(node, parents):
                found.append(f"line {node.lineno}: {module}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS_311:
            found.append(f"line {node.lineno}: {node.id}")
        elif type(node).__name__ == "TryStar":  # ast.TryStar exists on 3.11+ only
            found.append(f"line {getattr(node, 'lineno', '?')}: except*")
    return found


def test_sources_stay_python_3_10() -> None:
    """requires-python is >=3.10, and CI runs 3.11 only. A cheap stand-in for a 3.10 interpreter
    (none on this machine's PATH): every module parses with 3.10's grammar, and none uses a
    3.11-only standard-library name (tomllib, typing.Self, asyncio.TaskGroup, …) unguarded.
    It cannot see behaviour that changed (e.g. asyncio.TimeoutError is not TimeoutError on 3.10)."""
    assert project()["requires-python"] == ">=3.10"
    problems = []
    for folder in ("server", "client_sdk", "proto", "demo"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path), feature_version=(3, 10))
            problems += [f"{path.relative_to(ROOT)} {p}" for p in py311_only_uses(tree)]
    assert not problems, problems
