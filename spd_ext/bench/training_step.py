"""What the training-step benchmarks time (`spd-ext bench deepspeed`, `bench ddp-hook`): each
rank's fixed batch and the dense GPT (their configuration: spd_ext.bench.config)."""

from __future__ import annotations

import torch
from torch import nn

from spd_ext.bench.config import TrainingStepBenchConfig


def fixed_batch(cfg: TrainingStepBenchConfig, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's fixed batch (inputs, targets), timed in every step."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
    return x, torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)


def dense_model(cfg: TrainingStepBenchConfig) -> nn.Module:
    """The dense GPT every variant times (seeded: the same weights in every variant)."""
    from spd_ext.tp import ReducedSyncGPT

    torch.manual_seed(0)
    return ReducedSyncGPT(cfg.gpt_config())
