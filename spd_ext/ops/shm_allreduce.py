"""Builder of the shared-memory all-reduce op (used by spd_ext.comm).

Its fallback is torch.distributed itself, chosen by spd_ext.comm.all_reduce.
"""

from __future__ import annotations

from spd_ext.ops.builder import OpBuilder


class ShmAllReduceBuilder(OpBuilder):
    NAME = "shm_allreduce"
    SOURCES = ["cpu/shm_allreduce.cpp"]

    def ld_flags(self) -> list[str]:
        return [*super().ld_flags(), "-lrt"]  # shm_open on older glibc


builder = ShmAllReduceBuilder()
