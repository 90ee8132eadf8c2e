"""Server assembly and the ``raflora-server`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from raflora.server.engine.strategies import resolve_device
from raflora.v1 import aggregation_pb2 as pb
from raflora.v1 import aggregation_pb2_grpc as pb_grpc

from .config import FederationConfig
from .hub import FederationHub
from .metrics import ServerMetrics
from .service import AdminService, AggregationService
from .settings import ServerSettings, load_settings
from .storage import Storage

log = logging.getLogger("raflora.server")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["AdminService"].full_name,
    pb.DESCRIPTOR.services_by_name["AggregationService"].full_name,
)


class RafloraServer:
    """The aggregation service: gRPC API, health, reflection and /metrics."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.device = str(resolve_device(settings.device))
        self.metrics = ServerMetrics()
        self.storage = Storage(settings.data_dir)
        self.hub = FederationHub(self.storage, self.metrics, self.device)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: aio.Server | None = None

    async def start(self) -> None:
        s = self.settings
        self.hub.resume_all()
        if s.federations_file is not None:
            for raw in json.loads(s.federations_file.read_text()):
                await self.hub.create(FederationConfig.parse(raw), exist_ok=True)
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
        ]
        server = aio.server(options=options)
        pb_grpc.add_AdminServiceServicer_to_server(AdminService(self.hub, self.metrics), server)
        pb_grpc.add_AggregationServiceServicer_to_server(
            AggregationService(self.hub, self.metrics, s.chunk_size), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        log.info(
            "raflora server on %s:%d (device %s, data %s, metrics port %s, %d federations)",
            s.host,
            self.port,
            self.device,
            s.data_dir,
            self.metrics_port or "off",
            len(self.hub.federations),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let running ones finish within ``grace``, then close."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_seconds if grace is None else grace)
        await self.hub.close()
        self.metrics.close()
        log.info("raflora server stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: ServerSettings, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = RafloraServer(settings)
    await server.start()
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown requested")
    await server.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raflora-server", description="raFLoRA federated LoRA aggregation server"
    )
    p.add_argument("--config", type=Path, help="JSON or TOML settings file")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--metrics-host")
    p.add_argument("--metrics-port", type=int, help="-1 disables /metrics")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--federations-file", type=Path, help="JSON list of federations to create")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    settings = load_settings(args.config, **overrides)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
