"""`spd-ext bench backend`: the torch.distributed backend "spd_ext" against gloo on N local
CPU ranks, collective by collective and in whole training steps.

One job, initialized on ``cpu:spd_ext``: every collective is timed on the world group and
on a gloo group over the same ranks, interleaved (a slow phase of the machine hits both
alike); then every training step runs on each backend's groups, step by step in turn.
The steps train the benchmark GPT (about 10M parameters by default): DeepSpeed ZeRO-2
and ZeRO-3 engines (fp32, AdamW; an ``mpu`` hands DeepSpeed the backend's groups), DDP,
and FSDP2 (``fully_shard`` per block, parameters kept unsharded between forward and
backward: spd_ext's GPT does not support FSDP2's resharding).
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
    if not cfg.collective_list():
        return []
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


def _groups(world: int, backend: str | None) -> tuple[object, object]:
    """This rank's (model-parallel, data-parallel) groups on ``backend`` (None: the
    default, spd_ext's): single-rank model-parallel groups, the data-parallel group over
    every rank. Collective: every rank creates every group."""
    rank = dist.get_rank()
    singles = [dist.new_group([r], backend=backend) for r in range(world)]
    return singles[rank], dist.new_group(list(range(world)), backend=backend)


def _step_runner(variant: str, cfg: BackendBenchConfig, world: int,
                 groups: tuple[object, object]) -> tuple[Callable, dict]:
    """A function running one training step of ``variant`` on ``groups``, and the model's
    sizes."""
    model = dense_model(cfg)
    mp_group, dp_group = groups
    sizes = {"params": sum(p.numel() for p in model.parameters())}
    if variant in ("zero2", "zero3"):
        import deepspeed

        from spd_ext.parallel_dims import ModelParallelUnit

        config = {"train_batch_size": cfg.batch_size * world,
                  "train_micro_batch_size_per_gpu": cfg.batch_size,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                  "zero_optimization": {"stage": int(variant[-1])},
                  "steps_per_print": 1_000_000}
        # the mpu hands DeepSpeed the backend's groups: its ZeRO collectives run on them
        mpu = ModelParallelUnit(mp_group, (dist.get_rank(),), dp_group, tuple(range(world)))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=config, mpu=mpu)

        def engine_step(x: torch.Tensor, y: torch.Tensor) -> None:
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()

        return engine_step, sizes
    if variant == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, process_group=dp_group)
    else:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(dp_group, "cpu")
        for block in model.h:
            fully_shard(block, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sizes


def _time_steps(cfg: BackendBenchConfig, rank: int, world: int) -> list[dict]:
    if not cfg.variant_list():
        return []
    if any(v.startswith("zero") for v in cfg.variant_list()):
        from spd_ext.bench.deepspeed_comm import init_deepspeed_comm

        init_deepspeed_comm()  # on the job's default group (spd_ext's)
    x, y = fixed_batch(cfg, rank)
    groups = {"gloo": _groups(world, "gloo"), "spd_ext": _groups(world, None)}
    runners = {(v, b): _step_runner(v, cfg, world, groups[b])
               for v in cfg.variant_list() for b in groups}
    times: dict[tuple, list[float]] = {key: [] for key in runners}
    for _ in range(cfg.warmup + cfg.steps):  # round-robin: both backends in every round
        for key, (step, _) in runners.items():
            dist.barrier()
            start = time.perf_counter()
            step(x, y)
            times[key].append(time.perf_counter() - start)
    rows = []
    for variant in cfg.variant_list():
        row = {"variant": variant, **runners[(variant, "gloo")][1]}
        for backend in groups:
            kept = times[(variant, backend)][cfg.warmup:]
            stats = torch.tensor([statistics.median(kept), min(kept)], dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            row[f"{backend}_s"], row[f"{backend}_best_s"] = stats.tolist()
        rows.append(row)
    return rows


def _rank(rank: int, world: int, cfg: BackendBenchConfig) -> dict:
    group = dist.group.WORLD
    return {"collectives": _time_collectives(cfg, rank, world),
            "steps": _time_steps(cfg, rank, world),
            "info": {"backend": dist.get_backend(), "carried_by": group.describe()}}


def run(cfg: BackendBenchConfig) -> dict:
    """One job on ``cpu:spd_ext``; returns the collectives' rows and the steps' rows."""
    cfg.check()
    if any(v.startswith("zero") for v in cfg.variant_list()) and \
            importlib.util.find_spec("deepspeed") is None:
        raise UsageError("the zero2 and zero3 steps need deepspeed: pip install "
                         "'spd_ext[deepspeed]', or leave them out with --variants ddp,fsdp2")
    return spawn(_rank, cfg.nproc, cfg, backend=SPD_EXT_CPU_BACKEND, timeout=3600,
                 bind_cores=True, threads_per_rank=cfg.threads_per_rank,
                 env={"DS_ACCELERATOR": "cpu"})[0]


def tables(result: dict, markdown: bool = False) -> str:
    out = []
    if result["collectives"]:
        body = [[r["collective"], human_bytes(r["bytes"]), r["dtype"], r["gloo_s"] * 1e6,
                 r["spd_ext_s"] * 1e6, r["bytes"] / r["spd_ext_s"] / 1e9,
                 r["gloo_s"] / r["spd_ext_s"]] for r in result["collectives"]]
        out.append(format_table(["collective", "size", "dtype", "gloo us", "spd_ext us",
                                 "spd_ext GB/s", "spd_ext x gloo"], body, markdown))
    body = [[r["variant"], r["gloo_s"] * 1e3, r["spd_ext_s"] * 1e3, r["gloo_best_s"] * 1e3,
             r["spd_ext_best_s"] * 1e3, r["gloo_s"] / r["spd_ext_s"]] for r in result["steps"]]
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
    steps = result["steps"]
    if steps:
        lines.append(f"steps (forward, backward, optimizer) of a GPT {cfg.n_layer}L/"
                     f"{cfg.n_embd}d/{cfg.n_head}h ({steps[0]['params'] / 1e6:.1f}M "
                     f"parameters), fp32, {cfg.describe_timing()}; every step variant on "
                     "each backend's groups in the same job (DeepSpeed's through an mpu)")
    return "\n".join(lines)


def report(cfg: BackendBenchConfig, result: dict, markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the tables."""
    return describe_run(cfg, result) + "\n" + tables(result, markdown)
