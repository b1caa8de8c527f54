"""The CUDA kernels of csrc/cuda, run on the CPU through tests/csrc/cuda_emu.

The emulation compiles the .cu files unchanged with g++ (a few seconds) and runs each
launch's blocks one after another, the threads of a block as cooperative fibers and the
ranks of the IPC all-reduce as forked processes sharing an arena of "device memory". It
checks the kernels' logic: index arithmetic, vector packs and scalar tails, block and warp
reductions, bitwise agreement with the CPU and PyTorch implementations, the all-reduce's
flag protocol over many back-to-back calls. It cannot check the GPU's memory ordering or
speed: tests/test_cuda.py does, on a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from spd_ext.ops import dequantize_blockwise, quantize_blockwise
from spd_ext.ops.builder import csrc_root
from spd_ext.ops.codes import DTYPE_CODES, OP_CODES

from conftest import assert_within_bound, c_ptr, needs_kernels

HERE = Path(__file__).parent / "csrc"
CUDA_SUCCESS, CUDA_INVALID_VALUE = 0, 1
PLACEMENTS = {"staged": 0, "registered": 1, "registered-on-rank-0": 2}

pytestmark = needs_kernels  # no spd_ext dispatch here: the fallback run adds nothing


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the CUDA emulation")
    so = tmp_path_factory.mktemp("cuda_emu") / "cuda_emu.so"
    sources = sorted(str(p) for p in (csrc_root() / "cuda").glob("*.cu"))
    built = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas",
         "-I", str(HERE / "cuda_emu"), "-I", str(csrc_root() / "includes"),
         "-x", "c++", *sources, str(HERE / "cuda_emu_harness.cpp"), "-o", str(so)],
        capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    lib.spd_emu_all_reduce_check.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
        ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_int64,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_double),
        ctypes.c_char_p, ctypes.c_int]
    return lib



def _weighted_reduce(emu: ctypes.CDLL, xs: list[torch.Tensor], w: torch.Tensor,
                     out: torch.Tensor) -> int:
    ptrs = (ctypes.c_void_p * max(len(xs), 1))(*[x.data_ptr() for x in xs])
    return emu.spd_emu_weighted_reduce(DTYPE_CODES[out.dtype], c_ptr(out), ptrs, c_ptr(w), len(xs),
                                       ctypes.c_int64(out.numel()))


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4097, 20_003])
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned inputs, the scalar path
@pytest.mark.parametrize("k", [1, 5])
def test_weighted_reduce_kernel(emu, dtype: torch.dtype, n: int, offset: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 10 + offset + k)
    xs = [(torch.randn(n + offset, generator=g) * 3).to(dtype)[offset:] for _ in range(k)]
    w = torch.randn(k, generator=g)
    out = torch.full((n + offset,), float("nan"), dtype=dtype)[offset:]  # poisoned
    assert _weighted_reduce(emu, xs, w, out) == CUDA_SUCCESS
    assert_within_bound(out, [float(wj) * x.double() for wj, x in zip(w, xs)],
                        f"emulated cuda weighted_reduce {dtype} n={n} offset={offset} k={k}")


def test_weighted_reduce_kernel_rejects_bad_input_counts(emu) -> None:
    out = torch.zeros(4)
    assert _weighted_reduce(emu, [], torch.ones(1), out) == CUDA_INVALID_VALUE
    xs = [torch.ones(4)] * 33
    assert _weighted_reduce(emu, xs, torch.ones(33), out) == CUDA_INVALID_VALUE


def _quantize(emu: ctypes.CDLL, x: torch.Tensor, block: int):
    blocks = -(-x.numel() // block)
    values = torch.full((x.numel(),), 99, dtype=torch.int8)
    scales = torch.full((blocks,), float("nan"))
    flags = torch.zeros(1, dtype=torch.int32)
    code = emu.spd_emu_quantize(DTYPE_CODES[x.dtype], c_ptr(x), ctypes.c_int64(x.numel()),
                                ctypes.c_int64(block), c_ptr(values), c_ptr(scales), c_ptr(flags))
    return code, values, scales, int(flags)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("n, block", [(1, 256), (1000, 256), (7001, 64), (4096, 1024),
                                      (300, 7)])
def test_quantization_kernel_matches_pytorch_bitwise(emu, dtype: torch.dtype, n: int,
                                                      block: int) -> None:
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    ref = quantize_blockwise(x, block, impl="fallback")
    code, values, scales, flags = _quantize(emu, x, block)
    assert code == CUDA_SUCCESS and flags == 0
    assert torch.equal(values, ref.values) and torch.equal(scales, ref.scales)
    out = torch.full((n,), float("nan"), dtype=dtype)
    assert emu.spd_emu_dequantize(DTYPE_CODES[dtype], c_ptr(values), c_ptr(scales),
                                  ctypes.c_int64(n), ctypes.c_int64(block),
                                  c_ptr(out)) == CUDA_SUCCESS
    assert torch.equal(out, dequantize_blockwise(ref, impl="fallback"))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_quantization_kernel_flags_non_finite_blocks(emu, bad: float) -> None:
    x = torch.randn(1000)
    x[517] = bad
    code, _, _, flags = _quantize(emu, x, 256)
    assert code == CUDA_SUCCESS and flags == 1


# The emulated ranks' watchdog (tests/csrc/cuda_emu_harness.cpp): a run fails when no rank
# completes a call for STALL_S seconds (a hang), not when it is slow. 4 ranks on 2 cores
# that other jobs also load take minutes for 1000 calls, though each call takes well under
# a second; LIMIT_S only bounds a run that never ends (far below CI's 90 minutes).
STALL_S, LIMIT_S = 60.0, 900.0


def _run_all_reduce(emu: ctypes.CDLL, world: int, dtype: torch.dtype, op: str, two_shot: bool,
                    numel: int, calls: int, placement: str = "staged",
                    capacity: int = 1 << 20, stall_s: float = STALL_S,
                    limit_s: float = LIMIT_S, pace_s: float = 0.0,
                    stop: tuple[int, int, int] = (-1, 0, 0)) -> tuple[int, str, float]:
    """(code, message, worst error / bound) of the emulated all-reduce check. ``pace_s``
    delays every call; ``stop`` = (rank, call, exit code): that rank stops before that
    call, for good (exit code 0) or exiting with that code."""
    worst = ctypes.c_double(0.0)
    message = ctypes.create_string_buffer(4096)
    code = emu.spd_emu_all_reduce_check(world, DTYPE_CODES[dtype], OP_CODES[op], int(two_shot),
                                        PLACEMENTS[placement], numel, calls, capacity, stall_s,
                                        limit_s, int(pace_s * 1e6), *stop, ctypes.byref(worst),
                                        message, len(message))
    return code, message.value.decode(), worst.value


def _all_reduce(emu: ctypes.CDLL, world: int, dtype: torch.dtype, op: str, two_shot: bool,
                numel: int, calls: int, placement: str = "staged",
                capacity: int = 1 << 20) -> float:
    code, message, worst = _run_all_reduce(emu, world, dtype, op, two_shot, numel, calls,
                                           placement, capacity)
    assert code == 0, message
    return worst


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("two_shot", [False, True], ids=["one-shot", "two-shot"])
def test_ipc_all_reduce_every_world_size(emu, world: int, two_shot: bool) -> None:
    # 4100 float32 = 1025 packs: two-shot slices of uneven length for every world size here.
    assert _all_reduce(emu, world, torch.float32, "weighted", two_shot, 4100, 20) <= 1.0


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("op", list(OP_CODES))
@pytest.mark.parametrize("two_shot", [False, True], ids=["one-shot", "two-shot"])
def test_ipc_all_reduce_every_dtype_and_op(emu, dtype: torch.dtype, op: str,
                                           two_shot: bool) -> None:
    assert _all_reduce(emu, 2, dtype, op, two_shot, 16 // dtype.itemsize * 301, 10) <= 1.0


@pytest.mark.parametrize("two_shot", [False, True], ids=["one-shot", "two-shot"])
def test_ipc_all_reduce_400_back_to_back_calls(emu, two_shot: bool) -> None:
    # Fresh data and weights every call: a flag race shows up as a peer's old or next data.
    assert _all_reduce(emu, 4, torch.bfloat16, "weighted", two_shot, 8 * 64, 400) <= 1.0


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("two_shot", [False, True], ids=["one-shot", "two-shot"])
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_ipc_all_reduce_in_registered_buffers(emu, world: int, two_shot: bool,
                                              dtype: torch.dtype) -> None:
    # No staging copy: peers read each other's registered buffers, the result lands in place.
    numel = 16 // dtype.itemsize * 1025
    assert _all_reduce(emu, world, dtype, "weighted", two_shot, numel, 30, "registered") <= 1.0


@pytest.mark.parametrize("two_shot", [False, True], ids=["one-shot", "two-shot"])
def test_ipc_all_reduce_registered_400_back_to_back_calls(emu, two_shot: bool) -> None:
    assert _all_reduce(emu, 4, torch.float32, "weighted", two_shot, 4 * 64, 400,
                       "registered") <= 1.0


@pytest.mark.parametrize("two_shot", [False, True], ids=["one-shot", "two-shot"])
def test_ipc_all_reduce_ranks_disagreeing_on_the_buffer_get_nan(emu, two_shot: bool) -> None:
    # Rank 0 passes its registered buffer, the others unregistered memory: no rank may
    # return a plausible wrong sum, so every rank's result is NaN.
    _all_reduce(emu, 3, torch.float32, "sum", two_shot, 4 * 100, 5, "registered-on-rank-0")


def test_ipc_all_reduce_watchdog_lets_a_slow_run_finish(emu) -> None:
    # Each call comes within the 2 s window, the run (10 x 0.4 s) lasts twice as long: a
    # slow machine, not a hang (a deadline on the whole run failed exactly this).
    start = time.monotonic()
    code, message, _ = _run_all_reduce(emu, 2, torch.float32, "sum", False, 64, 10,
                                       stall_s=2.0, pace_s=0.4)
    assert code == 0, message
    assert time.monotonic() - start >= 10 * 0.4


def test_ipc_all_reduce_watchdog_fails_a_stopped_run_within_the_window(emu) -> None:
    start = time.monotonic()
    code, message, _ = _run_all_reduce(emu, 3, torch.float32, "sum", True, 64, 1000,
                                       stall_s=2.0, stop=(1, 4, 0))
    took = time.monotonic() - start
    assert code != 0
    assert message.startswith("no rank completed a call for 2 s (a hang); calls completed "
                              "by rank: 0: 4, 1: 4, 2: 4"), message
    assert 2.0 < took < 2.0 + 30, took  # the window, plus set-up on a loaded machine


def test_ipc_all_reduce_watchdog_limits_the_whole_run(emu) -> None:
    code, message, _ = _run_all_reduce(emu, 2, torch.float32, "sum", False, 64, 1000,
                                       limit_s=1.0, pace_s=0.2)
    assert code != 0 and message.startswith("still running after 1 s in all"), message


def test_ipc_all_reduce_watchdog_stops_the_peers_of_a_failed_rank_at_once(emu) -> None:
    # Rank 1 exits as on a wrong value; its peers would spin for it: they are stopped at
    # once, well within the stall window.
    start = time.monotonic()
    code, message, _ = _run_all_reduce(emu, 3, torch.float32, "sum", False, 64, 1000,
                                       stop=(1, 4, 1))
    assert code != 0
    assert message == ("rank 1 exited 1 (a value outside the bound); the ranks still running "
                       "were stopped"), message
    assert time.monotonic() - start < STALL_S / 2
