"""What every experiment shares: results files written atomically, resumed by row."""

from __future__ import annotations

from pathlib import Path

from spd_ext.errors import UsageError
from spd_ext.utils.files import read_json, write_json

__all__ = ["finished_runs", "read_json", "write_json"]


def finished_runs(results_path: Path, key, selected, force: bool) -> dict:
    """Results already in ``results_path`` by ``key(row)``; with ``force`` the selected
    runs are dropped (to be rerun) and the others kept."""
    rows = read_json(results_path, [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{results_path} is not a list of result rows (JSON objects); move it "
                         "away to start over")
    try:
        done = {key(row): row for row in rows}
    except KeyError as exc:
        raise UsageError(f"{results_path}: a row lacks the field {exc}; it was not written by "
                         "this experiment (move it away, or use another --out)") from None
    if force:
        done = {k: v for k, v in done.items() if k not in set(selected)}
    return done
