"""Files written so that a reader never sees a partial one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
        raise ValueError(f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}); repair it, or move it away to start over") from None


def load_checkpoint(path: Path | str, what: str = "checkpoint") -> dict:
    """A checkpoint's dict, read with ``torch.load(weights_only=True)``: tensors and plain
    data only, so a crafted file cannot run code. Garbage, truncated, crafted or
    non-dict files raise ValueError naming the file and the problem."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            global_name = next((line.strip() for line in text.splitlines()
                                if "GLOBAL" in line or "Unsupported global" in line), "")
            global_name = global_name.split(" was not")[0].replace("WeightsUnpickler error: ", "")
            raise ValueError(
                f"{path} is not a {what} spd_ext can load: it holds objects other than "
                "tensors and plain data, and spd_ext loads checkpoints with weights_only=True "
                f"so that a file cannot run code ({global_name})") from None
        raise ValueError(f"{path} is not a readable {what} (not written by torch.save, or "
                         "damaged)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path} is not a readable {what} (truncated or not written by "
                         f"torch.save?): {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a {what} dict; pass a "
                         "checkpoint written by spd_ext")
    return state
