"""Sharded layers. Every weight carries a leading shard dimension (T emulated, 1 distributed).

ColumnParallelLinear splits output features, RowParallelLinear splits input features and
returns rank-local partial sums together with its replicated bias, which it does not add
(Megatron's ``skip_bias_add``): the residual stream adds it once, after the sum. Every
parameter records its layout (spd_ext.tp.sharding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spd_ext.errors import UsageError
from spd_ext.tp.communicator import TensorParallelComm
from spd_ext.tp.kv_cache import LayerKVCache, causal_mask
from spd_ext.tp.sharding import set_tensor_parallel_layout


def divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size != 0:
        raise UsageError(f"{what} ({n}) must be divisible by the tensor-parallel size "
                         f"({tp_size})")
    return n // tp_size


class ColumnParallelLinear(nn.Module):
    """y_r = x_r W_r + b_r with W split by output features. [S, N, in] -> [S, N, out/T].

    ``stride``: the output features are this many equal blocks, each split across the
    shards separately (Megatron's ``stride``; attention's q | k | v: 3, so that shard r
    gets the q, k and v of its heads).
    """

    def __init__(self, in_features: int, out_features: int, comm: TensorParallelComm,
                 bias: bool = True, stride: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        per = divide(out_features, comm.tp_size, "output features")
        if per % stride != 0:
            raise UsageError(f"output features ({out_features}) must be {stride} blocks each "
                             f"divisible by the tensor-parallel size ({comm.tp_size})")
        self.weight = set_tensor_parallel_layout(
            nn.Parameter(torch.empty(comm.shards, in_features, per)), partition_dim=1,
            partition_stride=stride, dense_shape=(in_features, out_features))
        self.bias = None
        if bias:  # [1, out/T] per shard: broadcasts over the tokens
            self.bias = set_tensor_parallel_layout(
                nn.Parameter(torch.zeros(comm.shards, 1, per)), partition_dim=0,
                partition_stride=stride, dense_shape=(out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class RowParallelLinear(nn.Module):
    """Partial sums x_r W_r with W split by input features. [S, N, in/T] -> [S, N, out].

    ``forward`` returns ``(partial sums, bias)``: the bias (replicated, [out], or None) is
    not added to the rank-local partial sums but handed to the caller, to add once after
    their all-reduce (Megatron's ``skip_bias_add``; in a block, ``ResidualStream.add``).
    """

    def __init__(self, in_features: int, out_features: int, comm: TensorParallelComm,
                 bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        per = divide(in_features, comm.tp_size, "input features")
        self.weight = set_tensor_parallel_layout(
            nn.Parameter(torch.empty(comm.shards, per, out_features)), partition_dim=0,
            dense_shape=(in_features, out_features))
        self.bias = (set_tensor_parallel_layout(nn.Parameter(torch.zeros(out_features)))
                     if bias else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.bmm(x, self.weight), self.bias


class ShardedCausalSelfAttention(nn.Module):
    """Causal self-attention with heads split across shards. Returns the partial outputs
    and the output projection's bias, to add once after their all-reduce."""

    def __init__(self, n_embd: int, n_head: int, comm: TensorParallelComm, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise UsageError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.local_heads = divide(n_head, comm.tp_size, "n_head")
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.c_attn = ColumnParallelLinear(n_embd, 3 * n_embd, comm, bias,
                                           stride=3)  # [q_r | k_r | v_r]
        self.c_proj = RowParallelLinear(n_embd, n_embd, comm, bias)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``kv_cache``: attend to the cached positions too, and cache these (generation)."""
        s, b, t, c = x.shape
        h, d = self.local_heads, self.head_dim
        q, k, v = self.c_attn(x.reshape(s, b * t, c)).split(h * d, dim=-1)
        q, k, v = (z.reshape(s * b, t, h, d).transpose(1, 2) for z in (q, k, v))
        mask = None
        if kv_cache is not None:
            cached = kv_cache.length
            k, v = kv_cache.append(k, v)
            mask = causal_mask(t, cached, x.device)
            causal = cached == 0 and t > 1
        else:
            causal = True
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(s, b * t, h * d)
        out, bias = self.c_proj(y)
        return out.view(s, b, t, c), bias


class ShardedMLP(nn.Module):
    """GPT-2 MLP (tanh GELU) with the hidden layer split across shards. Returns the partial
    outputs and the output projection's bias, to add once after their all-reduce."""

    def __init__(self, n_embd: int, comm: TensorParallelComm, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(n_embd, 4 * n_embd, comm, bias)
        self.c_proj = RowParallelLinear(4 * n_embd, n_embd, comm, bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s, b, t, c = x.shape
        hidden = F.gelu(self.c_fc(x.reshape(s, b * t, c)), approximate="tanh")
        out, bias = self.c_proj(hidden)
        return out.view(s, b, t, c), bias


def gpt2_init_std(n_layer: int, residual_projection: bool) -> float:
    """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    return 0.02 / math.sqrt(2 * n_layer) if residual_projection else 0.02


def gpt2_dense_init(name: str, shape: torch.Size, n_layer: int,
                    generator: torch.Generator) -> torch.Tensor:
    """The GPT-2 initial value of the dense parameter ``name`` (ReducedSyncGPT's names):
    LayerNorm weights one, biases zero, the rest N(0, std) drawn from ``generator``."""
    if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = gpt2_init_std(n_layer, name.endswith("c_proj.weight"))
    return torch.randn(shape, generator=generator) * std
