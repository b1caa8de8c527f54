"""Reduced-sync tensor parallelism: regions, sharded layers, blocks, patterns, GPT model."""

from spd_ext.tp.blocks import (
    BLOCKS,
    LadderBlock,
    PaLMBlock,
    ParallelBlock,
    ReducedSyncBlock,
    SPDBlock,
    TPBlock,
)
from spd_ext.tp.communicator import DistributedComm, EmulatedComm, TensorParallelComm
from spd_ext.tp.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedCausalSelfAttention,
    ShardedMLP,
)
from spd_ext.tp.model import GPTConfig, ReducedSyncGPT
from spd_ext.tp.parallel_state import check_tp_size, initialize_model_parallel
from spd_ext.tp.patterns import BLOCK_KINDS, PatternError, parse_pattern
from spd_ext.tp.regions import copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region
from spd_ext.tp.sharding import (
    ShardedModel,
    TensorParallelLayout,
    set_tensor_parallel_layout,
    tensor_parallel_layout,
)
from spd_ext.tp.stream import ResidualStream
from spd_ext.tp.sync_counter import SyncCounter

__all__ = [
    "BLOCKS", "BLOCK_KINDS", "ColumnParallelLinear", "DistributedComm", "EmulatedComm",
    "GPTConfig", "LadderBlock", "PaLMBlock", "ParallelBlock",
    "PatternError", "ReducedSyncBlock", "ReducedSyncGPT", "ResidualStream", "RowParallelLinear",
    "SPDBlock", "ShardedCausalSelfAttention", "ShardedMLP", "ShardedModel", "SyncCounter",
    "TPBlock", "TensorParallelComm", "TensorParallelLayout", "check_tp_size",
    "copy_to_tensor_parallel_region", "initialize_model_parallel", "parse_pattern",
    "reduce_from_tensor_parallel_region", "set_tensor_parallel_layout", "tensor_parallel_layout",
]
