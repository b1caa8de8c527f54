"""`spd-ext bench generate`: KV-cached generation latency per sync pattern on N CPU ranks.

For each all-reduce backend, batch size and pattern: the prefill of a prompt, then
per-token decode latency (p50, p99 over every decoded token of every repeat, measured on
the group's first rank from the forward's start to the greedy token on the host, which
the all-reduce that agrees on it makes wait for every rank) and decode tokens/s (all
sequences).
"""

from __future__ import annotations

import os
import platform
import statistics

import torch
import torch.distributed as dist

from spd_ext.bench.config import GenerateBenchConfig
from spd_ext.launch import spawn
from spd_ext.tp import DistributedComm, ReducedSyncGPT
from spd_ext.utils.table import format_table


def _timed_steps(model: ReducedSyncGPT, prompt: torch.Tensor, cfg: GenerateBenchConfig,
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


def _rank(rank: int, world: int, cfg: GenerateBenchConfig) -> list[dict]:
    rows = []
    for backend in cfg.backend_list():
        for batch in cfg.batch_list():
            prompt = torch.randint(cfg.vocab_size, (batch, cfg.prompt_len),
                                   generator=torch.Generator().manual_seed(batch))
            models = {p: ReducedSyncGPT(cfg.model_config(p), DistributedComm(backend=backend),
                                        seed=0) for p in cfg.pattern_list()}
            timings = {p: {"prefill": [], "decode": [], "syncs": set()} for p in models}
            for model in models.values():  # warm-up
                list(model.generate_steps(prompt, cfg.new_tokens, temperature=0))
            # The patterns take turns, repeat by repeat: a slow phase of the machine (other
            # work on the host) then lands on every pattern alike, not on one of them.
            for _ in range(cfg.repeats):
                for pattern, model in models.items():
                    _timed_steps(model, prompt, cfg, timings[pattern])
            rows += [{"backend": backend, "batch": batch, "pattern": p,
                      **_summary(timings[p], batch)} for p in models]
    return rows


def run(cfg: GenerateBenchConfig) -> list[dict]:
    cfg.check()
    return spawn(_rank, cfg.nproc, cfg, timeout=3600, bind_cores=True)[0]


def table(rows: list[dict], markdown: bool = False) -> str:
    body = []
    for r in rows:
        dense = max((b for b in rows if (b["backend"], b["batch"]) == (r["backend"], r["batch"])),
                    key=lambda b: b["syncs_per_token"])
        body.append([r["backend"], r["batch"], r["pattern"], r["syncs_per_token"],
                     r["prefill_s"] * 1e3, r["p50_s"] * 1e3, r["p99_s"] * 1e3,
                     r["tokens_per_s"], r["p50_s"] / dense["p50_s"]])
    return format_table(["backend", "batch", "pattern", "syncs/token", "prefill ms",
                         "decode p50 ms", "decode p99 ms", "tokens/s", "x most-sync p50"],
                        body, markdown)


def describe_run(cfg: GenerateBenchConfig) -> str:
    return (f"KV-cached greedy generation on {cfg.nproc} CPU ranks of {platform.node()} "
            f"({os.cpu_count()} cores), tensor parallel {cfg.nproc}; GPT {cfg.n_layer}L/"
            f"{cfg.n_embd}d/{cfg.n_head}h, vocabulary {cfg.vocab_size}; prompt "
            f"{cfg.prompt_len} tokens, {cfg.new_tokens} new, {cfg.repeats} repeats; backend "
            "torch = torch.distributed (gloo), spd_ext = spd_ext.comm; latency on the first rank")


def report(cfg: GenerateBenchConfig, rows: list[dict], markdown: bool = False) -> str:
    """What `spd-ext bench` prints: the setup, then the table."""
    return describe_run(cfg) + "\n" + table(rows, markdown)
