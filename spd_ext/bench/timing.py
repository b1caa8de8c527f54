"""Timing loops: warm-up, calibrated iteration counts, many repeats, median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from spd_ext.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtypes(spec: str) -> list[torch.dtype]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise UsageError(f"unknown dtype(s) {bad or spec!r}; use a comma list of "
                         f"{', '.join(DTYPES)}")
    return [DTYPES[n] for n in names]


def check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch sees no CUDA device")


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def device_timing(device: str, warmup: int, repeats: int, target_s: float) -> dict:
    """``measure`` keywords for a benchmark on ``device``: on CUDA, queued work is finished
    before every loop starts and before its clock stops."""
    timing: dict = dict(warmup=warmup, repeats=repeats, target_s=target_s)
    if device == "cuda":
        timing.update(barrier=torch.cuda.synchronize, finish=torch.cuda.synchronize)
    return timing


def measure(fns: dict[str, Callable[[], object]], *, warmup: int = 5, repeats: int = 7,
            target_s: float = 0.02, barrier: Callable[[], object] = lambda: None,
            agree: Callable[[int], int] = lambda n: n,
            finish: Callable[[], object] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each candidate over ``repeats`` timed loops.

    Candidates are interleaved (one loop of each per repeat), so a slow phase of the
    machine hits all of them alike and their ratios stay meaningful. Each loop runs
    enough calls to last about ``target_s``. For collectives, ``barrier`` aligns the
    ranks before every loop and ``agree`` makes them use the same count. ``finish`` waits
    for queued device work (``torch.cuda.synchronize``) before the clock stops: CUDA calls
    return when launched, not when done.
    """
    iters = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        barrier()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        finish()
        one = (time.perf_counter() - start) / 3
        iters[name] = agree(max(1, min(100_000, int(target_s / max(one, 1e-9)))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            barrier()
            start = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            finish()
            samples[name].append((time.perf_counter() - start) / iters[name])
    return {name: statistics.median(s) for name, s in samples.items()}
