"""DeepSpeed engine integration: signal weighting, staleness control and tensor x data
parallelism inside ``DeepSpeedEngine``, configured by a ``"spd_ext"`` ds_config section.

    engine, optimizer, loader, scheduler = spd_ext.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")
    for batch in ...:
        loss = engine(batch); engine.backward(loss); engine.step()   # unchanged

``initialize`` takes ``deepspeed.initialize``'s arguments and returns its tuple. It reads
and validates the ``"spd_ext"`` section, removes it from what DeepSpeed validates, builds
the tensor-parallel / data-parallel groups or DiLoCo islands (handing DeepSpeed an
``mpu``), and attaches to the engine. ``attach(engine)`` does the last step for an
engine someone else created (Hugging Face Trainer, Accelerate); ``SpdExtCallback`` is a
``transformers.TrainerCallback`` that calls it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import time
from typing import Any

from spd_ext.backend_names import SPD_EXT, SPD_EXT_CPU_BACKEND
from spd_ext.deepspeed.config import (
    SECTION,
    SECTION_NAMES,
    SpdExtConfig,
    SpdExtConfigError,
    check_metrics_path,
    pipeline_ds_config,
    split_config,
    validate_against_deepspeed,
    validate_pipeline,
    zero_stage,
)
from spd_ext.deepspeed.engine import EngineIntegration
from spd_ext.parallel_dims import ModelParallelUnit, ParallelDims, Topology
from spd_ext.tp.sharding import tensor_parallel_layout

__all__ = ["SECTION", "EngineIntegration", "ModelParallelUnit", "SpdExtCallback",
           "SpdExtConfig", "SpdExtConfigError", "Topology", "attach", "build_topology",
           "dense_state_dict_from_checkpoint", "initialize", "parse_config",
           "pipeline_module"]


#: How long a rank refusing the section waits for the others to refuse it too.
REFUSAL_WAIT_S = 10.0


def _refuse_once_per_job(error: SpdExtConfigError) -> None:
    """A SpdExtConfigError on its way out of ``initialize`` / ``attach``: every rank refuses
    the same config, but a launcher stops the whole job when the first rank exits, so the
    ranks first wait for each other (through the store, at most REFUSAL_WAIT_S), then drop
    their DeepSpeed segment names (every peer mapped them in init_distributed), and the
    first rank says it in one line. Left unhandled, the error then ends each rank without
    a traceback (the process hook below); every rank exits non-zero."""
    import torch.distributed as dist

    launched = dist.is_initialized() and dist.get_world_size() > 1
    if launched:
        from spd_ext.comm.torch_private import default_store

        store, world = default_store(), dist.get_world_size()
        key = "spd_ext/refused_section"
        deadline = time.monotonic() + REFUSAL_WAIT_S
        with contextlib.suppress(Exception):  # a store gone or slow: just go on
            store.add(key, 1)
            while int(store.add(key, 0)) < world and time.monotonic() < deadline:
                time.sleep(0.05)
    path = _deepspeed_shm_path()
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if launched and dist.get_rank() == 0:
        print(f"spd_ext: error: {error}", file=sys.stderr, flush=True)
    if launched and not getattr(sys.excepthook, "spd_ext_config_errors", False):
        previous = sys.excepthook

        def hook(kind: type, value: BaseException, traceback: Any) -> None:
            if not issubclass(kind, SpdExtConfigError):
                previous(kind, value, traceback)  # said in one line by the first rank

        hook.spd_ext_config_errors = True  # type: ignore[attr-defined]
        sys.excepthook = hook


def _one_line_errors(function: Any) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except SpdExtConfigError as exc:
            _refuse_once_per_job(exc)
            raise

    return wrapper


def build_topology(tp_size: int = 1, islands: int = 1) -> Topology:
    """The groups (and the ``mpu``) for tensor parallelism ``tp_size`` and ``islands``
    DiLoCo islands on this job's world (collective the first time; cached)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("spd_ext.deepspeed needs torch.distributed initialized; call "
                           "deepspeed.init_distributed() first (initialize() does)")
    return ParallelDims(dist.get_world_size(), tp_size, islands, SECTION_NAMES).build()


def parse_config(ds_config: dict | str | None,
                 world_size: int | None = None) -> tuple[dict | None, SpdExtConfig]:
    """``(the ds_config without the section, the validated section)``; no collective.

    ``world_size`` defaults to ``$WORLD_SIZE`` (set by the launchers), so a size that
    does not divide the world fails here, before any rank waits on another."""
    rest, section = split_config(ds_config)
    cfg = SpdExtConfig.from_dict(section)
    if world_size is None and os.environ.get("WORLD_SIZE", "").isdigit():
        world_size = int(os.environ["WORLD_SIZE"])
    validate_against_deepspeed(cfg, rest or {}, world_size)
    return rest, cfg


def _deepspeed_shm_path() -> str | None:
    """This rank's DeepSpeed CPU all-reduce segment name (None outside a launched job)."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and dist.is_initialized()):
        return None
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def release_deepspeed_shm_name() -> bool:
    """Unlink the name of this rank's DeepSpeed CPU all-reduce segment (collective).

    DeepSpeed's CPU communication op creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_
    <addr>_<port>_<rank>`` (69 MB) for every rank in ``init_distributed`` and never
    unlinks it, so each job leaves its ranks' segments behind. By the time every rank has
    passed a barrier after ``init_distributed``, every peer has mapped every segment, so
    the names can go: the memory lives until the last mapping does (process exit), as
    with any unlinked POSIX shared memory. Returns whether a name was removed."""
    import torch.distributed as dist

    path = _deepspeed_shm_path()
    if path is None:
        return False
    dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _mark_tensor_parallel(model: Any, topology: Topology, cfg: SpdExtConfig) -> None:
    """Check the model fits the tensor-parallel group and mark its sharded parameters the
    way DeepSpeed's gradient norm reads them (Megatron's ``tensor_model_parallel``)."""
    import torch.distributed as dist

    comm = getattr(model, "comm", None)
    group = getattr(comm, "group", "missing")
    if group == "missing" or getattr(comm, "tp_size", None) != topology.tp_size:
        raise SpdExtConfigError(
            f"tensor_parallel.size {topology.tp_size} needs a model sharded over the tensor-"
            "parallel group, e.g. ReducedSyncGPT(GPTConfig(..., tp_size=T), "
            "DistributedComm(build_topology(T).tp_group)); this model is "
            f"{type(model).__name__} with comm {type(comm).__name__}")
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else \
        tuple(range(dist.get_world_size()))
    if ranks != topology.tp_ranks:
        raise SpdExtConfigError(
            f"the model's tensor-parallel group holds ranks {ranks}, but tensor_parallel.size "
            f"{topology.tp_size} puts this rank in {topology.tp_ranks}; build the model's "
            "DistributedComm on spd_ext.deepspeed.build_topology(size).tp_group")
    pattern = cfg.tensor_parallel.pattern
    model_pattern = getattr(getattr(model, "config", None), "pattern", None)
    if pattern is not None and model_pattern is not None and pattern != model_pattern:
        raise SpdExtConfigError(
            f"tensor_parallel.pattern {pattern!r} does not match the model's pattern "
            f"{model_pattern!r}; make them agree (or leave the pattern out of the section)")
    for p in model.parameters():
        if tensor_parallel_layout(p).sharded:
            # DeepSpeed's (Megatron's) attributes, read by its gradient norm; they describe
            # the stored tensor, whose leading dimension is the shard dimension.
            p.tensor_model_parallel = True
            p.partition_dim = 0
            p.partition_stride = 1


def _init_distributed(cfg: SpdExtConfig, ds_config: dict) -> None:
    """``deepspeed.init_distributed`` unless the caller did it, on the torch.distributed
    backend "spd_ext" when ``comm.backend`` is spd_ext on a CPU accelerator (DeepSpeed would
    pick gloo); at ZeRO >= 1 that backend is what the setting means, so a group initialized
    on another one is refused."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from spd_ext.comm.process_group import is_spd_ext_group
    from spd_ext.deepspeed.ops import load_deepspeed_comm_op

    wanted = cfg.comm.backend == SPD_EXT
    stage = zero_stage(ds_config)
    device = get_accelerator().device_name()
    if wanted and stage >= 1 and device != "cpu":
        raise SpdExtConfigError(
            f"comm.backend 'spd_ext' with zero_optimization.stage {stage} on {device}: at "
            "ZeRO >= 1 it selects the torch.distributed backend 'spd_ext', which carries CPU "
            "tensors; on GPUs use comm.backend 'deepspeed' (NCCL) or stage 0 (spd_ext's CUDA "
            "IPC all-reduce)")
    if not dist.is_initialized():
        load_deepspeed_comm_op()  # under spd_ext's build lock: never a silent hang
        deepspeed.init_distributed(dist_backend=SPD_EXT_CPU_BACKEND
                                   if wanted and device == "cpu" else None)
    elif wanted and stage >= 1 and not is_spd_ext_group():
        raise SpdExtConfigError(
            f"comm.backend 'spd_ext' with zero_optimization.stage {stage} runs DeepSpeed's "
            "collectives on the torch.distributed backend 'spd_ext', but this job's process "
            f"group was initialized on {dist.get_backend()!r}; initialize it with "
            f"deepspeed.init_distributed(dist_backend='{SPD_EXT_CPU_BACKEND}') after "
            "`import spd_ext.comm`, or leave it to spd_ext.deepspeed.initialize")


def _is_pipeline(model: Any) -> bool:
    """A DeepSpeed ``PipelineModule`` (without importing DeepSpeed for other models)."""
    return any(cls.__name__ == "PipelineModule" and cls.__module__.startswith("deepspeed")
               for cls in type(model).__mro__)


def _pipeline_topology(model: Any, cfg: SpdExtConfig, ds_config: dict) -> Topology:
    """The section's groups on a pipeline: tensor parallelism is the model's own (a
    ReducedSyncPipeline's config.tp_size; 1 for any other PipelineModule) and DeepSpeed's
    grid is the mpu; what spd_ext cannot do on a pipeline yet is refused."""
    import torch.distributed as dist

    from spd_ext.deepspeed.pipeline import ReducedSyncPipeline, pipeline_dims

    tp = model.config.tp_size if isinstance(model, ReducedSyncPipeline) else 1
    islands = getattr(model, "islands", 1)
    validate_pipeline(cfg, ds_config, tp, islands)
    topology = pipeline_dims(dist.get_world_size(), model.num_stages, tp, islands).build()
    if tp > 1:
        _mark_tensor_parallel(model, topology, cfg)
    return topology


@_one_line_errors
def initialize(args: Any = None, model: Any = None, *, config: Any = None,
               config_params: Any = None, mpu: Any = None, **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` with the ``"spd_ext"`` section honoured (same arguments,
    same return tuple; the engine carries ``engine.spd_ext``)."""
    import deepspeed
    import torch.distributed as dist

    if config is None:
        config = config_params
    if config is None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None  # DeepSpeed gets the config without the section
    rest, cfg = parse_config(config)
    if rest is None:
        raise SpdExtConfigError("spd_ext.deepspeed.initialize needs a DeepSpeed config: pass "
                                "config=... or --deepspeed_config")
    if model is None:
        raise SpdExtConfigError("spd_ext.deepspeed.initialize needs model=...")
    if _is_pipeline(model):
        from spd_ext.deepspeed.pipeline import ReducedSyncPipeline

        if isinstance(model, ReducedSyncPipeline):
            rest = pipeline_ds_config(rest)
    _init_distributed(cfg, rest)
    # Collective, before anything else can fail: every rank has mapped DeepSpeed's CPU
    # all-reduce segments since init_distributed, and a refused set-up would leave them.
    release_deepspeed_shm_name()
    validate_against_deepspeed(cfg, rest, dist.get_world_size())
    check_metrics_path(cfg)
    if _is_pipeline(model):
        topology = _pipeline_topology(model, cfg, rest)
    else:
        topology = build_topology(cfg.tensor_parallel.size, cfg.staleness.islands)
    if topology.mpu is not None:
        if mpu is not None:
            raise SpdExtConfigError(
                "mpu= was given together with spd_ext's tensor_parallel or islands, which "
                "build their own; pass one or the other")
        mpu = topology.mpu
    if topology.tp_size > 1 and topology.pp == 1:
        _mark_tensor_parallel(model, topology, cfg)
    out = deepspeed.initialize(args=args, model=model, config=rest, mpu=mpu, **kwargs)
    EngineIntegration(out[0], cfg, topology)
    return out


@_one_line_errors
def attach(engine: Any, config: dict | SpdExtConfig | None = None) -> EngineIntegration:
    """Attach spd_ext to an engine created elsewhere. ``config`` is the ``"spd_ext"``
    section (default: the one in the engine's own ds_config). Tensor parallelism and
    islands change DeepSpeed's groups, so they must be given to ``initialize`` instead."""
    if getattr(engine, "spd_ext", None) is not None:
        return engine.spd_ext
    import torch.distributed as dist

    release_deepspeed_shm_name()  # first: every rank attaches at the same point (collective)
    ds_config = getattr(getattr(engine, "_config", None), "_param_dict", None) or {}
    if isinstance(config, SpdExtConfig):
        cfg = config
    else:
        cfg = SpdExtConfig.from_dict(config if config is not None else ds_config.get(SECTION))
    mpu = getattr(engine, "mpu", None)
    replicas = (mpu.get_data_parallel_world_size() if mpu is not None
                else dist.get_world_size())
    validate_against_deepspeed(cfg, ds_config, replicas)
    check_metrics_path(cfg)
    if cfg.tensor_parallel.size > 1 or cfg.staleness.islands > 1:
        raise SpdExtConfigError(
            "tensor_parallel.size > 1 and staleness.islands > 1 change the groups DeepSpeed "
            "reduces over, which are fixed when the engine is created: create the engine "
            "with spd_ext.deepspeed.initialize instead of attaching afterwards")
    topology = build_topology(1, 1)
    if mpu is not None:
        topology = Topology(1, 1, mpu, dp_group=mpu.get_data_parallel_group(),
                            dp_ranks=tuple(dist.get_process_group_ranks(
                                mpu.get_data_parallel_group())))
    return EngineIntegration(engine, cfg, topology)


def __getattr__(name: str) -> Any:
    if name == "SpdExtCallback":  # needs transformers: imported on first use only
        from spd_ext.deepspeed.callback import SpdExtCallback

        return SpdExtCallback
    if name in ("pipeline_module", "dense_state_dict_from_checkpoint"):
        from spd_ext.deepspeed import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
