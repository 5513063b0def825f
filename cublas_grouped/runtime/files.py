"""An inter-process lock for the library's read-merge-write files (AUTO's measurements).

Writers of those files read what is there, merge their own entries and
replace the file atomically (temporary file, then ``os.replace``): a reader
never sees half a file. The lock makes the read-merge-write of concurrent
writers (processes sharing one tuning folder) happen one after another, so
no writer drops what another has just stored. It is advisory (``fcntl.flock``
on ``<file>.lock``) and best effort: where it cannot be taken (no ``fcntl``, a
read-only folder), the write goes on unlocked, since the atomic replace alone
already keeps the file whole.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exclusive_lock"]


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock on ``<path>.lock`` while the block runs; yields
    whether the lock was taken (False: the block runs unlocked)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    lock_path = Path(path).with_name(Path(path).name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock
