"""Collectives for spd_ext: ``all_reduce`` with shared-memory (CPU) and CUDA IPC kernels,
and registered CUDA buffers."""

from __future__ import annotations

from spd_ext.utils.lazy import lazy_exports

# Loaded on first use: the torch-free modules of this package (its names, for the command
# line's flags) do not pull in torch and the kernels.
_EXPORTS = {"AllReduceWork": "spd_ext.comm.work", "CommError": "spd_ext.comm.all_reduce",
            "all_reduce": "spd_ext.comm.all_reduce", "describe": "spd_ext.comm.shm",
            "ipc_buffer": "spd_ext.comm.cuda_ipc", "path": "spd_ext.comm.all_reduce"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
