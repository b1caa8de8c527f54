"""Sharded layers. Every weight carries a leading shard dimension (T emulated, 1 distributed).

ColumnParallelLinear splits output features, RowParallelLinear splits input features and
returns rank-local partial sums; its bias is replicated and *not* added here: the
residual stream adds it once, after the sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spd_ext.tp.communicator import TensorParallelComm


def _mark_sharded(p: nn.Parameter) -> nn.Parameter:
    p.tp_sharded = True  # leading dim is the shard dim; each rank owns its slices
    return p


def divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size != 0:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel size "
                         f"({tp_size})")
    return n // tp_size


class ColumnParallelLinear(nn.Module):
    """y_r = x_r W_r + b_r with W split by output features. [S, N, in] -> [S, N, out/T]."""

    def __init__(self, in_features: int, out_features: int, comm: TensorParallelComm,
                 bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        per = divide(out_features, comm.tp_size, "output features")
        self.weight = _mark_sharded(nn.Parameter(torch.empty(comm.shards, in_features, per)))
        self.bias = (_mark_sharded(nn.Parameter(torch.zeros(comm.shards, 1, per)))
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class RowParallelLinear(nn.Module):
    """Partial sums x_r W_r with W split by input features. [S, N, in/T] -> [S, N, out].

    ``bias`` (replicated, [out]) is for the caller to add once after the all-reduce.
    """

    def __init__(self, in_features: int, out_features: int, comm: TensorParallelComm,
                 bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        per = divide(in_features, comm.tp_size, "input features")
        self.weight = _mark_sharded(nn.Parameter(torch.empty(comm.shards, per, out_features)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight)


class ShardedCausalSelfAttention(nn.Module):
    """Causal self-attention with heads split across shards; returns partial outputs."""

    def __init__(self, n_embd: int, n_head: int, comm: TensorParallelComm, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.local_heads = divide(n_head, comm.tp_size, "n_head")
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.c_attn = ColumnParallelLinear(n_embd, 3 * n_embd, comm, bias)  # [q_r | k_r | v_r]
        self.c_proj = RowParallelLinear(n_embd, n_embd, comm, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, t, c = x.shape
        h, d = self.local_heads, self.head_dim
        q, k, v = self.c_attn(x.reshape(s, b * t, c)).split(h * d, dim=-1)
        q, k, v = (z.reshape(s * b, t, h, d).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(s, b * t, h * d)
        return self.c_proj(y).view(s, b, t, c)


class ShardedMLP(nn.Module):
    """GPT-2 MLP (tanh GELU) with the hidden layer split across shards; partial outputs."""

    def __init__(self, n_embd: int, comm: TensorParallelComm, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(n_embd, 4 * n_embd, comm, bias)
        self.c_proj = RowParallelLinear(4 * n_embd, n_embd, comm, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, t, c = x.shape
        hidden = F.gelu(self.c_fc(x.reshape(s, b * t, c)), approximate="tanh")
        return self.c_proj(hidden).view(s, b, t, c)


def gpt2_init_std(n_layer: int, residual_projection: bool) -> float:
    """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    return 0.02 / math.sqrt(2 * n_layer) if residual_projection else 0.02
