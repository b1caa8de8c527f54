"""Your own nanoGPT-style loop on DeepSpeed, with spd_ext's signal-weighted gradients.

    deepspeed --num_gpus 2 examples/nanogpt_deepspeed.py
    deepspeed --num_gpus 2 examples/nanogpt_deepspeed.py --steps 5 --n-layer 2 --n-embd 32
    deepspeed --num_gpus 2 examples/nanogpt_deepspeed.py --corrupt-rank 1   # a noisy shard

(On a machine without GPUs the launcher starts CPU ranks: set DS_ACCELERATOR=cpu.)

The loop is the usual forward / engine.backward / engine.step. The only spd_ext parts
are `spd_ext.deepspeed.initialize` (deepspeed.initialize's arguments and return tuple)
and the ds_config's "spd_ext" section: each step, every data-parallel rank's gradient
g_i is combined as g = sum_i w_i g_i, with weights from the ranks' loss EMAs (softmax),
instead of the plain mean. Data: TinyShakespeare, characters, one contiguous shard per
rank (`--corrupt-rank R` swaps 30% of rank R's tokens: watch its weight drop).
The model is spd_ext's ReducedSyncGPT, emulating `--tp-size` tensor-parallel shards
with a reduced-sync `--pattern` inside each process. Prints `done: ...` at the end.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import spd_ext.deepspeed as sd
from spd_ext.data import Corruption, ShardedSampler, TokenDataset
from spd_ext.tp import GPTConfig, ReducedSyncGPT


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--block-size", type=int, default=64, help="context length")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-embd", type=int, default=128, help="model width")
    p.add_argument("--pattern", default=None,
                   help="sync pattern, e.g. '[tp,spd]*2'; None: spd*N_LAYER")
    p.add_argument("--tp-size", type=int, default=2, help="tensor-parallel shards emulated")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1], help="DeepSpeed ZeRO stage")
    p.add_argument("--signal", default="loss_ema",
                   choices=["loss_ema", "grad_norm_stability", "cosine_to_prev_global"],
                   help="per-rank signal the weights come from")
    p.add_argument("--map", default="softmax", choices=["softmax", "inverse"],
                   help="signal -> weight map")
    p.add_argument("--temperature", type=float, default=0.1, help="softmax temperature")
    p.add_argument("--corrupt-rank", type=int, default=None,
                   help="corrupt this data-parallel rank's shard (30%% token swaps)")
    p.add_argument("--eval-interval", type=int, default=50, help="steps between val evals")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per eval")
    p.add_argument("--seed", type=int, default=1337, help="weights and batches")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; unused")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.1,
                                                  "betas": [0.9, 0.99], "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 10**9,
        "spd_ext": {"signal_weighting": {"signal": args.signal, "map": args.map,
                                         "temperature": args.temperature, "floor": 0.05,
                                         "warmup_steps": 10}},
    }

    data = TokenDataset("tinyshakespeare", "char")  # $SPD_EXT_DATA_DIR, cache or download
    config = GPTConfig(block_size=args.block_size, vocab_size=data.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       pattern=args.pattern or f"spd*{args.n_layer}", tp_size=args.tp_size)
    model = ReducedSyncGPT(config, seed=args.seed)  # the same weights on every rank
    engine, _, _, _ = sd.initialize(model=model, model_parameters=model.parameters(),
                                    config=ds_config)
    rank, world = dist.get_rank(), dist.get_world_size()
    corrupt = () if args.corrupt_rank is None else (args.corrupt_rank,)
    batches = ShardedSampler(data, rank, world, args.batch_size, args.block_size, args.seed,
                             sharding="clean_vs_corrupt" if corrupt else "iid",
                             corrupt_ranks=corrupt, corruption=Corruption("token_swap", 0.3))

    @torch.no_grad()
    def val_loss() -> float:  # clean validation batches, the same on every rank
        engine.eval()
        loss = sum(engine(*batches("val", i))[1].item() for i in range(args.eval_batches))
        engine.train()
        return loss / args.eval_batches

    if rank == 0:
        print(f"{model.num_params() / 1e3:.0f}K parameters, pattern {config.pattern}, "
              f"{world} data-parallel ranks, ZeRO-{args.zero_stage}")
    t0 = time.time()
    for step in range(args.steps):
        x, y = batches("train", step)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()  # g = sum_i w_i g_i, then clipping and AdamW
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            weights = ", ".join(f"{w:.3f}" for w in engine.spd_ext.last["weights"])
            print(f"step {step:4d}  loss {loss.item():.4f}  weights [{weights}]  "
                  f"{(time.time() - t0) * 1000 / (step + 1):.0f} ms/step")
        if args.eval_interval and step > 0 and step % args.eval_interval == 0:
            val = val_loss()
            if rank == 0:
                print(f"step {step:4d}  val loss {val:.4f}")

    val = val_loss()
    weights = ", ".join(f"{w:.3f}" for w in engine.spd_ext.last["weights"])
    if rank == 0:
        print(f"done: {args.steps} steps, train loss {loss.item():.4f}, val loss {val:.4f}, "
              f"weights [{weights}]")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
