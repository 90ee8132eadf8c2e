"""All federations of one server: creation, lookup, resume on start, shutdown."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from raflora.v1.wire import ErrorReason

from ..config import FederationConfig, echo_id
from ..errors import AlreadyExistsError, NotFoundError
from ..metrics import ServerMetrics
from ..storage import Storage
from .runtime import FederationRuntime, RuntimeLimits

log = logging.getLogger("raflora.server")


class FederationHub:
    def __init__(
        self,
        storage: Storage,
        metrics: ServerMetrics,
        device: str,
        limits: RuntimeLimits | None = None,
    ) -> None:
        self.storage = storage
        self.metrics = metrics
        self.device = device
        self.limits = limits or RuntimeLimits()
        # One aggregation at a time: torch already spreads one over all cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raflora-aggregate")
        self.federations: dict[str, FederationRuntime] = {}
        self._create_lock = asyncio.Lock()

    def _runtime(self, config: FederationConfig) -> FederationRuntime:
        return FederationRuntime(
            config,
            self.storage.federation(config.federation_id),
            self.metrics,
            self.executor,
            self.device,
            self.limits,
        )

    def resume_all(self) -> None:
        """Resume every stored federation; one that cannot even be read is skipped, loudly."""
        for federation_id in self.storage.federation_ids():
            try:
                store = self.storage.federation(federation_id)
                config = FederationConfig.parse(store.read_config())
                runtime = self._runtime(config)
                runtime.resume()
            except Exception:
                log.exception("federation %s could not be resumed and is not served", federation_id)
                self.metrics.storage_problems.labels(federation_id).inc()
                self.metrics.degraded.labels(federation_id).set(1)
                continue
            runtime.start()
            self.federations[federation_id] = runtime

    async def create(
        self, config: FederationConfig, *, exist_ok: bool = False
    ) -> FederationRuntime:
        async with self._create_lock:
            existing = self.federations.get(config.federation_id)
            if existing is not None:
                if exist_ok and existing.config == config:
                    return existing
                raise AlreadyExistsError(
                    "federation_id",
                    f"federation {config.federation_id!r} already exists",
                    ErrorReason.FEDERATION_EXISTS,
                )
            runtime = self._runtime(config)  # validates strategy options before touching disk
            await asyncio.to_thread(runtime.store.create, config.model_dump(mode="json"))
            runtime.resume()
            runtime.start()
            self.federations[config.federation_id] = runtime
        log.info(
            "created federation %s (%s, R=%d)",
            config.federation_id,
            config.strategy,
            config.max_rank,
        )
        return runtime

    def get(self, federation_id: str) -> FederationRuntime:
        runtime = self.federations.get(federation_id)
        if runtime is None:
            raise NotFoundError("federation_id", f"no federation {echo_id(federation_id)}")
        return runtime

    async def close(self) -> None:
        for runtime in self.federations.values():
            await runtime.close()
        self.executor.shutdown(wait=True, cancel_futures=False)
