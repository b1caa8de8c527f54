"""`spd-ext bench reduce`: weighted_reduce vs the best torch expressions and memcpy."""

from __future__ import annotations

import os
import platform
import sys
from functools import partial

import torch

from spd_ext.bench.config import ReduceConfig
from spd_ext.bench.timing import check_device, device_timing, dtype_name, measure, parse_dtypes
from spd_ext.ops import weighted_reduce
from spd_ext.ops.weighted_reduce import builder, cuda_builder
from spd_ext.utils.table import format_table, human_bytes, parse_sizes


def _candidates(xs: list[torch.Tensor], w: list[float]) -> dict:
    """weighted_reduce and the two torch expressions users would write instead."""
    out = torch.empty_like(xs[0])
    w_col = torch.tensor(w, dtype=xs[0].dtype, device=xs[0].device).view(len(xs), 1)
    if xs[0].is_cuda:
        w = torch.tensor(w, device=xs[0].device)  # device weights: no host sync per call

    def chain() -> None:
        torch.mul(xs[0], w[0], out=out)
        for x, wj in zip(xs[1:], w[1:]):
            if isinstance(wj, torch.Tensor):
                out.add_(x * wj)
            else:
                out.add_(x, alpha=wj)

    return {
        "spd_ext": lambda: weighted_reduce(xs, w, out),
        "stack": lambda: torch.stack(xs).mul_(w_col).sum(0),
        "chain": chain,
    }


def run(cfg: ReduceConfig) -> list[dict]:
    counts = cfg.input_counts()
    sizes = parse_sizes(cfg.sizes)
    dtypes = parse_dtypes(cfg.dtypes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_device(cfg.device)
    chosen = cuda_builder if cfg.device == "cuda" else builder
    if chosen.load() is None:
        raise RuntimeError(f"the weighted_reduce kernel is unavailable on {cfg.device} "
                           f"({chosen.status().reason}); nothing to benchmark")
    rows = []
    total = len(counts) * len(sizes) * len(dtypes)
    timing = device_timing(cfg.device, cfg.warmup, cfg.repeats, cfg.target_ms / 1e3)
    for dtype in dtypes:
        for size in sizes:
            numel = max(1, size // torch.empty((), dtype=dtype).element_size())
            src = torch.empty(numel, dtype=dtype, device=cfg.device).uniform_(-1, 1)
            copy = partial(torch.Tensor.copy_, torch.empty_like(src), src)
            copy_s = measure({"memcpy": copy}, **timing)["memcpy"]
            for n in counts:
                xs = [torch.empty(numel, dtype=dtype, device=cfg.device).uniform_(-1, 1)
                      for _ in range(n)]
                row = {"inputs": n, "bytes": size, "dtype": dtype_name(dtype),
                       "memcpy": copy_s}
                row.update(measure(_candidates(xs, torch.rand(n).tolist()), **timing))
                rows.append(row)
                print(f"[{len(rows)}/{total}] {n} x {human_bytes(size)} {row['dtype']}: spd_ext "
                      f"{row['spd_ext'] * 1e6:.1f} us, stack {row['stack'] * 1e6:.1f} us, chain "
                      f"{row['chain'] * 1e6:.1f} us", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    headers = ["inputs", "size", "dtype", "spd_ext us", "stack us", "chain us",
               "spd_ext x best torch", "spd_ext GB/s", "memcpy GB/s", "spd_ext % of memcpy"]
    out = []
    for r in rows:
        moved = (r["inputs"] + 1) * r["bytes"]
        spd_bw = moved / r["spd_ext"] / 1e9
        copy_bw = 2 * r["bytes"] / r["memcpy"] / 1e9
        out.append([r["inputs"], human_bytes(r["bytes"]), r["dtype"], r["spd_ext"] * 1e6,
                    r["stack"] * 1e6, r["chain"] * 1e6, min(r["stack"], r["chain"]) / r["spd_ext"],
                    spd_bw, copy_bw, 100 * spd_bw / copy_bw])
    return format_table(headers, out, markdown)


def describe_run(cfg: ReduceConfig) -> str:
    if cfg.device == "cuda":
        where = f"weighted_reduce on {torch.cuda.get_device_name()} ({platform.node()})\n"
    else:
        module = builder.load()
        where = (f"weighted_reduce on {platform.node()} ({os.cpu_count()} cores, "
                 f"{torch.get_num_threads()} torch threads), kernel ISA {module.isa()}, "
                 f"OpenMP {module.openmp()}\n")
    return (where +
            "stack = torch.stack(xs).mul_(w).sum(0); chain = torch.mul(x0, w0, out=out) then "
            "out.add_(x, alpha=w); GB/s counts (inputs + 1) x size bytes; memcpy = "
            "dst.copy_(src), 2 x size bytes")


def report(cfg: ReduceConfig, rows: list[dict], markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(cfg) + "\n" + table(rows, markdown)
