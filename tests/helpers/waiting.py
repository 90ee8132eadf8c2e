"""Polling until a condition holds, for what a test cannot be notified of (files on the
server's disk, a metric, a scrape by another process)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Call ``predicate`` every ``interval`` seconds until it is true (returns True) or
    ``timeout`` passes (returns False, so the caller's ``assert`` says what it waited for)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_for(
    what: str, condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.2
) -> None:
    """:func:`wait_until` that fails with ``what`` in the message when it times out."""
    if not wait_until(condition, timeout, interval):
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
