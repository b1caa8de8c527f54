"""spd_ext's kernels and collectives as torch operators, in the ``spd_ext`` namespace.

A pybind function is opaque to ``torch.compile``: the graph breaks at every call. Each
operator here has a fake (meta) implementation that says what it returns without running
it, so Dynamo and Inductor trace straight through (DeepSpeed's ``shm_interface.cpp``
registers its CPU all-reduce the same way, with ``TORCH_LIBRARY``):

- ``spd_ext::all_reduce_(Tensor(a!) tensor, str op, str group) -> ()``: the collective of
  :func:`spd_ext.comm.all_reduce`, in place, on the process group named ``group`` (its
  ``group_name``, the same on every rank; "" for the world). Inductor keeps its order.
- ``spd_ext::weighted_reduce(Tensor[] xs, float[] weights) -> Tensor``: the fused
  ``sum_i w_i x_i`` of :func:`spd_ext.ops.weighted_reduce`.
- ``spd_ext::quantize_blockwise(Tensor x, int block_size) -> (Tensor, Tensor)`` and
  ``spd_ext::dequantize_blockwise(Tensor values, Tensor scales, int block_size, int[] shape,
  ScalarType dtype) -> Tensor``: the 8-bit block quantization of :mod:`spd_ext.ops.quantize`.

Each calls the same Python entry a user calls (kernel or fallback as that one chooses), so
an operator and its eager function agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.comm.all_reduce import all_reduce
from spd_ext.comm.torch_private import group_name, resolve_group
from spd_ext.ops.quantize import QuantizedTensor, dequantize_blockwise, quantize_blockwise
from spd_ext.ops.weighted_reduce import weighted_reduce

__all__ = ["group_key"]


def group_key(group: Any) -> str:
    """What the operators take for ``group``: its name ("" for the default group)."""
    if group is None or group is dist.group.WORLD:
        return ""
    return group_name(group)


@torch.library.custom_op("spd_ext::all_reduce_", mutates_args=("tensor",))
def _all_reduce_(tensor: torch.Tensor, op: str, group: str) -> None:
    all_reduce(tensor, op, group=resolve_group(group) if group else None)


@_all_reduce_.register_fake
def _(tensor: torch.Tensor, op: str, group: str) -> None:
    return None


@torch.library.custom_op("spd_ext::weighted_reduce", mutates_args=())
def _weighted_reduce(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return weighted_reduce(list(xs), list(weights))


@_weighted_reduce.register_fake
def _(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return torch.empty_like(xs[0])


@torch.library.custom_op("spd_ext::quantize_blockwise", mutates_args=())
def _quantize_blockwise(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = quantize_blockwise(x, block_size)
    return q.values, q.scales


@_quantize_blockwise.register_fake
def _(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    return (x.new_empty(n, dtype=torch.int8),
            x.new_empty(-(-n // block_size), dtype=torch.float32))


@torch.library.custom_op("spd_ext::dequantize_blockwise", mutates_args=())
def _dequantize_blockwise(values: torch.Tensor, scales: torch.Tensor, block_size: int,
                          shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return dequantize_blockwise(QuantizedTensor(values, scales, torch.Size(shape), dtype,
                                                block_size))


@_dequantize_blockwise.register_fake
def _(values: torch.Tensor, scales: torch.Tensor, block_size: int, shape: Sequence[int],
      dtype: torch.dtype) -> torch.Tensor:
    return values.new_empty(tuple(shape), dtype=dtype)
