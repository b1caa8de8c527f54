"""The reduction kernel and dtype conversions, compiled for every vector ISA this host runs.

The op builder compiles only the best ISA; these tests build csrc/includes into a small
C library per ISA (no torch headers, a second or two each) so the scalar and AVX2 paths
are tested too, against float64 references and torch's own conversions.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from spd_ext.ops.builder import ISA_FLAGS, csrc_root, isa_supported
from spd_ext.ops.codes import DTYPE_CODES

from conftest import assert_within_bound, c_ptr

HARNESS = Path(__file__).parent / "csrc" / "reduce_harness.cpp"


@pytest.fixture(scope="module", params=list(ISA_FLAGS))
def lib(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    isa = request.param
    if not isa_supported(isa):
        pytest.skip(f"this CPU cannot run {isa}")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = tmp_path_factory.mktemp(isa) / f"harness_{isa}.so"
    subprocess.run([cxx, "-O2", "-std=c++17", "-fopenmp", "-shared", "-fPIC", *ISA_FLAGS[isa],
                    "-I", str(csrc_root() / "includes"), str(HARNESS), "-o", str(so)],
                   check=True, capture_output=True, text=True)
    handle = ctypes.CDLL(str(so))
    handle.spd_test_isa.restype = ctypes.c_char_p
    assert handle.spd_test_isa().decode() == isa
    return handle



def _reduce(lib, xs: list[torch.Tensor], w: list[float], out: torch.Tensor, threads: int,
            stream: bool) -> None:
    ptrs = (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs])
    weights = (ctypes.c_float * len(w))(*w)
    lib.spd_test_weighted_reduce(DTYPE_CODES[out.dtype], c_ptr(out), ptrs, weights, len(xs),
                                 ctypes.c_int64(out.numel()), threads, int(stream))


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("n", [1, 7, 17, 64, 1000, 300_001])
@pytest.mark.parametrize("stream", [False, True])
def test_weighted_reduce_every_isa(lib, dtype: torch.dtype, n: int, stream: bool) -> None:
    g = torch.Generator().manual_seed(n)
    xs = [(torch.randn(n + 1, generator=g) * 4).to(dtype)[1:] for _ in range(3)]  # misaligned
    w = [0.75, -1.5, 0.125]
    out = torch.full((n,), float("nan"), dtype=dtype)
    _reduce(lib, xs, w, out, threads=2, stream=stream)
    assert_within_bound(out, [wj * x.double() for wj, x in zip(w, xs)], f"n={n}")


def _special_floats() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    values = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 65504.0, 65520.0, 70000.0,
              2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-26, 1e-40, -1e-40, 3.4e38,
              1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11]
    wide = torch.randn(5000, generator=g) * torch.exp2(torch.randint(-30, 30, (5000,),
                                                                     generator=g).float())
    return torch.cat([torch.tensor(values), wide])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("entry", ["spd_test_round_trip", "spd_test_scalar_round_trip"])
def test_conversions_match_torch_bitwise(lib, dtype: torch.dtype, entry: str) -> None:
    x = _special_floats()
    bits = torch.empty(x.numel(), dtype=dtype)
    back = torch.empty_like(x)
    getattr(lib, entry)(DTYPE_CODES[dtype], c_ptr(x), c_ptr(back), c_ptr(bits),
                        ctypes.c_int64(x.numel()))
    expected = x.to(dtype)
    mismatch = (bits.view(torch.int16) != expected.view(torch.int16)).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at input {x[int(mismatch[0])].item()!r}"
    assert torch.equal(back, expected.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nan_stays_nan(lib, dtype: torch.dtype) -> None:
    x = torch.tensor([float("nan"), -float("nan"), 1.0] * 7)
    bits = torch.empty(x.numel(), dtype=dtype)
    back = torch.empty_like(x)
    lib.spd_test_round_trip(DTYPE_CODES[dtype], c_ptr(x), c_ptr(back), c_ptr(bits),
                            ctypes.c_int64(x.numel()))
    assert torch.equal(back.isnan(), x.isnan())


def test_last_level_cache_size_is_what_lscpu_reports(lib) -> None:
    lib.spd_test_llc_bytes.restype = ctypes.c_int64
    expected = 32 << 20  # the kernel's default when sysfs says nothing
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        if (index / "level").read_text().strip() == "3":
            size = (index / "size").read_text().strip()
            expected = int(size[:-1]) << {"K": 10, "M": 20}[size[-1]]
            break
    assert lib.spd_test_llc_bytes() == expected


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("n, block", [(1, 256), (37, 16), (1000, 256), (70_001, 64)])
def test_quantization_matches_pytorch_bitwise(lib, dtype: torch.dtype, n: int,
                                              block: int) -> None:
    from spd_ext.ops.quantize import dequantize_blockwise, quantize_blockwise

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n + 1, generator=g) * 3).to(dtype)[1:]  # misaligned
    ref = quantize_blockwise(x, block, impl="fallback")
    q = torch.empty(n, dtype=torch.int8)
    scales = torch.empty(-(-n // block), dtype=torch.float32)
    assert lib.spd_test_quantize(DTYPE_CODES[dtype], c_ptr(x), ctypes.c_int64(n),
                                 ctypes.c_int64(block), c_ptr(q), c_ptr(scales)) == 1
    assert torch.equal(q, ref.values) and torch.equal(scales, ref.scales)
    out = torch.empty(n, dtype=dtype)
    lib.spd_test_dequantize(DTYPE_CODES[dtype], c_ptr(q), c_ptr(scales), ctypes.c_int64(n),
                            ctypes.c_int64(block), c_ptr(out))
    assert torch.equal(out, dequantize_blockwise(ref, impl="fallback"))
    bad = x.clone()
    bad[n // 2] = float("nan")
    assert lib.spd_test_quantize(DTYPE_CODES[dtype], c_ptr(bad), ctypes.c_int64(n),
                                 ctypes.c_int64(block), c_ptr(q), c_ptr(scales)) == 0
