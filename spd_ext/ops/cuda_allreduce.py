"""Builder of the CUDA IPC all-reduce op (used by spd_ext.comm for CUDA tensors)."""

from __future__ import annotations

from spd_ext.ops.builder import CUDAOpBuilder, OpBuilder


class CudaAllReduceBuilder(CUDAOpBuilder, OpBuilder):
    NAME = "cuda_allreduce"
    SOURCES = ["cuda/custom_allreduce.cu", "cuda/custom_allreduce_binding.cpp"]


builder = CudaAllReduceBuilder()
