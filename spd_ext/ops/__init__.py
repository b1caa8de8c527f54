"""C++ ops with JIT/prebuilt loading and a pure-PyTorch fallback for each."""

from spd_ext.ops import shm_allreduce
from spd_ext.ops import weighted_reduce as _weighted_reduce_module
from spd_ext.ops.builder import OpBuilder, OpStatus, force_fallback, host_isa
from spd_ext.ops.weighted_reduce import weighted_reduce

#: Every op builder, in the order `spd-ext report` lists them.
ALL_BUILDERS: list[OpBuilder] = [_weighted_reduce_module.builder, shm_allreduce.builder]

__all__ = ["ALL_BUILDERS", "OpBuilder", "OpStatus", "force_fallback", "host_isa",
           "weighted_reduce"]
