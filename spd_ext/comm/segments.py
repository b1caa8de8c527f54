"""Shared-memory segments in /dev/shm that outlived the job that made them.

spd_ext names a group's segment ``spd_ext_<pid>_<token>`` (pid: the group's rank 0) and
unlinks the name as soon as every rank has attached; a name still there whose creator is
gone was left by a rank killed during set-up. DeepSpeed's CPU communication op names one
segment per rank ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` and never
unlinks it; such a segment is stale when no live process maps it.
``spd-ext clean`` lists and removes both kinds; every group set-up removes stale spd_ext
segments first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spd_ext.utils.files import pid_alive

SHM_DIR = Path("/dev/shm")
SPD_EXT_NAME = re.compile(r"^spd_ext_(\d+)_[0-9a-f]+$")
DEEPSPEED_NAME = re.compile(r"^deepspeed_allreduce_buffer_\d+_.+_\d+_\d+$")


@dataclass(frozen=True)
class StaleSegment:
    path: Path
    size: int
    reason: str


def _mapped_names() -> set[str]:
    """Names under /dev/shm that some process maps (every /proc/<pid>/maps we can read)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue  # the process ended, or is not ours to read
        for line in text.splitlines():
            where = line.find("/dev/shm/")
            if where >= 0:
                names.add(line[where + len("/dev/shm/"):].split(" (deleted)")[0].strip())
    return names


def stale_segments(shm_dir: Path = SHM_DIR, deepspeed: bool = True) -> list[StaleSegment]:
    """spd_ext segments whose creator is gone and (``deepspeed``) DeepSpeed segments no live
    process maps."""
    if not shm_dir.is_dir():
        return []
    found, mapped = [], None
    for path in sorted(shm_dir.iterdir()):
        match = SPD_EXT_NAME.match(path.name)
        if match and not pid_alive(int(match.group(1))):
            found.append(StaleSegment(path, _size(path), f"spd_ext set-up by pid "
                                      f"{match.group(1)}, which has exited"))
        elif deepspeed and DEEPSPEED_NAME.match(path.name):
            mapped = _mapped_names() if mapped is None else mapped
            if path.name not in mapped:
                found.append(StaleSegment(path, _size(path), "DeepSpeed CPU all-reduce buffer "
                                          "that no process maps"))
    return found


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def remove_stale_segments(shm_dir: Path = SHM_DIR, deepspeed: bool = False) -> list[StaleSegment]:
    """Unlink :func:`stale_segments`; returns what went."""
    removed = []
    for segment in stale_segments(shm_dir, deepspeed):
        try:
            segment.path.unlink()
        except FileNotFoundError:
            continue  # someone else cleaned it meanwhile
        except PermissionError:
            continue  # another user's: not ours to remove
        removed.append(segment)
    return removed
