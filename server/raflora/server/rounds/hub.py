"""All federations of one server: creation, lookup, resume on start, deletion, shutdown,
and the admin's views of them (clients, serving exports)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from raflora.server.engine import ModuleMap, lora_scaling
from raflora.v1.wire import ErrorReason

from ..config import FederationConfig, echo_id
from ..errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from ..metrics import ServerMetrics
from ..storage import ClientRecord, Storage
from .hot_views import HotViews
from .preload import MemoryBudget
from .runtime import FederationRuntime, RuntimeLimits
from .views import View, ViewReader


@dataclass(frozen=True)
class Export:
    """A published round at one rank, opened for ExportAdapter: ``scale = lora_alpha / rank``
    (or ``/ √rank``) with the federation's ``lora_alpha``."""

    view: View
    reader: ViewReader
    lora_alpha: float


@dataclass(frozen=True)
class ClientInfo:
    record: ClientRecord
    last_round_uploaded: int | None  # the open round's, else the newest publication's


log = logging.getLogger("raflora.server")


class FederationHub:
    def __init__(
        self,
        storage: Storage,
        metrics: ServerMetrics,
        device: str,
        limits: RuntimeLimits | None = None,
        map_modules: ModuleMap | None = None,
    ) -> None:
        self.storage = storage
        self.map_modules = map_modules  # None: in process; else e.g. on Ray (cluster/)
        self.metrics = metrics
        self.device = device
        self.limits = limits or RuntimeLimits()
        # A bounded pool: torch spreads one aggregation over all cores, so the default is one
        # at a time; more workers let federations close rounds without queueing behind a heavy
        # one (each federation's own jobs still run one at a time, in order).
        self.executor = ThreadPoolExecutor(
            max_workers=self.limits.aggregation_workers, thread_name_prefix="raflora-aggregate"
        )
        self.federations: dict[str, FederationRuntime] = {}
        self._create_lock = asyncio.Lock()
        # One budget for every federation's uploads held for their close (rounds/preload.py).
        self.preload_budget = MemoryBudget(
            self.limits.preload_memory_bytes, self.limits.preload_max_upload_bytes
        )
        # One budget for every federation's round sums (rounds/summing.py).
        self.sums_budget = MemoryBudget(
            self.limits.round_sums_memory_bytes, self.limits.round_sums_memory_bytes
        )
        # One limit for every federation's pull views kept in memory (rounds/hot_views.py).
        self.hot_views = HotViews(self.limits.hot_view_memory_bytes)
        self.metrics.hot_view_bytes.set_function(lambda: self.hot_views.used)

    def _runtime(self, config: FederationConfig) -> FederationRuntime:
        return FederationRuntime(
            config,
            self.storage.federation(config.federation_id),
            self.metrics,
            self.executor,
            self.device,
            self.limits,
            map_modules=self.map_modules,
            preload_budget=self.preload_budget,
            hot_views=self.hot_views,
            sums_budget=self.sums_budget,
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

    async def delete(self, federation_id: str, *, archive: bool = False) -> str | None:
        """Stop a federation and delete (or archive) its storage; returns the archive's name.

        From the moment it leaves ``federations`` every RPC for it is NOT_FOUND, the ones in
        flight included (:meth:`FederationRuntime.retire`). Its storage goes only once nothing
        writes there any more: joins and commits under way finish or refuse, view builds and
        an aggregation in the (shared, one-thread) executor finish. A stored federation that
        could not be resumed at start can be deleted too.
        """
        async with self._create_lock:
            runtime = self.federations.pop(federation_id, None)
            if runtime is not None:
                await runtime.retire()
                # A federation's jobs run in order: once this no-op ran, a publication of this
                # federation submitted before it has finished writing.
                await runtime.run_job(_nothing)
            elif federation_id not in await asyncio.to_thread(self.storage.federation_ids):
                raise NotFoundError("federation_id", f"no federation {echo_id(federation_id)}")
            archived = await asyncio.to_thread(
                self.storage.delete_federation, federation_id, archive=archive
            )
            self.metrics.forget_federation(federation_id)
        if archived is None:
            log.info("deleted federation %s and its stored state", federation_id)
        else:
            log.info("deleted federation %s; its state is archived as %s", federation_id, archived)
        return archived

    def clients(self, federation_id: str) -> list[ClientInfo]:
        """The federation's joined clients, by id, and the round of their newest upload that
        the server holds (the open round's, else the one the newest publication aggregated)."""
        runtime = self.get(federation_id)
        published: dict[str, int] = {}
        if runtime.manifest is not None:
            published = {u.client_id: runtime.manifest.round - 1 for u in runtime.manifest.uploads}
        out = []
        for client_id in sorted(runtime.clients):
            if client_id in runtime.uploads:
                last: int | None = runtime.uploads[client_id].round
            else:
                last = published.get(client_id)
            out.append(ClientInfo(runtime.clients[client_id], last))
        return out

    async def open_export(
        self, federation_id: str, round_: int | None = None, rank: int | None = None
    ) -> Export:
        """Published round ``round_`` (None: the newest) at ``rank`` (None: max_rank), opened.

        The view is the one a client of that rank joined with the federation's ``lora_alpha``
        pulls (the same cache entry): ``scale · B @ A`` is the round's global update truncated
        to ``rank``, whatever alpha is chosen, since B carries ``1/scale``; the federation's
        alpha is the one its clients train with by default.
        """
        runtime = self.get(federation_id)
        runtime.check_serving()
        config = runtime.config
        r = config.max_rank if rank is None else rank
        if not 1 <= r <= config.max_rank:
            raise InvalidArgumentError(
                "rank", f"must be in 1..max_rank={config.max_rank} (0: max_rank), got {r}"
            )
        alpha = config.lora_alpha
        view, reader = await runtime.open_view_at(
            r, lora_scaling(alpha, r, config.scaling_rule), round_
        )
        if view.has_merge:
            reader.close()
            raise FailedPreconditionError(
                "federation_id",
                f"round {view.round} of federation {runtime.id!r} ({config.strategy}) is a "
                "delta to merge into the base weights, not an adapter: it cannot be exported",
                ErrorReason.NOT_EXPORTABLE,
            )
        return Export(view, reader, alpha)

    async def close(self) -> None:
        for runtime in self.federations.values():
            await runtime.close()
        self.executor.shutdown(wait=True, cancel_futures=False)


def _nothing() -> None:
    """A no-op job: the aggregation thread reaches it once every earlier job is done."""
