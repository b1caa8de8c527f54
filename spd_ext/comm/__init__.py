"""Collectives for spd_ext: ``all_reduce`` with shared-memory (CPU) and CUDA IPC kernels,
registered CUDA buffers, and the torch.distributed backend ``"spd_ext"`` (registered on
import)."""

from spd_ext.comm.all_reduce import CommError, all_reduce, path
from spd_ext.comm.cuda_ipc import ipc_buffer
from spd_ext.comm.process_group import register_backend, weighted_op
from spd_ext.comm.shm import describe
from spd_ext.comm.work import AllReduceWork

# Eager on purpose: the function all_reduce shares its name with its module, and a lazy
# attribute would lose to the submodule once anything imported spd_ext.comm.all_reduce.
__all__ = ["AllReduceWork", "CommError", "all_reduce", "describe", "ipc_buffer", "path",
           "register_backend", "weighted_op"]

register_backend()  # the torch.distributed backend "spd_ext"
