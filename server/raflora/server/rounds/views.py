"""Pull views: the global adapter of one round at one rank and scale, built once and cached.

A view is keyed by (round, rank, scale). The scale comes from the client's alpha, which is
fixed at join and may change only between rounds. However many distinct keys clients ask
for, a round keeps at most ``max_views_per_round`` view files: the least recently built one is
deleted to make room (a reader that has it open keeps reading it).
Every tensor is checked finite before it is written: a view never serves NaN or Inf.

The cache also knows which rounds are being streamed (a :class:`ViewReader` is open on one of
their views), so that retention never deletes those, which rounds retention deleted (a view of
one is NOT_FOUND from then on, even while cached or being built), and whether the federation was
deleted (every later view, and every later read of an open one, is NOT_FOUND).

A view's framed messages may also be held in memory (hot_views.py, docs/design.md §4.3): a
build keeps the bytes it writes and hashes, and they leave memory with the view's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

import torch
from torch import Tensor

from raflora.server.engine import GlobalState, RankEnergy, Strategy
from raflora.server.engine.validation import all_finite
from raflora.v1.framing import Framer
from raflora.v1.wire import DEFAULT_CHUNK_SIZE, LORA_A, LORA_B, ErrorReason, tensor_name

from ..errors import InvalidArgumentError, NotFoundError, ServiceError, UnavailableError
from ..storage import FederationStore, StoredView
from ..storage.manifest import Holders
from ..storage.store import TensorSpec
from ..storage.tensorio import Tee, safetensors_size
from .hot_views import Fill, HotEntry, HotKey, HotViews
from .live_views import LiveBuild, LiveFacts

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
    def key(self) -> ViewKey:
        return (self.round, self.rank, self.scale)

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


def _federation_deleted() -> NotFoundError:
    return NotFoundError(
        "federation_id", "the federation was deleted", ErrorReason.FEDERATION_NOT_FOUND
    )


def _round_deleted(round_: int) -> NotFoundError:
    return NotFoundError(
        "round", f"round {round_} was deleted (retention)", ErrorReason.ROUND_NOT_FOUND
    )


class ViewReader:
    """An opened view's bytes. While it is open its round counts as streamed (retention keeps
    the round); once the federation is deleted, a read refuses with NOT_FOUND."""

    def __init__(
        self,
        cache: ViewCache,
        round_: int,
        inner: BinaryIO | None,
        entry: HotEntry | None = None,
    ) -> None:
        self._cache = cache
        self._round = round_
        self._inner = inner
        self._entry = entry  # the view's messages, when it is served from memory
        self._closed = False
        cache._streaming[round_] = cache._streaming.get(round_, 0) + 1

    @property
    def hot(self) -> tuple[bytes, ...] | None:
        """The view's framed messages when it is served from memory, else None."""
        return None if self._entry is None else self._entry.messages

    def check(self) -> None:
        """NOT_FOUND once the federation was deleted (before each message of a hot view)."""
        if self._cache.closed:
            raise _federation_deleted()

    def read(self, size: int = -1) -> bytes:
        self.check()
        if self._inner is None:
            raise ValueError("a view served from memory has no file to read")
        return self._inner.read(size)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._inner is not None:
                self._inner.close()
            if self._entry is not None:
                self._cache.hot.release(self._entry)
        finally:
            left = self._cache._streaming.get(self._round, 0) - 1
            if left > 0:
                self._cache._streaming[self._round] = left
            else:
                self._cache._streaming.pop(self._round, None)

    def __enter__(self) -> ViewReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_HEADER_ROOM = 64 << 10  # a view's safetensors header and framing, well above what they take


class ViewCache:
    def __init__(
        self,
        strategy: Strategy,
        store: FederationStore,
        max_views_per_round: int = 64,
        hot: HotViews | None = None,
        federation_id: str = "",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.strategy = strategy
        self.store = store
        self.max_views_per_round = max_views_per_round
        # Shared by the server's federations (hot_views.py).
        self.hot = HotViews(0) if hot is None else hot
        self.federation_id = federation_id
        self.chunk_size = chunk_size  # of the messages a build frames for the hot views
        self._tasks: dict[ViewKey, asyncio.Task[View]] = {}
        self._live: dict[ViewKey, LiveBuild] = {}  # builds in flight, for pulls to follow
        self._streaming: dict[int, int] = {}  # round -> open ViewReaders
        self._gone: set[int] = set()  # rounds deleted by retention
        self.closed = False  # the federation was deleted

    async def get(
        self, round_: int, rank: int, scale: float, content: Callable[[], RoundContent]
    ) -> View:
        """The view, built on a miss from ``content()`` (called in the build's thread, so an
        older round is read from storage only when its view is not cached)."""
        task = await self._task(round_, rank, scale, content)
        try:
            view = await asyncio.shield(task)
        except (ServiceError, OSError):
            self._check(round_)  # deleted while it was read: say so, not "damaged"
            raise
        self._check(round_)
        return view

    async def follow(
        self, round_: int, rank: int, scale: float, content: Callable[[], RoundContent]
    ) -> LivePull | None:
        """The view's build in flight, for a pull to stream while it runs (starting it on a
        miss); None when the view is built already or its build does not frame into memory:
        the caller then uses :meth:`get`."""
        task = await self._task(round_, rank, scale, content)
        live = self._live.get((round_, rank, scale))
        if task.done() or live is None or not await asyncio.shield(live.started):
            return None
        assert live.facts is not None and live.fill is not None
        if not self.hot.follow(live.fill):  # it ended meanwhile: the view is built
            return None
        try:
            self._check(round_)
        except ServiceError:
            self.hot.unfollow(live.fill)
            raise
        return LivePull(self, round_, rank, scale, live, task)

    async def _task(
        self, round_: int, rank: int, scale: float, content: Callable[[], RoundContent]
    ) -> asyncio.Task[View]:
        """The build of the view, started unless it is built or building."""
        self._check(round_)
        key = (round_, rank, scale)
        task = self._tasks.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            loop = asyncio.get_running_loop()
            live = LiveBuild(loop)
            task = loop.create_task(
                asyncio.to_thread(lambda: self.build(content(), rank, scale, live))
            )
            self._live[key] = live
            task.add_done_callback(lambda _done: self._built(key, live))
            self._tasks.pop(key, None)
            self._tasks[key] = task  # insertion order: the newest last
            await self._evict(key[0])
        return task

    def _built(self, key: ViewKey, live: LiveBuild) -> None:
        live.finish()
        if self._live.get(key) is live:
            del self._live[key]

    def _check(self, round_: int) -> None:
        if self.closed:
            raise _federation_deleted()
        if round_ in self._gone:
            raise _round_deleted(round_)

    def open(self, view: View, inner: BinaryIO) -> ViewReader:
        """``inner`` (the view's bytes, just opened) as a reader that pins its round."""
        return ViewReader(self, view.round, inner)

    def open_hot(self, view: View) -> ViewReader | None:
        """The view served from memory, pinned like :meth:`open`; None when it is not hot."""
        entry = self.hot.acquire(self._hot_key(view))
        return None if entry is None else ViewReader(self, view.round, None, entry)

    def begin_fill(self, view: View) -> Fill | None:
        """Room for the messages of the pull about to stream ``view`` from storage, if any
        is free (such a fill never pushes other views out)."""
        return None if self.closed else self.hot.begin_fill(self._hot_key(view), view.size)

    def end_fill(self, view: View, fill: Fill, messages: list[bytes] | None) -> None:
        """Keep ``messages`` (known good: a build's own, or a whole stream from storage that
        matched the digest) unless the view went meanwhile; or give the room back (None).
        Callable from any thread."""
        gone = self.closed or view.key not in self._tasks  # pruned, evicted, retired
        self.hot.end_fill(fill, None if gone else messages, self._hot_key(view))

    def _hot_key(self, view: View) -> HotKey:
        return (self.federation_id, *view.key, view.sha256)

    def _drop_hot(self, where: Callable[[ViewKey], bool]) -> None:
        me = self.federation_id
        self.hot.drop(lambda k: k[0] == me and where((k[1], k[2], k[3])))

    def streaming(self, round_: int) -> bool:
        """Is a pull (or export) streaming a view of this round right now?"""
        return self._streaming.get(round_, 0) > 0

    def retire(self, rounds: Iterable[int]) -> None:
        """Retention deleted (is deleting) these rounds: their views are NOT_FOUND from now."""
        gone = set(rounds)
        self._gone |= gone
        self._tasks = {k: v for k, v in self._tasks.items() if k[0] not in gone}
        self._drop_hot(lambda key: key[0] in gone)

    def close(self) -> None:
        """The federation is being deleted: every later view and read is NOT_FOUND."""
        self.closed = True
        self._drop_hot(lambda _key: True)

    async def drain(self) -> None:
        """Wait for the view builds in flight (they write into the federation's storage)."""
        for task in list(self._tasks.values()):
            if not task.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.shield(task)

    async def _evict(self, round_: int) -> None:
        in_round = [k for k in self._tasks if k[0] == round_]
        evicted = in_round[: max(0, len(in_round) - self.max_views_per_round)]
        self._drop_hot(lambda held: held in evicted)
        for key in evicted:
            old = self._tasks.pop(key)
            if old.done() and not old.cancelled() and old.exception() is None:
                await asyncio.to_thread(self.store.delete_view, old.result().stored)

    def forget(self, view: View) -> None:
        """Drop a cached view whose bytes went away (pruned): the next get rebuilds it."""
        self._tasks.pop(view.key, None)
        self._drop_hot(lambda held: held == view.key)

    def keep_from(self, round_: int) -> None:
        self._tasks = {k: v for k, v in self._tasks.items() if k[0] >= round_}
        self._drop_hot(lambda key: key[0] < round_)

    def build(
        self, content: RoundContent, rank: int, scale: float, live: LiveBuild | None = None
    ) -> View:
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
                    if not all_finite(out):
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
        # The framed copy is reserved before it is made: fp32 tensors and a header's room.
        size = sum(math.prod(shape) * 4 for _, _, shape in specs) + _HEADER_ROOM
        fill = None if self.closed else self.hot.begin_fill(None, size, evict=True)
        framing = None if fill is None else (fill, Framer(self.chunk_size))
        try:
            tee: Tee | None = None if framing is None else framing[1].feed
            if live is not None and framing is not None:  # pulls may stream it as it is framed
                total = safetensors_size(specs, metadata)
                facts = LiveFacts(total, has_merge, state.round, content.energy, content.holders)
                live.begin(facts, framing[1].messages, framing[0])
                tee = _telling(framing[1].feed, live)
            stored = self.store.write_view(state.round, key, specs, produce(), metadata, tee)
        except BaseException:
            if framing is not None:
                self.hot.end_fill(framing[0], None)
            raise
        view = View(stored, state.round, rank, scale, has_merge, content.energy, content.holders)
        if framing is not None:  # the bytes just written and hashed
            self.end_fill(view, framing[0], framing[1].close())
        return view


def _telling(feed: Tee, live: LiveBuild) -> Tee:
    """``feed``, then a word to the pulls following the build."""

    def tee(piece: memoryview) -> None:
        feed(piece)
        live.advanced()

    return tee


class LivePull:
    """One pull streaming a view while it is built: it pins the view's round (retention
    keeps it) and holds the build's reserved room counted until it ends (:meth:`close`)."""

    def __init__(
        self,
        cache: ViewCache,
        round_: int,
        rank: int,
        scale: float,
        live: LiveBuild,
        task: asyncio.Task[View],
    ) -> None:
        assert live.facts is not None and live.fill is not None
        self.round, self.rank, self.scale = round_, rank, scale
        self.facts: LiveFacts = live.facts
        self._cache = cache
        self._live = live
        self._fill: Fill = live.fill
        self._task = task
        self._pin = ViewReader(cache, round_, None)
        self._closed = False

    async def messages(self) -> AsyncIterator[bytes]:
        """The view's messages as the build frames them; NOT_FOUND once the federation is
        deleted."""
        async for message in self._live.follow():
            self._pin.check()
            yield message

    async def view(self) -> View:
        """The built view (its digest), once the build has ended; the build's error if it
        failed, UNAVAILABLE if its round's views were pruned meanwhile (pull again)."""
        try:
            view = await asyncio.shield(self._task)
        except FileNotFoundError:
            raise UnavailableError(
                "round", "the view's round was pruned while it was built; pull again"
            ) from None
        self._cache._check(self.round)
        return view

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._cache.hot.unfollow(self._fill)
        finally:
            self._pin.close()

    def __enter__(self) -> LivePull:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
