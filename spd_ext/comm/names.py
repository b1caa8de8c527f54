"""The names settings use for spd_ext's collectives (torch-free: the command line's
flags and the config checks read them without loading torch)."""

from __future__ import annotations

#: The name of spd_ext's own collectives where a setting chooses between them and another
#: library's ("spd" before 2026-11-23; "spd" names a block kind only).
SPD_EXT = "spd_ext"

#: The tensor-parallel all-reduces a setting chooses from (``DistributedComm(backend=)``,
#: ``parallel.tp_backend``, ``spd-ext serve --backend``, the benchmarks' ``--backends``).
TP_BACKENDS = (SPD_EXT, "torch")


def renamed_backend_hint(name: object) -> str:
    """A hint for the old name of :data:`SPD_EXT`, to append to an error message."""
    return f" ('{name}' is now called '{SPD_EXT}')" if name == "spd" else ""
