"""spd_ext's reduced-sync blocks inside your own model, tensor-parallel under torchrun.

    torchrun --nproc_per_node 2 examples/tp_blocks_torchrun.py
    torchrun --nproc_per_node 2 examples/tp_blocks_torchrun.py --steps 5 --n-layer 2 --n-embd 32

The model is yours: an embedding, a stack of blocks, a final norm and a head. Only the
blocks come from spd_ext: `ParallelBlock` (no sync: it leaves the rank-local region
open) alternating with `SPDBlock` (one sync: attention and MLP share one all-reduce),
so a pair costs one forward all-reduce where two Megatron blocks cost four. Every rank
holds its share of the heads and MLP units and sees the same batch; `DistributedComm`
carries the all-reduces and counts them. Prints the measured syncs and the loss, and
finally `done: ...`.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spd_ext.data import TokenDataset
from spd_ext.tp import (
    DistributedComm,
    ParallelBlock,
    ResidualStream,
    SPDBlock,
    tensor_parallel_layout,
)


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 comm: DistributedComm) -> None:
        super().__init__()
        self.comm = comm
        self.tok = nn.Embedding(vocab, n_embd)  # replicated on every rank
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(  # sharded: each rank holds n_head / T heads
            (ParallelBlock if i % 2 == 0 else SPDBlock)(n_embd, n_head, comm)
            for i in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        # A ResidualStream lets a region stay open from one block to the next (what
        # ParallelBlock needs); a block called on a plain tensor closes its own region.
        stream = ResidualStream(x, self.comm)
        for block in self.blocks:
            block(stream)
        x = stream.finish()  # replicated again (one last sync if a region is still open)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, rank: int) -> None:
    """Replicated weights equal on every rank; each rank draws its own shards."""
    shared = torch.Generator().manual_seed(seed)
    own = torch.Generator().manual_seed(seed + 1 + rank)
    for name, p in model.named_parameters():
        if "ln" in name:
            continue  # LayerNorms keep ones / zeros
        if name.endswith("bias"):
            p.zero_()
        else:
            sharded = tensor_parallel_layout(p).sharded
            p.normal_(0.0, 0.02, generator=own if sharded else shared)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--block-size", type=int, default=64, help="context length")
    p.add_argument("--n-layer", type=int, default=4, help="blocks: parallel, spd, parallel, ...")
    p.add_argument("--n-head", type=int, default=4, help="divisible by the number of ranks")
    p.add_argument("--n-embd", type=int, default=128, help="model width")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=1337, help="weights and batches")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = DistributedComm()  # the whole world is one tensor-parallel group
    data = TokenDataset("tinyshakespeare", "char")
    batches = data.sampler(args.batch_size, args.block_size, args.seed)  # same batch everywhere
    model = TinyGPT(data.vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd,
                    comm)
    init_weights(model, args.seed, rank)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    # LayerNorms inside the blocks act on rank-local views: each rank holds part of
    # their gradient, summed over the group once per step.
    partial = [q for q in model.parameters() if tensor_parallel_layout(q).partial_gradient]

    for step in range(args.steps):
        loss = model(*batches("train", step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        comm.all_reduce_params_([q.grad for q in partial])
        comm.counter.grad_syncs += 1
        opt.step()
        syncs = comm.counter.step()  # this step's all-reduces, counted as they ran
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  syncs: forward {syncs['forward']}, "
                  f"backward {syncs['backward']}, LayerNorm grads {syncs['grad_syncs']}")

    # Replicated weights must still agree: every rank computed the same update. Each rank
    # compares its own with the first rank's; the verdict is the minimum over the ranks.
    head = model.head.weight.detach().clone()
    dist.broadcast(head, src=0)
    same = torch.tensor([int(torch.equal(head, model.head.weight))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    agree = bool(same.item())
    if rank == 0:
        print(f"done: {args.steps} steps on {world} tensor-parallel ranks, loss "
              f"{loss.item():.4f}, {syncs['forward']} forward syncs per step "
              f"(Megatron blocks: {2 * args.n_layer}), replicated weights agree: {agree}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
