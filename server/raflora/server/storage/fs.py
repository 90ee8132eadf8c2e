"""Crash-safe file primitives: write, fsync, rename, fsync the directory.

A write that runs out of space (ENOSPC, EDQUOT) removes its temporaries and raises
:class:`DiskFullError`: nothing already acknowledged is touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import DiskFullError, is_disk_full

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Any:
    """Linux's sync_file_range(2) through libc, or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_range = _sync_file_range()


def start_writeback(fd: int, start: int, end: int) -> None:
    """Ask the kernel to start writing [start, end) of ``fd`` to disk, without waiting for it.

    Durability still comes from the fsync before the acknowledgement; this only starts the
    disk earlier. A no-op where sync_file_range is unavailable (the fsync then does it all).
    """
    if _sync_range is not None and end > start:
        _sync_range(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def disk_full_guard(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into :class:`DiskFullError`; other errors pass through."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError("storage", f"disk full on the server while {what}") from None
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with disk_full_guard(f"writing {path.name}"):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode(), mode)


def read_json(path: Path, max_bytes: int = 16 << 20) -> Any:
    """Parse a JSON file of bounded size (a corrupt file must not exhaust memory)."""
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path.name} is larger than {max_bytes} bytes")
    try:
        return json.loads(data)
    except RecursionError:  # "[[[[…" nested past the parser's stack: junk like any other
        raise ValueError(f"{path.name} nests too deeply to be a record") from None
