"""`spd-ext bench generate`: KV-cached generation latency per sync pattern on N CPU ranks.

For each all-reduce backend, batch size and pattern: the prefill of a prompt, then
per-token decode latency (p50, p99 over every decoded token of every repeat, measured on
the group's first rank from the forward's start to the greedy token on the host, which
the all-reduce that agrees on it makes wait for every rank) and decode tokens/s (all
sequences). Layout ``pp``: the same model split into N pipeline stages of one rank each
(spd_ext.tp.staged), a token's activations passing stage to stage, for comparison with
tensor parallelism at the same rank count.
"""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.bench.config import GenerateBenchConfig
from spd_ext.launch import spawn
from spd_ext.tp import DistributedComm, ReducedSyncGPT
from spd_ext.utils.table import format_table


def _timed_steps(model: Any, prompt: torch.Tensor, cfg: GenerateBenchConfig,
                 timings: dict) -> None:
    dist.barrier()
    for step in model.generate_steps(prompt, cfg.new_tokens, temperature=0):
        if step.index == 0:
            timings["prefill"].append(step.seconds)
        else:
            timings["decode"].append(step.seconds)
            timings["syncs"].add(step.syncs)


def _summary(timings: dict, batch: int) -> dict:
    decode = timings["decode"]
    ordered = sorted(decode)
    return {"prefill_s": statistics.median(timings["prefill"]),
            "p50_s": statistics.median(decode),
            "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "tokens_per_s": batch * len(decode) / sum(decode),
            "syncs_per_token": max(timings["syncs"])}


def _pipelined(cfg: GenerateBenchConfig, world: int) -> Any:
    """The model as ``world`` pipeline stages of one rank each (its dense weights: seed 0)."""
    from spd_ext.parallel_dims import ParallelDims
    from spd_ext.tp import EmulatedComm
    from spd_ext.tp.staged import StagedGPT, StageLinks

    config = cfg.model_config(f"tp*{cfg.n_layer}", tp=1)
    topology = ParallelDims(world, 1, pp=world).build()
    links = StageLinks.of(dist.get_rank(), world, 1, topology.replica_ranks,
                          topology.replica_group)
    dense = ReducedSyncGPT(config, seed=0).dense_state_dict()
    return StagedGPT.from_dense(config, dense, EmulatedComm(1), links)


def _rank(rank: int, world: int, cfg: GenerateBenchConfig) -> list[dict]:
    rows = []
    layouts = cfg.layout_list()
    staged = _pipelined(cfg, world) if "pp" in layouts else None
    for backend in cfg.backend_list():
        for batch in cfg.batch_list():
            prompt = torch.randint(cfg.vocab_size, (batch, cfg.prompt_len),
                                   generator=torch.Generator().manual_seed(batch))
            models: dict[str, Any] = {}
            if "tp" in layouts:
                models = {p: ReducedSyncGPT(cfg.model_config(p),
                                            DistributedComm(backend=backend), seed=0)
                          for p in cfg.pattern_list()}
            if staged is not None:  # stages of one rank: no all-reduce, no backend to vary
                if backend == cfg.backend_list()[0]:
                    models[PIPELINE] = staged
            timings = {p: {"prefill": [], "decode": [], "syncs": set()} for p in models}
            for model in models.values():  # warm-up
                list(model.generate_steps(prompt, cfg.new_tokens, temperature=0))
            # The patterns take turns, repeat by repeat: a slow phase of the machine (other
            # work on the host) then lands on every pattern alike, not on one of them.
            for _ in range(cfg.repeats):
                for pattern, model in models.items():
                    _timed_steps(model, prompt, cfg, timings[pattern])
            rows += [{"backend": "-" if p == PIPELINE else backend, "batch": batch,
                      "layout": f"pp {world}" if p == PIPELINE else f"tp {world}",
                      "pattern": f"tp*{cfg.n_layer}" if p == PIPELINE else p,
                      **_summary(timings[p], batch)} for p in models]
            for row in rows:
                if row["layout"].startswith("pp"):  # stages of one rank: no all-reduce
                    row["syncs_per_token"] = 0
    return rows


#: the pipelined model's key among the patterns'
PIPELINE = "pipeline"


def run(cfg: GenerateBenchConfig) -> list[dict]:
    cfg.check()
    return spawn(_rank, cfg.nproc, cfg, timeout=3600, bind_cores=True)[0]


def table(rows: list[dict], markdown: bool = False) -> str:
    body = []
    for r in rows:
        # the most-synchronizing tensor-parallel row of the batch (any backend's, if the
        # row is the pipeline's)
        peers = [b for b in rows if b["batch"] == r["batch"] and b["backend"] != "-"
                 and b["backend"] in (r["backend"], rows[0]["backend"])]
        same = [b for b in peers if b["backend"] == r["backend"]] or peers
        dense = max(same, key=lambda b: b["syncs_per_token"]) if same else r
        body.append([r["backend"], r["batch"], r.get("layout", ""), r["pattern"],
                     r["syncs_per_token"], r["prefill_s"] * 1e3, r["p50_s"] * 1e3,
                     r["p99_s"] * 1e3, r["tokens_per_s"], r["p50_s"] / dense["p50_s"]])
    return format_table(["backend", "batch", "layout", "pattern", "syncs/token", "prefill ms",
                         "decode p50 ms", "decode p99 ms", "tokens/s", "x most-sync tp p50"],
                        body, markdown)


def describe_run(cfg: GenerateBenchConfig) -> str:
    layouts = " and ".join({"tp": f"tensor parallel {cfg.nproc}",
                            "pp": f"{cfg.nproc} pipeline stages (syncs: 0, one hand-off "
                                  "per stage boundary)"}[x] for x in cfg.layout_list())
    return (f"KV-cached greedy generation on {cfg.nproc} CPU ranks of {platform.node()} "
            f"({os.cpu_count()} cores), {layouts}; GPT {cfg.n_layer}L/"
            f"{cfg.n_embd}d/{cfg.n_head}h, vocabulary {cfg.vocab_size}; prompt "
            f"{cfg.prompt_len} tokens, {cfg.new_tokens} new, {cfg.repeats} repeats; backend "
            "torch = torch.distributed (gloo), spd_ext = spd_ext.comm; latency on the first rank")


def report(cfg: GenerateBenchConfig, rows: list[dict], markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(cfg) + "\n" + table(rows, markdown)
