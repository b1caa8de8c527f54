"""Tensor-parallel layouts of parameters, and dense <-> sharded state dicts.

Every parameter of the tensor-parallel layers, blocks and model records its layout
(``TensorParallelLayout``, set with ``set_tensor_parallel_layout`` and read with
``tensor_parallel_layout``; a parameter without one is replicated), as Megatron-Core
records ``partition_dim`` / ``partition_stride`` on its parameters. A sharded parameter
is stored with a leading shard dimension, ``[S, ...]`` (S = T emulated, 1 distributed):
shard r holds slice r of the dense tensor along ``partition_dim``. A replicated one is
the whole dense tensor on every shard.

The dense layout is GPT-2's (Hugging Face Conv1D weights are [in, out]) under the model's
names: ``h.{i}.attn.c_attn.weight`` is [C, 3C] with q | k | v, so column-parallel layers
split dimension 1 (c_attn each of q, k and v separately: stride 3), row-parallel layers
dimension 0. ``shard_state_dict`` / ``merge_state_dict`` convert by the layouts of a
model's parameters, whatever their names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from spd_ext.errors import UsageError


@runtime_checkable
class ShardedModel(Protocol):
    """What the Trainer needs of a tensor-parallel model (``ReducedSyncGPT``): checkpoints
    in the dense layout, the partial gradients summed after backward, its all-reduces
    counted. The Trainer treats any other module as an ordinary one."""

    config: Any  # ``config.tp_size``: the tensor-parallel size T
    comm: Any  # a TensorParallelComm; ``comm.emulated``: all T shards in this process

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in the dense layout (collective when distributed)."""

    def load_dense_state_dict(self, dense: dict[str, torch.Tensor]) -> None:
        """Load a dense state dict, each rank keeping its shards."""

    def sync_partial_grads_(self) -> None:
        """Sum the gradients of parameters with ``partial_gradient`` over the group."""

    @property
    def sync_counter(self) -> Any:
        """The SyncCounter of the model's all-reduces."""


@dataclass(frozen=True)
class TensorParallelLayout:
    """How one parameter is laid out over the T shards of a tensor-parallel group.

    ``partition_dim``: the dimension of the dense tensor split into T equal slices, one
    per shard; None: replicated (every shard holds all of it).
    ``partition_stride``: the split dimension is this many equal blocks, each split into
    T slices separately (c_attn's q | k | v: 3).
    ``dense_shape``: the dense tensor's shape (sharded parameters only). A shard may
    store its slice in another shape of the same size: a column-parallel bias [out]
    keeps [1, out/T] to broadcast over tokens.
    ``partial_gradient``: replicated, but applied to rank-local views, so each rank holds
    part of its gradient, which must be summed over the group (the blocks' LayerNorms;
    ``ReducedSyncGPT.sync_partial_grads_``).
    """

    partition_dim: int | None = None
    partition_stride: int = 1
    dense_shape: tuple[int, ...] | None = None
    partial_gradient: bool = False

    def __post_init__(self) -> None:
        if self.partition_dim is None:
            if self.partition_stride != 1 or self.dense_shape is not None:
                raise UsageError("partition_stride and dense_shape describe sharded "
                                 "parameters; set partition_dim too")
            return
        if self.dense_shape is None or not 0 <= self.partition_dim < len(self.dense_shape):
            raise UsageError(f"a sharded parameter needs its dense_shape and a partition_dim "
                             f"inside it, got {self.partition_dim} and {self.dense_shape}")
        if self.partition_stride < 1:
            raise UsageError(f"partition_stride must be positive, got {self.partition_stride}")
        if self.partial_gradient:
            raise UsageError("partial_gradient is for replicated parameters: a sharded "
                             "parameter's gradient is its own shard's")

    @property
    def sharded(self) -> bool:
        return self.partition_dim is not None


REPLICATED = TensorParallelLayout()
_ATTRIBUTE = "tp_layout"


def set_tensor_parallel_layout(param: nn.Parameter, partition_dim: int | None = None, *,
                               partition_stride: int = 1,
                               dense_shape: tuple[int, ...] | None = None,
                               partial_gradient: bool = False) -> nn.Parameter:
    """Record ``param``'s layout (see TensorParallelLayout; no arguments: replicated)."""
    setattr(param, _ATTRIBUTE, TensorParallelLayout(
        partition_dim, partition_stride, None if dense_shape is None else tuple(dense_shape),
        partial_gradient))
    return param


def tensor_parallel_layout(param: torch.Tensor) -> TensorParallelLayout:
    """``param``'s layout; replicated when none was recorded."""
    return getattr(param, _ATTRIBUTE, REPLICATED)


def shard_tensor(dense: torch.Tensor, layout: TensorParallelLayout,
                 tp_size: int) -> torch.Tensor:
    """A dense tensor -> [tp_size, *slice]: every shard's slice along ``partition_dim``
    (a replicated tensor comes back unchanged)."""
    if not layout.sharded:
        return dense
    dim, stride, t = layout.partition_dim, layout.partition_stride, tp_size
    if tuple(dense.shape) != layout.dense_shape:
        raise UsageError(f"shape {tuple(dense.shape)} is not the layout's dense shape "
                         f"{layout.dense_shape}")
    n = dense.shape[dim]
    if n % (stride * t) != 0:
        raise UsageError(f"dimension {dim} ({n}) does not split into {stride} x {t} slices")
    before, after = dense.shape[:dim], dense.shape[dim + 1:]
    d = dense.reshape(*before, stride, t, n // (stride * t), *after).movedim(dim + 1, 0)
    return d.reshape(t, *before, n // t, *after)


def merge_tensor(shards: torch.Tensor, layout: TensorParallelLayout,
                 tp_size: int) -> torch.Tensor:
    """Every shard's slice ([tp_size, ...], each in its stored shape) -> the dense tensor;
    the inverse of shard_tensor."""
    if not layout.sharded:
        return shards
    dim, stride, t = layout.partition_dim, layout.partition_stride, tp_size
    dense = layout.dense_shape
    before, n, after = dense[:dim], dense[dim], dense[dim + 1:]
    d = shards.reshape(t, *before, stride, n // (stride * t), *after).movedim(0, dim + 1)
    return d.reshape(dense)


def shard_state_dict(dense: Mapping[str, torch.Tensor], model: nn.Module, tp_size: int,
                     first: int, count: int) -> dict[str, torch.Tensor]:
    """``model``'s state dict holding shards ``[first, first + count)`` of the dense one,
    by the layouts of ``model``'s parameters (entries it lacks stay as they are)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name, value in dense.items():
        p = params.get(name)
        layout = REPLICATED if p is None else tensor_parallel_layout(p)
        if layout.sharded:
            value = shard_tensor(value, layout, tp_size)[first:first + count]
            value = value.reshape(count, *p.shape[1:])  # the stored shape of a slice
        out[name] = value
    return out


def merge_state_dict(sharded: Mapping[str, torch.Tensor], model: nn.Module,
                     tp_size: int) -> dict[str, torch.Tensor]:
    """All shards' state dict ([T, ...] sharded tensors) -> the dense layout, by the
    layouts of ``model``'s parameters (entries it lacks stay as they are)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: merge_tensor(value, tensor_parallel_layout(params[name])
                               if name in params else REPLICATED, tp_size)
            for name, value in sharded.items()}


def dense_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Every parameter's shape in the dense layout, by its recorded layout, in order."""
    shapes = {}
    for name, p in module.named_parameters():
        layout = tensor_parallel_layout(p)
        shapes[name] = torch.Size(layout.dense_shape) if layout.sharded else p.shape
    return shapes


@torch.no_grad()
def load_dense_shards_(module: nn.Module, dense: Mapping[str, torch.Tensor], tp_size: int,
                       first: int, count: int) -> None:
    """Copy shards ``[first, first + count)`` of the dense tensors into ``module``'s
    parameters and buffers of the same names, checking names and dense shapes."""
    own = module.state_dict()
    missing, unexpected = set(own) - set(dense), set(dense) - set(own)
    if missing or unexpected:
        raise UsageError(f"state dict does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, shape in dense_shapes(module).items():
        if dense[name].shape != shape:
            raise UsageError(f"{name}: checkpoint shape {tuple(dense[name].shape)} does not "
                             f"match the model's {tuple(shape)}; check n_layer, n_embd, "
                             "n_head, vocab_size and block_size")
    for name, value in shard_state_dict(dense, module, tp_size, first, count).items():
        own[name].copy_(value)


@torch.no_grad()
def gather_dense_state_dict(module: nn.Module, comm: Any) -> dict[str, torch.Tensor]:
    """``module``'s state dict in the dense layout, copied (collective over ``comm``'s
    group when it is distributed: every shard's slices all-gathered, then merged)."""
    import torch.distributed as dist

    local = {k: v.detach() for k, v in module.state_dict().items()}
    if not comm.emulated:
        params = dict(module.named_parameters())
        for name, v in local.items():
            if name in params and tensor_parallel_layout(params[name]).sharded:
                parts = [torch.empty_like(v) for _ in range(comm.tp_size)]
                dist.all_gather(parts, v.contiguous(), group=comm.group)
                local[name] = torch.cat(parts, 0)
    return {k: v.clone() for k, v in merge_state_dict(local, module, comm.tp_size).items()}
