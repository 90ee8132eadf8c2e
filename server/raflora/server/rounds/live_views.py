"""A pull view being built, whose framed messages pulls stream as they are made (§4.3).

The first pull of a (round, rank, scale) used to wait for the whole view to be built (the
factors at that rank, the safetensors file written and hashed, its messages framed) before its
first byte left: on the reference machine about 0.15 s of a 0.32 s pull of 64 MiB. A client
that takes the digest last (``PullRequest.digest_last``) now follows the build instead: each
message goes out as soon as the build thread has framed it, and the digest follows in a
``PullTrailer`` once the build has hashed the last byte. Pulls that come while the build runs
follow it too; later ones find the view hot, or on storage, as before.

Only a build that frames into the hot views (hot_views.py) can be followed: the messages it
frames are the ones it keeps, so following costs no memory beyond the view's reservation. The
build thread appends to the message list and wakes the followers through the event loop; the
followers read the list from the loop thread (appends are atomic under the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from raflora.server.engine import RankEnergy

from ..storage.manifest import Holders
from .hot_views import Fill


@dataclass(frozen=True)
class LiveFacts:
    """What a pull's header says about a view before its bytes exist."""

    total_bytes: int
    has_merge: bool
    round: int
    energy: RankEnergy | None
    holders: tuple[Holders, ...]


class LiveBuild:
    """One view build's progress: its facts once known, its messages as they are framed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.facts: LiveFacts | None = None
        self.messages: Sequence[bytes] = ()
        self.fill: Fill | None = None  # the room its messages are counted in
        self.started: asyncio.Future[bool] = loop.create_future()  # True: it can be followed
        self.finished = False
        self._waiters: list[asyncio.Future[None]] = []

    # -- the build thread ------------------------------------------------------------------
    def begin(self, facts: LiveFacts, messages: Sequence[bytes], fill: Fill) -> None:
        """The build frames into ``messages`` (a list it appends to), counted in ``fill``."""
        self.facts, self.messages, self.fill = facts, messages, fill
        self._tell(self._resolve_started, True)

    def advanced(self) -> None:
        """More messages were framed."""
        self._tell(self._wake)

    def _tell(self, callback: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody follows
            self._loop.call_soon_threadsafe(callback, *args)

    # -- the event loop --------------------------------------------------------------------
    def finish(self) -> None:
        """The build ended (done, failed or cancelled): followers drain and stop."""
        self.finished = True
        self._resolve_started(False)
        self._wake()

    async def follow(self) -> AsyncIterator[bytes]:
        """Every message the build frames, in order, as it frames them; ends with the build
        (the caller then asks the build's task whether it succeeded)."""
        sent = 0
        while True:
            while sent < len(self.messages):
                yield self.messages[sent]
                sent += 1
            if self.finished:
                if sent == len(self.messages):
                    return
                continue
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter

    def _resolve_started(self, followable: bool) -> None:
        if not self.started.done():
            self.started.set_result(followable)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


__all__ = ["LiveBuild", "LiveFacts"]
