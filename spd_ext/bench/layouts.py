"""`spd-ext bench layouts`: the training step of one GPT laid out three ways on N ranks.

* dp: every rank a replica (DeepSpeed's data parallelism), ``--batch-size`` sequences each;
* tp: one replica tensor-parallel over the N ranks (spd_ext's reduced-sync blocks, pattern
  ``--pattern``), the step's ``batch x N`` sequences in ``--micro-batches`` micro-batches;
* pp: one replica split into N pipeline stages (DeepSpeed's pipeline engine, spd_ext's
  stage layers), the same micro-batches (1F1B schedule).

Every layout takes the same ``batch x N`` sequences per step, fp32 at ZeRO 0, AdamW; the
layouts' engines live in one job and step in turns (a slow phase of the machine lands on
all of them), timed from a barrier to the end of the step on the slowest rank.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import torch
import torch.distributed as dist

from spd_ext.bench.config import LayoutBenchConfig
from spd_ext.bench.deepspeed_comm import init_deepspeed_comm
from spd_ext.bench.training_step import dense_model
from spd_ext.launch import spawn
from spd_ext.utils.table import format_table


def _batches(cfg: LayoutBenchConfig, seed: int, count: int, size: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(cfg.vocab_size, (size, cfg.seq_len), generator=g),
             torch.randint(cfg.vocab_size, (size, cfg.seq_len), generator=g))
            for _ in range(count)]


def _ds_config(cfg: LayoutBenchConfig, micro: int, gas: int, dp: int) -> dict:
    return {"train_batch_size": micro * gas * dp, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": gas,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": 0}, "steps_per_print": 1_000_000}


def _engines(rank: int, world: int, cfg: LayoutBenchConfig) -> dict:
    """Each layout's engine and its step (a function of no arguments)."""
    import spd_ext.deepspeed as sd
    from spd_ext.tp import DistributedComm, ReducedSyncGPT

    micro = cfg.batch_size * world // cfg.micro_batches
    steps = {}
    for layout in cfg.variant_list():
        if layout == "dp":
            model = dense_model(cfg)
            engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                       config=_ds_config(cfg, cfg.batch_size, 1, world))
            batches = _batches(cfg, rank, 1, cfg.batch_size)
        elif layout == "tp":
            topology = sd.build_topology(world)
            torch.manual_seed(0)
            model = ReducedSyncGPT(cfg.layout_config(world), DistributedComm(topology.tp_group))
            section = {"tensor_parallel": {"size": world}}
            engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                       config={**_ds_config(cfg, micro, cfg.micro_batches, 1),
                                               "spd_ext": section})
            batches = _batches(cfg, 0, cfg.micro_batches, micro)
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints the partition
                model = sd.pipeline_module(cfg.layout_config(1), world,
                                           partition_method="blocks")
            engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                       config=_ds_config(cfg, micro, cfg.micro_batches, 1))
            batches = _batches(cfg, 0, cfg.micro_batches, micro)
        steps[layout] = (engine, batches)
    return steps


def _step(layout: str, engine, batches: list[tuple]) -> None:
    if layout == "pp":
        engine.train_batch(iter(batches))
        return
    for x, y in batches:
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()


def _rank(rank: int, world: int, cfg: LayoutBenchConfig) -> list[dict]:
    init_deepspeed_comm()
    engines = _engines(rank, world, cfg)
    times: dict[str, list[float]] = {layout: [] for layout in engines}
    for _ in range(cfg.warmup + cfg.steps):
        for layout, (engine, batches) in engines.items():
            dist.barrier()
            start = time.perf_counter()
            _step(layout, engine, batches)
            times[layout].append(time.perf_counter() - start)
    rows = []
    tokens = cfg.batch_size * world * cfg.seq_len
    for layout in engines:
        median = torch.tensor([statistics.median(times[layout][cfg.warmup:])],
                              dtype=torch.float64)
        dist.all_reduce(median, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        rows.append({"layout": layout, "step_s": median.item(),
                     "tokens_per_s": tokens / median.item(),
                     "params": dense_model(cfg).num_params(), "grad_bytes": 0})
    return rows


def run(cfg: LayoutBenchConfig) -> list[dict]:
    cfg.check()
    return spawn(_rank, cfg.nproc, cfg, timeout=1800, bind_cores=True)[0]


def table(cfg: LayoutBenchConfig, rows: list[dict], markdown: bool = False) -> str:
    names = {"dp": f"dp {cfg.nproc}", "tp": f"tp {cfg.nproc}", "pp": f"pp {cfg.nproc}"}
    dp = next((r for r in rows if r["layout"] == "dp"), None)
    body = [[names[r["layout"]], r["step_s"] * 1e3, r["tokens_per_s"],
             r["step_s"] / dp["step_s"] if dp else float("nan")] for r in rows]
    return format_table(["layout", "step ms", "tokens/s", "step x dp"], body, markdown)


def describe_run(cfg: LayoutBenchConfig, rows: list[dict]) -> str:
    micro = cfg.batch_size * cfg.nproc // cfg.micro_batches
    pattern = cfg.pattern or f"tp*{cfg.n_layer}"
    return (f"one training step laid out three ways (DeepSpeed fp32 ZeRO-0, AdamW) on "
            f"{cfg.describe_ranks_and_model(rows).split('; GPT')[0]}; GPT {cfg.n_layer}L/"
            f"{cfg.n_embd}d/{cfg.n_head}h, {rows[0]['params'] / 1e6 if rows else 0:.1f}M "
            f"parameters; {cfg.batch_size * cfg.nproc} x {cfg.seq_len} tokens per step: dp "
            f"{cfg.batch_size} sequences per rank, tp and pp {cfg.micro_batches} micro-batches "
            f"of {micro} (tp pattern {pattern}); median of {cfg.steps} steps after "
            f"{cfg.warmup}, slowest rank")


def report(cfg: LayoutBenchConfig, rows: list[dict], markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(cfg, rows) + "\n" + table(cfg, rows, markdown)
