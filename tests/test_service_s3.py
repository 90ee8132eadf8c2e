"""Object-store mode through real processes: a raflora-server on a SeaweedFS bucket.

The failover of issue 13: the server is SIGKILLed mid-round and its local disk is thrown
away; a replacement server with an empty data directory, on the same bucket, resumes the
federation from the bucket alone and publishes what a filesystem-backed server that never
crashed publishes.
"""

from __future__ import annotations

import shutil
import signal
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from raflora.client_sdk import RafloraClient, pb
from raflora.server.testing import start_server_process
from raflora.server.testing_s3 import SeaweedFS

from .test_service_crash import (
    ACKED_BEFORE_CRASH,
    CLIENTS,
    FEDERATION,
    MODULES,
    Launcher,
    N,
    create_federation,
    finish_round,
    join_all,
    launch,  # noqa: F401 (a fixture)
    push,
    run_without_crash,
)


def test_a_replacement_server_with_an_empty_disk_resumes_from_the_bucket(
    launch: Launcher,  # noqa: F811
    s3_env: dict[str, str],
    seaweed: SeaweedFS,
    tmp_path: Path,
) -> None:
    first_disk = tmp_path / "node-a"
    first = start_server_process(first_disk, tmp_path / "node-a.log", env=s3_env)
    try:
        create_federation(first.target)
        acked = [cid for cid, _, _ in CLIENTS[:ACKED_BEFORE_CRASH]]
        with ExitStack() as stack:
            clients = join_all(stack, first.target)
            for i, cid in enumerate(acked):
                result = push(clients[cid])
                assert (result.duplicate, result.uploads_in_round) == (False, i + 1)
    finally:
        first.kill()  # the node is lost mid-round ...
    assert first.process.returncode == -signal.SIGKILL
    shutil.rmtree(first_disk)  # ... and its disk with it
    assert not (first_disk / "federations").exists()

    second = start_server_process(tmp_path / "node-b", tmp_path / "node-b.log", env=s3_env)
    try:
        with ExitStack() as stack:
            probe = stack.enter_context(RafloraClient(second.target, FEDERATION, "c0"))
            status = probe.status()
            assert (status.round, status.uploads) == (0, ACKED_BEFORE_CRASH)
            assert status.joined_clients == N
            assert status.phase == pb.ROUND_PHASE_COLLECTING
            clients = join_all(stack, second.target)
            again = push(clients[acked[1]])  # a retry of an acked upload: not counted twice
            assert again.duplicate and again.uploads_in_round == ACKED_BEFORE_CRASH
            for cid, _, _ in CLIENTS[ACKED_BEFORE_CRASH:]:
                assert not push(clients[cid]).duplicate
            failover_pull = finish_round(clients)
    finally:
        assert second.terminate() == 0
    # Nothing durable went to the replacement's disk (pull views and spool files only): the
    # round is in the bucket.
    kept = {p.relative_to(tmp_path / "node-b").parts[0] for p in (tmp_path / "node-b").rglob("*")}
    assert kept <= {"views", "spool", "token.key"}, kept
    client = seaweed.client()
    prefix = f"{s3_env['RAFLORA_S3_PREFIX']}/federations/{FEDERATION}/rounds/00000001/"
    listed = client.list_objects_v2(Bucket=s3_env["RAFLORA_S3_BUCKET"], Prefix=prefix)
    names = sorted(o["Key"].rsplit("/", 1)[1] for o in listed["Contents"])
    assert names[0] == "manifest.json" and names[1].startswith("state-") and len(names) == 2

    baseline_pull = run_without_crash(launch, tmp_path / "baseline-on-disk")
    # Compared as products: the baseline server folds (tests/test_service_crash.py turns it
    # on), the replacement closes one-shot, and singular vectors of close singular values
    # differ by eps/gap between the two (docs/design.md §2.10).
    assert failover_pull.tensors.keys() == baseline_pull.tensors.keys()
    for module in MODULES:
        got, want = (
            p.tensors[f"{module}.lora_B.weight"] @ p.tensors[f"{module}.lora_A.weight"]
            for p in (failover_pull, baseline_pull)
        )
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), module


def test_a_server_that_cannot_reach_its_bucket_says_so(
    tmp_path: Path, s3_env: dict[str, str]
) -> None:
    env = {**s3_env, "RAFLORA_S3_BUCKET": "no-such-bucket"}
    with pytest.raises(RuntimeError) as caught:
        start_server_process(tmp_path / "d", tmp_path / "server.log", env=env, timeout=30)
    log = (tmp_path / "server.log").read_text()
    assert "s3_bucket: cannot use bucket 'no-such-bucket'" in log, (caught.value, log[-2000:])
    assert "Traceback" not in log  # one line an operator can act on
