"""weighted_reduce: kernel and fallback against float64, edge cases and bad input."""

from __future__ import annotations

import pytest
import torch

from spd_ext.ops import weighted_reduce
from spd_ext.ops.weighted_reduce import builder

from conftest import FORCED_FALLBACK, assert_within_bound

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 4 * 16 + 1 crosses the unrolled loop; 2**18 + 1 elements of fp32 pass the 1 MiB
# threshold where the kernel splits work across threads; 2**20 + 7 adds an odd tail and
# streaming stores (>= 4 MiB).
SIZES = [1, 3, 65, 1023, 2**18 + 1, 2**20 + 7]
IMPLS = [
    pytest.param("kernel", marks=pytest.mark.skipif(FORCED_FALLBACK, reason="fallback forced")),
    "fallback",
]


def _inputs(n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor],
                                                                       torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, generator=g) * 3).to(dtype) for _ in range(k)]
    w = torch.rand(k, generator=g) * 2 - 0.5  # some negative weights
    return xs, w


def _terms(xs: list[torch.Tensor], w: torch.Tensor) -> list[torch.Tensor]:
    return [float(wj) * x.double() for wj, x in zip(w, xs)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_matches_float64_reference(impl: str, dtype: torch.dtype, n: int, k: int) -> None:
    xs, w = _inputs(n, k, dtype, seed=n * 7 + k)
    out = weighted_reduce(xs, w, impl=impl)
    assert out.dtype == dtype and out.shape == xs[0].shape
    assert_within_bound(out, _terms(xs, w), f"{impl} {dtype} n={n} k={k}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_calls_see_new_data(impl: str, dtype: torch.dtype) -> None:
    n = 4099
    out = torch.full((n,), float("nan"), dtype=dtype)  # poisoned: every element must be written
    for step in range(100):
        xs, w = _inputs(n, 3, dtype, seed=1000 + step)
        weighted_reduce(xs, w.tolist(), out=out, impl=impl)
        assert_within_bound(out, _terms(xs, w), f"{impl} step {step}")


@pytest.mark.parametrize("impl", IMPLS)
def test_out_may_alias_an_input(impl: str) -> None:
    xs, w = _inputs(10_001, 3, torch.float32, seed=3)
    terms = _terms(xs, w)
    out = weighted_reduce(xs, w, out=xs[1], impl=impl)
    assert out.data_ptr() == xs[1].data_ptr()
    assert_within_bound(out, terms, f"{impl} in place")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs_and_shapes(impl: str) -> None:
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(64, 66, generator=g) for _ in range(3)]
    xs = [b[:, 1:65].t() for b in base]  # non-contiguous 64 x 64 views
    w = [0.5, -1.25, 2.0]
    out = weighted_reduce(xs, w, impl=impl)
    assert out.shape == (64, 64) and out.is_contiguous()
    assert_within_bound(out, _terms(xs, torch.tensor(w)), f"{impl} views")


@pytest.mark.parametrize("impl", IMPLS)
def test_misaligned_output_and_inputs(impl: str) -> None:
    # Slices starting one element in: exercises the aligned-head peeling of the
    # streaming stores (outputs >= 4 MiB) and unaligned vector loads.
    n = (4 << 20) // 4 + 33
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(9)
        xs = [torch.randn(n + 1, generator=g).to(dtype)[1:] for _ in range(2)]
        out = torch.empty(n + 1, dtype=dtype)[1:]
        weighted_reduce(xs, [0.25, 0.75], out=out, impl=impl)
        assert_within_bound(out, _terms(xs, torch.tensor([0.25, 0.75])), f"{impl} {dtype}")


@pytest.mark.parametrize("impl", IMPLS)
def test_special_values_propagate(impl: str) -> None:
    x = torch.tensor([1.0, float("inf"), float("nan"), -2.0, 3e38], dtype=torch.float32)
    y = torch.tensor([1.0, 1.0, 0.0, float("-inf"), 3e38], dtype=torch.float32)
    out = weighted_reduce([x, y], [1.0, 1.0], impl=impl)
    assert out[0] == 2.0 and out[1] == float("inf") and out[2].isnan()
    assert out[3] == float("-inf") and out[4] == float("inf")  # fp32 overflow


def test_kernel_and_fallback_agree_bitwise_for_single_input() -> None:
    # w * x is exact in fp32 before the final rounding, so both must round identically.
    if FORCED_FALLBACK:
        pytest.skip("fallback forced")
    for dtype in DTYPES:
        xs, _ = _inputs(5000, 1, dtype, seed=11)
        a = weighted_reduce(xs, [0.5], impl="kernel")
        b = weighted_reduce(xs, [0.5], impl="fallback")
        assert torch.equal(a, b), dtype


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: weighted_reduce([], []), ValueError, "at least one"),
        (lambda: weighted_reduce([torch.ones(3), torch.ones(4)], [1, 1]), ValueError, "input 1"),
        (lambda: weighted_reduce([torch.ones(3), torch.ones(3).half()], [1, 1]), ValueError,
         "input 1"),
        (lambda: weighted_reduce([torch.ones(3, dtype=torch.int32)], [1]), TypeError,
         "float32"),
        (lambda: weighted_reduce([torch.ones(3)], [1, 2]), ValueError, "one weight per input"),
        (lambda: weighted_reduce([torch.ones(3)], [float("nan")]), ValueError, "finite"),
        (lambda: weighted_reduce([torch.ones(3)], torch.tensor([float("inf")])), ValueError,
         "finite"),
        (lambda: weighted_reduce([torch.ones(4)], [1], out=torch.ones(8)[::2]), ValueError,
         "contiguous"),
        (lambda: weighted_reduce([torch.ones(4)], [1], out=torch.ones(4).half()), ValueError,
         "out is"),
        (lambda: weighted_reduce([torch.ones(4)], [1], impl="fast"), ValueError, "impl"),
    ],
)
def test_bad_input_is_refused(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_partial_overlap_with_out_is_refused() -> None:
    buf = torch.ones(10)
    with pytest.raises(ValueError, match="partially overlaps"):
        weighted_reduce([buf[:8], torch.ones(8)], [1, 1], out=buf[2:])


def test_nan_weights_leave_out_untouched() -> None:
    out = torch.full((5,), 7.0)
    with pytest.raises(ValueError):
        weighted_reduce([torch.ones(5)], [float("nan")], out=out)
    assert torch.equal(out, torch.full((5,), 7.0))


def test_kernel_impl_reports_why_it_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "load", lambda: None)
    with pytest.raises(RuntimeError, match="unavailable"):
        weighted_reduce([torch.ones(3)], [1.0], impl="kernel")


@pytest.mark.parametrize("impl", IMPLS)
def test_writing_out_bumps_its_version(impl: str) -> None:
    # autograd checks saved tensors' versions; an in-place write it cannot see would
    # silently corrupt gradients.
    out = torch.zeros(100)
    before = out._version
    weighted_reduce([torch.ones(100)], [2.0], out=out, impl=impl)
    assert out._version > before


def test_fallback_with_weights_in_a_tensor_matches_float_weights() -> None:
    # The path CUDA tensors take (weights stay on the device, no host sync).
    from spd_ext.ops.weighted_reduce import weighted_reduce_torch

    xs, w = _inputs(3001, 4, torch.bfloat16, seed=21)
    a = weighted_reduce_torch(xs, w, torch.empty_like(xs[0]))
    b = weighted_reduce_torch(xs, w.tolist(), torch.empty_like(xs[0]))
    assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU-only torch")
def test_cuda_ops_explain_why_they_are_unavailable() -> None:
    from spd_ext.ops import ALL_BUILDERS
    from spd_ext.ops.builder import CUDAOpBuilder

    cuda_builders = [b for b in ALL_BUILDERS if isinstance(b, CUDAOpBuilder)]
    assert {b.NAME for b in cuda_builders} == {"weighted_reduce_cuda", "quantize_cuda",
                                               "ipc_allreduce"}
    for b in cuda_builders:
        ok, why = b.is_compatible()
        assert not ok and ("without CUDA" in why or "no CUDA" in why)
        status = b.status()
        assert status.implementation == "fallback"
        assert status.target == "cuda" and "--expt-relaxed-constexpr" in status.flags


def test_op_and_dtype_codes_are_read_from_the_header() -> None:
    """spd_codes.h is the codes' one definition: a code renumbered there is renumbered for
    Python too, and a missing enum is an error rather than a silent default."""
    from spd_ext.ops import codes

    assert set(codes.OP_CODES) == {"sum", "mean", "weighted"}
    assert codes.KERNEL_DTYPES == tuple(sorted(codes.DTYPE_CODES, key=codes.DTYPE_CODES.get))
    text = "enum class ReduceOp : int32_t { kSum = 3, kMean = 0, kWeighted = 7 };"
    assert codes.read_enum("ReduceOp", text) == {"kSum": 3, "kMean": 0, "kWeighted": 7}
    with pytest.raises(RuntimeError, match="no enum class DType"):
        codes.read_enum("DType", text)
