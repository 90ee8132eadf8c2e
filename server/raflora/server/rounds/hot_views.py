"""Pull views kept in memory as the very messages a pull sends (docs/design.md §4.3).

A cached pull used to read its view file, hash it against the view's digest and frame every
chunk into a message: about 180 ms of server CPU for a 64 MiB view, where grpcio itself spends
about 35 ms sending it. Every client of a rank pulls the same view, so the server keeps the
framed messages of the views it served last, under one byte limit for the whole server, and a
pull of a hot view only writes them.

Only bytes whose digest was checked enter: a pull that streamed a view from storage offers the
messages it sent once the whole view matched its digest, never before (so a view damaged at
rest is never served from memory). A view is filled by one pull at a time, and the bytes being
filled count against the limit, so that many first pulls of one large view cannot hold it many
times over. No single view above a quarter of the limit enters: one large adapter would
otherwise push every other rank's view out.

Entries are opaque to this module (the transport frames them) and keyed by the view's digest
too, so that a view rebuilt with other bytes never meets its stale messages.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

# federation, round, rank, scale, sha256 of the view's bytes
HotKey = tuple[str, int, int, float, str]


class HotViews:
    """A byte-bounded, least-recently-used set of framed views (thread-safe)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = max(0, limit_bytes)
        self.max_view_bytes = self.limit // 4
        self._entries: OrderedDict[HotKey, tuple[bytes, ...]] = OrderedDict()
        self._sizes: dict[HotKey, int] = {}
        self._filling: dict[HotKey, int] = {}  # keys being filled -> bytes reserved
        self._lock = threading.Lock()
        self.used = 0  # bytes held or reserved

    def get(self, key: HotKey) -> tuple[bytes, ...] | None:
        with self._lock:
            messages = self._entries.get(key)
            if messages is not None:
                self._entries.move_to_end(key)
            return messages

    def begin_fill(self, key: HotKey, size: int) -> bool:
        """Reserve room for a view of ``size`` bytes a pull is about to stream; False when it
        is too large, held already, being filled by another pull, or room cannot be made."""
        with self._lock:
            if not 0 < size <= self.max_view_bytes:
                return False
            if key in self._entries or key in self._filling:
                return False
            if sum(self._filling.values()) + size > self.limit:
                return False  # other fills hold the room: evicting would not make it
            self._make_room(size)
            if self.used + size > self.limit:
                return False
            self._filling[key] = size
            self.used += size
            return True

    def end_fill(self, key: HotKey, messages: Sequence[bytes] | None) -> None:
        """Finish a fill: keep ``messages`` (the view, checked against its digest), or give the
        room back (None: the stream failed or did not match)."""
        with self._lock:
            reserved = self._filling.pop(key, None)
            if reserved is None:
                return  # dropped meanwhile (the view or its federation went away)
            self.used -= reserved
            if messages is None:
                return
            size = sum(len(m) for m in messages)
            self._make_room(size)
            if size > self.max_view_bytes or self.used + size > self.limit:
                return
            self._entries[key] = tuple(messages)
            self._sizes[key] = size
            self.used += size

    def drop(self, where: Callable[[HotKey], bool]) -> None:
        """Forget every entry (and fill in progress) whose key ``where`` selects."""
        with self._lock:
            for key in [k for k in self._entries if where(k)]:
                self._remove(key)
            for key in [k for k in self._filling if where(k)]:
                self.used -= self._filling.pop(key)

    def _make_room(self, size: int) -> None:
        while self._entries and self.used + size > self.limit:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: HotKey) -> None:
        del self._entries[key]
        self.used -= self._sizes.pop(key)

    def held(self) -> list[HotKey]:
        """The views held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def entries(self) -> int:
        """How many views are held (no ``__len__``: an empty set must not read as no set)."""
        with self._lock:
            return len(self._entries)


__all__ = ["HotKey", "HotViews"]
