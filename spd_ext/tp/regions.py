"""The two ends of a sync region, as autograd functions (Megatron's mappings).

copy-to-region: the replicated residual stream enters rank-local computation. Forward:
identity (broadcast over the shard dimension). Backward: one all-reduce of the input
gradient, since every shard's computation contributed to it.

reduce-from-region: the region's rank-local contributions are summed. Forward: one
all-reduce. Backward: identity (the gradient of a sum reaches every shard unchanged).

Both count their all-reduce on the communicator's SyncCounter as it happens. A compiled
backward cannot count (it runs no Python): under torch.compile the backward all-reduce of
a copy-to-region is counted when the region opens, where the forward makes it certain
(the input needs its gradient). The compiled graph is guarded on the counter's values as
they were when it was traced (zero: a step's counts start there), so a loop under
torch.compile ends each step with ``model.sync_counter.step()``, as spd_ext's loops do;
counts left to grow recompile every step.
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
        if not torch.compiler.is_compiling():
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


class _SumOverShards(torch.autograd.Function):
    """[shards, ...] -> [...]: the local half of reduce-from-region, whose all-reduce the
    caller launches asynchronously (backward: the gradient reaches every shard)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shards = x.shape[0]
        return x.sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.unsqueeze(0).expand(ctx.shards, *grad.shape)


def copy_to_tensor_parallel_region(x: torch.Tensor, comm: TensorParallelComm) -> torch.Tensor:
    """[...] replicated -> [shards, ...] rank-local (backward: one all-reduce)."""
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and x.requires_grad:
        comm.counter.count_backward(comm.counter.label)
    return _CopyToTensorParallelRegion.apply(x, comm)


def reduce_from_tensor_parallel_region(x: torch.Tensor, comm: TensorParallelComm) -> torch.Tensor:
    """[shards, ...] rank-local -> [...] replicated sum (forward: one all-reduce)."""
    return _ReduceFromTensorParallelRegion.apply(x, comm)


def reduce_from_tensor_parallel_region_async(x: torch.Tensor, comm: TensorParallelComm) -> Handle:
    """Like reduce_from_tensor_parallel_region, but returns at once with a handle; the
    summed tensor is valid after ``wait()`` (the all-reduce fills it in place). Nothing
    autograd saves is written: the sum's backward needs only the shape."""
    y = _SumOverShards.apply(x)
    handle = comm.all_reduce_async(y)
    comm.counter.count_forward(comm.counter.label)
    return handle
