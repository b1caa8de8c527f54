"""spd_ext all-reduce in a user's script, under torchrun or the deepspeed launcher.

    torchrun --nproc_per_node 2 examples/allreduce.py
    deepspeed --num_gpus 2 examples/allreduce.py      # CPU ranks on a machine without GPUs

Every rank contributes rank + 1; the script checks sum, mean and a weighted sum against
the closed form and prints which path carried the collective.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from spd_ext.comm import all_reduce, describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 20, help="elements per tensor")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; unused")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # CPU tensors; spd_ext picks shared memory on one host
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)

    x = torch.full((args.numel,), float(rank + 1), dtype=dtype)
    all_reduce(x)  # sum
    m = torch.full((args.numel,), float(rank + 1), dtype=dtype)
    all_reduce(m, "mean")
    weights = torch.softmax(torch.arange(world, dtype=torch.float32), 0)  # same on every rank
    w = torch.full((args.numel,), float(rank + 1), dtype=dtype)
    all_reduce(w, "weighted", weights=weights)

    expect = {"sum": world * (world + 1) / 2, "mean": (world + 1) / 2,
              "weighted": float((weights * torch.arange(1, world + 1)).sum())}
    got = {"sum": x, "mean": m, "weighted": w}
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for name, t in got.items():
        if not torch.allclose(t.float(), torch.full_like(t.float(), expect[name]), rtol=tol):
            raise SystemExit(f"rank {rank}: {name} gave {t[0].item()}, expected {expect[name]}")
    if rank == 0:
        print(f"all-reduce over {world} ranks via {describe()}: "
              + ", ".join(f"{k}={got[k][0].item():.4f}" for k in got) + " (all correct)")
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
