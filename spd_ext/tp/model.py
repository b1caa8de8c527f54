"""ReducedSyncGPT: a GPT-2 whose blocks follow a sync pattern, emulated or distributed.

nanoGPT's model with tensor-parallel blocks. One config, two modes with the same math:
emulated (``EmulatedComm(T)``: all T shards in this process, batched along a leading
shard dimension, so a step costs about what the dense model costs) and distributed
(``DistributedComm(group)``: one shard per rank). With pattern ``tp*L`` it computes
exactly GPT-2 (Hugging Face's included, see spd_ext.tp.convert).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spd_ext.tp.blocks import BLOCKS
from spd_ext.tp.communicator import DistributedComm, EmulatedComm, TensorParallelComm
from spd_ext.tp.layers import gpt2_init_std
from spd_ext.tp.patterns import parse_pattern
from spd_ext.tp.sharding import is_sharded, merge_state_dict, shard_state_dict
from spd_ext.tp.stream import ResidualStream


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    pattern: str = "tp*12"
    tp_size: int = 2

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "tp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        parse_pattern(self.pattern, self.n_layer)  # fail early, naming the bad token
        for name in ("n_head", "n_embd"):
            if getattr(self, name) % self.tp_size != 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be divisible by "
                                 f"tp_size ({self.tp_size})")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)


class ReducedSyncGPT(nn.Module):
    def __init__(self, config: GPTConfig, comm: TensorParallelComm | None = None,
                 seed: int | None = 0) -> None:
        """``comm`` defaults to emulating ``config.tp_size`` shards; ``seed=None`` skips
        initialization (for loading weights or building on the meta device)."""
        super().__init__()
        comm = comm or EmulatedComm(config.tp_size)
        if comm.tp_size != config.tp_size:
            raise ValueError(f"config.tp_size is {config.tp_size} but the communicator spans "
                             f"{comm.tp_size} shards")
        self.config, self.comm = config, comm
        self.kinds = parse_pattern(config.pattern, config.n_layer)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(
            BLOCKS[kind](config.n_embd, config.n_head, comm, config.dropout, config.bias)
            for kind in self.kinds)
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        if seed is not None:
            self.reset_parameters(seed)

    @property
    def sync_counter(self):
        return self.comm.counter

    # -- weights ------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 initialization drawn in the dense layout, so it is the same model for
        every tensor-parallel size and mode."""
        g = torch.Generator().manual_seed(seed)
        dense = {}
        for name, p in self.dense_shapes().items():
            if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
                dense[name] = torch.ones(p)
            elif name.endswith(".bias"):
                dense[name] = torch.zeros(p)
            else:
                std = gpt2_init_std(self.config.n_layer, name.endswith("c_proj.weight"))
                dense[name] = torch.randn(p, generator=g) * std
        self.load_dense_state_dict(dense)

    def dense_shapes(self) -> dict[str, torch.Size]:
        """Every parameter's shape in the dense (GPT-2) layout, in a fixed order."""
        shapes = {}
        t = self.config.tp_size
        for name, p in self.named_parameters():
            if is_sharded(name):
                shape = list(p.shape)
                shape[0] = t * p.shape[0] // self.comm.shards
                full = torch.empty(shape, device="meta")
                merged = merge_state_dict({name: full}, t)[name]
                shapes[name] = merged.shape
            else:
                shapes[name] = p.shape
        return shapes

    @torch.no_grad()
    def load_dense_state_dict(self, dense: dict[str, torch.Tensor]) -> None:
        """Load GPT-2-layout weights, keeping this process's shards."""
        own = shard_state_dict(dense, self.config.tp_size, self.comm.rank, self.comm.shards)
        missing = set(self.state_dict()) - set(own)
        unexpected = set(own) - set(self.state_dict())
        if missing or unexpected:
            raise KeyError(f"state dict does not fit this model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for name, p in self.state_dict().items():
            if own[name].shape != p.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(own[name].shape)} (after "
                                 f"sharding) does not match the model's {tuple(p.shape)}; "
                                 "check n_layer, n_embd, n_head, vocab_size and block_size")
            p.copy_(own[name])

    @torch.no_grad()
    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the dense layout (collective in the distributed mode)."""
        local = {k: v.detach() for k, v in self.state_dict().items()}
        if not self.comm.emulated:
            assert isinstance(self.comm, DistributedComm)
            for name, v in local.items():
                if is_sharded(name):
                    parts = [torch.empty_like(v) for _ in range(self.comm.tp_size)]
                    dist.all_gather(parts, v.contiguous(), group=self.comm.group)
                    local[name] = torch.cat(parts, 0)
        return {k: v.clone() for k, v in merge_state_dict(local, self.config.tp_size).items()}

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of the whole model (all shards), GPT-2's way of counting."""
        n = sum(torch.Size(s).numel() for s in self.dense_shapes().values())
        return n - self.wpe.weight.numel() if non_embedding else n

    # -- training helpers ---------------------------------------------------------
    def sync_partial_grads_(self) -> None:
        """Sum, over the tensor-parallel group, the gradients of replicated parameters
        that are applied to rank-local views (the blocks' LayerNorms). One bucketed
        all-reduce per step in the distributed mode; nothing to do when emulated."""
        grads = [p.grad for p in self.parameters()
                 if getattr(p, "tp_partial_grad", False) and p.grad is not None]
        if grads and not self.comm.emulated:
            self.comm.all_reduce_params_(grads)
            self.comm.counter.grad_syncs += 1

    # -- forward ------------------------------------------------------------------
    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        stream = ResidualStream(self.drop(self.wte(idx) + self.wpe(pos)), self.comm)
        counter = self.comm.counter
        for i, (kind, block) in enumerate(zip(self.kinds, self.h)):
            with counter.scope(f"{i}:{kind}"):
                block(stream)
        with counter.scope("final"):
            x = stream.finish()
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied embeddings
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
