"""Generate the Python stubs of proto/ (never edit them by hand).

Usage: python scripts/gen_proto.py          # regenerate in place
       python scripts/gen_proto.py --check  # fail if the committed stubs drifted
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
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
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
