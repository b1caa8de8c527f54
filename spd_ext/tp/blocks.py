"""Transformer blocks that differ only in where the tensor-parallel all-reduces go.

Every block has the same constructor ``Block(n_embd, n_head, comm, dropout=0.0,
bias=True)`` and the same parameters (LayerNorms, sharded attention, sharded MLP), so
blocks swap freely in a pattern and load the same weights. ``forward`` takes a
ResidualStream (inside ReducedSyncGPT) or a plain [B, T, C] tensor (alone in a user's
model: the block then closes its own region and returns a tensor).

    tp        h = x + AR(Attn_r(LN1(x)));  y = h + AR(MLP_r(LN2(h)))          2 syncs
    spd       a_r = Attn_r(LN1(x)); y = x + AR(a_r + MLP_r(LN2(x + a_r)))      1 sync
    palm      y = x + AR(Attn_r(LN1(x)) + MLP_r(LN2(x)))                       1 sync
    parallel  x_r += Attn_r(LN1(x_r)); x_r += MLP_r(LN2(x_r))  (region stays open)  0
    ladder    like tp, each module reads the stream without the previous module's
              all-reduce, which runs meanwhile (Ladder residual)            2, hidden
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from spd_ext.tp.communicator import TensorParallelComm
from spd_ext.tp.kv_cache import LayerKVCache
from spd_ext.tp.layers import ShardedCausalSelfAttention, ShardedMLP
from spd_ext.tp.sharding import set_tensor_parallel_layout
from spd_ext.tp.stream import ResidualStream


class ReducedSyncBlock(nn.Module):
    """Parameters and plumbing shared by every block kind."""

    kind: ClassVar[str]

    def __init__(self, n_embd: int, n_head: int, comm: TensorParallelComm, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        self.comm = comm
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = ShardedCausalSelfAttention(n_embd, n_head, comm, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = ShardedMLP(n_embd, comm, bias)
        self.resid_dropout = nn.Dropout(dropout)
        for ln in (self.ln_1, self.ln_2):
            for p in ln.parameters():
                # Applied to rank-local views, so each rank holds part of their gradient.
                set_tensor_parallel_layout(p, partial_gradient=True)

    def attn_out(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention's rank-local contribution and its bias (for ResidualStream.add)."""
        out, bias = self.attn(self.ln_1(x), kv_cache)
        return self.resid_dropout(out), bias

    def mlp_out(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MLP's rank-local contribution and its bias (for ResidualStream.add)."""
        out, bias = self.mlp(self.ln_2(x))
        return self.resid_dropout(out), bias

    def forward(self, x: ResidualStream | torch.Tensor,
                kv_cache: LayerKVCache | None = None) -> ResidualStream | torch.Tensor:
        if isinstance(x, ResidualStream):
            self.run(x, kv_cache)
            return x
        stream = ResidualStream(x, self.comm)
        self.run(stream, kv_cache)
        return stream.finish()

    def run(self, s: ResidualStream, kv_cache: LayerKVCache | None = None) -> None:
        raise NotImplementedError


class TPBlock(ReducedSyncBlock):
    kind = "tp"

    def run(self, s: ResidualStream, kv_cache: LayerKVCache | None = None) -> None:
        s.add(*self.attn_out(s.local(), kv_cache))
        s.close()
        s.add(*self.mlp_out(s.local()))
        s.close()


class SPDBlock(ReducedSyncBlock):
    kind = "spd"

    def run(self, s: ResidualStream, kv_cache: LayerKVCache | None = None) -> None:
        s.add(*self.attn_out(s.local(), kv_cache))
        s.add(*self.mlp_out(s.local()))  # local() = x + a_r
        s.close()


class PaLMBlock(ReducedSyncBlock):
    kind = "palm"

    def run(self, s: ResidualStream, kv_cache: LayerKVCache | None = None) -> None:
        x = s.local()  # both modules read the same input
        s.add(*self.attn_out(x, kv_cache))
        s.add(*self.mlp_out(x))
        s.close()


class ParallelBlock(ReducedSyncBlock):
    kind = "parallel"

    def run(self, s: ResidualStream, kv_cache: LayerKVCache | None = None) -> None:
        s.add(*self.attn_out(s.local(), kv_cache))
        s.add(*self.mlp_out(s.local()))


class LadderBlock(ReducedSyncBlock):
    kind = "ladder"

    def run(self, s: ResidualStream, kv_cache: LayerKVCache | None = None) -> None:
        s.add(*self.attn_out(s.local(settle=False), kv_cache))
        s.close_async()
        s.add(*self.mlp_out(s.local(settle=False)))
        s.close_async()


BLOCKS: dict[str, type[ReducedSyncBlock]] = {
    cls.kind: cls for cls in (TPBlock, SPDBlock, ParallelBlock, PaLMBlock, LadderBlock)}
