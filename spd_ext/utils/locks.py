"""A lock that belongs to a live process, and says which one holds it.

``fcntl.flock`` on a file: the kernel drops the lock when its holder exits, however it
ends (SIGKILL included), so a lock whose owner is gone never blocks anyone. The holder
writes its pid and the time it took the lock into the file, for the message of whoever
finds it taken. The file itself stays (empty of meaning once unlocked): removing it would
let a second process lock a new file of the same name while a third still holds the old.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: a pid and since when (seconds since the epoch; 0 if unknown)."""

    pid: int | None
    since: float

    def describe(self) -> str:
        who = f"pid {self.pid}" if self.pid else "another process"
        if not self.since:
            return who
        return f"{who}, for {max(0.0, time.time() - self.since):.0f} s"


class ProcessLock:
    """An exclusive lock on ``path`` held by this process until :meth:`release` or exit."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> LockHolder | None:
        """Take the lock without waiting: None when taken, else who holds it."""
        if self._fd is not None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.time():.3f}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None

    def __enter__(self) -> ProcessLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(path: str | os.PathLike) -> LockHolder | None:
    """Who holds the lock on ``path`` now (None: nobody, or no such file), without
    keeping it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)  # drops the shared lock, if taken


def _read_holder(fd: int) -> LockHolder:
    try:
        pid, since = os.pread(fd, 64, 0).decode().split()
        return LockHolder(int(pid), float(since))
    except (ValueError, UnicodeDecodeError, OSError):
        return LockHolder(None, 0.0)  # taken a moment ago: its holder is still writing
