"""The reduced-sync GPT as a DeepSpeed pipeline: pipeline x tensor x data parallelism.

    pipe = spd_ext.deepspeed.pipeline_module(GPTConfig(..., tp_size=T), num_stages=P)
    engine, *_ = spd_ext.deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(),
                                              config=ds_config)
    loss = engine.train_batch(iter(batches))   # batches of (idx, targets)

``pipeline_module`` returns a ``deepspeed.pipe.PipelineModule`` of spd_ext.tp.stages's
layers: the embedding, the blocks of any pattern, the final LayerNorm and the head, the
token embedding tied across the first and last stage (``TiedLayerSpec``). The world is
``P x dp x T`` (DeepSpeed's ``PipeModelDataParallelTopology``: the stage slowest, the
tensor-parallel rank fastest), and inside each stage the blocks are tensor-parallel over
the ranks ``[k*T, (k+1)*T)``, spd_ext's tensor-parallel groups. Stage boundaries carry the
residual stream as tensors (``ResidualStream.to_tensors``), each tensor-parallel rank to
the same rank of the next stage, so DeepSpeed's partitioning of activations across the
tensor-parallel group (which assumes them replicated) is turned off.

Checkpoints are DeepSpeed's pipeline checkpoints (a file per layer and tensor-parallel
rank); ``dense_state_dict`` (collective) and ``dense_state_dict_from_checkpoint`` (a
directory, no ranks) turn one into ReducedSyncGPT's dense state dict, and
``load_dense_state_dict`` starts a pipeline from one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.errors import MissingFileError, UsageError
from spd_ext.parallel_dims import LayoutNames, ParallelDims
from spd_ext.tp.communicator import DistributedComm, EmulatedComm, TensorParallelComm
from spd_ext.tp.config import GPTConfig
from spd_ext.tp.sharding import (
    gather_dense_state_dict,
    merge_state_dict,
    tensor_parallel_layout,
)
from spd_ext.tp.stages import (
    BlockLayer,
    StageLayer,
    TokenEmbedding,
    initial_dense_weights,
    language_model_loss,
    layer_classes,
    lm_head,
)
from spd_ext.tp.stream import ResidualStream, own_gradient
from spd_ext.utils.files import load_checkpoint

__all__ = ["PARTITION_METHODS", "ReducedSyncPipeline", "dense_state_dict_from_checkpoint",
           "pipeline_module"]

#: how layers are split into stages: DeepSpeed's balance of parameter counts, equal layer
#: counts, or equal block counts (the embeddings go with the first block, the head with
#: the last)
PARTITION_METHODS = {"parameters": "parameters", "uniform": "uniform",
                     "blocks": f"type:^{BlockLayer.__name__}$"}
TIED_KEY = "wte"


def _layer_specs(config: GPTConfig, comm: TensorParallelComm, recompute: bool) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    classes = layer_classes(config)
    specs: list = []
    for position, (cls, kwargs) in enumerate(classes):
        kwargs = dict(kwargs)
        if cls is BlockLayer:
            kwargs["recompute"] = recompute
        if cls is TokenEmbedding:
            head = position == len(classes) - 1
            specs.append(TiedLayerSpec(TIED_KEY, cls, config, comm, **kwargs,
                                       forward_fn=lm_head if head else None,
                                       tied_weight_attr=["weight"]))
        else:
            specs.append(LayerSpec(cls, config, comm, **kwargs))
    return specs


def pipeline_dims(world: int, num_stages: int, tp_size: int, islands: int = 1) -> ParallelDims:
    """The job's sizes (``world = islands x num_stages x dp x tp_size``), refused with the
    names pipeline_module's callers use."""
    return ParallelDims(world, tp_size, islands, pp=num_stages,
                        names=LayoutNames(tp="config.tp_size", pp="num_stages",
                                          islands="islands"))


class ReducedSyncPipeline(nn.Module):
    """Marker base, so that ``isinstance`` checks need not import DeepSpeed; the class
    ``pipeline_module`` returns derives from it and DeepSpeed's ``PipelineModule``."""

    config: GPTConfig
    comm: TensorParallelComm


def _make_class() -> type:
    from deepspeed.pipe import PipelineModule


    class _ReducedSyncPipeline(PipelineModule, ReducedSyncPipeline):
        """A PipelineModule of spd_ext.tp.stages's layers (see the module docstring)."""

        def __init__(self, config: GPTConfig, comm: TensorParallelComm, topology: Any,
                     seed: int | None, partition_method: str, recompute: bool,
                     islands: int = 1) -> None:
            self.islands = islands  # read by _index_tied_modules, inside __init__ below
            PipelineModule.__init__(
                self, layers=_layer_specs(config, comm, recompute), topology=topology,
                loss_fn=language_model_loss, partition_method=PARTITION_METHODS[
                    partition_method], activation_checkpoint_interval=0)
            self.config, self.comm = config, comm
            if islands > 1:
                self._island_model_parallel_group()
            # set by spd_ext's engine integration, which sums the tensor-parallel partial
            # gradients (the blocks' LayerNorms) that DeepSpeed alone would leave partial
            self.partial_gradients_summed = False
            if seed is not None:
                self.reset_parameters(seed)

        @torch.no_grad()
        def reset_parameters(self, seed: int) -> None:
            """ReducedSyncGPT(config, seed)'s initial weights, this rank's layers and shards
            of them: every layout starts from the same model."""
            dense = _dense_model(self.config)
            own = {name for layer in self.stage_layers() for name in layer.local_names()}
            values = initial_dense_weights(self.config, seed, own,
                                           list(dense.dense_shapes().items()))
            for layer in self.stage_layers():
                layer.load_dense(values)

        @property
        def sync_counter(self) -> Any:
            return self.comm.counter

        def _replica_filter(self) -> dict[str, int]:
            """The topology coordinates that pick this rank's replica (its island and data-
            parallel index: every stage and shard of it)."""
            coord = self._topo.get_coord(dist.get_rank())._asdict()
            return {axis: value for axis, value in coord.items() if axis in ("island", "data")}

        def _island_model_parallel_group(self) -> None:
            """DeepSpeed's grid takes every rank of one data-parallel index as a replica
            (its "model-parallel" group: gradient norms, the tied-weight sums' peers); with
            islands those ranks span islands, whose replicas train apart. The grid gets the
            island's own (every rank creates every island's, in order)."""
            grid, mine = self._grid, self._replica_filter()
            for island in range(self.islands):
                for data in range(grid.data_parallel_size):
                    ranks = self._topo.filter_match(island=island, data=data)
                    group = dist.new_group(ranks=ranks)
                    if {"island": island, "data": data} == mine:
                        grid.ds_model_proc_group = group
                        grid.ds_model_world_size = len(ranks)
                        grid.ds_model_rank = ranks.index(dist.get_rank())

        def _index_tied_modules(self) -> dict:
            """DeepSpeed's, for every island: the groups of the tied embedding's copies
            (first and last stage of each replica). DeepSpeed's own builds each rank's
            island's groups only, which differ across islands (a group is created by every
            rank alike)."""
            if getattr(self, "islands", 1) == 1 or self._topo.get_dim("pipe") == 1:
                return PipelineModule._index_tied_modules(self)
            tied_stages = sorted({self.stage_owner(i) for i, spec in
                                  enumerate(self._layer_specs) if getattr(spec, "key", None)
                                  == TIED_KEY})
            comms = {}
            grid = self._grid
            for island in range(self.islands):
                for data in range(grid.data_parallel_size):
                    for model in range(grid.get_slice_parallel_world_size()):
                        ranks = [self._topo.get_rank(island=island, pipe=s, data=data,
                                                     model=model) for s in tied_stages]
                        group = dist.new_group(ranks=ranks)
                        if dist.get_rank() in ranks:
                            comms[TIED_KEY] = {
                                "ranks": ranks, "group": group,
                                "weight_attr": self.tied_weight_attrs[TIED_KEY],
                                "module": self.tied_modules[TIED_KEY]}
                            if dist.get_rank() != ranks[0]:  # counted once in norms
                                for p in self.tied_modules[TIED_KEY].parameters():
                                    p.ds_pipe_replicated = True
            return comms

        def _synchronize_tied_weights(self) -> None:
            # DeepSpeed broadcasts the tied embedding into the parameter in place; outside
            # no_grad autograd records the broadcast on the leaf (and warns in backward)
            with torch.no_grad():
                PipelineModule._synchronize_tied_weights(self)

        def num_params(self, non_embedding: bool = False) -> int:
            """Parameters of the whole model (every stage and shard), as ReducedSyncGPT
            counts them."""
            return _dense_model(self.config).num_params(non_embedding)

        def forward(self, inputs: Any) -> Any:
            if self.activation_checkpoint_interval:
                raise UsageError(
                    "pipeline.activation_checkpoint_interval in the ds_config: DeepSpeed's "
                    "checkpointing passes plain tensors between layers, while these layers "
                    "pass the residual stream; build the module with pipeline_module(..., "
                    "activation_checkpointing=True) (every block recomputed) and leave the "
                    "interval out")
            if (self.comm.tp_size > 1 and self.training and torch.is_grad_enabled()
                    and not self.partial_gradients_summed):
                raise UsageError(
                    "a tensor-parallel pipeline trained by an engine spd_ext is not attached "
                    "to: the blocks' LayerNorm gradients would stay partial; create the engine "
                    "with spd_ext.deepspeed.initialize")
            x = inputs
            if isinstance(x, tuple):  # the residual stream, from the previous stage
                x = ResidualStream.from_tensors(x, self.comm)
            for layer in self.forward_funcs:
                x = layer(x)
            if isinstance(x, ResidualStream):
                return x.to_tensors()
            return own_gradient(x) if torch.is_tensor(x) and x.requires_grad else x

        # -- generation ------------------------------------------------------------
        def staged(self) -> Any:
            """This rank's stage as a StagedGPT (the same layers and parameters) for
            generation across the stages of its replica (spd_ext.tp.staged)."""
            from spd_ext.tp.staged import StagedGPT, StageLinks

            replica = tuple(sorted(self._topo.filter_match(**self._replica_filter())))
            links = StageLinks.of(dist.get_rank(), self.num_stages, self.comm.tp_size,
                                  replica, self._grid.get_model_parallel_group())
            layers = [f for f in self.forward_funcs if isinstance(f, StageLayer)]
            head = self.tied_modules[TIED_KEY] if links.stage == links.stages - 1 else None
            return StagedGPT(self.config, self.comm, links, layers, head)

        def generate_steps(self, *args: Any, **kwargs: Any) -> Any:
            """KV-cached generation across the stages (ReducedSyncGPT.generate_steps'
            arguments); every rank of the replica iterates together."""
            return self.staged().generate_steps(*args, **kwargs)

        @torch.no_grad()
        def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int | None = None, seed: int | None = None) -> torch.Tensor:
            """``idx`` and ``max_new_tokens`` new tokens, on every rank of the replica
            (greedy at temperature 0: ReducedSyncGPT.generate's tokens)."""
            was_training = self.training
            self.eval()
            try:
                return self.staged().generate(idx, max_new_tokens, temperature, top_k, seed)
            finally:
                self.train(was_training)

        # -- dense weights ---------------------------------------------------------
        def stage_layers(self) -> list[StageLayer]:
            """This stage's layers that hold parameters (the tied embedding once)."""
            own = [f for f in self.forward_funcs if isinstance(f, StageLayer)]
            for module in self.tied_modules.values():
                if module not in own:
                    own.append(module)
            return own

        def load_dense_state_dict(self, dense: dict[str, torch.Tensor]) -> None:
            """Load ReducedSyncGPT's dense state dict: each rank its layers' shards."""
            expected = set(_dense_names(self.config))
            if set(dense) != expected:
                missing, unexpected = expected - set(dense), set(dense) - expected
                raise UsageError(f"state dict does not fit this model: missing "
                                 f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
            for layer in self.stage_layers():
                layer.load_dense(dense)

        @torch.no_grad()
        def dense_state_dict(self) -> dict[str, torch.Tensor]:
            """ReducedSyncGPT's dense state dict of the whole model, on every rank
            (collective over the job: each replica gathers its stages' shards)."""
            local: dict[str, torch.Tensor] = {}
            for layer in self.stage_layers():
                if isinstance(layer, TokenEmbedding) and self.stage_id != 0:
                    continue  # the first stage's copy (the tie keeps them equal)
                for name, value in gather_dense_state_dict(layer, self.comm).items():
                    local[layer.dense_name(name)] = value.cpu()
            parts: list[Any] = [None] * self._grid.get_pipe_parallel_world_size()
            dist.all_gather_object(parts, local, group=self._grid.get_pipe_parallel_group())
            dense: dict[str, torch.Tensor] = {}
            for part in parts:
                dense.update(part)
            return {name: dense[name] for name in _dense_names(self.config)}

    return _ReducedSyncPipeline


_CLASS: list[type] = []


def pipeline_module(config: GPTConfig, num_stages: int, *, seed: int | None = 0,
                    partition_method: str = "parameters", activation_checkpointing: bool = False,
                    tp_backend: str = "spd_ext", islands: int = 1) -> Any:
    """The reduced-sync GPT ``config`` as a DeepSpeed ``PipelineModule`` of ``num_stages``
    stages, tensor-parallel ``config.tp_size`` inside each (collective: every rank calls
    it alike, after torch.distributed is initialized). ``partition_method``: one of
    PARTITION_METHODS. ``activation_checkpointing``: recompute every block in backward.
    ``seed``: ReducedSyncGPT(config, seed)'s initial weights; None leaves them for
    ``load_dense_state_dict``. ``islands``: DiLoCo islands of whole pipelines (the world is
    ``islands x num_stages x dp x tp``; the "spd_ext" section's ``staleness.islands`` must
    say the same)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if not dist.is_initialized():
        raise RuntimeError("pipeline_module needs torch.distributed initialized first "
                           "(deepspeed.init_distributed())")
    if partition_method not in PARTITION_METHODS:
        raise UsageError(f"partition_method must be one of {sorted(PARTITION_METHODS)}, got "
                         f"{partition_method!r}")
    dims = pipeline_dims(dist.get_world_size(), num_stages, config.tp_size, islands)
    if config.n_layer + 4 < num_stages:
        raise UsageError(f"{num_stages} stages for {config.n_layer + 4} layers (embeddings, "
                         f"{config.n_layer} blocks, final LayerNorm, head): use at most "
                         f"{config.n_layer + 4} stages")
    topology = dims.build()
    comm: TensorParallelComm = (DistributedComm(topology.tp_group, backend=tp_backend)
                                if config.tp_size > 1 else EmulatedComm(1))
    if not _CLASS:
        _CLASS.append(_make_class())
    if islands == 1:
        ds_topology = PipeModelDataParallelTopology(num_pp=num_stages, num_mp=config.tp_size,
                                                    num_dp=dims.dp)
    else:  # the island slowest: DeepSpeed's groups then stay inside each island
        from deepspeed.runtime.pipe.topology import ProcessTopology

        ds_topology = ProcessTopology(axes=["island", "pipe", "data", "model"],
                                      dims=[islands, num_stages, dims.dp, config.tp_size])
    return _CLASS[0](config, comm, ds_topology, seed, partition_method,
                     activation_checkpointing, islands)


def _dense_model(config: GPTConfig) -> Any:
    """ReducedSyncGPT of ``config`` on the meta device (names and shapes, no memory)."""
    from spd_ext.tp.model import ReducedSyncGPT

    with torch.device("meta"):
        return ReducedSyncGPT(GPTConfig(**{**config.to_dict(), "tp_size": 1}), seed=None)


def _dense_names(config: GPTConfig) -> list[str]:
    """ReducedSyncGPT's dense names, in its order."""
    return list(_dense_model(config).state_dict())


_LAYER_FILE = re.compile(r"layer_(\d+)-(?:.*-)?model_states\.pt$")


def dense_state_dict_from_checkpoint(path: str | Path, config: GPTConfig,
                                     tag: str | None = None) -> dict[str, torch.Tensor]:
    """ReducedSyncGPT's dense state dict from a DeepSpeed pipeline checkpoint of this
    module (no ranks needed): ``path`` is the directory given to ``save_checkpoint``
    (the tag from ``tag`` or its ``latest`` file) or the tag's own directory. The
    tensor-parallel files of each layer are merged by the layers' layouts."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path} is not a directory: pass the directory given to "
                               "save_checkpoint, or its tag directory")
    if tag is None and not any(path.glob("layer_*model_states.pt")):
        latest = path / "latest"
        if not latest.is_file():
            raise MissingFileError(f"{path} holds no layer files and no 'latest' file: not a "
                                   "DeepSpeed pipeline checkpoint; pass its directory")
        tag = latest.read_text().strip()
    directory = path / tag if tag is not None else path
    files: dict[int, list[Path]] = {}
    for file in sorted(directory.glob("layer_*model_states.pt")):
        match = _LAYER_FILE.search(file.name)
        if match:
            files.setdefault(int(match.group(1)), []).append(file)
    t = config.tp_size
    dense: dict[str, torch.Tensor] = {}
    with torch.device("meta"):
        layers = [cls(config, EmulatedComm(t), **kwargs)
                  for cls, kwargs in layer_classes(config)[:-1]]  # the head has no file
    for index, layer in enumerate(layers):
        found = files.get(index, [])
        if len(found) != t:
            raise MissingFileError(
                f"{directory}: layer {index} has {len(found)} file(s), expected {t} (one per "
                f"tensor-parallel rank of config.tp_size {t}); check the config matches the "
                "run that saved it")
        parts = [load_checkpoint(f, f"pipeline layer {index}") for f in found]
        params = dict(layer.named_parameters())
        shards = {}
        for name in layer.state_dict():
            if name in params and tensor_parallel_layout(params[name]).sharded:
                shards[name] = torch.cat([p[name] for p in parts], 0)
            else:
                shards[name] = parts[0][name]
        for name, value in merge_state_dict(shards, layer, t).items():
            dense[layer.dense_name(name)] = value.clone()
    names = _dense_names(config)
    missing = [n for n in names if n not in dense]
    if missing:
        raise UsageError(f"{directory}: the checkpoint lacks {missing[:5]}; check the config")
    return {name: dense[name] for name in names}
