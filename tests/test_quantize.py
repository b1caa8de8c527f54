"""8-bit block quantization: kernel and fallback, error bound, bitwise agreement, bad input."""

from __future__ import annotations

import pytest
import torch

from spd_ext.ops.quantize import dequantize_blockwise, error_bound, quantize_blockwise

from conftest import FORCED_FALLBACK

IMPLS = [
    pytest.param("kernel", marks=pytest.mark.skipif(FORCED_FALLBACK, reason="fallback forced")),
    "fallback",
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 65537])
def test_round_trip_within_bound(impl: str, dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))).to(dtype)
    q = quantize_blockwise(x, block_size=256, impl=impl)
    assert q.values.dtype == torch.int8 and q.scales.numel() == -(-n // 256)
    assert q.nbytes < x.numel() * x.element_size() or n < 8
    back = dequantize_blockwise(q, impl=impl)
    assert back.dtype == dtype and back.shape == x.shape
    # The bound holds in fp32; casting back to a 16-bit dtype adds one rounding.
    exact = dequantize_blockwise(q, out=torch.empty(x.shape), impl=impl)
    assert ((exact - x.float()).abs() <= error_bound(x)).all()
    if dtype != torch.float32:
        rel = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
        assert ((back.float() - x.float()).abs() <= error_bound(x) + rel * exact.abs()).all()


@pytest.mark.skipif(FORCED_FALLBACK, reason="fallback forced")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_and_fallback_agree_bitwise(dtype: torch.dtype) -> None:
    x = torch.randn(3, 5000).to(dtype)
    a = quantize_blockwise(x, 100, impl="kernel")
    b = quantize_blockwise(x, 100, impl="fallback")
    assert torch.equal(a.values, b.values) and torch.equal(a.scales, b.scales)
    assert torch.equal(dequantize_blockwise(a, impl="kernel"),
                       dequantize_blockwise(b, impl="fallback"))
    assert dequantize_blockwise(a).shape == (3, 5000)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(impl: str) -> None:
    with pytest.raises(TypeError, match="float32"):
        quantize_blockwise(torch.ones(3, dtype=torch.int32), impl=impl)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_blockwise(torch.tensor([1.0, float("inf")]), impl=impl)
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(torch.ones(3), block_size=0, impl=impl)
    q = quantize_blockwise(torch.ones(6), impl=impl)
    with pytest.raises(ValueError, match="out has shape"):
        dequantize_blockwise(q, out=torch.empty(5), impl=impl)
    with pytest.raises(ValueError, match="impl must be"):
        quantize_blockwise(torch.ones(3), impl="fast")
