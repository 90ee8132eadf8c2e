"""Generate the Python stubs of proto/ (never edit them by hand).

Usage: python scripts/gen_proto.py          # regenerate in place
       python scripts/gen_proto.py --check  # fail if the committed stubs drifted

Outputs, per ``.proto`` (grpcio-tools' bundled protoc, plus mypy-protobuf's two plugins):

* ``*_pb2.py`` (``--python_out``) and ``*_pb2_grpc.py`` (``--grpc_python_out``): the runtime
  modules;
* ``*_pb2_grpc.pyi`` (``--mypy_grpc_out``, ``protoc-gen-mypy_grpc``): the service stubs, which
  grpcio-tools does not emit. They type the client stubs and the servicer base classes, sync
  and ``grpc.aio``, so neither servicers nor clients need ``Any`` or ``# type: ignore``;
* ``*_pb2.pyi`` (``--mypy_out``, ``protoc-gen-mypy``): the message stubs. These come from
  mypy-protobuf too, not from protoc's ``--pyi_out``: protoc's stubs fail ``mypy --strict``
  (bare ``Mapping`` in every constructor) and needed an ``ignore_errors`` override, while
  mypy-protobuf's pass as they are, and the code that builds and reads messages checks the
  same against both, so the switch touched only this generated file.

grpcio-tools and mypy-protobuf are pinned to exact versions (pyproject.toml, ``dev``) so that
``--check`` gives the same bytes on every machine. The plugins are looked up next to the
running interpreter (a virtual environment's bin/), then on PATH.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")  # both from mypy-protobuf


def plugin(name: str) -> Path:
    """The protoc plugin executable ``name``: beside this interpreter, else on PATH."""
    exe = name + (".exe" if sys.platform == "win32" else "")
    beside = Path(sys.executable).parent / exe
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return Path(found)


def generate(out: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        *[f"--plugin={name}={plugin(name)}" for name in PLUGINS],
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        # quiet: no "Writing mypy to ..." line per file on stderr.
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        drifted = []
        for path in fresh:
            rel = path.relative_to(tmp)
            target = PROTO_ROOT / rel
            if args.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    drifted.append(str(rel))
            else:
                shutil.copyfile(path, target)
        if drifted:
            print("generated stubs drifted from proto/: " + ", ".join(drifted), file=sys.stderr)
            print("run: python scripts/gen_proto.py", file=sys.stderr)
            return 1
    print(f"{'checked' if args.check else 'generated'} {len(fresh)} files from proto/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
