"""One push's payload on its way in: written, hashed and checked while it still arrives.

The event loop only receives. Each chunk goes to two lanes that run in worker threads: one
writes it to the upload's sink (which flushes to disk as it goes), and the other hashes it
and feeds the streaming validator. Both lanes work on the same bytes at the same time, so
when the last chunk lands, what is left to do before the acknowledgement is the tail of
each lane and one fsync. A lane holds a thread only while it has work (and gives it back
every few jobs), on a pool of the lanes' own: a stalled client's upload costs no thread, and
the server's default executor stays free for commits, joins and views. Each lane takes at
most ``window`` chunks ahead of its worker, which bounds an upload's memory to a few chunks
— unless the push holds a :class:`~raflora.server.rounds.preload.Reservation` for its whole
payload: then the intake keeps the chunks it checked, for the close (rounds/preload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import NamedTuple

from raflora.v1.layout import Layout

from ..storage import UploadSink
from ..storage.tensorio import StreamingUploadCheck
from .preload import Reservation

DEFAULT_WINDOW = 4
DISCARD_WAIT_SECONDS = 5.0
_JOBS_PER_TURN = 8
# The lanes' own threads: however many uploads stream, commits, joins, view builds and the
# rest of the server keep the default executor to themselves.
_LANES = ThreadPoolExecutor(
    max_workers=min(8, (os.cpu_count() or 1) + 2), thread_name_prefix="raflora-intake"
)


class SerialLane:
    """Blocking jobs run in submission order, one at a time, on an executor shared by lanes.

    The first job that fails stops the lane: later jobs are skipped and :meth:`submit` and
    :meth:`drain` raise that error.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor | None,
        window: int,
        failed: asyncio.Event | None = None,
    ) -> None:
        self._loop = loop
        self._failed = failed  # set (on the loop) when a job fails
        self._executor = executor
        self._jobs: deque[Callable[[], None]] = deque()
        self._final: Callable[[], None] | None = None
        self._active = False
        self._slots = asyncio.Semaphore(window)
        self._idle = asyncio.Event()
        self._idle.set()
        self.error: BaseException | None = None

    async def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; waits while ``window`` jobs are already queued or running."""
        self.raise_error()
        await self._slots.acquire()
        self._jobs.append(job)
        self._idle.clear()
        if not self._active:
            self._start()

    def _start(self) -> None:
        self._active = True
        future = self._loop.run_in_executor(self._executor, self._run)
        future.add_done_callback(self._stopped)

    def _run(self) -> None:  # in a worker thread
        for _ in range(_JOBS_PER_TURN):  # then give the thread back and queue up again
            try:
                job = self._jobs.popleft()
            except IndexError:
                return
            try:
                if self.error is None or job is self._final:
                    job()
            except BaseException as exc:  # kept for the caller; the lane stops here
                self.error = exc
                if self._failed is not None:
                    self._loop.call_soon_threadsafe(self._failed.set)
            finally:
                self._loop.call_soon_threadsafe(self._slots.release)

    def _stopped(self, future: asyncio.Future[None]) -> None:  # on the loop
        if not future.cancelled() and future.exception() is not None and self.error is None:
            self.error = future.exception()
        if self._jobs:  # queued after the worker found the deque empty
            self._start()
            return
        self._active = False
        self._idle.set()

    async def drain(self) -> None:
        """Wait until every queued job has run; raises the lane's error, if any."""
        await self._idle.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    async def idle(self) -> None:
        """Wait until no job is queued or running, without raising the lane's error."""
        await self._idle.wait()

    def close(self, final: Callable[[], None]) -> None:
        """Drop the jobs not yet started and run ``final`` after the one running, if any
        (even if the lane has failed). Does not wait."""
        while True:
            try:  # the worker may take the last job between a check and this pop
                self._jobs.popleft()
            except IndexError:
                break
            self._slots.release()
        self._final = final
        self._jobs.append(final)
        self._idle.clear()
        if not self._active:
            self._start()


class Kept(NamedTuple):
    """What a push kept for the close: its chunks, the layout its check accepted, their room."""

    chunks: list[bytes | memoryview]
    layout: Layout
    reservation: Reservation


class UploadIntake:
    """Takes one upload's chunks; :meth:`finish` says whether the whole payload is sound."""

    def __init__(
        self,
        sink: UploadSink,
        check: StreamingUploadCheck | None,
        executor: Executor | None = None,
        window: int = DEFAULT_WINDOW,
        keep: Reservation | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        executor = executor or _LANES
        self.sink = sink
        self._check = check
        self.unchecked = check is None  # only hashed: a possible duplicate of a counted upload
        self._digest = hashlib.sha256()
        # Set once either lane fails: the receiving loop stops waiting for the next chunk.
        self.failed = asyncio.Event()
        self._writer = SerialLane(loop, executor, window, self.failed)
        self._checker = SerialLane(loop, executor, window, self.failed)
        self.received = 0
        self.layout: Layout | None = None  # once finish() has checked the whole payload
        self._closed = False
        # The received chunks (read-only views of immutable message bytes), while ``keep``
        # holds room for the whole payload.
        self._reservation = keep
        self._kept: list[bytes | memoryview] | None = [] if keep is not None else None

    async def put(self, chunk: bytes | memoryview) -> None:
        """Hand one chunk to both lanes; raises at once if either has found a problem."""
        if self._closed:
            raise RuntimeError("the upload's intake is closed")
        self.raise_error()
        self.received += len(chunk)
        if self._kept is not None:
            self._kept.append(chunk)
        await self._writer.submit(lambda: self.sink.write(chunk))
        await self._checker.submit(lambda: self._inspect(chunk))

    def raise_error(self) -> None:
        """The first problem either lane found (the checker's first), if any."""
        self._checker.raise_error()
        self._writer.raise_error()

    def _inspect(self, chunk: bytes | memoryview) -> None:
        self._digest.update(chunk)
        if self._check is not None:
            self._check.feed(chunk)

    async def finish(self) -> str:
        """Wait for both lanes; the payload's SHA-256 once every byte is written and checked.

        The checker's verdict comes first: a payload that is not a sound upload is refused as
        such even if writing it also failed.
        """
        await self._checker.drain()
        await self._writer.drain()
        if self._check is not None:
            self.layout = self._check.close()
        return self._digest.hexdigest()

    def kept(self) -> Kept | None:
        """Hand over the kept chunks, their layout and reservation (once, after :meth:`finish`)."""
        if self._kept is None or self._reservation is None or self.layout is None:
            return None
        kept, self._kept = self._kept, None
        reservation, self._reservation = self._reservation, None
        return Kept(kept, self.layout, reservation)

    def forget_kept(self) -> None:
        self._kept = None
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def close(self) -> None:
        """Stop taking bytes; the sink forgets them (a no-op once committed) after any write
        still running. Idempotent, and it does not wait: safe in a cancelled handler."""
        self.forget_kept()
        if self._closed:
            return
        self._closed = True
        try:
            self._checker.close(lambda: None)
        finally:
            self._writer.close(self.sink.abort)

    async def discard(self, wait_seconds: float = DISCARD_WAIT_SECONDS) -> None:
        """:meth:`close`, then wait (up to ``wait_seconds``) until the sink has forgotten the
        bytes: a refusal that reaches the client after this leaves nothing of the upload
        behind. A sink slower than that (a bucket not answering) finishes in the background."""
        self.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._writer.idle()), wait_seconds)
