"""Run a real raflora server for tests, benchmarks and demos.

One harness instead of a copy per caller: the test suite, ``bench/`` and ``raflora-demo`` all
need to start ``raflora-server`` on free loopback ports, wait until it reports SERVING, stop it
(gracefully or with SIGKILL, to test crashes) and read its log afterwards. It ships with the
package, so benchmarks and downstream projects use it without importing ``tests/``.

* :class:`ServerProcess` / :func:`start_server_process`: ``python -m raflora.server.app`` as a
  child process, its output in a log file; a context manager.
* :func:`threaded_server`: the real server in this process, its event loop in a background
  thread (fast to start; lets a test look at the server's internals).
* :func:`wait_serving` (the gRPC health check, TLS included), :func:`scrape` (``/metrics``),
  :func:`free_port`, :func:`python_env`, :func:`federation_spec`.
* :func:`make_pki`: a throwaway certificate authority for TLS runs (needs ``cryptography``,
  a development dependency, imported only when called).

Nothing here is used by the server itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from raflora.v1 import aggregation_pb2 as pb

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from raflora.server.app import RafloraServer

__all__ = [
    "SOURCE_DIRS",
    "Issued",
    "Pki",
    "ServerProcess",
    "ThreadedServer",
    "federation_spec",
    "free_port",
    "make_pki",
    "python_env",
    "scrape",
    "source_root",
    "start_server_process",
    "threaded_server",
    "wait_serving",
]

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
#: The source folders that hold the ``raflora.*`` packages a server process imports.
SOURCE_DIRS = ("server", "client_sdk", "proto")
#: How much of a server's log a start-up failure quotes.
_LOG_TAIL = 4000


# -- ports and the child's environment ---------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (the OS picks it).

    Another process may take it before the server binds it; on loopback, in tests, that is rare
    enough that retrying is not worth the complexity.
    """
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def source_root() -> Path | None:
    """The source checkout this module was loaded from, or None for an installed copy.

    This file is ``<root>/server/raflora/server/testing.py`` in a checkout (an editable install
    points at the same file); in a wheel it lies in site-packages, with no ``<root>/server``.
    """
    here = Path(__file__).resolve()
    if len(here.parents) < 4:
        return None
    root = here.parents[3]
    if here != root / "server" / "raflora" / "server" / "testing.py":
        return None
    if not all((root / d / "raflora").is_dir() for d in SOURCE_DIRS):
        return None
    return root


def python_env(
    extra: Mapping[str, str] | None = None,
    *,
    extra_dirs: Sequence[str] = (),
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for a child Python process that must import this same ``raflora``.

    The one rule: an installed copy is used as is (the child's interpreter finds it like this
    one did); a copy in a source checkout prepends the checkout's :data:`SOURCE_DIRS` (and
    ``extra_dirs``, e.g. ``("demo",)``) to ``PYTHONPATH``, so the child runs the very code this
    process runs, installed or not. Under an editable install those folders are the ones the
    install maps, so prepending them changes nothing; without it, it is what makes the child
    work. An existing ``PYTHONPATH`` is kept, after them.

    ``base`` defaults to ``os.environ``; ``extra`` (e.g. ``RAFLORA_*`` settings) is applied last.
    """
    env = dict(os.environ if base is None else base)
    root = source_root()
    if root is not None:
        paths = [str(root / d) for d in (*SOURCE_DIRS, *extra_dirs)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


# -- health and metrics ------------------------------------------------------------------------


def wait_serving(
    target: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 60.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Block until the gRPC health service at ``target`` answers SERVING.

    The health check, not an open port, is the readiness signal: the server flips it only once
    every service is registered and the federations on disk are loaded. ``credentials`` are for
    a TLS server (a plaintext probe of one never succeeds). With ``process``, fail fast if it
    exits instead of waiting out ``timeout``.

    Raises RuntimeError if ``process`` exited, TimeoutError if ``timeout`` passed.
    """
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
    raise TimeoutError(f"server at {target} did not become SERVING within {timeout:g} s")


def scrape(url: str, timeout: float = 10.0) -> str:
    """One scrape of a Prometheus ``/metrics`` endpoint, as text."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


# -- a server process --------------------------------------------------------------------------


class ServerProcess:
    """``raflora-server`` (``python -m raflora.server.app``) as a child process.

    Separate from the caller on purpose: it can be SIGKILLed and restarted on the same data
    (durability tests), its memory and CPU are its own (benchmarks), and its command line,
    environment and log are the real ones. Its gRPC and metrics ports are picked free unless
    given and are kept across :meth:`start` calls, so a restarted server is found at the same
    ``target``.

    ``host`` and ``device`` default to loopback and CPU, what tests want; pass None to leave
    them to the server's settings (``raflora-demo`` does, to use a GPU when there is one).
    ``extra_args`` go to the command line; ``env`` adds environment (``RAFLORA_*`` settings);
    ``credentials`` are what the health check connects with (a TLS server needs them).

    Use as ``with ServerProcess(...) as server:`` (started and SERVING inside, stopped after), or
    call :meth:`start` and :meth:`stop`; :func:`start_server_process` does the former in one go.
    """

    def __init__(
        self,
        data_dir: Path,
        log: Path,
        *,
        port: int | None = None,
        metrics_port: int | None = None,
        host: str | None = LOOPBACK,
        device: str | None = "cpu",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log = log
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.host = host
        self.device = device
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.credentials = credentials
        self._process: subprocess.Popen[bytes] | None = None

    # where it is
    @property
    def target(self) -> str:
        """The gRPC address clients dial (loopback, whatever ``host`` the server binds)."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The current child process (the latest one, after a restart)."""
        if self._process is None:
            raise RuntimeError("the server process has not been started")
        return self._process

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The command line :meth:`start` runs."""
        cmd = [sys.executable, "-m", "raflora.server.app"]
        if self.host is not None:
            cmd += ["--host", self.host]
        cmd += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        cmd += ["--data-dir", str(self.data_dir)]
        if self.device is not None:
            cmd += ["--device", self.device]
        return [*cmd, *self.extra_args]

    # life cycle
    def start(self, *, log: Path | None = None, wait: bool = True, timeout: float = 60.0) -> None:
        """Launch the server (again, after a stop or kill) and, with ``wait``, block until it
        is SERVING. ``log`` switches to another log file (appended to, like the first).

        A server that fails to come up is killed before the error propagates, so a failed
        start never leaks a process.
        """
        if self.running:
            raise RuntimeError(f"server already running as pid {self.pid}")
        if log is not None:
            self.log = log
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=python_env(self.env)
            )
        if wait:
            try:
                self.wait_serving(timeout)
            except BaseException:
                if self.running:
                    self.kill()
                raise

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Block until SERVING; a server that exits or times out raises, quoting its log."""
        try:
            wait_serving(self.target, self.process, timeout, self.credentials)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}; log {self.log}:\n{self.log_text()[-_LOG_TAIL:]}") from None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, the graceful shutdown an operator triggers; returns the exit code.

        Raises subprocess.TimeoutExpired if it has not exited within ``timeout``: a test of
        graceful shutdown wants to know. :meth:`stop` is the variant that never hangs.
        """
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL: a crash, with no chance to clean up; returns the exit code (-SIGKILL)."""
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop it if it runs: SIGTERM, then SIGKILL after ``timeout``. Idempotent.

        Returns the exit code, or None if it was never started.
        """
        if self._process is None:
            return None
        if self._process.poll() is None:
            try:
                return self.terminate(timeout)
            except subprocess.TimeoutExpired:
                return self.kill()
        return self._process.returncode

    def log_text(self) -> str:
        """Everything the server (all its starts) wrote to the log so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> ServerProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server_process(
    data_dir: Path,
    log: Path,
    port: int | None = None,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 60.0,
) -> ServerProcess:
    """A :class:`ServerProcess` on loopback and CPU, returned once it is SERVING.

    The caller stops it (``terminate``, ``kill`` or ``stop``).
    """
    server = ServerProcess(
        data_dir, log, port=port, extra_args=extra_args, env=env, credentials=credentials
    )
    server.start(timeout=timeout)
    return server


# -- a server in this process ------------------------------------------------------------------


@dataclass
class ThreadedServer:
    """A running in-process server and the event loop (in its own thread) it runs on."""

    server: RafloraServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.metrics_port}/metrics"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the server's loop (where its state lives) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def threaded_server(data_dir: Path, **settings: Any) -> Iterator[ThreadedServer]:
    """The real gRPC server on loopback ports picked by the OS, its event loop in a thread.

    Starts in milliseconds and shares the process, so a test can reach into ``server`` (its
    settings, hub, metrics); blocking SDK calls from the test thread work because the loop runs
    elsewhere. ``settings`` are :class:`~raflora.server.settings.ServerSettings` fields; the
    defaults are CPU and a 1 s shutdown grace.
    """
    from raflora.server.app import RafloraServer
    from raflora.server.settings import ServerSettings

    config = ServerSettings(
        **{
            "host": LOOPBACK,
            "port": 0,
            "metrics_port": 0,
            "device": "cpu",
            "grace_seconds": 1.0,
            **settings,
            "data_dir": data_dir,
        }
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="raflora-server", daemon=True)
    thread.start()
    try:
        server = RafloraServer(config)
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        try:
            yield ThreadedServer(server, loop, thread)
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- federations -------------------------------------------------------------------------------


def federation_spec(
    federation_id: str,
    modules: Mapping[str, tuple[int, int]],
    *,
    strategy: str = "raflora",
    max_rank: int = 8,
    min_clients: int = 1,
    expected_clients: int = 0,
    deadline_seconds: float = 0.0,
    lora_alpha: float = 16.0,
    **extra: Any,
) -> pb.FederationSpec:
    """A FederationSpec from ``{module: (d_out, d_in)}``, with small-test defaults.

    ``extra`` are further FederationSpec fields (``init_seed``, ``allowed_ranks``, ...).
    """
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


# -- a throwaway certificate authority ---------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path

    def pem(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class Pki:
    """What :func:`make_pki` wrote: a CA, certificates it issued, and one it did not."""

    ca_cert: Path
    server: Issued
    client: Issued
    other_ca_client: Issued  # a client certificate signed by an unrelated CA

    def channel_credentials(self, client: Issued | None = None) -> grpc.ChannelCredentials:
        """Trusts the test CA; presents ``client``'s certificate when given (mutual TLS)."""
        root = self.ca_cert.read_bytes()
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=root)
        key, chain = client.pem()
        return grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key, certificate_chain=chain
        )


def make_pki(folder: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a client
    certificate from another CA; PEM files under ``folder``.

    EC P-256 keys (fast to generate), valid for a day. The server certificate names 127.0.0.1
    and localhost, so clients verify it without a hostname override. Needs ``cryptography``
    (in the ``dev`` extra).
    """
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("make_pki needs the 'cryptography' package (raflora[dev])") from exc
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca_path = _ca(folder, "test-ca")
    other_key, other_cert, _ = _ca(folder, "other-ca")
    return Pki(
        ca_cert=ca_path,
        server=_issue(folder, "server", ca_key, ca_cert, server=True),
        client=_issue(folder, "client", ca_key, ca_cert, server=False),
        other_ca_client=_issue(folder, "stranger", other_key, other_cert, server=False),
    )


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _ca(folder: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _issue(
    folder: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
) -> Issued:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return Issued(cert_path, key_path)
