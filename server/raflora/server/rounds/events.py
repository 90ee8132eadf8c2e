"""Round phases, the events a federation emits, and the bus that fans them out to watchers.

A watcher that falls more than ``capacity`` events behind is cut off: its subscription ends
with :class:`WatcherLaggedError` at once (the stream closes and the SDK reconnects and re-reads the
status), instead of being dropped silently and left open.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

from raflora.server.engine import RankEnergy

from ..storage.manifest import Holders


class Phase(str, Enum):
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"


class EventType(str, Enum):
    STATUS = "status"
    UPLOAD = "upload"
    AGGREGATING = "aggregating"
    PUBLISHED = "published"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    SELECTED = "selected"  # a pending selection was drawn


@dataclass(frozen=True)
class PrivacyStatus:
    """A private federation's spend so far (docs/design.md §2.9)."""

    epsilon: float
    delta: float
    rounds: int
    noise_multiplier: float
    clip_norm: float
    noise_std: float  # of the newest private round (0 before the first)


@dataclass(frozen=True)
class Snapshot:
    federation_id: str
    round: int  # the newest published round, and the round that collects uploads
    phase: Phase
    uploads: int
    min_clients: int
    expected_clients: int
    deadline_unix: float
    energy: RankEnergy | None
    joined_clients: int
    holders: tuple[Holders, ...] = ()
    degraded: str = ""  # why the federation cannot serve, or "" when healthy
    selected: frozenset[str] | None = None  # the round's selection; None: everyone
    selection_pending: bool = False  # a policy's draw waits for more clients to join
    observers: frozenset[str] = frozenset()  # never selected, whatever the policy
    privacy: PrivacyStatus | None = None  # None: not a private federation


@dataclass(frozen=True)
class RoundEvent:
    type: EventType
    snapshot: Snapshot
    message: str = ""
    warnings: tuple[str, ...] = ()


class WatcherLaggedError(Exception):
    """The subscriber stopped reading and missed events; it must re-read the status."""


class BusClosedError(Exception):
    """The federation is gone (deleted): its watches end, and a new one gets NOT_FOUND."""


_LAGGED = object()
_CLOSED = object()


class Subscription:
    def __init__(self, bus: EventBus, capacity: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=capacity + 1)
        self._capacity = capacity
        self.lagged = False

    def _offer(self, event: RoundEvent) -> bool:
        """Queue ``event``; False (and a lag marker) when the subscriber is too far behind."""
        if self._queue.qsize() >= self._capacity:
            self.lagged = True
            self._queue.put_nowait(_LAGGED)  # the one slot kept free for it
            return False
        self._queue.put_nowait(event)
        return True

    async def next(self, timeout: float | None = None) -> RoundEvent | None:
        """The next event; None on ``timeout``; WatcherLaggedError once it fell behind."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes on Python 3.10
            return None
        if item is _LAGGED:
            raise WatcherLaggedError(f"fell more than {self._capacity} events behind")
        if item is _CLOSED:
            raise BusClosedError("the federation was deleted")
        assert isinstance(item, RoundEvent)
        return item

    def close(self) -> None:
        self._bus._subscribers.discard(self)


class EventBus:
    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self.capacity)
        self._subscribers.add(subscription)
        return subscription

    @property
    def watchers(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """End every subscription now; each one's next() raises BusClosedError."""
        for subscription in list(self._subscribers):
            while not subscription._queue.empty():  # what it had not read no longer matters
                subscription._queue.get_nowait()
            subscription._queue.put_nowait(_CLOSED)
        self._subscribers.clear()

    def emit(self, event: RoundEvent) -> None:
        for subscription in list(self._subscribers):
            if not subscription._offer(event):
                self._subscribers.discard(subscription)
