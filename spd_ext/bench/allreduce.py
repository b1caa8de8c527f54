"""`spd-ext bench allreduce`: gloo vs DeepSpeed's shm op vs spd_ext, on N local ranks.

On CPU the ranks use the shared-memory kernel. With ``--device cuda`` they share GPU 0
through CUDA IPC; there ``spd_ext-registered`` reduces a registered buffer (no staging copy)
and ``spd_ext-graph`` replays a CUDA graph of ``GRAPH_CALLS`` such calls, which leaves out
the Python and launch overhead: close to the kernel's own time.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch
import torch.distributed as dist

from spd_ext.bench.config import ALLREDUCE_CUDA_ONLY, AllReduceConfig
from spd_ext.bench.deepspeed_comm import init_deepspeed_comm
from spd_ext.bench.timing import check_device, device_timing, dtype_name, measure, parse_dtypes
from spd_ext.comm import all_reduce
from spd_ext.comm.shm import shm_group
from spd_ext.errors import UsageError
from spd_ext.launch import spawn
from spd_ext.utils.table import format_table, human_bytes, parse_sizes

GRAPH_CALLS = 20


def _deepspeed_all_reduce():
    """DeepSpeed's `inference_all_reduce` (its shm kernel) or the reason it can't run."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed.comm as ds_comm
    except ImportError:
        return None, "deepspeed not installed"
    init_deepspeed_comm()  # first: the returns and failures below leave no segment behind
    backend = ds_comm.comm.cdb
    level = getattr(backend, "shm_vector_kernel_level", 0)
    has_op = hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed,
                                                         "inference_all_reduce_")
    if not has_op or level < 1:
        return None, "deepspeed shm op unavailable"

    def run(x: torch.Tensor) -> None:
        ds_comm.inference_all_reduce(x)

    return run, ""


def _candidates(x: torch.Tensor, weights: torch.Tensor, ds_run,
                registered: torch.Tensor | None) -> dict:
    """The timed calls on one tensor, by implementation name (None: not runnable)."""
    fns = {
        "gloo": lambda: dist.all_reduce(x),
        "deepspeed": (lambda: ds_run(x)) if ds_run else None,
        "spd_ext": lambda: all_reduce(x),
        "spd_ext-weighted": lambda: all_reduce(x, "weighted", weights=weights),
        "spd_ext-registered": None,
        "spd_ext-graph": None,
    }
    if registered is not None:
        view = registered[:x.numel() * x.element_size()].view(x.dtype)
        view.copy_(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                all_reduce(view)
        fns.update({"spd_ext-registered": lambda: all_reduce(view), "spd_ext-graph": graph.replay})
    return fns


def _after_a_gap(fn, gap_s: float):
    """``fn`` preceded by ``gap_s`` of busy compute (spinning on the clock, so the core
    stays busy as in a forward): calls spaced as a model's all-reduces are, which on some
    machines costs more per call than back-to-back calls do."""
    def call() -> None:
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:
            pass
        fn()
    return call


def _rank_bench(rank: int, world: int, cfg: AllReduceConfig) -> dict:
    impls = cfg.impl_list()
    notes: dict[str, str] = {}
    ds_run = None
    if cfg.device == "cuda":
        torch.cuda.set_device(0)
        impls = [i for i in impls if i != "deepspeed"]  # its shm op is CPU-only
        notes["deepspeed"] = "CPU-only op, not timed on cuda"
    else:
        impls = [i for i in impls if i not in ALLREDUCE_CUDA_ONLY]
    if "deepspeed" in impls:
        ds_run, why = _deepspeed_all_reduce()
        if ds_run is None:
            notes["deepspeed"] = why
    probe = torch.zeros(16, device=cfg.device)
    all_reduce(probe)  # sets up the shm / IPC group before timing
    shm = shm_group() if cfg.device == "cpu" else None
    weights = torch.softmax(torch.arange(world, dtype=torch.float32), 0)
    registered = None
    if any(i in ALLREDUCE_CUDA_ONLY for i in impls):
        from spd_ext.comm import cuda_ipc

        ipc = cuda_ipc.ipc_group()
        if ipc is None:
            notes["spd_ext-registered"] = f"no CUDA IPC path: {cuda_ipc.describe()}"
        else:  # raw bytes, viewed as each dtype; sizes past the IPC capacity go to NCCL
            registered = cuda_ipc.ipc_buffer(ipc.capacity, torch.uint8)
            notes["spd_ext-graph"] = (f"time per all_reduce in a CUDA graph of {GRAPH_CALLS}; "
                                  f"registered and graph: sizes up to {ipc.capacity} B")

    def barrier() -> None:
        if cfg.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    def agree(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    timing = device_timing(cfg.device, cfg.warmup, cfg.repeats, cfg.target_ms / 1e3)
    rows = []
    sizes = parse_sizes(cfg.sizes)
    dtypes = parse_dtypes(cfg.dtypes)
    total = len(sizes) * len(dtypes)
    for i, dtype in enumerate(dtypes):
        for j, size in enumerate(sizes):
            numel = max(1, size // torch.empty((), dtype=dtype).element_size())
            x = torch.empty(numel, dtype=dtype, device=cfg.device).uniform_(-1, 1)
            row = {"bytes": size, "dtype": dtype_name(dtype)}
            fits = registered is not None and x.numel() * x.element_size() <= registered.numel()
            runnable = {k: fn for k, fn in _candidates(x, weights.to(cfg.device), ds_run,
                                                       registered if fits else None).items()
                        if k in impls and fn is not None}
            gap_s = cfg.gap_us / 1e6
            if gap_s:
                runnable = {k: _after_a_gap(fn, gap_s) for k, fn in runnable.items()}
            times = measure(runnable, **{**timing, "barrier": barrier}, agree=agree)
            times = {k: t - gap_s for k, t in times.items()}
            if "spd_ext-graph" in times:
                times["spd_ext-graph"] /= GRAPH_CALLS
            for name in impls:
                if name not in times:
                    row[name] = float("nan")
                    continue
                slowest = torch.tensor([times[name]], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                row[name] = slowest.item()
            rows.append(row)
            if rank == 0:
                print(f"[{i * len(sizes) + j + 1}/{total}] {row['dtype']} "
                      f"{human_bytes(size)}: " + ", ".join(
                          f"{k} {row[k] * 1e6:.1f} us" for k in impls if row[k] == row[k]),
                      file=sys.stderr, flush=True)
    path = ("shared memory" if shm else describe_path(probe))
    info = {"path": path, "notes": notes}
    if shm:
        info.update(chunk=shm.chunk_bytes, oneshot=shm.oneshot_max_bytes)
    return {"rows": rows, "info": info}


def describe_path(probe: torch.Tensor) -> str:
    from spd_ext.comm import cuda_ipc

    return cuda_ipc.describe() if probe.is_cuda else "torch.distributed"


def run(cfg: AllReduceConfig) -> dict:
    """Run the benchmark on ``cfg.nproc`` ranks; returns rows (seconds per call)."""
    impls = cfg.impl_list()
    if cfg.gap_us and cfg.device == "cuda":
        raise UsageError("--gap-us times CPU calls (a CUDA call returns before it is done, "
                         "so the gap would hide it); leave it out with --device cuda")
    check_device(cfg.device)
    if cfg.device != "cuda" and any(i in ALLREDUCE_CUDA_ONLY for i in impls):
        raise UsageError(f"{', '.join(ALLREDUCE_CUDA_ONLY)} time CUDA IPC paths; use them with "
                         "--device cuda")
    parse_sizes(cfg.sizes)
    parse_dtypes(cfg.dtypes)
    if cfg.nproc < 2:
        raise UsageError(f"--nproc must be at least 2 for an all-reduce, got {cfg.nproc}")
    return spawn(_rank_bench, cfg.nproc, cfg, timeout=cfg.timeout,
                 threads_per_rank=cfg.threads_per_rank, bind_cores=cfg.bind_cores,
                 env={"DS_ACCELERATOR": "cpu"})[0]


def table(result: dict, cfg: AllReduceConfig, markdown: bool = False) -> str:
    impls = cfg.impl_list()
    headers = ["size", "dtype", *[f"{i} us" for i in impls]]
    if "spd_ext" in impls:
        headers += ["spd_ext busbw GB/s"]
        if "gloo" in impls:
            headers += ["spd_ext x gloo"]
        if "deepspeed" in impls:
            headers += ["spd_ext x ds"]
        if "spd_ext-weighted" in impls:
            headers += ["weighted/sum"]
    busbw_factor = 2 * (cfg.nproc - 1) / cfg.nproc
    rows = []
    for r in result["rows"]:
        row = [human_bytes(r["bytes"]), r["dtype"], *[r[i] * 1e6 for i in impls]]
        if "spd_ext" in impls:
            row.append(r["bytes"] / r["spd_ext"] * busbw_factor / 1e9)
            if "gloo" in impls:
                row.append(r["gloo"] / r["spd_ext"])
            if "deepspeed" in impls:
                row.append(r["deepspeed"] / r["spd_ext"])
            if "spd_ext-weighted" in impls:
                row.append(r["spd_ext-weighted"] / r["spd_ext"])
        rows.append(row)
    return format_table(headers, rows, markdown)


def describe_run(result: dict, cfg: AllReduceConfig) -> str:
    info = result["info"]
    lines = [f"all-reduce, {cfg.nproc} ranks on {platform.node()} ({os.cpu_count()} cores), "
             f"torch {torch.__version__}, spd_ext path: {info['path']}"]
    if "chunk" in info:
        lines.append(f"spd_ext: one-shot up to {human_bytes(info['oneshot'])}, then "
                     f"reduce-scatter + all-gather in {human_bytes(info['chunk'])} chunks per rank")
    for k, v in info["notes"].items():
        lines.append(f"{k}: {v}")
    if cfg.gap_us:
        lines.append(f"every call follows {cfg.gap_us:g} us of busy compute, not counted in "
                     "its time")
    lines.append("time per call: median of repeats, slowest rank; busbw = bytes/time * "
                 "2(n-1)/n")
    return "\n".join(lines)


def report(cfg: AllReduceConfig, rows: dict, markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(rows, cfg) + "\n" + table(rows, cfg, markdown)
