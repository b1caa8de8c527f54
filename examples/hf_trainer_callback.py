"""Hugging Face Trainer on DeepSpeed ZeRO-1, with spd_ext's signal weighting as a callback.

    deepspeed --num_gpus 2 examples/hf_trainer_callback.py
    deepspeed --num_gpus 2 examples/hf_trainer_callback.py --steps 5 --n-layer 2 --n-embd 32
    deepspeed --num_gpus 2 examples/hf_trainer_callback.py --model PATH   # a local GPT-2

(On a machine without GPUs the launcher starts CPU ranks: set DS_ACCELERATOR=cpu.)

Trainer creates the DeepSpeed engine itself, so spd_ext attaches afterwards:
`trainer.add_callback(SpdExtCallback(trainer))` reads the ds_config's "spd_ext" section
when training starts, makes the engine's gradient sum_i w_i g_i over the data-parallel
ranks (weights from their loss EMAs), and adds the weights to Trainer's logs. The model
is a small randomly initialized GPT-2 over TinyShakespeare's characters, or `--model`
(then the text is GPT-2 BPE). Prints Trainer's logs and finally `done: ...`.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from spd_ext.data import TokenDataset
from spd_ext.deepspeed import SpdExtCallback


class Windows(torch.utils.data.Dataset):
    """Consecutive windows of the training tokens; Trainer shards them over the ranks."""

    def __init__(self, data: TokenDataset, block_size: int) -> None:
        self.tokens, self.block_size = data.split("train"), block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.tokens[i * self.block_size:(i + 1) * self.block_size]
                             .astype("int64"))
        return {"input_ids": x, "labels": x}  # the model shifts the labels itself


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="local Hugging Face GPT-2 folder; None: a "
                   "new small GPT-2 over characters")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--block-size", type=int, default=64, help="context length")
    p.add_argument("--n-layer", type=int, default=4, help="new model only")
    p.add_argument("--n-head", type=int, default=4, help="new model only")
    p.add_argument("--n-embd", type=int, default=128, help="new model only")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear decay)")
    p.add_argument("--output-dir", default=None, help="Trainer's output; None: a temp dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by the deepspeed launcher")
    args = p.parse_args()

    if args.model:
        model = GPT2LMHeadModel.from_pretrained(args.model, local_files_only=True)
        data = TokenDataset("tinyshakespeare", "gpt2")
    else:
        data = TokenDataset("tinyshakespeare", "char")
        torch.manual_seed(0)  # the same initial weights on every rank
        model = GPT2LMHeadModel(GPT2Config(vocab_size=data.vocab_size,
                                           n_positions=args.block_size, n_layer=args.n_layer,
                                           n_head=args.n_head, n_embd=args.n_embd,
                                           bos_token_id=None, eos_token_id=None))

    ds_config = {  # "auto": Trainer fills these in from TrainingArguments
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": 1},
        "spd_ext": {"signal_weighting": {"signal": "loss_ema", "map": "softmax",
                                         "temperature": 0.1, "warmup_steps": 2}},
    }
    training_args = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="hf_trainer_callback_"),
        per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, max_grad_norm=1.0, deepspeed=ds_config, use_cpu=True,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
        disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args,
                      train_dataset=Windows(data, args.block_size))
    trainer.add_callback(SpdExtCallback(trainer))
    result = trainer.train()

    if trainer.is_world_process_zero():
        for logged in trainer.state.log_history:  # the callback's entries in Trainer's logs
            weights = [v for k, v in logged.items() if k.startswith("spd_ext/weight/")]
            if weights and "loss" in logged:
                print(f"step {logged['step']:4d}  loss {logged['loss']:.4f}  weights "
                      f"[{', '.join(f'{w:.3f}' for w in weights)}]")
        last = trainer.model_wrapped.spd_ext.last
        weights = ", ".join(f"{w:.3f}" for w in last["weights"])
        print(f"done: {result.global_step} steps, train loss {result.training_loss:.4f}, "
              f"weights [{weights}]")


if __name__ == "__main__":
    main()
