"""Files written so that a reader never sees a partial one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spd_ext.errors import MissingFileError, UsageError


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def process_exited(pid: int) -> bool:
    """Whether process ``pid`` of this host is gone: no such process, or a zombie (it
    exited and its parent has not collected it yet, so ``kill(pid, 0)`` still succeeds)."""
    if not pid_alive(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False  # no procfs: trust kill()
    state = stat[stat.rfind(")") + 2:][:1]
    return state in ("Z", "X")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete ``<name>.tmp<pid>`` files beside ``path`` left by writers that were killed
    mid-write (their process is gone); a live writer's file is kept."""
    removed = []
    prefix = f"{path.name}.tmp"
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        suffix = candidate.name[len(prefix):]
        if candidate.name.startswith(prefix) and suffix.isdigit() and \
                not pid_alive(int(suffix)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` when the block
    ends normally, removed when it raises (a crash mid-write leaves the old file; the
    temporary of a writer killed outright is removed by the next write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: Free bytes under which a failed write is put down to a full disk: torch.save's errors
#: ("basic_ios::clear: iostream error", "file write failed") carry no errno.
NEARLY_FULL_BYTES = 16 << 20


class WriteError(RuntimeError):
    """A file could not be written; the message says why (a full disk named as such)."""


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


@contextmanager
def explained_write_errors(path: Path, what: str) -> Iterator[None]:
    """Turn the errors of writing ``what`` at ``path`` (OSError, or torch.save's
    RuntimeError) into one :class:`WriteError` that says when the disk is full."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            raise  # a collective inside the writer failed: not a write error
        free = _free_bytes(path)
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            (free is not None and free < NEARLY_FULL_BYTES)
        if full:
            raise WriteError(f"cannot write {what} {path}: the disk holding it is full "
                             f"({free if free is not None else '?'} bytes free); free some "
                             "space, then continue with --resume (the last complete "
                             "checkpoint is untouched)") from None
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WriteError(f"cannot write {what} {path}: {detail}") from None


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure to ``path`` atomically (the format from its suffix), then
    close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def write_json(path: Path, payload: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def read_json(path: Path, default: object) -> object:
    """The file's JSON, or ``default`` when there is no file; a malformed file raises
    ValueError naming it (never silently replaced: it may hold finished results)."""
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}); repair it, or move it away to start over") from None


def load_weights_only(path: Path | str, what: str = "checkpoint", map_location: Any = "cpu",
                      allowed: Sequence[Any] = (), mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data, plus the classes in
    ``allowed`` (plain-data classes such as DeepSpeed's loss scaler), so a crafted file
    cannot run code. Garbage, truncated or crafted files raise ValueError naming the file
    and the problem. ``mmap``: map the tensors' storage instead of reading it (a check of
    a large file's contents), where the file's format allows it."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no {what} at {path}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            try:
                return torch.load(path, map_location=map_location, weights_only=True,
                                  mmap=mmap)
            except RuntimeError as exc:
                if not (mmap and "mmap" in str(exc)):
                    raise
                # an older, non-zip file (DeepSpeed's legacy serialization): read it whole
                return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        named = re.search(r"GLOBAL ([\w.]+)", text)
        if named:
            raise UsageError(
                f"{path} is not a {what} spd_ext can load: it holds objects other than "
                f"tensors and plain data (here {named.group(1)}), and spd_ext reads checkpoints "
                "with weights_only=True so that a file cannot run code") from None
        raise UsageError(f"{path} is not a readable {what} (not written by torch.save, or "
                         "damaged)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"{path} is not a readable {what} (truncated or not written by "
                         f"torch.save?): {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None


def load_checkpoint(path: Path | str, what: str = "checkpoint") -> dict:
    """A checkpoint's dict, read with :func:`load_weights_only`; a file that holds no dict
    raises ValueError too."""
    path = Path(path)
    state = load_weights_only(path, what)
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a {what} dict; pass a "
                         "checkpoint written by spd_ext")
    return state
