"""`spd-ext bench tp`: training step time per sync pattern on N local CPU ranks."""

from __future__ import annotations

import os
import platform

import torch
import torch.distributed as dist

from spd_ext.bench.config import TPBenchConfig
from spd_ext.bench.timing import measure
from spd_ext.launch import spawn
from spd_ext.tp import DistributedComm, GPTConfig, ReducedSyncGPT
from spd_ext.utils.table import format_table


def _step_fn(model: ReducedSyncGPT, x: torch.Tensor, y: torch.Tensor, mode: str):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    call = torch.compile(model, fullgraph=True) if mode == "compiled" else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _, loss = call(x, y)
        loss.backward()
        model.sync_partial_grads_()
        opt.step()
        # a step's counts start at zero, as a training loop's do: torch.compile guards on
        # the counter's values, and counts that kept growing would recompile every step
        step.counts = model.sync_counter.step()

    return step


def _rank(rank: int, world: int, cfg: TPBenchConfig) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
    y = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
    rows = []
    for backend in cfg.backend_list():
        comm_models = {}
        for pattern in cfg.pattern_list():
            mc = GPTConfig(block_size=cfg.seq_len, vocab_size=cfg.vocab_size,
                           n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                           pattern=pattern, tp_size=world)
            for mode in cfg.modes():
                comm_models[pattern, mode] = ReducedSyncGPT(
                    mc, DistributedComm(backend=backend), seed=0)
        steps = {k: _step_fn(m, x, y, k[1]) for k, m in comm_models.items()}
        counts = {}
        for k in comm_models:
            steps[k]()  # compiles a compiled one
            counts[k] = steps[k].counts

        def agree(n: int) -> int:
            t = torch.tensor([n])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return int(t.item())

        times = measure(steps, warmup=cfg.warmup, repeats=cfg.repeats,
                        target_s=cfg.target_ms / 1e3, barrier=dist.barrier, agree=agree)
        for k in comm_models:
            t = torch.tensor([times[k]], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rows.append({"backend": backend, "pattern": k[0], "mode": k[1],
                         "syncs_fwd": counts[k]["forward"], "syncs_bwd": counts[k]["backward"],
                         "seconds": t.item()})
    return rows


def run(cfg: TPBenchConfig) -> list[dict]:
    cfg.check()
    return spawn(_rank, cfg.nproc, cfg, timeout=3600, bind_cores=True)[0]


def table(rows: list[dict], markdown: bool = False) -> str:
    """One row per backend, pattern (and mode, when compiled steps were timed too); the
    last column compares each step with the most-synchronizing pattern's of its backend
    and mode."""
    modes = len({r.get("mode", "eager") for r in rows}) > 1
    body = []
    for r in rows:
        most = max((b for b in rows if b["backend"] == r["backend"]
                    and b.get("mode") == r.get("mode")), key=lambda b: b["syncs_fwd"])
        body.append([r["backend"], r["pattern"], *([r["mode"]] if modes else []),
                     r["syncs_fwd"], r["syncs_bwd"], r["seconds"] * 1e3,
                     r["seconds"] / most["seconds"]])
    return format_table(["backend", "pattern", *(["mode"] if modes else []), "syncs fwd",
                         "syncs bwd", "step ms", "x most-sync step"], body, markdown)


def describe_run(cfg: TPBenchConfig) -> str:
    return (f"tensor-parallel training step (forward, backward, LayerNorm-grad sync, SGD) on "
            f"{cfg.nproc} CPU ranks of {platform.node()} ({os.cpu_count()} cores); GPT "
            f"{cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}h, batch {cfg.batch_size} x "
            f"{cfg.seq_len}; one all-reduce moves {cfg.batch_size * cfg.seq_len * cfg.n_embd * 4}"
            " bytes; backend torch = torch.distributed (gloo), spd_ext = spd_ext.comm")


def report(cfg: TPBenchConfig, rows: list[dict], markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(cfg) + "\n" + table(rows, markdown)
