"""8-bit block quantization: absmax per block, int8 values plus fp32 scales.

    q = round(x / s) with s = absmax(block) / 127,   x_hat = q * s

Error bound, per element: |x - x_hat| <= s / 2 = absmax(block) / 254, plus float32
rounding of the scale and products (a few units of 2^-24 * absmax), plus one rounding to
the output dtype when dequantizing to bf16 / fp16. Used for compressed gradient pushes.

The C++ kernel (csrc/includes/spd_quant.h, CPU) computes with the same float32 operations
as the PyTorch implementation here, so the two agree bitwise; the PyTorch one serves every
other device and is the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from spd_ext.errors import UsageError
from spd_ext.ops.builder import CUDAOpBuilder, OpBuilder
from spd_ext.ops.codes import KERNEL_DTYPES

Impl = Literal["auto", "kernel", "fallback"]


class QuantizeBuilder(OpBuilder):
    NAME = "quantize"
    SOURCES = ["cpu/quantize.cpp"]


class QuantizeCUDABuilder(CUDAOpBuilder, OpBuilder):
    NAME = "quantize_cuda"
    SOURCES = ["cuda/quantize.cu", "cuda/quantize_binding.cpp"]


builder = QuantizeBuilder()
cuda_builder = QuantizeCUDABuilder()


def _kernel(x: torch.Tensor, impl: Impl):
    if impl not in ("auto", "kernel", "fallback"):
        raise UsageError(f"impl must be 'auto', 'kernel' or 'fallback', got {impl!r}")
    chosen = cuda_builder if x.device.type == "cuda" else builder
    module = chosen.load() if impl != "fallback" else None
    if module is None and impl == "kernel":
        raise RuntimeError(f"the quantize kernel is unavailable for {x.device} tensors "
                           f"({chosen.status().reason})")
    return module


@dataclass
class QuantizedTensor:
    values: torch.Tensor  # int8, numel elements (padded to whole blocks internally)
    scales: torch.Tensor  # float32, one per block
    shape: torch.Size
    dtype: torch.dtype
    block_size: int

    @property
    def nbytes(self) -> int:
        return self.values.numel() + 4 * self.scales.numel()


def quantize_blockwise(x: torch.Tensor, block_size: int = 256,
                       impl: Impl = "auto") -> QuantizedTensor:
    """int8 values and one fp32 absmax scale per ``block_size`` elements."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"quantize_blockwise supports float32, bfloat16 and float16, got "
                        f"{x.dtype}")
    if block_size < 1:
        raise UsageError(f"block_size must be positive, got {block_size}")
    module = _kernel(x, impl)
    if module is not None:
        try:
            values, scales, *flags = module.quantize(x.detach().reshape(-1).contiguous(),
                                                     block_size)
        except RuntimeError as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
        if flags and bool(flags[0].item()):  # the CUDA kernel flags NaN / inf blocks
            raise UsageError("cannot quantize a tensor with NaN or inf entries")
        return QuantizedTensor(values, scales, x.shape, x.dtype, block_size)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    if not torch.isfinite(absmax).all():
        raise UsageError("cannot quantize a tensor with NaN or inf entries")
    scales = absmax / 127.0
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round(blocks * inv.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return QuantizedTensor(q.view(-1)[:n].clone() if pad else q.view(-1), scales, x.shape,
                           x.dtype, block_size)


def dequantize_blockwise(q: QuantizedTensor, out: torch.Tensor | None = None,
                         impl: Impl = "auto") -> torch.Tensor:
    """x_hat = values * scale of their block, in the original shape and dtype (or ``out``)."""
    if out is not None and out.shape != q.shape:
        raise UsageError(f"out has shape {tuple(out.shape)}, the quantized tensor "
                         f"{tuple(q.shape)}")
    module = _kernel(q.values, impl)
    if module is not None and (out is None or out.is_contiguous()):
        target = (torch.empty(q.shape, dtype=q.dtype, device=q.values.device) if out is None
                  else out)
        module.dequantize(q.values, q.scales, q.block_size, target.view(-1))
        return target
    n = q.values.numel()
    pad = (-n) % q.block_size
    values = q.values.float()
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    x = (values.view(-1, q.block_size) * q.scales.unsqueeze(1)).view(-1)[:n]
    x = x.view(q.shape)
    if out is None:
        return x.to(q.dtype)
    return out.copy_(x)


def error_bound(x: torch.Tensor, block_size: int = 256) -> torch.Tensor:
    """Per-element bound on |x - dequantize(quantize(x))| in fp32 (before the output cast):
    half a quantization step plus the float32 rounding of computing it."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    absmax = flat.view(-1, block_size).abs().amax(dim=1, keepdim=True)
    bound = absmax / 254.0 + 4 * 2.0**-24 * absmax + 1e-30
    return bound.expand(-1, block_size).reshape(-1)[:x.numel()].view(x.shape)
