"""Run logs: one JSON object per line, a progress line on stderr, optional W&B."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from spd_ext.utils.files import atomic_path


def log_lines(path: Path) -> Iterator[tuple[str, dict | None]]:
    """Each line of a JSONL log with its record (None: a line cut short by a crash)."""
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        yield line, record if isinstance(record, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """The metric records of a run's log (events and cut-short lines skipped); [] if the
    file does not exist."""
    if not path.is_file():
        return []
    return [r for _, r in log_lines(path) if r is not None and "event" not in r and "step" in r]


class RunLog:
    def __init__(self, path: Path | None, run_name: str = "run", config: dict | None = None,
                 quiet: bool = False, wandb_project: str | None = None) -> None:
        self.path, self.run_name, self.quiet = path, run_name, quiet
        self.history: list[dict] = []
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # line-buffered: a crash loses <= 1 line
        self._wandb = None
        project = wandb_project or os.environ.get("SPD_EXT_WANDB_PROJECT")
        if project and os.environ.get("WANDB_MODE") != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project=project, name=run_name, config=config or {})
            except ImportError:
                print(f"spd_ext: W&B project {project!r} asked for but wandb is not installed "
                      "(pip install 'spd_ext[wandb]'); logging locally only", file=sys.stderr)
        self.event("start", config=config or {})

    def _write(self, record: dict) -> None:
        record = {"run": self.run_name, "time": time.time(), **record}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def event(self, name: str, **fields) -> None:
        self._write({"event": name, **fields})

    def metrics(self, **values) -> None:
        self.history.append(values)
        self._write(values)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if k != "step"},
                            step=values.get("step"))
        if not self.quiet:
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in values.items()]
            print(f"[{self.run_name}] " + "  ".join(parts), file=sys.stderr, flush=True)

    def drop_after(self, step: int) -> int:
        """Remove the metric records of steps after ``step`` (a resumed run redoes them
        from its checkpoint, so they would appear twice); returns how many went. The file
        is rewritten atomically."""
        if self.path is None or self._file is None:
            return 0
        self._file.close()
        kept, dropped = [], 0
        for line, record in log_lines(self.path):
            if record is None or ("event" not in record and record.get("step", -1) > step):
                dropped += 1  # a later step's record, or a line cut short by the crash
            else:
                kept.append(line)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)
        return dropped

    def close(self) -> None:
        self.event("end")
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
