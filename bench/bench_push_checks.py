"""What the push-time trust checks cost on a large upload, against references in the same run.

An upload is validated before it is acknowledged. The structural checks (names, dtypes,
shapes, finite in its own dtype) were there before; the trust-boundary checks add, per module,
a cast to the compute dtype, the peak of s·B and A, and ‖s·B·A‖_F from r×r Gram products.
This measures both on the same safetensors file, with memcpy and SHA-256 of the payload as
references (the server hashes every byte anyway), and prints the added time as a ratio.

    .venv/bin/python bench/bench_push_checks.py --mib 64 --repeats 5

Run it alone: it prints the load average and how many cores the phases kept busy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from raflora.server.engine import AdapterSchema, ClientUpdate, FactorPair, ModuleShape
from raflora.server.engine.validation import validate_update
from raflora.server.storage.tensorio import (
    UpdateBounds,
    open_file,
    validate_upload,
)
from raflora.v1.wire import LORA_A, LORA_B, tensor_name


def adapter(mib: int, rank: int, dim: int) -> tuple[dict[str, torch.Tensor], AdapterSchema]:
    per_module = 2 * rank * dim * 4
    modules = max(1, (mib << 20) // per_module)
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for i in range(modules):
        name = f"layers.{i}.q_proj"
        tensors[tensor_name(name, LORA_A)] = torch.randn(rank, dim, generator=g) / dim**0.5
        tensors[tensor_name(name, LORA_B)] = torch.randn(dim, rank, generator=g) * 0.01
        shapes[name] = (dim, dim)
    return tensors, AdapterSchema.from_shapes(shapes)


def structural_only(path: Path, schema: AdapterSchema, rank: int) -> None:
    """The checks an upload had before the trust boundary: the engine's (names, dtypes, shapes,
    finite in its own dtype), module by module."""
    with open_file(path) as reader:
        for module, shape in schema.modules.items():
            pair = FactorPair(
                B=reader.get(tensor_name(module, LORA_B)), A=reader.get(tensor_name(module, LORA_A))
            )
            single = AdapterSchema({module: ModuleShape(shape.d_out, shape.d_in)})
            validate_update(ClientUpdate("c", rank, 1, 2.0, {module: pair}), single, rank)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall seconds, cores busy = CPU time / wall time)."""
    walls, busy = [], []
    fn()  # warm the page cache and allocator
    for _ in range(repeats):
        cpu0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        walls.append(wall)
        busy.append((time.process_time() - cpu0) / wall)
    return statistics.median(walls), statistics.median(busy)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mib", type=int, default=64, help="payload size in MiB")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    tensors, schema = adapter(args.mib, args.rank, args.dim)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.safetensors"
        save_file(tensors, str(path))
        payload = path.read_bytes()
        size = len(payload)
        bounds = UpdateBounds(torch.float32, 1e6)

        def full() -> None:
            with open_file(path) as reader:
                validate_upload(reader, schema, args.rank, "c", 2.0, bounds)

        rows = {
            "memcpy of the payload": timed(lambda: bytearray(payload), args.repeats),
            "sha256 of the payload": timed(lambda: hashlib.sha256(payload).digest(), args.repeats),
            "structural checks (before)": timed(
                lambda: structural_only(path, schema, args.rank), args.repeats
            ),
            "structural + trust checks (after)": timed(full, args.repeats),
        }
    print(
        f"payload {size / 2**20:.1f} MiB, {len(schema.modules)} modules of {args.dim}², "
        f"rank {args.rank}; torch threads {torch.get_num_threads()}; load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    sha = rows["sha256 of the payload"][0]
    print(f"{'phase':38} {'ms':>9} {'MiB/s':>9} {'x sha256':>9} {'cores busy':>11}")
    for name, (wall, busy) in rows.items():
        print(
            f"{name:38} {wall * 1e3:9.1f} {size / 2**20 / wall:9.0f} {wall / sha:9.2f} {busy:11.2f}"
        )
    before = rows["structural checks (before)"][0]
    after = rows["structural + trust checks (after)"][0]
    print(
        f"added by the trust checks: {(after - before) * 1e3:.1f} ms per {size / 2**20:.0f} MiB "
        f"upload = {(after - before) / sha:.2f}x the time to hash it"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
