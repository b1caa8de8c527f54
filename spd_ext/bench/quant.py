"""`spd-ext bench quant`: 8-bit block quantize / dequantize against copy bandwidth."""

from __future__ import annotations

import os
import platform
import sys
from functools import partial

import torch

from spd_ext.bench.config import QuantBenchConfig
from spd_ext.bench.timing import check_device, device_timing, dtype_name, measure, parse_dtypes
from spd_ext.ops.quantize import builder, cuda_builder, dequantize_blockwise, quantize_blockwise
from spd_ext.utils.table import format_table, human_bytes, parse_sizes


def run(cfg: QuantBenchConfig) -> list[dict]:
    check_device(cfg.device)
    timing = device_timing(cfg.device, cfg.warmup, cfg.repeats, cfg.target_ms / 1e3)
    kernel = (cuda_builder if cfg.device == "cuda" else builder).load() is not None
    rows = []
    for dtype in parse_dtypes(cfg.dtypes):
        for size in parse_sizes(cfg.sizes):
            n = max(1, size // torch.empty((), dtype=dtype).element_size())
            x = torch.randn(n, device=cfg.device).to(dtype)
            q = quantize_blockwise(x, cfg.block_size, impl="fallback")
            out = torch.empty_like(x)  # like memcpy's destination: no page faults timed
            fns = {
                "memcpy": partial(torch.Tensor.copy_, out, x),
                "quantize (torch)": partial(quantize_blockwise, x, cfg.block_size,
                                            impl="fallback"),
                "dequantize (torch)": partial(dequantize_blockwise, q, out, impl="fallback"),
            }
            if kernel:
                fns["quantize (kernel)"] = partial(quantize_blockwise, x, cfg.block_size,
                                                   impl="kernel")
                fns["dequantize (kernel)"] = partial(dequantize_blockwise, q, out,
                                                     impl="kernel")
            rows.append({"bytes": size, "dtype": dtype_name(dtype), "n": n,
                         **measure(fns, **timing)})
            print(f"[{len(rows)}] {human_bytes(size)} {dtype_name(dtype)}", file=sys.stderr,
                  flush=True)
    return rows


def table(rows: list[dict], block_size: int, markdown: bool = False) -> str:
    impls = [k for k in ("quantize (kernel)", "quantize (torch)", "dequantize (kernel)",
                         "dequantize (torch)") if k in rows[0]]
    body = []
    for r in rows:
        es = 4 if r["dtype"] == "fp32" else 2
        packed = r["n"] + 4 * -(-r["n"] // block_size)  # int8 values + fp32 scales
        moved = r["n"] * es + packed  # read one side, write the other
        copy_bw = 2 * r["n"] * es / r["memcpy"] / 1e9
        body.append([human_bytes(r["bytes"]), r["dtype"], copy_bw,
                     *[moved / r[k] / 1e9 for k in impls],
                     *[100 * moved / r[k] / 1e9 / copy_bw for k in impls if "kernel" in k]])
    headers = ["size", "dtype", "memcpy GB/s", *[f"{k} GB/s" for k in impls],
               *[f"{k} % of memcpy" for k in impls if "kernel" in k]]
    return format_table(headers, body, markdown)


def describe_run(cfg: QuantBenchConfig) -> str:
    return (f"8-bit block quantization (block {cfg.block_size}) on {cfg.device} of "
            f"{platform.node()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads); "
            "GB/s counts the bytes read plus written (input + int8 values + fp32 scales); "
            "memcpy = dst.copy_(src) of the input; dequantize writes into a preallocated out, "
            "quantize allocates its int8 values and scales on every call")


def report(cfg: QuantBenchConfig, rows: list[dict], markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(cfg) + "\n" + table(rows, cfg.block_size, markdown)
