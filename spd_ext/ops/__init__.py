"""C++ ops with JIT/prebuilt loading and a pure-PyTorch fallback for each."""

from spd_ext.ops.builder import OpBuilder, OpStatus, force_fallback, host_isa
from spd_ext.ops.ipc_allreduce import builder as _ipc_allreduce_builder
from spd_ext.ops.quantize import QuantizedTensor, dequantize_blockwise, quantize_blockwise
from spd_ext.ops.quantize import builder as _quantize_builder
from spd_ext.ops.quantize import cuda_builder as _quantize_cuda_builder
from spd_ext.ops.shm_allreduce import builder as _shm_allreduce_builder
from spd_ext.ops.weighted_reduce import builder as _weighted_reduce_builder
from spd_ext.ops.weighted_reduce import cuda_builder as _weighted_reduce_cuda_builder
from spd_ext.ops.weighted_reduce import weighted_reduce

#: Every op builder, in the order `spd-ext report` lists them.
ALL_BUILDERS: list[OpBuilder] = [_weighted_reduce_builder, _shm_allreduce_builder,
                                 _quantize_builder, _weighted_reduce_cuda_builder,
                                 _quantize_cuda_builder, _ipc_allreduce_builder]

__all__ = ["ALL_BUILDERS", "OpBuilder", "OpStatus", "QuantizedTensor", "dequantize_blockwise",
           "force_fallback", "host_isa", "quantize_blockwise", "weighted_reduce"]
