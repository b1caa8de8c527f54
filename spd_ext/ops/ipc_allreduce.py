"""Builder of the CUDA IPC all-reduce op (used by spd_ext.comm for CUDA tensors)."""

from __future__ import annotations

from spd_ext.ops.builder import CUDAOpBuilder, OpBuilder


class IpcAllReduceBuilder(CUDAOpBuilder, OpBuilder):
    NAME = "ipc_allreduce"
    SOURCES = ["cuda/ipc_allreduce.cu", "cuda/ipc_allreduce_binding.cpp"]


builder = IpcAllReduceBuilder()
