"""Reduced-sync tensor parallelism: regions, sharded layers, blocks, patterns, GPT model."""

from spd_ext.utils.lazy import lazy_exports

# Loaded on first use: the model's shape (spd_ext.tp.config) and the patterns are read by the
# command line without loading torch.
_EXPORTS = {
    **dict.fromkeys(["BLOCKS", "LadderBlock", "PaLMBlock", "ParallelBlock", "ReducedSyncBlock",
                     "SPDBlock", "TPBlock"], "spd_ext.tp.blocks"),
    **dict.fromkeys(["DistributedComm", "EmulatedComm", "TensorParallelComm"],
                    "spd_ext.tp.communicator"),
    **dict.fromkeys(["ColumnParallelLinear", "RowParallelLinear", "ShardedCausalSelfAttention",
                     "ShardedMLP"], "spd_ext.tp.layers"),
    "GPTConfig": "spd_ext.tp.config",
    "ReducedSyncGPT": "spd_ext.tp.model",
    **dict.fromkeys(["check_tp_size", "initialize_model_parallel"], "spd_ext.tp.parallel_state"),
    **dict.fromkeys(["BLOCK_KINDS", "PatternError", "parse_pattern"], "spd_ext.tp.patterns"),
    **dict.fromkeys(["copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region"],
                    "spd_ext.tp.regions"),
    **dict.fromkeys(["ShardedModel", "TensorParallelLayout", "set_tensor_parallel_layout",
                     "tensor_parallel_layout"], "spd_ext.tp.sharding"),
    "ResidualStream": "spd_ext.tp.stream",
    "SyncCounter": "spd_ext.tp.sync_counter",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
