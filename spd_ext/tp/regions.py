"""The two ends of a sync region, as autograd functions (Megatron's mappings).

copy-to-region: the replicated residual stream enters rank-local computation. Forward:
identity (broadcast over the shard dimension). Backward: one all-reduce of the input
gradient, since every shard's computation contributed to it.

reduce-from-region: the region's rank-local contributions are summed. Forward: one
all-reduce. Backward: identity (the gradient of a sum reaches every shard unchanged).

Both count their all-reduce on the communicator's SyncCounter as it happens.
"""

from __future__ import annotations

import torch

from spd_ext.tp.communicator import Handle, TensorParallelComm


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TensorParallelComm) -> torch.Tensor:
        ctx.comm = comm
        ctx.label = comm.counter.label
        return x.unsqueeze(0).expand(comm.shards, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = grad.sum(0)
        ctx.comm.all_reduce_(g)
        ctx.comm.counter.count_backward(ctx.label)
        return g, None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TensorParallelComm) -> torch.Tensor:
        ctx.shards = x.shape[0]
        y = x.sum(0)
        comm.all_reduce_(y)
        comm.counter.count_forward(comm.counter.label)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.unsqueeze(0).expand(ctx.shards, *grad.shape), None


class _ReduceFromTensorParallelRegionAsync(torch.autograd.Function):
    """Launches the forward all-reduce and returns at once; the result is valid after
    the handle's ``wait()`` (the tensor is filled in place by the worker thread)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TensorParallelComm) -> torch.Tensor:
        ctx.shards = x.shape[0]
        y = x.sum(0)
        comm.last_handle = comm.all_reduce_async(y)
        comm.counter.count_forward(comm.counter.label)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.unsqueeze(0).expand(ctx.shards, *grad.shape), None


def copy_to_tensor_parallel_region(x: torch.Tensor, comm: TensorParallelComm) -> torch.Tensor:
    """[...] replicated -> [shards, ...] rank-local (backward: one all-reduce)."""
    return _CopyToTensorParallelRegion.apply(x, comm)


def reduce_from_tensor_parallel_region(x: torch.Tensor, comm: TensorParallelComm) -> torch.Tensor:
    """[shards, ...] rank-local -> [...] replicated sum (forward: one all-reduce)."""
    return _ReduceFromTensorParallelRegion.apply(x, comm)


def reduce_from_tensor_parallel_region_async(x: torch.Tensor, comm: TensorParallelComm) -> Handle:
    """Like reduce_from_tensor_parallel_region, but returns a handle to ``wait()`` on."""
    y = _ReduceFromTensorParallelRegionAsync.apply(x, comm)
    launched, comm.last_handle = comm.last_handle, None
    return Handle(y, launched.future)
