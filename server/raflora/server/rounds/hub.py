"""All federations of one server: creation, lookup, resume on start, shutdown."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from .config import FederationConfig
from .errors import AlreadyExistsError, NotFoundError
from .federation import FederationRuntime
from .metrics import ServerMetrics
from .storage import Storage

log = logging.getLogger("raflora.server")


class FederationHub:
    def __init__(
        self,
        storage: Storage,
        metrics: ServerMetrics,
        device: str,
        *,
        max_pushes_per_round: int = 10,
        aggregation_delay_seconds: float = 0.0,
    ) -> None:
        self.storage = storage
        self.metrics = metrics
        self.device = device
        self.max_pushes_per_round = max_pushes_per_round
        self.aggregation_delay_seconds = aggregation_delay_seconds
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
            max_pushes_per_round=self.max_pushes_per_round,
            aggregation_delay_seconds=self.aggregation_delay_seconds,
        )

    def resume_all(self) -> None:
        for federation_id in self.storage.federation_ids():
            store = self.storage.federation(federation_id)
            config = FederationConfig.parse(store.read_config())
            runtime = self._runtime(config)
            runtime.resume()
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
                    "federation_id", f"federation {config.federation_id!r} already exists"
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
            raise NotFoundError("federation_id", f"no federation {federation_id!r}")
        return runtime

    async def close(self) -> None:
        for runtime in self.federations.values():
            await runtime.close()
        self.executor.shutdown(wait=True, cancel_futures=False)
