"""Pull views: the global adapter of one round at one rank and scale, built once and cached.

A view is keyed by (round, rank, scale). The scale comes from the client's alpha, which is
fixed at join and may change only between rounds. However many distinct keys clients ask
for, a round keeps at most ``max_views_per_round`` view files: the least recently built one is
deleted to make room (a reader that has it open keeps reading it).
Every tensor is checked finite before it is written: a view never serves NaN or Inf.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from raflora.server.engine import GlobalState, RankEnergy, Strategy
from raflora.v1.wire import LORA_A, LORA_B, tensor_name

from ..errors import InvalidArgumentError
from ..storage import FederationStore, StoredView
from ..storage.manifest import Holders
from ..storage.store import TensorSpec

ViewKey = tuple[int, int, float]


@dataclass(frozen=True)
class View:
    stored: StoredView
    round: int
    rank: int
    scale: float
    has_merge: bool
    energy: RankEnergy | None
    holders: tuple[Holders, ...] = ()

    @property
    def size(self) -> int:
        return self.stored.size

    @property
    def sha256(self) -> str:
        return self.stored.sha256


@dataclass(frozen=True)
class RoundContent:
    """A published round as views need it."""

    state: GlobalState
    energy: RankEnergy | None
    holders: tuple[Holders, ...]


class ViewCache:
    def __init__(
        self, strategy: Strategy, store: FederationStore, max_views_per_round: int = 64
    ) -> None:
        self.strategy = strategy
        self.store = store
        self.max_views_per_round = max_views_per_round
        self._tasks: dict[ViewKey, asyncio.Task[View]] = {}

    async def get(
        self, round_: int, rank: int, scale: float, content: Callable[[], RoundContent]
    ) -> View:
        """The view, built on a miss from ``content()`` (called in the build's thread, so an
        older round is read from storage only when its view is not cached)."""
        key = (round_, rank, scale)
        task = self._tasks.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(lambda: self.build(content(), rank, scale))
            )
            self._tasks.pop(key, None)
            self._tasks[key] = task  # insertion order: the newest last
            await self._evict(key[0])
        return await asyncio.shield(task)

    async def _evict(self, round_: int) -> None:
        in_round = [k for k in self._tasks if k[0] == round_]
        for key in in_round[: max(0, len(in_round) - self.max_views_per_round)]:
            old = self._tasks.pop(key)
            if old.done() and not old.cancelled() and old.exception() is None:
                await asyncio.to_thread(self.store.delete_view, old.result().stored)

    def forget(self, view: View) -> None:
        """Drop a cached view whose bytes went away (pruned): the next get rebuilds it."""
        self._tasks.pop((view.round, view.rank, view.scale), None)

    def keep_from(self, round_: int) -> None:
        self._tasks = {k: v for k, v in self._tasks.items() if k[0] >= round_}

    def build(self, content: RoundContent, rank: int, scale: float) -> View:
        state = content.state
        specs: list[TensorSpec] = []
        has_merge = False
        for name, shape in self.strategy.schema.modules.items():
            specs.append((tensor_name(name, LORA_A), torch.float32, (rank, shape.d_in)))
            specs.append((tensor_name(name, LORA_B), torch.float32, (shape.d_out, rank)))
            k = self.strategy.merge_rank(state, name)
            if k is not None:
                has_merge = True
                specs.append(
                    (tensor_name(name, LORA_A, merge=True), torch.float32, (k, shape.d_in))
                )
                specs.append(
                    (tensor_name(name, LORA_B, merge=True), torch.float32, (shape.d_out, k))
                )

        def produce() -> Iterator[tuple[str, Tensor]]:
            for name in self.strategy.schema:
                factors, merge = self.strategy.distribute_module(state, name, rank, scale)
                pairs = [
                    (tensor_name(name, LORA_A), factors.A),
                    (tensor_name(name, LORA_B), factors.B),
                ]
                if merge is not None:
                    pairs += [
                        (tensor_name(name, LORA_A, merge=True), merge.A),
                        (tensor_name(name, LORA_B, merge=True), merge.B),
                    ]
                for tensor_key, tensor in pairs:
                    out = tensor.float()
                    if not bool(torch.isfinite(out).all()):
                        raise InvalidArgumentError(
                            "scale", f"the view at rank {rank}, scale {scale:g} is not finite"
                        )
                    yield tensor_key, out

        metadata = {
            "format": "raflora.v1",
            "round": str(state.round),
            "rank": str(rank),
            "scale": repr(scale),
        }
        key = f"rank-{rank}-scale-{scale.hex()}"
        stored = self.store.write_view(state.round, key, specs, produce(), metadata)
        return View(stored, state.round, rank, scale, has_merge, content.energy, content.holders)
