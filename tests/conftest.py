"""Shared test set-up: markers, environment, and the float64 error bound."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
_shared_data = Path(__file__).resolve().parents[2] / "shared" / "data"
if _shared_data.is_dir():
    os.environ.setdefault("SPD_EXT_DATA_DIR", str(_shared_data))

FORCED_FALLBACK = os.environ.get("SPD_EXT_FORCE_FALLBACK", "0") not in ("", "0")

needs_kernels = pytest.mark.skipif(
    FORCED_FALLBACK, reason="tests the C++ kernels; SPD_EXT_FORCE_FALLBACK=1 disables them")

# The forced-fallback pass (the second run of `make pytest`) is for the PyTorch fallbacks
# that replace the kernels: the op, comm, tp, dp, DeepSpeed and staleness tests run again
# without kernels. The whole-command tests below (and the examples) run the same
# spd_ext.comm calls end to end through launchers (over half of a pass's time, which would
# keep CI over its budget), so they run in the kernel pass only, unless
# SPD_EXT_TEST_COMMANDS_IN_FALLBACK=1.
COMMAND_TESTS = ("test_train_cli.py", "test_experiments.py", "test_serve.py",
                 "test_examples.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not FORCED_FALLBACK or os.environ.get("SPD_EXT_TEST_COMMANDS_IN_FALLBACK") == "1":
        return
    skip = pytest.mark.skip(reason="a whole-command test: the kernel pass runs it (set "
                            "SPD_EXT_TEST_COMMANDS_IN_FALLBACK=1 to run it here)")
    for item in items:
        if item.path.name in COMMAND_TESTS:
            item.add_marker(skip)

# dtype codes of csrc/includes/spd_dtype.h, for the tests that call C entry points (ctypes).


def c_ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


# Unit roundoff of the storage dtype (the one final rounding of an fp32 result).
_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Half the smallest subnormal: the absolute error floor of that final rounding.
_TINY = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}


def error_bound(ref: torch.Tensor, abs_terms: torch.Tensor, dtype: torch.dtype,
                k: int) -> torch.Tensor:
    """Largest error of sum_j w_j x_j computed with k fp32 FMAs, then stored in dtype.

    ``ref`` is the float64 result, ``abs_terms`` the float64 sum of |w_j x_j|.
    """
    accumulate = k * 2.0**-24 * abs_terms * (1 + _ROUNDOFF[dtype])
    return _ROUNDOFF[dtype] * ref.abs() + accumulate + _TINY[dtype]


def assert_within_bound(out: torch.Tensor, terms: list[torch.Tensor], label: str) -> None:
    """``out`` (any dtype) against float64 sum of ``terms`` (float64 tensors w_j x_j)."""
    ref = torch.stack(terms).sum(0)
    abs_terms = torch.stack(terms).abs().sum(0)
    bound = error_bound(ref, abs_terms, out.dtype, len(terms))
    err = (out.double() - ref).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{label}: element {worst} is {out.reshape(-1)[worst].item()!r}, reference "
        f"{ref.reshape(-1)[worst].item()!r}, error {err.reshape(-1)[worst].item():.3g} > bound "
        f"{bound.reshape(-1)[worst].item():.3g}")
