"""Published rounds read back from the store: verified, on the compute device."""

from __future__ import annotations

import logging

from torch import Tensor

from raflora.server.engine import FactorPair, GlobalState, LowRank, ModuleState, Strategy
from raflora.v1.wire import ErrorReason

from ..errors import NotFoundError, UnavailableError
from ..metrics import ServerMetrics
from ..storage import CorruptDataError, FederationStore, RoundManifest
from .views import RoundContent

log = logging.getLogger("raflora.server")


class PublishedRounds:
    def __init__(
        self, federation_id: str, strategy: Strategy, store: FederationStore, metrics: ServerMetrics
    ) -> None:
        self.id = federation_id
        self.strategy = strategy
        self.store = store
        self.metrics = metrics

    def load(self, round_: int) -> tuple[GlobalState, RoundManifest]:
        """Round ``round_``; CorruptDataError unless its bytes match its manifest."""
        loaded, manifest = self.store.load_published(round_, self.strategy.schema)
        state = GlobalState(
            round=loaded.round,
            modules={n: self._to_device(m) for n, m in loaded.modules.items()},
            participant_ranks=loaded.participant_ranks,
        )
        return state, manifest

    def content(self, round_: int) -> RoundContent:
        """An older round for a pull: NOT_FOUND if absent, UNAVAILABLE if damaged."""
        try:
            state, manifest = self.load(round_)
        except FileNotFoundError:
            raise NotFoundError(
                "round", f"round {round_} is not on disk", ErrorReason.ROUND_NOT_FOUND
            ) from None
        except CorruptDataError as exc:
            log.error("federation %s: %s", self.id, exc)
            self.metrics.storage_problems.labels(self.id).inc()
            raise UnavailableError(
                "round",
                f"round {round_} is damaged on the server's storage",
                ErrorReason.FEDERATION_DEGRADED,
            ) from None
        return RoundContent(state, manifest.energy, manifest.holders)

    def _to_device(self, module: ModuleState) -> ModuleState:
        def move(t: Tensor) -> Tensor:
            return t.to(device=self.strategy.device, dtype=self.strategy.dtype)

        if isinstance(module, LowRank):
            return LowRank(move(module.U), move(module.S), move(module.V))
        return FactorPair(move(module.B), move(module.A))
