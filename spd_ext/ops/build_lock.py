"""A JIT build lock that dies with its holder.

``torch.utils.cpp_extension.load`` takes a ``lock`` file in the build directory (a
``FileBaton``: created with ``O_EXCL``, removed when the build step ends) on every load in
a fresh process, even when nothing needs compiling, and a process that finds the file
waits for it to disappear: silently and forever. A process killed during that step leaves
the file behind and every later load of the op hangs.

So every spd_ext load holds an ``fcntl.flock`` on ``spd_ext-build.lock`` in the same
directory around torch's (a :class:`~spd_ext.utils.locks.ProcessLock`): the kernel
drops a flock when its holder dies, however it dies, and the holder's pid and start time
in the file tell the processes waiting on it whom they wait for, as they tell
``spd-ext report``.
Since no spd_ext loader is inside torch's build without holding the flock, a torch
``lock`` found by whoever holds (or could take) the flock is a dead build's, and goes.
A loader killed alone (``kill -9``, the OOM killer) leaves its ninja running, compilers
and all; the next holder waits for that ninja before building in the same directory.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from spd_ext.utils.locks import LockHolder, ProcessLock, lock_holder

LOCK_FILE = "spd_ext-build.lock"  # the flock; never deleted (a waiter may hold it open)
TORCH_BATON = "lock"  # torch.utils.cpp_extension's FileBaton

# A waiter's messages: the first once a build is clearly not instant, then a reminder
# that it is still waiting (a CUDA op can take minutes).
NOTICE_AFTER_S = 2.0
NOTICE_EVERY_S = 30.0
POLL_S = 0.1
NINJA_POLL_S = 0.5  # each poll reads /proc


@dataclass(frozen=True)
class BuildLockState:
    """A build directory whose lock is held, or holds a stale torch ``lock`` file."""

    directory: Path
    holder: LockHolder | None  # the live holder; None: nobody holds it (stale)

    @property
    def held(self) -> bool:
        return self.holder is not None

    @property
    def baton(self) -> Path:
        return self.directory / TORCH_BATON

    def describe(self) -> str:
        if self.holder is not None:
            return f"held by {self.holder.describe()}, building in {self.directory}"
        return (f"stale: {self.baton} was left by a build that was killed; `spd-ext clean` "
                "or the next load removes it")


def _notice(message: str) -> None:
    print(f"spd_ext: {message}", file=sys.stderr, flush=True)


def _ninjas_left_running(directory: Path) -> list[int]:
    """Pids of ninja processes working in ``directory``: torch runs ninja there, and a
    ninja whose loader was killed alone goes on writing the build's files."""
    target, found = os.path.realpath(directory), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if ((proc / "comm").read_text().strip() == "ninja"
                    and os.readlink(proc / "cwd") == target):
                found.append(int(proc.name))
        except OSError:
            continue  # exited meanwhile, or another user's (not building in our cache)
    return found


def _ninja_message(directory: Path, op: str, waited: float) -> str:
    pids = ", ".join(map(str, _ninjas_left_running(directory))) or "?"
    return (f"waiting {waited:.0f} s so far for ninja (pid {pids}), left running in "
            f"{directory} by a killed build of op '{op}', to finish before building it again")


def _wait_while(busy: Callable[[], bool], message: Callable[[float], str],
                poll: float) -> None:
    """Poll until not ``busy()``, saying ``message(seconds waited)`` on stderr after
    ``NOTICE_AFTER_S`` and then every ``NOTICE_EVERY_S``."""
    start, next_notice = time.monotonic(), NOTICE_AFTER_S
    while busy():
        waited = time.monotonic() - start
        if waited >= next_notice:
            _notice(message(waited))
            next_notice = waited + NOTICE_EVERY_S
        time.sleep(poll)


#: A torch ``lock`` in a directory other programs build in too (DeepSpeed's JIT ops, which
#: plain DeepSpeed jobs load without spd_ext's lock) counts as a dead build's only when no
#: ninja works there and it is this old: a live load holds it for a second or so.
FOREIGN_BATON_GRACE_S = 60.0


def _foreign_build_running(directory: Path) -> bool:
    baton = directory / TORCH_BATON
    try:
        age = time.time() - baton.stat().st_mtime
    except FileNotFoundError:
        return False
    return bool(_ninjas_left_running(directory)) or age < FOREIGN_BATON_GRACE_S


@contextmanager
def build_lock(directory: Path, op: str, shared: bool = False) -> Iterator[None]:
    """Hold the build lock of ``directory`` (creating it) while building or loading ``op``.

    Waits for a live holder and for a ninja a killed holder left running, saying on
    stderr whom it waits for; removes a torch ``lock`` left by a dead build. ``shared``:
    programs without this lock build there too (DeepSpeed's ops), so a torch ``lock`` is
    first waited for while a build may be behind it (FOREIGN_BATON_GRACE_S)."""
    lock = ProcessLock(directory / LOCK_FILE)
    holder: LockHolder | None = None

    def taken() -> bool:
        nonlocal holder
        holder = lock.acquire()
        return holder is not None

    _wait_while(taken, lambda waited: (
        f"waiting {waited:.0f} s so far for the build of op '{op}' in {directory} by "
        f"{holder.describe() if holder else 'another process'}; if that process is stuck, "
        "end it: its lock goes with it"), POLL_S)
    try:
        _wait_while(lambda: bool(_ninjas_left_running(directory)),
                    lambda waited: _ninja_message(directory, op, waited), NINJA_POLL_S)
        if shared:
            _wait_while(lambda: _foreign_build_running(directory), lambda waited: (
                f"waiting {waited:.0f} s so far for another program's build of op '{op}' in "
                f"{directory} (its lock file is taken; one older than "
                f"{FOREIGN_BATON_GRACE_S:.0f} s with no build running counts as left by a "
                "killed build)"), NINJA_POLL_S)
        baton = directory / TORCH_BATON
        if baton.exists():  # with the lock held: a dead build's
            baton.unlink()
            _notice(f"removed {baton}, left by a build of op '{op}' that was killed; "
                    "building it again")
        yield
    finally:
        lock.release()


def lock_state(directory: Path) -> BuildLockState | None:
    """The lock of one build directory when it is held or stale, else None. Takes nothing
    that a loader would wait for beyond one poll (a shared flock, dropped at once)."""
    try:
        holder = lock_holder(directory / LOCK_FILE)
    except PermissionError:
        return None  # another user's build: not ours to judge (or clean)
    if holder is not None or (directory / TORCH_BATON).exists():
        return BuildLockState(directory, holder)
    return None


def _build_dirs(root: Path) -> list[Path]:
    """Build directories under an ops cache (``<root>/<torch tag>/<op dir>``) with a lock."""
    return sorted({p.parent for name in (LOCK_FILE, TORCH_BATON)
                   for p in root.glob(f"*/*/{name}")})


def build_locks(root: Path) -> list[BuildLockState]:
    """Every held or stale build lock under the ops cache ``root``."""
    return [s for s in map(lock_state, _build_dirs(root)) if s is not None]


def stale_build_locks(root: Path) -> list[BuildLockState]:
    """Torch ``lock`` files under ``root`` that no live build holds."""
    return [s for s in build_locks(root) if not s.held]


def remove_stale_build_locks(root: Path) -> list[BuildLockState]:
    """Remove :func:`stale_build_locks`; returns what went. Each is removed under the
    build lock, so a load starting meanwhile never loses its live ``lock``."""
    removed = []
    for state in stale_build_locks(root):
        with ProcessLock(state.directory / LOCK_FILE) as lock:
            try:
                if lock.acquire() is not None:
                    continue  # a load began since: its lock is live
                state.baton.unlink()
            except (FileNotFoundError, PermissionError):
                continue  # a load took it over meanwhile, or another user's build
            removed.append(state)
    return removed
