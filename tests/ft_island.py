"""One fault-tolerant DiLoCo island for tests/test_fault_tolerance.py, under the real
``deepspeed`` launcher (one job per island):

    deepspeed --num_gpus 2 tests/ft_island.py --island A --lighthouse HOST:PORT --out DIR

Trains a tiny GPT (ZeRO-1, diloco:H) for --steps steps from ``engine.spd_ext.join_islands()``
on batches that depend on (island, rank, step), and writes ``DIR/<island>.rank<R>.json``:
the steps it trained, its parameters after the last outer step, the islands present,
its mean loss and its weight at each outer step. Test hooks (none is product behaviour):
--die-at S kills this island (SIGKILL of rank 0) inside step S, after backward;
--die-in-outer-step S kills it inside the outer step after step S, once it is in the
quorum but before the all-reduce; --wait-for FILE --wait-at S holds rank 0 before step S
until FILE exists (a restarted island's start); --ready FILE is written as the island
first asks for a quorum.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from ds_worker import batch, ds_config, gpt_config  # noqa: I001 - the tests' folder

import spd_ext.deepspeed as sd
from spd_ext.deepspeed.ops import load_deepspeed_comm_op
from spd_ext.tp import ReducedSyncGPT


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--island", required=True)
    p.add_argument("--lighthouse", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--islands", type=int, default=2)
    p.add_argument("--H", type=int, default=2)
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--die-in-outer-step", type=int, default=None)
    p.add_argument("--wait-for", default=None)
    p.add_argument("--wait-at", type=int, default=None)
    p.add_argument("--ready", default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--island-weights", default="uniform")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    load_deepspeed_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # every island starts from the same weights (init_sync=False)
    model = ReducedSyncGPT(gpt_config(), None, seed=0)
    section = {"staleness": {"mode": f"diloco:{args.H}"},
               "fault_tolerance": {"lighthouse": args.lighthouse, "island": args.island,
                                   "quorum_timeout_s": 120, "timeout_s": 20,
                                   "islands": args.islands,
                                   "island_weights": args.island_weights,
                                   "temperature": args.temperature}}
    engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                               config=ds_config(stage=1, dp=world, section=section))
    integration = engine.spd_ext
    if args.ready and rank == 0:
        announce_first_quorum_request(integration.strategy.manager, Path(args.ready))
    if args.die_in_outer_step is not None:
        inject_death_in_outer_step(integration.strategy, args.die_in_outer_step)
    start = integration.join_islands()
    present, trained, weights = [], [], []
    for step in range(start, args.steps):
        if args.wait_at == step and args.wait_for:
            while not Path(args.wait_for).exists():
                time.sleep(0.1)
            time.sleep(1.0)  # the restarted island's quorum request reaches the lighthouse
        x, y = batch(100 * ord(args.island[0]) + rank, step)
        _, loss = engine(x, y)
        engine.backward(loss)
        if args.die_at == step and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        engine.step()
        trained.append(step)
        if (step + 1) % args.H == 0:
            present.append([step, integration.islands_present])
            weights.append([step, integration.strategy.island_loss,
                            integration.strategy.island_weight])
        time.sleep(args.step_sleep)
    params = torch.cat([w.detach().reshape(-1).float()
                        for w in integration.strategy.inner.weights(model)]).tolist()
    Path(args.out, f"{args.island}.rank{rank}.json").write_text(json.dumps({
        "start": start, "trained": trained, "present": present, "params": params,
        "weights": weights,
        "voted_down": integration.strategy.voted_down,
        "healed_at": integration.strategy.healed_at}))
    dist.barrier()
    integration.close()


def announce_first_quorum_request(manager, ready: Path) -> None:
    """Write ``ready`` as this island first asks for a quorum (its join): an island that
    asked earlier would get a quorum of its own (torchft's fast quorum: every member of the
    previous one is there) and meet this one only at its next outer step."""
    start_quorum = manager.start_quorum

    def announcing(*a, **k):
        if not ready.exists():
            ready.write_text("joining")
        return start_quorum(*a, **k)

    manager.start_quorum = announcing


def inject_death_in_outer_step(strategy, at_step: int) -> None:
    """Kill this island once the outer step after ``at_step`` has its quorum, before its
    all-reduce: the other islands' all-reduce then fails inside the step."""
    manager = strategy.manager
    allreduce = manager.allreduce

    def dying_allreduce(*a, **k):
        if strategy.engine.global_steps == at_step + 1 and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return allreduce(*a, **k)

    manager.allreduce = dying_allreduce


if __name__ == "__main__":
    main()
