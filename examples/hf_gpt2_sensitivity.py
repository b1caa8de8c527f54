"""A Hugging Face GPT-2 turned into reduced-sync models, zero-shot: how much does each cost?

    python examples/hf_gpt2_sensitivity.py --model PATH        # a local GPT-2 folder
    python examples/hf_gpt2_sensitivity.py --model PATH --patterns "spd*12;grouped:4"

PATH is a folder with config.json and the weights, e.g. from
`huggingface-cli download gpt2 --local-dir gpt2` or `model.save_pretrained(PATH)`.
The dense weights are loaded into spd_ext's ReducedSyncGPT with each sync `--patterns`
entry (`spd_ext.tp.convert.from_hf`; `load_pretrained(PATH, pattern)` does the same from
the folder), emulating `--tp-size` shards, and evaluated on TinyShakespeare's validation
split (GPT-2 BPE) without any training. Pattern `tp*L` is exactly GPT-2 (checked against
the Hugging Face model first); the reduced patterns approximate it. Then, as
`spd-ext tp sensitivity --hf PATH` does, each block alone becomes an `spd` block: the
blocks whose loss barely moves are the ones to drop syncs from first.
Prints two tables and finally `done: ...`.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from spd_ext.data import TokenDataset
from spd_ext.experiments import sensitivity
from spd_ext.tp.convert import from_hf
from spd_ext.utils.table import format_table


def default_patterns(n_layer: int) -> list[str]:
    half = n_layer // 2
    if n_layer % 2:
        return [f"spd*{n_layer}"]
    return [f"[tp,spd]*{half}", f"spd*{n_layer}", f"[spd,parallel]*{half}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, default=argparse.SUPPRESS,
                   help="local Hugging Face GPT-2 folder")
    p.add_argument("--patterns", default=None,
                   help="';'-separated sync patterns; None: a few for the model's depth")
    p.add_argument("--tp-size", type=int, default=2, help="tensor-parallel shards emulated")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence (at most "
                   "the model's context)")
    p.add_argument("--no-per-block", action="store_true", help="skip the per-block table")
    p.add_argument("--seed", type=int, default=0, help="which validation windows")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    hf = GPT2LMHeadModel.from_pretrained(args.model, local_files_only=True).eval()
    n_layer, block = hf.config.n_layer, min(args.block_size, hf.config.n_positions)
    data = TokenDataset("tinyshakespeare", "gpt2")
    if hf.config.vocab_size < data.vocab_size:
        raise SystemExit(f"{args.model} has {hf.config.vocab_size} tokens; GPT-2 BPE needs "
                         f"{data.vocab_size}")
    batches = data.sampler(args.batch_size, block, args.seed)
    val = [batches("val", -1 - i) for i in range(args.eval_batches)]

    def evaluate(pattern: str) -> tuple[float, float]:
        """(mean validation loss, forward syncs per pass) of hf's weights under pattern."""
        model = from_hf(hf, pattern=pattern, tp_size=args.tp_size).eval()
        model.sync_counter.reset()
        loss = sum(model(x, y)[1].item() for x, y in val) / len(val)
        return loss, model.sync_counter.forward / len(val)

    dense = f"tp*{n_layer}"
    base, base_syncs = evaluate(dense)
    hf_loss = sum(F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
                  for x, y in val) / len(val)
    print(f"{args.model}: {n_layer} layers, {sum(q.numel() for q in hf.parameters()) / 1e6:.1f}M "
          f"parameters; {dense} vs Hugging Face: |delta loss| = {abs(base - hf_loss):.2e}")

    patterns = [q.strip() for q in args.patterns.split(";")] if args.patterns else \
        default_patterns(n_layer)
    rows = [[f"{dense} (dense)", base_syncs, base, 0.0, math.exp(base), 0.0]]
    for pattern in patterns:
        loss, syncs = evaluate(pattern)
        rows.append([pattern, syncs, loss, loss - base, math.exp(loss),
                     100 * (math.exp(loss - base) - 1)])
    print(format_table(["pattern", "syncs", "val loss", "delta loss", "perplexity",
                        "perplexity change %"], rows))

    if not args.no_per_block:  # the library's own analysis (spd-ext tp sensitivity)
        cfg = sensitivity.SensitivityConfig(hf=args.model, tp_size=args.tp_size,
                                            eval_batches=args.eval_batches,
                                            batch_size=args.batch_size, block_size=block,
                                            seed=args.seed)
        print(sensitivity.table(sensitivity.run(cfg)))

    best = min(rows[1:], key=lambda r: r[3])
    print(f"done: {len(patterns)} patterns vs dense on {len(val)} validation batches; "
          f"smallest loss increase {best[0]} ({best[3]:+.4f}, {best[1]:g} syncs vs "
          f"{base_syncs:g})")


if __name__ == "__main__":
    main()
