"""The names a setting uses to choose spd_ext's collectives over another library's.

Torch-free (outside :mod:`spd_ext.comm`, whose import loads torch): the command line and the
run configuration offer these names as choices before anything heavy is loaded.
"""

from __future__ import annotations

__all__ = ["DIST_BACKENDS", "SPD_EXT", "SPD_EXT_CPU_BACKEND", "TP_BACKENDS",
           "renamed_backend_hint"]

#: The name of spd_ext's own collectives where a setting chooses between them and another
#: library's ("spd" before 2026-11-23; "spd" names a block kind only).
SPD_EXT = "spd_ext"

#: The tensor-parallel all-reduces a setting chooses from (``DistributedComm(backend=)``,
#: ``parallel.tp_backend``, ``spd-ext serve --backend``, the benchmarks' ``--backends``).
TP_BACKENDS = (SPD_EXT, "torch")


#: ``init_process_group``'s backend string for spd_ext's torch.distributed backend on CPU
#: tensors (the backend is registered under :data:`SPD_EXT`).
SPD_EXT_CPU_BACKEND = f"cpu:{SPD_EXT}"

#: What ``parallel.dist_backend`` chooses from: auto (spd_ext on a CPU accelerator,
#: DeepSpeed's choice otherwise), spd_ext, or deepspeed (the accelerator's: gloo, NCCL).
DIST_BACKENDS = ("auto", SPD_EXT, "deepspeed")


def renamed_backend_hint(name: object) -> str:
    """A hint for the old name of :data:`SPD_EXT`, to append to an error message."""
    return f" ('{name}' is now called '{SPD_EXT}')" if name == "spd" else ""
