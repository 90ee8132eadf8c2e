"""Pull views kept in memory as the very messages a pull sends (docs/design.md §4.3).

A cached pull used to read its view file, hash it against the view's digest and frame every
chunk into a message: about 180 ms of server CPU for a 64 MiB view, where grpcio itself spends
about 35 ms sending it. Every client of a rank pulls the same view, so the server keeps the
framed messages of the views it served last, under one byte limit for the whole server, and a
pull of a hot view only writes them.

Only bytes whose digest is known good enter: a view build's own (the bytes it wrote and hashed
for the digest), or the messages a pull streamed from storage once the whole view matched its
digest, never before (so a view damaged at rest is never served from memory).

Every byte held counts against the limit, whatever holds it: an entry, a fill in progress (a
build framing its bytes, or a pull collecting what it streams), and an entry evicted while
pulls still stream it (its messages stay alive until the last of them ends, and stay counted
until then). One fill per view at a time; no single view above a quarter of the limit (one
large adapter would otherwise push every other rank's view out). A build may evict the least
recently used entries to make room for its view; a pull filling from storage uses free room
only, so that a client streaming old views slowly cannot push everyone else's out.

Entries are opaque to this module (the transport frames them) and keyed by the view's digest
too, so that a view rebuilt with other bytes never meets its stale messages.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

# federation, round, rank, scale, sha256 of the view's bytes
HotKey = tuple[str, int, int, float, str]


class HotEntry:
    """One view's messages, and how many pulls are streaming them right now."""

    def __init__(self, messages: tuple[bytes, ...], size: int) -> None:
        self.messages = messages
        self.size = size
        self.readers = 0
        self.evicted = False  # out of the index; still counted while readers stream it


class Fill:
    """Room reserved for one view's messages while they are framed or collected.

    Pulls may stream a build's messages while it frames them (live_views.py): they
    :meth:`HotViews.follow` its fill, and the bytes stay counted until the last of them ends,
    whatever becomes of the fill (kept as an entry they then read, dropped, not kept)."""

    def __init__(self, key: HotKey | None, size: int) -> None:
        self.key = key  # None: a build that learns its view's digest only once it has written
        self.size = size
        self.dropped = False  # its view or federation went: the room is given back already
        self.settled = False  # ended or dropped: no more followers
        self.followers = 0
        self.entry: HotEntry | None = None  # what it became, its followers its readers
        self.owed = False  # not kept, but its size stays counted for its followers


class HotViews:
    """A byte-bounded, least-recently-used set of framed views (thread-safe)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = max(0, limit_bytes)
        self.max_view_bytes = self.limit // 4
        self._entries: OrderedDict[HotKey, HotEntry] = OrderedDict()
        self._fills: list[Fill] = []
        self._lock = threading.Lock()
        self.used = 0  # bytes held, reserved, or evicted but still streamed

    # -- serving ---------------------------------------------------------------------------
    def acquire(self, key: HotKey) -> HotEntry | None:
        """The view's entry for one pull, which must :meth:`release` it when it ends."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.readers += 1
            return entry

    def release(self, entry: HotEntry) -> None:
        with self._lock:
            self._release(entry)

    def _release(self, entry: HotEntry) -> None:
        entry.readers -= 1
        if entry.evicted and entry.readers == 0:
            self.used -= entry.size

    def follow(self, fill: Fill) -> bool:
        """One more pull streams ``fill``'s messages as they are framed (it must
        :meth:`unfollow`); False once the fill has ended: the view is built, or gone."""
        with self._lock:
            if fill.settled:
                return False
            fill.followers += 1
            return True

    def unfollow(self, fill: Fill) -> None:
        with self._lock:
            fill.followers -= 1
            if fill.entry is not None:  # its followers became the entry's readers
                self._release(fill.entry)
            elif fill.owed and fill.followers == 0:
                fill.owed = False
                self.used -= fill.size

    def get(self, key: HotKey) -> tuple[bytes, ...] | None:
        """The view's messages, for a look (tests, tools); pulls :meth:`acquire` them."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.messages

    # -- filling ---------------------------------------------------------------------------
    def begin_fill(self, key: HotKey | None, size: int, *, evict: bool = False) -> Fill | None:
        """Reserve room for a view of ``size`` bytes about to be framed (a build, ``evict``:
        it may push the least recently used entries out) or streamed from storage (free room
        only). None when it is too large, held already, being filled, or there is no room."""
        with self._lock:
            if not 0 < size <= self.max_view_bytes:
                return None
            if key is not None and (key in self._entries or self._filling(key)):
                return None
            if evict:
                self._make_room(size)
            if self.used + size > self.limit:
                return None
            fill = Fill(key, size)
            self._fills.append(fill)
            self.used += size
            return fill

    def end_fill(
        self, fill: Fill, messages: Sequence[bytes] | None, key: HotKey | None = None
    ) -> None:
        """Finish a fill: keep ``messages`` (the view, known good) under ``key`` (the fill's
        own unless it had none yet), or give the room back (None: the stream failed, did not
        match, or its view went)."""
        with self._lock:
            if fill.dropped:
                return  # its room went back when its view or federation was dropped
            self._fills.remove(fill)
            fill.settled = True
            key = fill.key if key is None else key
            size = sum(len(m) for m in messages) if messages is not None else 0
            if (
                messages is None
                or key is None
                or key in self._entries
                or self._filling(key)
                or size > self.max_view_bytes
                or self.used - fill.size + size > self.limit
            ):
                self._settle_unkept(fill)
                return
            self.used -= fill.size
            entry = HotEntry(tuple(messages), size)
            entry.readers = fill.followers
            fill.entry = entry
            self._entries[key] = entry
            self.used += size

    def _settle_unkept(self, fill: Fill) -> None:
        if fill.followers:
            fill.owed = True  # counted until its last follower ends
        else:
            self.used -= fill.size

    def drop(self, where: Callable[[HotKey], bool]) -> None:
        """Forget every entry (and fill in progress) whose key ``where`` selects."""
        with self._lock:
            for key in [k for k in self._entries if where(k)]:
                self._remove(key)
            for fill in [f for f in self._fills if f.key is not None and where(f.key)]:
                self._fills.remove(fill)
                fill.dropped = fill.settled = True
                self._settle_unkept(fill)

    def _filling(self, key: HotKey) -> bool:
        return any(f.key == key for f in self._fills)

    def _make_room(self, size: int) -> None:
        while self._entries and self.used + size > self.limit:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: HotKey) -> None:
        entry = self._entries.pop(key)
        if entry.readers:
            entry.evicted = True  # counted until the last pull streaming it ends
        else:
            self.used -= entry.size

    # -- inspection ------------------------------------------------------------------------
    def held(self) -> list[HotKey]:
        """The views held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def entries(self) -> int:
        """How many views are held (no ``__len__``: an empty set must not read as no set)."""
        with self._lock:
            return len(self._entries)


__all__ = ["Fill", "HotEntry", "HotKey", "HotViews"]
