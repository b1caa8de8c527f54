"""`spd-ext bench ddp-hook`: a DDP training step with the signal-weighted communication
hook against DDP's default hook, at equal traffic.

Every variant wraps the same GPT in ``DistributedDataParallel`` with the same buckets, so
each step all-reduces the same bytes in the same number of calls:

- ``default``: DDP's own all-reduce hook (torch.distributed, then divide by N);
- ``weighted``: ``signal_weighted_hook``: each bucket's weighted all-reduce through
  spd_ext's kernel, issued asynchronously so it overlaps the rest of backward (plus the
  step's weights: a small all-gather of the loss signal in ``begin_step``);
- ``weighted-sync``: the same hook waiting for each bucket before backward goes on
  (what the hook did before it was asynchronous), to show what the overlap is worth.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from spd_ext.bench.config import DDPHookBenchConfig
from spd_ext.bench.training_step import dense_model, fixed_batch
from spd_ext.launch import spawn
from spd_ext.utils.table import format_table


def _waiting_hook(state, bucket):  # noqa: ANN001, ANN202 - DDP checks no annotations here
    """The signal-weighted hook, waiting for the bucket before backward goes on."""
    from spd_ext.dp import signal_weighted_hook

    reduced = signal_weighted_hook(state, bucket).wait()
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(reduced)
    return done


def _rank(rank: int, world: int, cfg: DDPHookBenchConfig) -> list[dict]:
    from torch.nn.parallel import DistributedDataParallel

    from spd_ext.dp import SignalWeightedAggregator, SignalWeightingState, signal_weighted_hook

    x, y = fixed_batch(cfg, rank)
    runs = {}
    for variant in cfg.variant_list():
        model = dense_model(cfg)
        ddp = DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_mb)
        state = None
        if variant != "default":
            state = SignalWeightingState(SignalWeightedAggregator("loss_ema", "softmax",
                                                                  warmup_steps=0))
            ddp.register_comm_hook(state, signal_weighted_hook if variant == "weighted"
                                   else _waiting_hook)
        runs[variant] = (ddp, state, torch.optim.SGD(ddp.parameters(), lr=1e-4))
    # Round-robin: every round steps each variant once, so a slow phase of the machine
    # hits all variants alike.
    times: dict[str, list[float]] = {v: [] for v in runs}
    for _ in range(cfg.warmup + cfg.steps):
        for variant, (ddp, state, opt) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            _, loss = ddp(x, y)
            if state is not None:
                state.begin_step(loss.item())
            loss.backward()
            if state is not None:
                state.end_step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[variant].append(time.perf_counter() - start)
    rows = []
    for variant, (ddp, _, _) in runs.items():
        kept = times[variant][cfg.warmup:]
        stats = torch.tensor([statistics.median(kept), min(kept)], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        params = list(ddp.module.parameters())
        rows.append({"variant": variant, "step_s": stats[0].item(), "best_s": stats[1].item(),
                     "grad_bytes": sum(p.numel() * p.element_size() for p in params),
                     "params": sum(p.numel() for p in params)})
    return rows


def run(cfg: DDPHookBenchConfig) -> list[dict]:
    cfg.check()
    return spawn(_rank, cfg.nproc, cfg, timeout=1800, bind_cores=True)[0]


def table(rows: list[dict], markdown: bool = False) -> str:
    base = {r["variant"]: r for r in rows}.get("default")
    body = [[r["variant"], r["step_s"] * 1e3, r["best_s"] * 1e3,
             r["step_s"] / base["step_s"] if base else float("nan")] for r in rows]
    return format_table(["variant", "step ms (median)", "step ms (best)",
                         "x DDP default hook"], body, markdown)


def describe_run(cfg: DDPHookBenchConfig, rows: list[dict]) -> str:
    return (f"DistributedDataParallel step (forward, backward, SGD) on "
            f"{cfg.describe_ranks_and_model(rows)} in {cfg.bucket_mb:g} MB buckets), "
            f"{cfg.describe_timing()}")


def report(cfg: DDPHookBenchConfig, rows: list[dict], markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(cfg, rows) + "\n" + table(rows, markdown)
