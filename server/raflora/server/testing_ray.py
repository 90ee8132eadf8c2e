"""A real Ray cluster on loopback for tests and benchmarks: ``ray start --head --block``.

Ray (the ``ray`` extra, in the dev extra) starts a one-node cluster in a few seconds. The head
runs in a process group of its own, so stopping it (SIGTERM, then SIGKILL) ends its raylet, GCS
and workers and nothing else: ``ray stop`` would stop every Ray cluster on the machine.

Nothing here is used by the server itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .testing import free_port

#: Ray 2.60 turns token authentication on whenever ~/.ray/auth_token exists (a local
#: ``ray.init()`` writes one), for the head but not for a driver that does not look: a test
#: cluster and its drivers say explicitly that it is off, so nothing left in $HOME changes them.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

#: The process title of a worker while it runs a module job (Ray titles workers ray::<task>).
TASK_TITLE = "ray::raflora_aggregate_module"


@dataclass(frozen=True)
class RayCluster:
    gcs_address: str  # HOST:PORT, for a driver on this machine
    client_address: str  # ray://HOST:PORT, Ray Client, for a driver anywhere
    log: Path
    pid: int  # the head's process group


def ray_binary() -> str | None:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def ray_cluster(
    cpus: int = 2,
    object_store_mib: int = 512,
    timeout_seconds: float = 90.0,
    env: dict[str, str] | None = None,
) -> Iterator[RayCluster]:
    """A head node with ``cpus`` CPUs; yields once its GCS and Ray Client ports answer.
    ``env`` overrides :data:`RAY_ENV` (e.g. ``RAY_AUTH_MODE=token`` and its token)."""
    binary = ray_binary()
    if binary is None:
        raise RuntimeError("ray is not installed (pip install 'raflora[ray]')")
    # Ray's socket paths must stay under 108 bytes: a short folder of its own under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="raflora-ray-", dir="/tmp"))
    gcs, client = free_port(), free_port()
    log = temp / "head.log"
    cmd = [
        binary,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--ray-client-server-port={client}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        f"--object-store-memory={object_store_mib << 20}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    head_env = {**os.environ, **RAY_ENV, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=head_env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_seconds
        while not (_answers(gcs) and _answers(client)):
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray did not answer within {timeout_seconds:g} s; see {log}")
            time.sleep(0.2)
        yield RayCluster(f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}", log, proc.pid)
    finally:
        _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL, the head's group; then any process left in its session (Ray's
    workers have process groups of their own)."""
    _signal_group(proc)
    for pid in _session(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _session(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                # /proc/PID/stat: pid (comm) state ppid pgrp session ...; comm may hold spaces
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid:
                    pids.append(int(entry.name))
    return pids


def _signal_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the group may outlive its leader for a moment: make sure it is gone
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def running_tasks(cluster: RayCluster | None = None) -> list[int]:
    """PIDs of Ray workers running a module job right now: ``cluster``'s (its workers share
    the head's session), else any on this machine."""
    pids = []
    mine = set(_session(cluster.pid)) if cluster is not None else None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (mine is not None and int(entry.name) not in mine):
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if title.decode(errors="replace").startswith(TASK_TITLE):
            pids.append(int(entry.name))
    return pids
