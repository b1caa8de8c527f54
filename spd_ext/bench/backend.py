"""`spd-ext bench backend`: the torch.distributed backend "spd_ext" against gloo on N local
CPU ranks, collective by collective and in whole training steps.

Two jobs. The first initializes torch.distributed on ``cpu:spd_ext`` and times every
collective on the world group and on a gloo group over the same ranks, interleaved
(so a slow phase of the machine hits both alike), then the training steps. The second,
initialized on gloo, times the same steps: DeepSpeed builds its groups on the default
backend, so its engines can only be compared job against job. The steps train the
benchmark GPT (about 10M parameters by default): DeepSpeed ZeRO-2 and ZeRO-3 engines
(fp32, AdamW), DDP, and FSDP2 (``fully_shard`` per block, parameters kept unsharded
between forward and backward: spd_ext's GPT does not support FSDP2's resharding).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from spd_ext.backend_names import SPD_EXT_CPU_BACKEND
from spd_ext.bench.config import BackendBenchConfig
from spd_ext.bench.timing import dtype_name, measure, parse_dtypes
from spd_ext.bench.training_step import dense_model, fixed_batch
from spd_ext.errors import UsageError
from spd_ext.launch import spawn
from spd_ext.utils.table import format_table, human_bytes, parse_sizes


def _collective(name: str, numel: int, world: int, dtype: torch.dtype
                ) -> Callable[[object], object]:
    """One call of collective ``name`` on ``numel`` elements in all (its whole tensor)."""
    whole = torch.empty(numel, dtype=dtype).uniform_(-1, 1)
    part = torch.empty(numel // world, dtype=dtype).uniform_(-1, 1)
    calls = {
        "all_reduce": lambda group: dist.all_reduce(whole, group=group),
        "reduce_scatter": lambda group: dist.reduce_scatter_tensor(part, whole, group=group),
        "all_gather": lambda group: dist.all_gather_into_tensor(whole, part, group=group),
        "broadcast": lambda group: dist.broadcast(whole, group_src=0, group=group),
    }
    return calls[name]


def _time_collectives(cfg: BackendBenchConfig, rank: int, world: int) -> list[dict]:
    gloo = dist.new_group(backend="gloo")
    mine = dist.group.WORLD

    def agree(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=gloo)
        return int(t.item())

    rows = []
    points = [(d, s, c) for d in parse_dtypes(cfg.dtypes) for s in parse_sizes(cfg.sizes)
              for c in cfg.collective_list()]
    for i, (dtype, size, name) in enumerate(points):
        element = torch.empty((), dtype=dtype).element_size()
        numel = max(world, size // element // world * world)
        call = _collective(name, numel, world, dtype)
        times = measure({"gloo": lambda call=call: call(gloo),
                         "spd_ext": lambda call=call: call(mine)},
                        warmup=cfg.warmup, repeats=cfg.repeats, target_s=cfg.target_ms / 1e3,
                        barrier=lambda: dist.barrier(group=gloo), agree=agree)
        slowest = torch.tensor([times["gloo"], times["spd_ext"]], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=gloo)
        row = {"collective": name, "bytes": numel * element, "dtype": dtype_name(dtype),
               "gloo_s": slowest[0].item(), "spd_ext_s": slowest[1].item()}
        rows.append(row)
        if rank == 0:
            print(f"[{i + 1}/{len(points)}] {name} {row['dtype']} {human_bytes(size)}: gloo "
                  f"{row['gloo_s'] * 1e6:.1f} us, spd_ext {row['spd_ext_s'] * 1e6:.1f} us",
                  file=sys.stderr, flush=True)
    dist.destroy_process_group(gloo)
    return rows


def _step_runner(variant: str, cfg: BackendBenchConfig, world: int) -> tuple[Callable, dict]:
    """A function running one training step of ``variant``, and the model's sizes."""
    model = dense_model(cfg)
    sizes = {"params": sum(p.numel() for p in model.parameters()),
             "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if variant in ("zero2", "zero3"):
        import deepspeed

        config = {"train_batch_size": cfg.batch_size * world,
                  "train_micro_batch_size_per_gpu": cfg.batch_size,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                  "zero_optimization": {"stage": int(variant[-1])},
                  "steps_per_print": 1_000_000}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=config)

        def engine_step(x: torch.Tensor, y: torch.Tensor) -> None:
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()

        return engine_step, sizes
    if variant == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block, reshard_after_forward=False)
        fully_shard(model, reshard_after_forward=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sizes


def _time_steps(cfg: BackendBenchConfig, rank: int, world: int) -> list[dict]:
    if any(v.startswith("zero") for v in cfg.variant_list()):
        from spd_ext.bench.deepspeed_comm import init_deepspeed_comm

        init_deepspeed_comm()  # on the job's group, whichever backend it is
    x, y = fixed_batch(cfg, rank)
    runners = {v: _step_runner(v, cfg, world) for v in cfg.variant_list()}
    times: dict[str, list[float]] = {v: [] for v in runners}
    for _ in range(cfg.warmup + cfg.steps):  # round-robin, as the other step benchmarks
        for variant, (step, _) in runners.items():
            dist.barrier()
            start = time.perf_counter()
            step(x, y)
            times[variant].append(time.perf_counter() - start)
    rows = []
    for variant, (_, sizes) in runners.items():
        kept = times[variant][cfg.warmup:]
        stats = torch.tensor([statistics.median(kept), min(kept)], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        rows.append({"variant": variant, "step_s": stats[0].item(), "best_s": stats[1].item(),
                     **sizes})
    return rows


def _rank(rank: int, world: int, cfg: BackendBenchConfig, collectives: bool) -> dict:
    group = dist.group.WORLD
    info = {"backend": dist.get_backend(),
            "carried_by": group.describe() if hasattr(group, "describe") else "gloo"}
    rows = _time_collectives(cfg, rank, world) if collectives else []
    return {"collectives": rows, "steps": _time_steps(cfg, rank, world), "info": info}


def run(cfg: BackendBenchConfig) -> dict:
    """Both jobs; returns the collectives' rows and the steps' rows of each backend."""
    cfg.check()
    if any(v.startswith("zero") for v in cfg.variant_list()) and \
            importlib.util.find_spec("deepspeed") is None:
        raise UsageError("the zero2 and zero3 steps need deepspeed: pip install "
                         "'spd_ext[deepspeed]', or leave them out with --variants ddp,fsdp2")
    common = dict(timeout=3600, bind_cores=True, threads_per_rank=cfg.threads_per_rank,
                  env={"DS_ACCELERATOR": "cpu"})
    mine = spawn(_rank, cfg.nproc, cfg, True, backend=SPD_EXT_CPU_BACKEND, **common)[0]
    gloo = spawn(_rank, cfg.nproc, cfg, False, backend="gloo", **common)[0] \
        if cfg.variant_list() else {"steps": []}
    return {"collectives": mine["collectives"], "info": mine["info"],
            "steps": {"spd_ext": mine["steps"], "gloo": gloo["steps"]}}


def tables(result: dict, markdown: bool = False) -> str:
    out = []
    if result["collectives"]:
        body = [[r["collective"], human_bytes(r["bytes"]), r["dtype"], r["gloo_s"] * 1e6,
                 r["spd_ext_s"] * 1e6, r["bytes"] / r["spd_ext_s"] / 1e9,
                 r["gloo_s"] / r["spd_ext_s"]] for r in result["collectives"]]
        out.append(format_table(["collective", "size", "dtype", "gloo us", "spd_ext us",
                                 "spd_ext GB/s", "spd_ext x gloo"], body, markdown))
    gloo = {r["variant"]: r for r in result["steps"]["gloo"]}
    body = [[r["variant"], gloo[r["variant"]]["step_s"] * 1e3, r["step_s"] * 1e3,
             gloo[r["variant"]]["best_s"] * 1e3, r["best_s"] * 1e3,
             gloo[r["variant"]]["step_s"] / r["step_s"]]
            for r in result["steps"]["spd_ext"] if r["variant"] in gloo]
    if body:
        out.append(format_table(["step", "gloo ms", "spd_ext ms", "gloo best ms",
                                 "spd_ext best ms", "spd_ext x gloo"], body, markdown))
    return "\n\n".join(out)


def describe_run(cfg: BackendBenchConfig, result: dict) -> str:
    lines = [f"torch.distributed backend {SPD_EXT_CPU_BACKEND} against gloo, {cfg.nproc} CPU "
             f"ranks of {platform.node()} ({os.cpu_count()} cores), torch {torch.__version__};"
             f" spd_ext: {result['info']['carried_by']}"]
    if result["collectives"]:
        lines.append("collectives: time per call, median of repeats, slowest rank; size: the "
                     "whole tensor (all_reduce's, reduce_scatter's input, all_gather's "
                     "output); GB/s = size / time")
    steps = result["steps"]["spd_ext"]
    if steps:
        lines.append(f"steps (forward, backward, optimizer) of a GPT {cfg.n_layer}L/"
                     f"{cfg.n_embd}d/{cfg.n_head}h ({steps[0]['params'] / 1e6:.1f}M "
                     f"parameters), fp32, {cfg.describe_timing()}; each backend in its own job")
    return "\n".join(lines)


def report(cfg: BackendBenchConfig, result: dict, markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the tables."""
    return describe_run(cfg, result) + "\n" + tables(result, markdown)
