"""Dense <-> sharded parameter layouts.

The dense layout is GPT-2's (Hugging Face Conv1D weights are [in, out]) under this
model's names: ``h.{i}.attn.c_attn.weight`` is [C, 3C] with q | k | v. The sharded
layout adds a leading shard dimension: column-parallel weights keep the columns of shard
r (for c_attn: q, k and v of shard r's heads), row-parallel weights keep its rows.
Everything else is replicated and identical in both layouts.
"""

from __future__ import annotations

import torch

COLUMN = ("attn.c_attn", "mlp.c_fc")
ROW = ("attn.c_proj", "mlp.c_proj")


def _role(name: str) -> str:
    for part in COLUMN:
        if f".{part}." in name:
            return "qkv" if part == "attn.c_attn" else "column"
    for part in ROW:
        if f".{part}.weight" in name:
            return "row"
    return "replicated"


def shard_tensor(name: str, dense: torch.Tensor, tp_size: int) -> torch.Tensor:
    """One dense parameter -> [tp_size, ...] shards (replicated ones come back unchanged)."""
    role, t = _role(name), tp_size
    if role == "replicated":
        return dense
    if role == "row":  # [in, out] -> [T, in/T, out]
        return dense.reshape(t, dense.shape[0] // t, dense.shape[1])
    is_bias = dense.dim() == 1
    d = dense.unsqueeze(0) if is_bias else dense  # [in, out]
    groups = 3 if role == "qkv" else 1
    rows, cols = d.shape
    d = d.reshape(rows, groups, t, cols // (groups * t)).permute(2, 0, 1, 3)
    return d.reshape(t, rows, cols // t)  # bias: [T, 1, out/T]


def merge_tensor(name: str, shards: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Inverse of shard_tensor."""
    role, t = _role(name), tp_size
    if role == "replicated":
        return shards
    if role == "row":
        return shards.reshape(-1, shards.shape[-1])
    groups = 3 if role == "qkv" else 1
    _, rows, per = shards.shape
    d = shards.reshape(t, rows, groups, per // groups).permute(1, 2, 0, 3)
    d = d.reshape(rows, groups * t * (per // groups))
    return d.squeeze(0) if name.endswith(".bias") else d


def shard_state_dict(dense: dict[str, torch.Tensor], tp_size: int, first: int,
                     count: int) -> dict[str, torch.Tensor]:
    """The state dict of a model holding shards ``[first, first + count)``."""
    out = {}
    for name, value in dense.items():
        if _role(name) == "replicated":
            out[name] = value
        else:
            out[name] = shard_tensor(name, value, tp_size)[first:first + count]
    return out


def merge_state_dict(sharded: dict[str, torch.Tensor], tp_size: int) -> dict[str, torch.Tensor]:
    """All shards' state dict ([T, ...] sharded tensors) -> the dense layout."""
    return {name: merge_tensor(name, value, tp_size) for name, value in sharded.items()}


def is_sharded(name: str) -> bool:
    return _role(name) != "replicated"
