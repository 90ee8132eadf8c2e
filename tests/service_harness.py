"""Run the real server for tests: in a background thread, or as a separate process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from raflora.client_sdk import pb
from raflora.server.app import RafloraServer
from raflora.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ThreadedServer:
    server: RafloraServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def threaded_server(data_dir: Path, **settings: Any) -> Iterator[ThreadedServer]:
    """The real gRPC server on loopback, its event loop in a background thread."""
    config = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        data_dir=data_dir,
        device="cpu",
        grace_seconds=1.0,
        **settings,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = RafloraServer(config)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    handle = ThreadedServer(server, loop, thread)
    try:
        yield handle
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def start_server_process(
    data_dir: Path,
    log: Path,
    port: int | None = None,
    *,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """``raflora-server`` as a separate process; returns once it reports SERVING.

    ``extra_args`` go to the command line, ``env`` adds environment (``RAFLORA_*`` settings),
    ``credentials`` are what the health check connects with (a TLS server needs them).
    """
    port = port or free_port()
    metrics_port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "raflora.server.app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        *extra_args,
    ]
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("server", "client_sdk", "proto")),
        **(env or {}),
    }
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    handle = ServerProcess(process, port, metrics_port, log)
    try:
        wait_serving(handle.target, process, credentials=credentials)
    except BaseException:  # never leak a server that did not come up
        if process.poll() is None:
            handle.kill()
        raise
    return handle


def wait_serving(
    target: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 60,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    channel = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {target} did not become SERVING")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def spec(
    federation_id: str,
    modules: dict[str, tuple[int, int]],
    *,
    strategy: str = "raflora",
    max_rank: int = 8,
    min_clients: int = 1,
    expected_clients: int = 0,
    deadline_seconds: float = 0.0,
    lora_alpha: float = 16.0,
    **extra: Any,
) -> pb.FederationSpec:
    return pb.FederationSpec(
        federation_id=federation_id,
        modules=[pb.ModuleSpec(name=n, d_out=o, d_in=i) for n, (o, i) in modules.items()],
        strategy=strategy,
        max_rank=max_rank,
        lora_alpha=lora_alpha,
        round_policy=pb.RoundPolicy(
            min_clients=min_clients,
            expected_clients=expected_clients,
            deadline_seconds=deadline_seconds,
        ),
        **extra,
    )
