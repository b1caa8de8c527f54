"""Collectives for spd_ext: ``all_reduce`` with shared-memory (CPU) and CUDA IPC kernels,
registered CUDA buffers, and launch helpers."""

from spd_ext.comm.all_reduce import CommError, all_reduce, path
from spd_ext.comm.cuda_ipc import ipc_buffer
from spd_ext.comm.launch import RankError, spawn
from spd_ext.comm.shm import describe

__all__ = ["CommError", "RankError", "all_reduce", "describe", "ipc_buffer", "path", "spawn"]
