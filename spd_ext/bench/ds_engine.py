"""`spd-ext bench deepspeed`: DeepSpeed engine step and gradient-reduction time, DeepSpeed's
own reduction vs spd_ext's fused all-reduce, plain and signal-weighted, at a ZeRO stage.

Each variant builds an fp32 engine at ``--stage`` around the same GPT on N local CPU ranks
and times ``engine(x); engine.backward(loss); engine.step()``; the reduction time is the
engine's ``allreduce_gradients`` call at the accumulation boundary (spd_ext times it in
its wrapper, whichever backend carries it; at ZeRO-2/3 most of the reduction has run
inside backward by then, so the step time is the figure to compare).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from spd_ext.bench.config import DEEPSPEED_VARIANTS, DeepSpeedBenchConfig
from spd_ext.bench.deepspeed_comm import init_deepspeed_comm
from spd_ext.bench.training_step import dense_model, fixed_batch
from spd_ext.launch import spawn
from spd_ext.utils.table import format_table


def _rank(rank: int, world: int, cfg: DeepSpeedBenchConfig) -> list[dict]:
    import spd_ext.deepspeed as sd

    init_deepspeed_comm()  # before the models are built: a failure there leaves no segment
    x, y = fixed_batch(cfg, rank)
    engines = {}
    for variant in cfg.variant_list():
        model = dense_model(cfg)
        ds_config = {"train_batch_size": cfg.batch_size * world,
                     "train_micro_batch_size_per_gpu": cfg.batch_size,
                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                     "zero_optimization": {"stage": cfg.stage}, "steps_per_print": 1_000_000,
                     "spd_ext": DEEPSPEED_VARIANTS[variant]}
        engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config)
        engine.spd_ext.barrier_before_reduce = True
        engines[variant] = engine
    # Round-robin: every round steps each variant once, so a slow phase of the machine
    # hits all variants alike instead of whichever ran then.
    step_times: dict[str, list[float]] = {v: [] for v in engines}
    for _ in range(cfg.warmup + cfg.steps):
        for variant, engine in engines.items():
            dist.barrier()
            start = time.perf_counter()
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            step_times[variant].append(time.perf_counter() - start)
    rows = []
    for variant, engine in engines.items():
        reduce_times = engine.spd_ext.reduce_seconds[cfg.warmup:]
        stats = torch.tensor([statistics.median(step_times[variant][cfg.warmup:]),
                              statistics.median(reduce_times), min(reduce_times)],
                             dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        params = list(engine.module.parameters())
        rows.append({"variant": variant, "step_s": stats[0].item(),
                     "reduce_s": stats[1].item(), "reduce_best_s": stats[2].item(),
                     # ZeRO-3 leaves each parameter an empty placeholder: ds_numel is its size
                     "grad_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                                       for p in params),
                     "params": engine.module.num_params()})
    return rows


def run(cfg: DeepSpeedBenchConfig) -> list[dict]:
    cfg.check()
    return spawn(_rank, cfg.nproc, cfg, timeout=1800, bind_cores=True)[0]


def table(rows: list[dict], markdown: bool = False) -> str:
    base = {r["variant"]: r for r in rows}
    body = []
    for r in rows:
        ds = base.get("deepspeed-weighted" if "weighted" in r["variant"] else "deepspeed")
        plain = base.get(r["variant"].replace("-weighted", ""))
        body.append([r["variant"], r["step_s"] * 1e3, r["reduce_s"] * 1e3,
                     r["reduce_best_s"] * 1e3, r["grad_bytes"] / r["reduce_s"] / 1e9,
                     ds["reduce_s"] / r["reduce_s"] if ds else float("nan"),
                     r["step_s"] / plain["step_s"] if plain else float("nan"),
                     r["reduce_s"] / plain["reduce_s"] if plain else float("nan"),
                     r["reduce_best_s"] / plain["reduce_best_s"] if plain else float("nan")])
    return format_table(["variant", "step ms", "reduce ms", "reduce best ms", "reduce GB/s",
                         "x faster than DeepSpeed (same weighting)", "step x its plain",
                         "reduce x its plain", "reduce x its plain (best)"], body, markdown)


def describe_run(cfg: DeepSpeedBenchConfig, rows: list[dict]) -> str:
    return (f"DeepSpeed ZeRO-{cfg.stage} fp32 engine step on "
            f"{cfg.describe_ranks_and_model(rows)}), "
            f"{cfg.describe_timing()}; deepspeed = DeepSpeed's reduction (gloo), spd_ext = "
            "spd_ext's fused all-reduce; weighted = signal weights (loss_ema, softmax)")


def report(cfg: DeepSpeedBenchConfig, rows: list[dict], markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(cfg, rows) + "\n" + table(rows, markdown)
