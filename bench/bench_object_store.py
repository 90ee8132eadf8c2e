"""Push and pull through the real server on the local disk vs on an S3 bucket (issue 13, part 6).

One sitting, three measurements of the same adapter bytes:

* the bucket itself: a boto3 PUT and GET of the payload against the same SeaweedFS
  (the reference: what the object store can move here);
* ``raflora-server`` with ``storage = file``: push + first pull + cached pull via the SDK;
* ``raflora-server`` with ``storage = s3`` on that SeaweedFS: the same;
* the same server with a ``data_plane = direct`` federation: the SDK posts the payload to the
  bucket and gets it back with pre-signed URLs; the server reads the upload back once to check
  it and puts each pull view into the bucket once.

Prints MiB/s (2 × payload / (push + pull)), the ratios, the server's own CPU seconds per
round trip, with the load average and cores busy. Run alone: nothing else on the machine.

    .venv/bin/python bench/bench_object_store.py [--size-mib 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench_service import (
    LOAD_BEFORE,
    MODULE_DIM,
    THROUGHPUT_RANK,
    MiB,
    contended,
    cpu_seconds,
    log,
    make_adapter,
    median,
    module_shapes,
)
from safetensors.torch import save as save_safetensors

from raflora.client_sdk import AdminClient, RafloraClient, pb
from raflora.server.testing import federation_spec, start_server_process
from raflora.server.testing_s3 import create_bucket, seaweedfs

BUCKET = "raflora-bench"


def through_server(
    workdir: Path,
    name: str,
    env: dict[str, str],
    modules: int,
    repeats: int,
    data_plane: int = pb.DATA_PLANE_GRPC,
) -> dict[str, list[float]]:
    tensors = make_adapter(modules, MODULE_DIM, THROUGHPUT_RANK, seed=1)
    handle = start_server_process(workdir / name, workdir / f"{name}.log", env=env)
    times: dict[str, list[float]] = {
        "push": [],
        "first": [],
        "cached": [],
        "busy": [],
        "server push": [],
        "server first pull": [],
        "server cached pull": [],
    }
    try:
        with AdminClient(handle.target) as admin:
            admin.create_federation(
                federation_spec(
                    "tp",
                    module_shapes(modules, MODULE_DIM),
                    max_rank=THROUGHPUT_RANK,
                    min_clients=repeats + 2,
                    data_plane=data_plane,
                )
            )
        for i in range(repeats):
            with RafloraClient(handle.target, "tp", f"client-{i}") as client:
                info = client.join(THROUGHPUT_RANK, num_examples=100, lora_alpha=16.0 + i)
                cpu0, own0, t0 = cpu_seconds(handle.pid), time.process_time(), time.perf_counter()
                client.push(tensors, round=info.round, num_examples=100)
                cpu1, t1 = cpu_seconds(handle.pid), time.perf_counter()
                client.pull()
                cpu2, t2 = cpu_seconds(handle.pid), time.perf_counter()
                client.pull()
                cpu3, t3 = cpu_seconds(handle.pid), time.perf_counter()
                busy = (cpu3 - cpu0 + time.process_time() - own0) / (t3 - t0)
            times["server push"].append(cpu1 - cpu0)
            times["server first pull"].append(cpu2 - cpu1)
            times["server cached pull"].append(cpu3 - cpu2)
            times["push"].append(t1 - t0)
            times["first"].append(t2 - t1)
            times["cached"].append(t3 - t2)
            times["busy"].append(busy)
            log(
                f"{name} #{i}: push {t1 - t0:.2f}s, first pull {t2 - t1:.2f}s, "
                f"cached pull {t3 - t2:.2f}s (server + client {busy:.2f} cores busy)"
            )
    finally:
        handle.terminate()
    return times


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    modules = max(1, round(args.size_mib * MiB / (THROUGHPUT_RANK * 2 * MODULE_DIM * 4)))
    payload = save_safetensors(make_adapter(modules, MODULE_DIM, THROUGHPUT_RANK, seed=1))
    n = len(payload)
    load_before = os.getloadavg()[0]
    LOAD_BEFORE[0] = load_before
    workdir = Path(tempfile.mkdtemp(prefix="raflora-bench-s3-"))
    try:
        with seaweedfs(workdir / "seaweedfs") as server:
            create_bucket(server, BUCKET)
            client = server.client()
            put, get = [], []
            for i in range(args.repeats):
                key = f"raw/{uuid.uuid4().hex}"
                t0 = time.perf_counter()
                client.put_object(Bucket=BUCKET, Key=key, Body=payload)
                t1 = time.perf_counter()
                got = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                t2 = time.perf_counter()
                assert len(got) == n
                put.append(t1 - t0)
                get.append(t2 - t1)
                log(f"bucket #{i}: PUT {t1 - t0:.2f}s, GET {t2 - t1:.2f}s")
            file_times = through_server(workdir, "file", {}, modules, args.repeats)
            s3_env = {
                **server.env,
                "RAFLORA_STORAGE": "s3",
                "RAFLORA_S3_BUCKET": BUCKET,
                "RAFLORA_S3_PREFIX": "bench",
                "RAFLORA_S3_ENDPOINT_URL": server.endpoint_url,
            }
            s3_times = through_server(workdir, "s3", s3_env, modules, args.repeats)
            direct_env = {**s3_env, "RAFLORA_S3_PREFIX": "bench-direct"}
            direct_times = through_server(
                workdir, "direct", direct_env, modules, args.repeats, pb.DATA_PLANE_DIRECT
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def rate(push: list[float], pull: list[float]) -> float:
        return 2 * n / MiB / (median(push) + median(pull))

    bucket = rate(put, get)
    rows = [
        ("bucket: boto3 PUT + GET (reference)", bucket, None),
        (
            "server, storage=file: push + cached pull",
            rate(file_times["push"], file_times["cached"]),
            median(file_times["busy"]),
        ),
        (
            "server, storage=file: push + first pull",
            rate(file_times["push"], file_times["first"]),
            None,
        ),
        (
            "server, storage=s3: push + cached pull",
            rate(s3_times["push"], s3_times["cached"]),
            median(s3_times["busy"]),
        ),
        ("server, storage=s3: push + first pull", rate(s3_times["push"], s3_times["first"]), None),
        (
            "server, storage=s3, data_plane=direct: push + cached pull",
            rate(direct_times["push"], direct_times["cached"]),
            median(direct_times["busy"]),
        ),
        (
            "server, storage=s3, data_plane=direct: push + first pull",
            rate(direct_times["push"], direct_times["first"]),
            None,
        ),
    ]
    print(f"\nObject store vs local disk, {n / MiB:.0f} MiB adapter, median of {args.repeats}")
    print("| path | MiB/s moved | vs bucket | cores busy |")
    print("|---|---:|---:|---:|")
    for label, value, busy in rows:
        cores = f"{busy:.2f}{contended(busy)}" if busy is not None else ""
        print(f"| {label} | {value:.0f} | {value / bucket:.2f}× | {cores} |")
    print("\nThe server's own CPU seconds (median), per")
    print("| storage, data plane | push | first pull | cached pull |")
    print("|---|---:|---:|---:|")
    for label, times in (
        ("file, grpc", file_times),
        ("s3, grpc", s3_times),
        ("s3, direct", direct_times),
    ):
        phases = ("server push", "server first pull", "server cached pull")
        print(f"| {label} | " + " | ".join(f"{median(times[p]):.3f}" for p in phases) + " |")
    ratio = rate(s3_times["push"], s3_times["cached"]) / rate(
        file_times["push"], file_times["cached"]
    )
    direct_ratio = rate(direct_times["push"], direct_times["cached"]) / rate(
        s3_times["push"], s3_times["cached"]
    )
    print(f"\ndata_plane=direct / grpc on storage=s3 (push + cached pull): {direct_ratio:.2f}×")
    print(
        f"\nstorage=s3 / storage=file (push + cached pull): {ratio:.2f}×; push p50 "
        f"{median(s3_times['push']):.2f}s vs {median(file_times['push']):.2f}s. "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
