"""weighted_reduce: out = sum_j w_j * x_j in one pass, with fp32 accumulation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from spd_ext.errors import UsageError
from spd_ext.ops.builder import CUDAOpBuilder, OpBuilder
from spd_ext.ops.codes import KERNEL_DTYPES

MAX_CUDA_INPUTS = 32  # spd::cuda::kMaxInputs


class WeightedReduceBuilder(OpBuilder):
    NAME = "weighted_reduce"
    SOURCES = ["cpu/weighted_reduce.cpp"]


class WeightedReduceCUDABuilder(CUDAOpBuilder, OpBuilder):
    NAME = "weighted_reduce_cuda"
    SOURCES = ["cuda/weighted_reduce.cu", "cuda/weighted_reduce_binding.cpp"]


builder = WeightedReduceBuilder()
cuda_builder = WeightedReduceCUDABuilder()


def as_weight_list(weights: torch.Tensor | Sequence[float], count: int, what: str) -> list[float]:
    """Weights as Python floats, checked: one per ``what``, all finite."""
    if isinstance(weights, torch.Tensor):
        values = (weights if weights.dim() == 1 else weights.reshape(-1)).tolist()
    else:
        values = [float(w) for w in weights]
    if len(values) != count:
        raise UsageError(f"got {len(values)} weights for {count} {what}; pass one weight per "
                         f"{what.rstrip('s')}")
    bad = [i for i, w in enumerate(values) if not math.isfinite(w)]
    if bad:
        raise UsageError(f"weights must be finite; entries {bad} are {[values[i] for i in bad]}")
    return values


def _check_inputs(xs: list[torch.Tensor], out: torch.Tensor | None) -> None:
    if not xs:
        raise UsageError("weighted_reduce needs at least one input tensor")
    first = xs[0]
    shape, dtype, device = first.shape, first.dtype, first.device
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"weighted_reduce supports float32, bfloat16 and float16, got {dtype}")
    for j, x in enumerate(xs):
        if x.shape != shape or x.dtype != dtype or x.device != device:
            raise UsageError(
                f"all inputs must match input 0 ({tuple(shape)}, {dtype}, {device}); input {j} "
                f"is ({tuple(x.shape)}, {x.dtype}, {x.device})")
    if out is None:
        return
    if out.shape != shape or out.dtype != dtype or out.device != device:
        raise UsageError(f"out is ({tuple(out.shape)}, {out.dtype}, {out.device}) but the inputs "
                         f"are ({tuple(shape)}, {dtype}, {device})")
    if not out.is_contiguous():
        raise UsageError("out must be contiguous (the result is written in one pass); pass "
                         "out=None to get a new tensor, or a contiguous buffer")
    # out may be exactly one of the inputs (in-place accumulation), never a partial overlap.
    lo = out.data_ptr()
    hi = lo + out.numel() * out.element_size()
    for j, x in enumerate(xs):
        x_lo = x.data_ptr()
        if x_lo == lo and x.is_contiguous():
            continue
        if x_lo < hi and lo < x_lo + x.numel() * x.element_size():
            raise UsageError(f"out partially overlaps input {j}; out may alias an input only "
                             "exactly")


def weighted_reduce_torch(xs: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor,
                          out: torch.Tensor) -> torch.Tensor:
    """The pure-PyTorch fallback: fp32 accumulator, then one copy into ``out``. Weights in
    a tensor stay on their device (no host sync)."""
    acc = torch.mul(xs[0].to(torch.float32), weights[0])
    for j, x in enumerate(xs[1:], start=1):
        if isinstance(weights, torch.Tensor):
            acc.addcmul_(x, weights[j])
        else:
            acc.add_(x, alpha=weights[j])
    return out.copy_(acc)


def weighted_reduce(xs: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float],
                    out: torch.Tensor | None = None, *,
                    impl: Literal["auto", "kernel", "fallback"] = "auto") -> torch.Tensor:
    """Return ``out = sum_j weights[j] * xs[j]``, accumulated in fp32, in one pass.

    Args:
        xs: same-shape, same-dtype tensors (float32, bfloat16 or float16) on one device.
            Non-contiguous inputs are copied to contiguous memory first (one extra pass).
        weights: one finite weight per input, a tensor or a sequence of floats.
        out: contiguous destination; may be one of ``xs`` exactly (in-place), never a
            partial overlap. A new tensor when None.
        impl: ``"kernel"`` requires the C++ op, ``"fallback"`` uses PyTorch, ``"auto"``
            takes the kernel when it is available (CPU tensors).
    """
    xs = list(xs)
    _check_inputs(xs, out)
    if impl not in ("auto", "kernel", "fallback"):
        raise UsageError(f"impl must be 'auto', 'kernel' or 'fallback', got {impl!r}")
    cuda = xs[0].device.type == "cuda"
    if cuda and isinstance(weights, torch.Tensor) and weights.device.type == "cuda":
        # Device weights are used as they are: checking them for NaN would cost a sync.
        w = weights.detach().reshape(-1).to(torch.float32)
        if w.numel() != len(xs):
            raise UsageError(f"got {w.numel()} weights for {len(xs)} inputs; pass one weight "
                             "per input")
    else:
        w = as_weight_list(weights, len(xs), "inputs")
        if cuda:
            w = torch.tensor(w, dtype=torch.float32, device=xs[0].device)
    if out is None:
        out = torch.empty_like(xs[0], memory_format=torch.contiguous_format)
    xs = [x if x.is_contiguous() else x.contiguous() for x in xs]
    chosen = cuda_builder if cuda else builder
    usable = impl != "fallback" and (not cuda or len(xs) <= MAX_CUDA_INPUTS)
    module = chosen.load() if usable else None
    if module is None:
        if impl == "kernel":
            raise RuntimeError(f"the weighted_reduce kernel is unavailable for {out.device} "
                               f"tensors ({chosen.status().reason or 'too many inputs'})")
        return weighted_reduce_torch(xs, w, out)
    return module.weighted_reduce(xs, w, out)
