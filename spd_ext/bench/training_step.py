"""What the training-step benchmarks share (`spd-ext bench deepspeed`, `bench ddp-hook`):
the GPT they time, the ranks, the variants and the step counts, checked before any rank
starts."""

from __future__ import annotations

import os
import platform
from collections.abc import Collection
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from spd_ext.errors import UsageError


@dataclass
class TrainingStepBenchConfig:
    nproc: int = 2
    variants: str = ""  # comma list of KNOWN_VARIANTS; empty: all of them
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    batch_size: int = 4
    seq_len: int = 64
    vocab_size: int = 65
    warmup: int = 3
    steps: int = 10

    #: the variant names a benchmark knows (set by each subclass)
    KNOWN_VARIANTS: ClassVar[Collection[str]] = ()

    def variant_list(self) -> list[str]:
        names = [v.strip() for v in self.variants.split(",") if v.strip()] \
            or list(self.KNOWN_VARIANTS)
        bad = [v for v in names if v not in self.KNOWN_VARIANTS]
        if bad:
            raise UsageError(f"unknown variant(s) {bad}; use a comma list of "
                             f"{', '.join(self.KNOWN_VARIANTS)}")
        return names

    def check(self) -> None:
        self.variant_list()
        if self.nproc < 2:
            raise UsageError(f"--nproc must be at least 2, got {self.nproc}")
        for name in ("steps", "batch_size", "seq_len", "n_layer"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        self.gpt_config()  # raises on an impossible shape (heads not dividing the width)

    def gpt_config(self):  # noqa: ANN201 - spd_ext.tp is imported lazily
        from spd_ext.tp import GPTConfig

        return GPTConfig(block_size=self.seq_len, vocab_size=self.vocab_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         pattern=f"tp*{self.n_layer}", tp_size=1)

    def describe_ranks_and_model(self, rows: list[dict]) -> str:
        """"N CPU ranks of HOST (C cores); GPT L/d/h (P parameters, G MiB of gradients"
        (the caller closes the parenthesis)."""
        params = rows[0]["params"] if rows else 0
        mb = rows[0]["grad_bytes"] / 2**20 if rows else 0
        return (f"{self.nproc} CPU ranks of {platform.node()} ({os.cpu_count()} cores); GPT "
                f"{self.n_layer}L/{self.n_embd}d/{self.n_head}h ({params / 1e6:.1f}M "
                f"parameters, {mb:.1f} MiB of gradients")

    def describe_timing(self) -> str:
        return (f"batch {self.batch_size} x {self.seq_len} per rank; median of {self.steps} "
                f"steps after {self.warmup} (variants interleaved step by step; best: the "
                "fastest step), slowest rank")

    def batch(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's fixed batch (inputs, targets), timed in every step."""
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(self.vocab_size, (self.batch_size, self.seq_len), generator=g)
        return x, torch.randint(self.vocab_size, (self.batch_size, self.seq_len), generator=g)

    def model(self) -> nn.Module:
        """The dense GPT every variant times (seeded: the same weights in every variant)."""
        from spd_ext.tp import ReducedSyncGPT

        torch.manual_seed(0)
        return ReducedSyncGPT(self.gpt_config())
