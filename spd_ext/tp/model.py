"""ReducedSyncGPT: a GPT-2 whose blocks follow a sync pattern, emulated or distributed.

nanoGPT's model with tensor-parallel blocks. One config, two modes with the same math:
emulated (``EmulatedComm(T)``: all T shards in this process, batched along a leading
shard dimension, so a step costs about what the dense model costs) and distributed
(``DistributedComm(group)``: one shard per rank). With pattern ``tp*L`` it computes
exactly GPT-2 (Hugging Face's included, see spd_ext.tp.convert).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spd_ext.errors import UsageError
from spd_ext.tp.blocks import BLOCKS
from spd_ext.tp.communicator import EmulatedComm, TensorParallelComm
from spd_ext.tp.config import GPTConfig
from spd_ext.tp.generation import DecodeStep, generate_steps
from spd_ext.tp.kv_cache import KVCache, LayerKVCache
from spd_ext.tp.layers import gpt2_dense_init
from spd_ext.tp.patterns import parse_pattern
from spd_ext.tp.sharding import (
    dense_shapes,
    gather_dense_state_dict,
    load_dense_shards_,
    set_tensor_parallel_layout,
    tensor_parallel_layout,
)
from spd_ext.tp.stream import ResidualStream


class ReducedSyncGPT(nn.Module):
    def __init__(self, config: GPTConfig, comm: TensorParallelComm | None = None,
                 seed: int | None = 0) -> None:
        """``comm`` defaults to emulating ``config.tp_size`` shards; ``seed=None`` skips
        initialization (for loading weights or building on the meta device)."""
        super().__init__()
        comm = comm or EmulatedComm(config.tp_size)
        if comm.tp_size != config.tp_size:
            raise UsageError(f"config.tp_size is {config.tp_size} but the communicator spans "
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
        for module in (self.wte, self.wpe, self.ln_f):
            for p in module.parameters():
                set_tensor_parallel_layout(p)  # replicated, full gradient on every rank
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
        self.load_dense_state_dict({name: gpt2_dense_init(name, shape, self.config.n_layer, g)
                                    for name, shape in self.dense_shapes().items()})

    def dense_shapes(self) -> dict[str, torch.Size]:
        """Every parameter's shape in the dense (GPT-2) layout, in a fixed order."""
        return dense_shapes(self)

    def load_dense_state_dict(self, dense: dict[str, torch.Tensor]) -> None:
        """Load GPT-2-layout weights, keeping this process's shards."""
        load_dense_shards_(self, dense, self.config.tp_size, self.comm.rank, self.comm.shards)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the dense layout (collective in the distributed mode)."""
        return gather_dense_state_dict(self, self.comm)

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
                 if tensor_parallel_layout(p).partial_gradient and p.grad is not None]
        if grads and not self.comm.emulated:
            self.comm.all_reduce_params_(grads)
            self.comm.counter.grad_syncs += 1

    # -- forward ------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] (and the loss with ``targets``). With ``kv_cache`` the tokens
        continue the cached positions, which they attend to, and are cached in turn."""
        logits = F.linear(self.final_hidden(idx, kv_cache), self.wte.weight)  # tied embeddings
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def final_hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The forward up to the LM head: ``ln_f`` of the last block's output, [B, T, C],
        replicated on every rank (generation applies the head to the positions and
        vocabulary rows it needs)."""
        b, t = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + t > self.config.block_size:
            raise UsageError(f"sequence of {start + t} tokens is longer than block_size "
                             f"{self.config.block_size}")
        if kv_cache is not None and (len(kv_cache.layers) != len(self.h)
                                     or kv_cache.batch_size != b):
            raise UsageError(f"this KV cache was made for {len(kv_cache.layers)} blocks and "
                             f"batch {kv_cache.batch_size}, not {len(self.h)} and {b}; make "
                             "one with model.new_kv_cache(batch_size, max_len)")
        pos = torch.arange(start, start + t, device=idx.device)
        stream = ResidualStream(self.drop(self.wte(idx) + self.wpe(pos)), self.comm)
        counter = self.comm.counter
        for i, (kind, block) in enumerate(zip(self.kinds, self.h)):
            with counter.scope(f"{i}:{kind}"):
                block(stream, None if kv_cache is None else kv_cache.layers[i])
        with counter.scope("final"):
            x = stream.finish()
        return self.ln_f(x)

    # -- generation -----------------------------------------------------------------
    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` positions
        (default: the context), in the parameters' dtype and device."""
        max_len = self.config.block_size if max_len is None else max_len
        if not 1 <= max_len <= self.config.block_size:
            raise UsageError(f"max_len must be in [1, {self.config.block_size}], got {max_len}")
        w = self.wte.weight
        layers = [LayerKVCache(self.comm.shards * batch_size, block.attn.local_heads, max_len,
                               block.attn.head_dim, w.dtype, w.device) for block in self.h]
        return KVCache(layers, batch_size)

    def generate_steps(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, seed: int | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       vocab_size: int | None = None) -> Iterator[DecodeStep]:
        """KV-cached generation one step at a time (see spd_ext.tp.generation): the
        prefill, then one token per sequence per step, each with its sync count and time;
        ``should_stop`` (on the group's first rank) ends it early on every rank;
        ``vocab_size`` keeps the tokens below a tokenizer's vocabulary."""
        return generate_steps(self, idx, max_new_tokens, temperature, top_k, seed, should_stop,
                              vocab_size)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None) -> torch.Tensor:
        """``idx`` [B, T] followed by ``max_new_tokens`` sampled tokens (temperature 0:
        greedy), with a KV cache: the prompt in one forward, then one token per forward.
        Every rank of a distributed model calls it together and gets the same tokens."""
        new = [step.tokens[:, None] for step in
               generate_steps(self, idx, max_new_tokens, temperature, top_k, seed)]
        return torch.cat([idx, *new], dim=1)
