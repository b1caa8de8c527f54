"""The reduced-sync GPT as a sequence of layers, for layer-wise (pipeline) parallelism.

    0      TokenEmbedding     idx -> wte(idx)                    (its weight is the head's)
    1      PositionEmbedding  x -> stream of drop(x + wpe(pos))
    2+i    BlockLayer         stream -> stream                   (block i of the pattern)
    2+L    FinalNorm          stream -> ln_f(stream.finish())
    3+L    the LM head        h -> h wte^T                       (lm_head, on layer 0's module)

They compute exactly what ReducedSyncGPT computes: within a stage the layers hand each
other the ResidualStream itself, so sync regions (``parallel`` blocks) and the Ladder's
pending all-reduce run across blocks as in the whole model; between stages the stream
travels as ``ResidualStream.to_tensors()``. Each layer's parameters have the whole model's
dense names under ``dense_name`` (``h.{i}.`` for block i), so any split of the layers loads
and saves ReducedSyncGPT's dense state dict (``load_dense``); :func:`initial_dense_weights`
draws ReducedSyncGPT(config, seed)'s initial weights for a subset of them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from spd_ext.errors import UsageError
from spd_ext.tp.blocks import BLOCKS
from spd_ext.tp.communicator import TensorParallelComm
from spd_ext.tp.config import GPTConfig
from spd_ext.tp.kv_cache import LayerKVCache
from spd_ext.tp.layers import gpt2_dense_init
from spd_ext.tp.patterns import parse_pattern
from spd_ext.tp.sharding import load_dense_shards_, set_tensor_parallel_layout
from spd_ext.tp.stream import ResidualStream


class StageLayer(nn.Module):
    """What every layer shares: its index, its parameters' dense names, its init."""

    #: the dense names' prefix for the layer's own names (``h.{i}.`` for a block)
    dense_prefix: ClassVar[str] = ""

    def __init__(self, config: GPTConfig, comm: TensorParallelComm, index: int) -> None:
        super().__init__()
        self.config, self.comm, self.index = config, comm, index

    def dense_name(self, local: str) -> str:
        return self.dense_prefix + local

    def local_names(self) -> dict[str, str]:
        """Dense name -> this layer's name, for every entry of its state dict."""
        return {self.dense_name(name): name for name in self.state_dict()}

    def load_dense(self, dense: dict[str, torch.Tensor]) -> None:
        """Load this layer's entries of a dense state dict (its shards)."""
        names = self.local_names()
        load_dense_shards_(self, {names[k]: dense[k] for k in names}, self.comm.tp_size,
                           self.comm.rank, self.comm.shards)


class TokenEmbedding(StageLayer):
    """``wte``; the LM head reuses its weight (:func:`lm_head`)."""

    dense_prefix = "wte."

    def __init__(self, config: GPTConfig, comm: TensorParallelComm, index: int = 0) -> None:
        super().__init__(config, comm, index)
        self.weight = set_tensor_parallel_layout(
            nn.Parameter(torch.empty(config.vocab_size, config.n_embd)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


def lm_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] from the final hidden state, with the tied embedding."""
    return F.linear(hidden, embedding.weight)


class PositionEmbedding(StageLayer):
    """``wpe`` and the embedding dropout; opens the residual stream."""

    def __init__(self, config: GPTConfig, comm: TensorParallelComm, index: int = 1) -> None:
        super().__init__(config, comm, index)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        set_tensor_parallel_layout(self.wpe.weight)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, start: int = 0) -> ResidualStream:
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        return ResidualStream(self.drop(x + self.wpe(pos)), self.comm)


class BlockLayer(StageLayer):
    """Block ``block_index`` of the pattern. ``recompute``: activation checkpointing (the
    block's activations are recomputed in backward, its forward syncs with them)."""

    def __init__(self, config: GPTConfig, comm: TensorParallelComm, index: int,
                 block_index: int, recompute: bool = False) -> None:
        super().__init__(config, comm, index)
        self.block_index = block_index
        self.kind = parse_pattern(config.pattern, config.n_layer)[block_index]
        self.block = BLOCKS[self.kind](config.n_embd, config.n_head, comm, config.dropout,
                                       config.bias)
        self.recompute = recompute

    def dense_name(self, local: str) -> str:
        return f"h.{self.block_index}." + local.removeprefix("block.")

    def forward(self, stream: ResidualStream,
                kv_cache: LayerKVCache | None = None) -> ResidualStream:
        with self.comm.counter.scope(f"{self.block_index}:{self.kind}"):
            if self.recompute and self.training and torch.is_grad_enabled():
                comm = self.comm

                def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    inner = ResidualStream.from_tensors(tensors, comm)
                    self.block(inner)
                    return inner.to_tensors()

                out = checkpoint(run, *stream.to_tensors(), use_reentrant=False)
                return ResidualStream.from_tensors(out, comm)
            self.block(stream, kv_cache)
            return stream


class FinalNorm(StageLayer):
    """Closes the stream (one last sync if a region is open) and applies ``ln_f``."""

    def __init__(self, config: GPTConfig, comm: TensorParallelComm, index: int) -> None:
        super().__init__(config, comm, index)
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        for p in self.ln_f.parameters():
            set_tensor_parallel_layout(p)

    def forward(self, stream: ResidualStream) -> torch.Tensor:
        with self.comm.counter.scope("final"):
            x = stream.finish()
        return self.ln_f(x)


def layer_classes(config: GPTConfig) -> list[tuple[type[StageLayer], dict]]:
    """The model's layers in order: each one's class and its arguments after (config,
    comm); the last entry is the head, which reuses the first's module."""
    n = config.n_layer
    return [(TokenEmbedding, {"index": 0}), (PositionEmbedding, {"index": 1}),
            *((BlockLayer, {"index": 2 + i, "block_index": i}) for i in range(n)),
            (FinalNorm, {"index": 2 + n}), (TokenEmbedding, {"index": 0})]


def partition_by_blocks(n_layer: int, stages: int) -> list[int]:
    """Stage boundaries over layer_classes' positions (stage s holds ``[parts[s],
    parts[s+1])``): the blocks spread as evenly as they go, earlier stages taking the
    extra ones; the embeddings go with the first stage, the final LayerNorm and the head
    with the last."""
    if not 1 <= stages <= n_layer:
        raise UsageError(f"{stages} pipeline stages for {n_layer} blocks: each stage needs a "
                         f"block; use 1 to {n_layer} stages")
    parts, first = [0], 2
    for s in range(stages):
        first += n_layer // stages + (1 if s < n_layer % stages else 0)
        parts.append(first)
    parts[-1] = n_layer + 4
    return parts


def initial_dense_weights(config: GPTConfig, seed: int, names: set[str],
                          order: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """ReducedSyncGPT(config, seed)'s initial value of each dense parameter in ``names``:
    the whole model's draws in its ``order`` (``dense_shapes``), one tensor alive at a
    time, so that a stage holds the weights the whole model would start from."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in order:
        value = gpt2_dense_init(name, shape, config.n_layer, g)
        if name in names:
            out[name] = value
    return out


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ReducedSyncGPT's loss: cross-entropy over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
