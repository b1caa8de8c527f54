"""spd_ext inside a DeepSpeed engine: signal weighting, staleness control, tensor parallelism.

``EngineIntegration`` attaches to one ``DeepSpeedEngine`` by replacing, on that engine
instance only, a few of its methods with wrappers that call the originals:

* ``backward(loss)``: keeps the micro-batch loss on the device (the signals' input). With
  signal weighting, the step's first backward decides the step's weights (one scalar
  all-gather on the data-parallel group: each rank's signal as it would be after this
  micro-batch's loss) and every backward of the step scales its loss by ``N * w_i``, so
  that DeepSpeed's mean over the ranks yields sum_i w_i g_i. Being linear, this holds
  through gradient accumulation, clipping, bf16 and fp16 loss scaling, and at every ZeRO
  stage: ZeRO-2 and ZeRO-3 reduce gradients inside backward, bucket by bucket, where
  nothing after backward could still weight them;
* ``allreduce_gradients()`` (DeepSpeed calls it once per accumulation boundary): at ZeRO
  stages 0 and 1, sums tensor-parallel partial gradients over the tp group, refuses the
  step on every rank if any rank's gradient holds NaN or inf (unless fp16 loss scaling
  owns overflows), shows the rank's own gradient to gradient-based signals, and reduces
  with DeepSpeed or spd_ext's fused all-reduce (``comm.backend = "spd_ext"``, stage 0);
  staleness modes replace the reduction with their own (delayed, or none for local SGD /
  DiLoCo);
* ``_take_model_step()``: skips the optimizer while ``delayed:k`` has nothing to apply;
* ``step()``: after DeepSpeed's update, the step's loss enters the signal, or, when
  DeepSpeed skipped the update (fp16 overflow; a non-finite reduced gradient at ZeRO-2/3),
  the signal state goes back to where the step found it; then parameter averaging (local
  SGD / DiLoCo) and metrics;
* ``save_checkpoint`` / ``load_checkpoint``: spd_ext's per-rank state beside DeepSpeed's,
  in ``<save_dir>/<tag>/spd_ext/rank<R>.pt``.

On DeepSpeed's ``PipelineEngine`` (``train_batch``) the loss exists on the last stage only:
there the instruction that runs a micro-batch's backward scales the loss by the replica's
factor (the weights are decided among the last stage's data-parallel ranks), and the
scaled gradient flows back through every stage of the replica, so each stage's reduction
yields sum_i w_i g_i for its own parameters; ``train_batch`` ends the step as ``step()``
does. The gradient norm for clipping counts each parameter of the replica once (tied
copies on their first stage).

Nothing is read on the host except on metrics steps (``metrics.interval``, see
``check_step``): losses, signals, weights and the non-finite flags stay device tensors,
and a fault on another step is raised at the next check (``DeferredFaults``).

The DeepSpeed internals relied on are listed in ``REQUIRED_ENGINE_ATTRIBUTES`` and
``REQUIRED_ZERO1_ATTRIBUTES`` and checked when attaching.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.backend_names import SPD_EXT
from spd_ext.comm import all_reduce
from spd_ext.comm.buckets import copy_back, flatten
from spd_ext.deepspeed.checkpoint import guard_checkpoint_loads
from spd_ext.deepspeed.config import SpdExtConfig
from spd_ext.dp.aggregator import SignalWeightedAggregator, WeightError
from spd_ext.errors import MissingFileError
from spd_ext.parallel_dims import Topology
from spd_ext.staleness.collective import DiLoCo, make_strategy
from spd_ext.tp.sharding import tensor_parallel_layout
from spd_ext.utils.files import atomic_path, load_checkpoint
from spd_ext.utils.run_log import RunLog

REQUIRED_ENGINE_ATTRIBUTES = (
    "allreduce_gradients", "backward", "step", "_take_model_step", "clip_fp32_gradients",
    "is_gradient_accumulation_boundary", "gradient_average", "zero_optimization_stage",
    "gradient_accumulation_steps", "gradient_clipping", "global_steps", "global_samples",
    "get_global_grad_norm", "was_step_applied",
    "save_checkpoint", "load_checkpoint", "monitor", "module", "optimizer",
)
REQUIRED_ZERO1_ATTRIBUTES = ("bit16_groups", "get_gradient_for_reduction",
                             "single_partition_of_fp32_groups", "update_lp_params")
#: what islands need of a ZeRO-2 / ZeRO-3 optimizer
REQUIRED_ISLAND_ATTRIBUTES = {2: ("single_partition_of_fp32_groups", "update_lp_params"),
                              3: ("fp32_partitioned_groups_flat", "_partition_all_parameters",
                                  "_reassign_or_swap_out_partitioned_parameters")}
STATE_VERSION = 1
#: ZeRO stages at which DeepSpeed reduces gradients inside backward (reduce-scatter hooks).
REDUCES_IN_BACKWARD = (2, 3)


class IslandDiLoCo(DiLoCo):
    """DiLoCo across islands, each running ZeRO-1, 2 or 3 on its own ranks: the outer step
    acts on this rank's fp32 master partition (averaged with the same partition of the
    other islands, which have the same layout), then the low-precision weights are
    refreshed from the masters inside the island: ZeRO-1/2 all-gather them, ZeRO-3 copies
    them into this rank's partition of each parameter (which stays partitioned)."""

    def __init__(self, mode: Any, zero_optimizer: Any, stage: int, outer_lr: float,
                 outer_momentum: float, group: Any) -> None:
        self.zero_optimizer, self.stage = zero_optimizer, stage
        super().__init__(mode, nn.Module(), outer_lr, outer_momentum, group)

    def weights(self, model: nn.Module) -> list[torch.Tensor]:
        if self.stage == 3:
            return list(self.zero_optimizer.fp32_partitioned_groups_flat)
        return list(self.zero_optimizer.single_partition_of_fp32_groups)

    def after_step(self, model: nn.Module, step: int) -> None:
        super().after_step(model, step)
        if (step + 1) % self.H == 0:
            self.refresh_low_precision()

    def refresh_low_precision(self) -> None:
        """The island's working weights from the fp32 masters the outer step wrote."""
        opt = self.zero_optimizer
        if self.stage == 3:
            # as DeepSpeed's own step does: release every gathered parameter (those it
            # keeps whole, below stage3_param_persistence_threshold, too), refresh the
            # partitions from the fp32 masters, gather the persistent ones again
            opt._partition_all_parameters()
            for group in range(len(opt.fp32_partitioned_groups_flat)):
                opt._reassign_or_swap_out_partitioned_parameters(group)
            persistent = getattr(opt, "persistent_parameters", [])
            if persistent:
                persistent[0].all_gather(persistent)
            if hasattr(opt, "invalidate_secondary_tensor"):
                opt.invalidate_secondary_tensor()
        else:
            opt.update_lp_params()  # all-gather inside the island


class EngineIntegration:
    """spd_ext's state on one engine (``engine.spd_ext``)."""

    def __init__(self, engine: Any, cfg: SpdExtConfig, topology: Topology) -> None:
        missing = [a for a in REQUIRED_ENGINE_ATTRIBUTES if not hasattr(engine, a)]
        stage = engine.zero_optimization_stage() if hasattr(engine,
                                                            "zero_optimization_stage") else 0
        if stage == 1 and cfg.active:
            missing += [f"optimizer.{a}" for a in REQUIRED_ZERO1_ATTRIBUTES
                        if not hasattr(engine.optimizer, a)]
        self.island_diloco = (getattr(topology, "islands", 1) > 1
                              or cfg.fault_tolerance is not None)
        if self.island_diloco and stage in REQUIRED_ISLAND_ATTRIBUTES:
            missing += [f"optimizer.{a}" for a in REQUIRED_ISLAND_ATTRIBUTES[stage]
                        if not hasattr(engine.optimizer, a)]
        if missing:
            import deepspeed

            raise RuntimeError(
                f"spd_ext.deepspeed cannot attach to this DeepSpeed {deepspeed.__version__} "
                f"engine: it lacks {', '.join(missing)}, which spd_ext relies on (see the "
                "README's DeepSpeed section); use a DeepSpeed version between 0.14 and 0.19")
        self.engine, self.cfg, self.topology = engine, cfg, topology
        # DeepSpeed's PipelineEngine: the loss and the signals live on the last stage
        self.pipeline = hasattr(engine, "train_batch") and hasattr(engine, "is_last_stage")
        self.last_stage = bool(engine.is_last_stage()) if self.pipeline else True
        # the PipelineEngine's bf16 at stage 0: fp32 gradient buffers, its own reduction
        self._bf16_optimizer = bool(getattr(engine, "using_bf16_optimizer", False))
        guard_checkpoint_loads(engine)  # load_checkpoint never runs a crafted file's code
        self.stage = stage
        self.module: nn.Module = engine.module
        self.dp_group = topology.dp_group
        self.dp_rank = dist.get_rank(self.dp_group)
        self.dp_size = dist.get_world_size(self.dp_group)
        self._micro_losses: list[torch.Tensor] = []
        self._skip_optimizer = False
        # what `last` shows, kept as DeepSpeed and the signals left it (device tensors)
        self._last: dict[str, Any] = {}
        self._unchecked = DeferredFaults(dist.get_world_size())
        # signal weighting: this rank's loss factor for the step under way (None between
        # steps), the aggregator's state when the step began (put back if DeepSpeed skips
        # the step), and the steps applied so far (the weights' warm-up counts these)
        self._loss_factor: torch.Tensor | None = None
        self._state_before_step: dict | None = None
        self.applied_steps = 0
        self.reduce_seconds: list[float] = []  # per boundary, for benchmarks
        # Benchmarks set this: a barrier before the reduction's clock starts, so that the
        # time measures the reduction, not the ranks' skew in arriving at it.
        self.barrier_before_reduce = False
        mode = cfg.staleness.parsed
        self.mode = mode
        self.aggregator: SignalWeightedAggregator | None = None
        if cfg.signal_weighting is not None and self.last_stage:
            sw = cfg.signal_weighting  # checked against the stage: validate_against_deepspeed
            self.aggregator = SignalWeightedAggregator(
                sw.signal, sw.map, temperature=sw.temperature, floor=sw.floor, ema=sw.ema,
                warmup_steps=sw.warmup_steps, signal_args=sw.signal_args, group=self.dp_group)
        self.strategy: Any = None  # a StalenessStrategy or FaultTolerantIslandDiLoCo
        if self.island_diloco:
            self.strategy = IslandDiLoCo(mode, engine.optimizer, stage, cfg.staleness.outer_lr,
                                         cfg.staleness.outer_momentum,
                                         topology.cross_island_group)
            if cfg.fault_tolerance is not None:
                from spd_ext.deepspeed.fault_tolerance import FaultTolerantIslandDiLoCo

                self.strategy = FaultTolerantIslandDiLoCo(self.strategy, engine, self,
                                                          cfg.fault_tolerance)
        elif mode.kind != "ssgd":
            outer = ({"outer_lr": cfg.staleness.outer_lr,
                      "outer_momentum": cfg.staleness.outer_momentum}
                     if mode.kind == "diloco" else {})
            self.strategy = make_strategy(mode, self.module, group=self.dp_group, **outer)
        self._partial = ([p for p in self.module.parameters()
                          if tensor_parallel_layout(p).partial_gradient]
                         if topology.tp_size > 1 else [])
        self._counter = getattr(self.module, "sync_counter", None) if topology.tp_size > 1 \
            else None
        self._tp_hooks = [p.register_hook(self._sum_partial_grad_in_backward)
                          for p in self._partial] if stage in REDUCES_IN_BACKWARD else []
        self.log: RunLog | None = None
        if cfg.metrics.jsonl and dist.get_rank() == 0:
            self.log = RunLog(Path(cfg.metrics.jsonl), run_name="spd_ext", quiet=True,
                              config={"spd_ext": _plain(cfg)})
        self._grad_buffers: dict[torch.dtype, torch.Tensor] = {}
        # comm.backend "spd_ext": at stage 0 spd_ext's fused all-reduce replaces DeepSpeed's
        # reduction; at ZeRO >= 1 DeepSpeed's own reduce-scatter and all-gathers run on the
        # torch.distributed backend "spd_ext" (selected by spd_ext.deepspeed.initialize).
        self._fused_reduction = cfg.comm.backend == SPD_EXT and stage == 0
        if self._fused_reduction and self.strategy is None:
            self._grad_buffers = self._make_grad_buffers()
        fp16 = getattr(engine, "fp16_enabled", None)
        self._fp16 = bool(fp16()) if callable(fp16) else False  # loss scaling skips overflows
        self._originals = {name: getattr(engine, name) for name in (
            "backward", "allreduce_gradients", "_take_model_step", "step", "save_checkpoint",
            "load_checkpoint", "clip_fp32_gradients")}
        engine.backward = self.backward
        engine.allreduce_gradients = self.allreduce_gradients
        engine._take_model_step = self._take_model_step
        engine.step = self.step
        engine.save_checkpoint = self.save_checkpoint
        engine.load_checkpoint = self.load_checkpoint
        engine.clip_fp32_gradients = self.clip_fp32_gradients
        if self.pipeline:
            self._attach_to_pipeline(engine)
        if hasattr(self.module, "partial_gradients_summed"):
            self.module.partial_gradients_summed = True  # allreduce_gradients sums them
        engine.spd_ext = self

    def _attach_to_pipeline(self, engine: Any) -> None:
        """The PipelineEngine never calls ``engine.backward`` / ``engine.step``: its
        schedule runs instructions from a class table. This engine gets its own table
        whose backward instruction weights the last stage's loss, and ``train_batch``
        ends the step."""
        from deepspeed.runtime.pipe import schedule

        table = dict(type(engine)._INSTRUCTION_MAP)
        original = table[schedule.BackwardPass]

        def backward_pass(pipe_engine: Any, buffer_id: int) -> None:
            if not pipe_engine.is_last_stage():
                return original(pipe_engine, buffer_id)
            loss = pipe_engine.loss
            factor = self._note_micro_loss(loss.detach())
            if factor is None:
                return original(pipe_engine, buffer_id)
            pipe_engine.loss = loss * factor
            try:
                return original(pipe_engine, buffer_id)
            finally:
                pipe_engine.loss = loss

        table[schedule.BackwardPass] = backward_pass
        engine._INSTRUCTION_MAP = table
        if self._bf16_optimizer:
            self._originals["_bf16_reduce_grads"] = engine._bf16_reduce_grads
            engine._bf16_reduce_grads = self._bf16_reduce_grads
        self._originals["train_batch"] = engine.train_batch
        engine.train_batch = self.train_batch
    @property
    def last(self) -> dict[str, Any]:
        """The last step's values (step, loss, weight, weights, signals, grad_norm,
        syncs_forward / syncs_backward / grad_syncs, skipped, skipped_optimizer), read on
        the host: a synchronization with the device, which the engine itself makes only
        on metrics steps (``metrics.interval``)."""
        return {key: _host(value) for key, value in self._last.items()}

    @property
    def fault_tolerant(self) -> bool:
        return self.cfg.fault_tolerance is not None

    def join_islands(self, wait_for_all: bool = True) -> int:
        """With ``fault_tolerance``: join the islands alive before training (collective
        with them; a restarted island heals from a live one, taking its step, optimizer
        partition and outer state). Returns the step to train from: the engine's
        ``global_steps``, which a healed island has taken from the others. Call it after
        any ``load_checkpoint`` and before the first step. ``wait_for_all``: on a fresh
        start, wait for ``fault_tolerance.islands`` islands (pass False for an island
        restarted after a failure)."""
        if not self.fault_tolerant:
            raise RuntimeError("join_islands() is for a \"spd_ext\" section with "
                               "fault_tolerance; this engine has none")
        return self.strategy.join(wait_for_all)

    def last_loss(self) -> torch.Tensor | None:
        """This rank's loss of the step just taken (a device tensor; None before one)."""
        return self._last.get("loss")

    @property
    def islands_present(self) -> int | None:
        """With ``fault_tolerance``: the islands in the last outer step's quorum."""
        return self.strategy.islands_present if self.fault_tolerant else None

    def close(self) -> None:
        """Release what outlives the engine otherwise (torchft's manager and servers)."""
        if self.fault_tolerant:
            self.strategy.close()

    def check_step(self, step: int) -> bool:
        """Whether step ``step`` (counted from 0) reads its values on the host: its metrics
        are written and a non-finite loss, signal or gradient is refused before its update.
        Other steps keep every value on the device and are checked at the next such step."""
        return (step + 1) % self.cfg.metrics.interval == 0

    def check(self) -> None:
        """Raise WeightError on every rank now if a step since the last check had a
        non-finite loss, signal or gradient (a host read; the engine itself checks on
        metrics steps and before saving a checkpoint)."""
        self._unchecked.raise_if_any(self.engine.global_steps - 1, self.cfg.metrics.interval)

    # -- the wrapped engine methods ----------------------------------------------------
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        factor = self._note_micro_loss(loss.detach())
        if self._grad_buffers:
            self._attach_grad_views()
        if factor is None:
            return self._originals["backward"](loss, *args, **kwargs)
        out = self._originals["backward"](loss * factor, *args, **kwargs)
        return out / factor  # what DeepSpeed returns: the loss over the steps

    def _note_micro_loss(self, value: torch.Tensor) -> torch.Tensor | None:
        """A micro-batch's loss before its backward; returns the factor to scale it by
        (None without signal weighting). The step's first decides the step's weights."""
        if not self._micro_losses:  # the step's first micro-batch
            self._last = {}
        self._micro_losses.append(value)
        if self.aggregator is None:
            return None
        if self._loss_factor is None:
            self._loss_factor = self._weigh_step(value)
        return self._loss_factor

    def _weigh_step(self, first_loss: torch.Tensor) -> torch.Tensor:
        """The step's weights, before its first backward (collective on the data-parallel
        group, on the device); returns this rank's loss factor: ``N * w_i`` where DeepSpeed
        averages, ``w_i`` where it sums. On a check step, every rank raises WeightError if
        any rank's loss or signal is not finite; otherwise that is noted for the next
        check."""
        agg = self.aggregator
        assert agg is not None
        step = self.engine.global_steps
        self._state_before_step = agg.state_dict()
        weights = agg.weights_before_backward(self.applied_steps, first_loss)
        signals = agg.last["signals"]
        self._last.update(weight=weights[self.dp_rank], weights=weights, signals=signals)
        if self.check_step(step):
            self._unchecked.raise_if_any(step, self.cfg.metrics.interval)
            agg.checked_weights()
        else:
            self._unchecked.note_signals(step, signals, weights)
        factor = weights[self.dp_rank] * (self.dp_size if self.engine.gradient_average else 1)
        return factor.to(torch.promote_types(first_loss.dtype, torch.float32))

    # -- gradients as views of flat buffers (comm.backend "spd_ext", stage 0) ----------------
    def _make_grad_buffers(self) -> dict[torch.dtype, torch.Tensor]:
        """One flat buffer per dtype, reused every step: the reduction runs in place on it
        with no flatten / copy-back (PyTorch DDP's gradient_as_bucket_view). Fresh
        buffers each step would also pay the page faults of first touch."""
        sizes: dict[torch.dtype, int] = {}
        for p in self.module.parameters():
            if p.requires_grad:
                sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        return {dtype: torch.zeros(n, dtype=dtype) for dtype, n in sizes.items()}

    def _attach_grad_views(self) -> None:
        """Point every parameter's .grad at its slice of the buffers before backward, so
        autograd accumulates into them. DeepSpeed's zero_grad sets .grad to None after
        each step: then the buffers are zeroed and the views attached again. No Python
        reference to a view is kept, so autograd may accumulate in place."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if all(p.grad is not None for p in params):
            return  # accumulating micro-batches into the attached views
        for buffer in self._grad_buffers.values():
            buffer.zero_()
        offsets = dict.fromkeys(self._grad_buffers, 0)
        for p in params:
            start = offsets[p.dtype]
            if p.grad is not None:  # kept by the caller: keep its value
                self._grad_buffers[p.dtype][start:start + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = self._grad_buffers[p.dtype][start:start + p.numel()].view_as(p)
            offsets[p.dtype] = start + p.numel()

    def _grads_are_views(self) -> bool:
        return bool(self._grad_buffers) and all(
            p.grad is not None and p.grad.untyped_storage().data_ptr()
            == self._grad_buffers[p.dtype].untyped_storage().data_ptr()
            for p in self.module.parameters() if p.requires_grad)

    def allreduce_gradients(self, *args: Any, **kwargs: Any) -> None:
        engine = self.engine
        if not engine.is_gradient_accumulation_boundary():
            return self._originals["allreduce_gradients"](*args, **kwargs)
        start = self._start_reduction()
        if self.stage in REDUCES_IN_BACKWARD:  # reduced already, weighted by the loss factor
            self._originals["allreduce_gradients"](*args, **kwargs)
            self.reduce_seconds.append(time.perf_counter() - start)
            return None
        grads = self._prepare_reduction()
        loss = self._last["loss"]
        if self.strategy is not None and not self.island_diloco:
            out = self.strategy.after_backward(self.module, engine.global_steps,
                                               float(loss)) or {}
            self._skip_optimizer = bool(out.get("skip_optimizer", False))
        elif self.aggregator is not None:
            self._weighted_reduce(grads, args, kwargs)
        elif self._fused_reduction:
            self._spd_reduce(grads, "mean" if engine.gradient_average else "sum", None)
        else:
            self._originals["allreduce_gradients"](*args, **kwargs)
        self.reduce_seconds.append(time.perf_counter() - start)

    def _bf16_reduce_grads(self) -> None:
        """The PipelineEngine with DeepSpeed's BF16_Optimizer (bf16 at stage 0) reduces its
        fp32 gradient buffers here instead of in allreduce_gradients: the same steps come
        first (the loss factor is in the gradients already; gradient signals are refused
        on pipelines)."""
        start = self._start_reduction()
        self._prepare_reduction()
        self._originals["_bf16_reduce_grads"]()
        self.reduce_seconds.append(time.perf_counter() - start)

    def _start_reduction(self) -> float:
        """At the accumulation boundary: the step's loss into ``last``; the clock's start."""
        if self.barrier_before_reduce:
            dist.barrier(group=self.dp_group)
        start = time.perf_counter()
        losses, self._micro_losses = self._micro_losses, []
        loss = (torch.stack([x.double() for x in losses]).mean() if losses
                else torch.tensor(float("nan"), dtype=torch.float64))
        # counted from 1, as the metrics are
        self._last.update(step=self.engine.global_steps + 1, loss=loss)
        return start

    def _prepare_reduction(self) -> list[torch.Tensor]:
        """Before the reduction (ZeRO 0/1): partial gradients summed over the tensor-
        parallel group, non-finite gradients refused; returns the gradients to reduce."""
        grads = self._reduction_grads()
        if self._partial:
            self._sum_partial_grads()
        if not self._fp16:
            self._refuse_non_finite(grads, self.engine.global_steps)
        return grads

    def _take_model_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._skip_optimizer:
            return self._originals["_take_model_step"](*args, **kwargs)
        optimizer = self.engine.optimizer
        own = vars(optimizer).get("step")  # an instance step (LR schedulers install one)
        optimizer.step = lambda *a, **k: None  # this instance only, for this one call
        try:
            return self._originals["_take_model_step"](*args, **kwargs)
        finally:
            if own is not None:
                optimizer.step = own
            else:
                del optimizer.step

    def step(self, *args: Any, **kwargs: Any) -> Any:
        boundary = self.engine.is_gradient_accumulation_boundary()
        out = self._originals["step"](*args, **kwargs)
        if boundary:
            self._end_step()
        return out

    def train_batch(self, *args: Any, **kwargs: Any) -> Any:
        """PipelineEngine.train_batch: a whole step (its micro-batches, reduction, update).
        Off the last stage ``last["loss"]`` is the replicas' mean DeepSpeed returns."""
        if not self.last_stage:
            self._last = {}
        out = self._originals["train_batch"](*args, **kwargs)
        if not self.last_stage:
            self._last["loss"] = out.detach()
        self._end_step()
        return out

    def _end_step(self) -> None:
        """After DeepSpeed's update: signals, staleness, sync counts, metrics."""
        step = self.engine.global_steps - 1  # the step just taken
        self._account_for_step(step)
        if self.strategy is not None:
            self.strategy.after_step(self.module, step)
        if self._counter is not None:
            syncs = self._counter.step()
            self._last.update(syncs_forward=syncs["forward"],
                              syncs_backward=syncs["backward"],
                              grad_syncs=syncs["grad_syncs"])
        norm = self.engine.get_global_grad_norm() if self.stage >= 1 else None
        if norm is not None:
            self._last["grad_norm"] = norm
        self._last["skipped_optimizer"] = self._skip_optimizer
        self._skip_optimizer = False
        if self.check_step(step):
            self._unchecked.raise_if_any(step, self.cfg.metrics.interval)
            self._write_metrics(step)

    def _account_for_step(self, step: int) -> None:
        """After DeepSpeed's step: the step's loss enters the signal if the update was
        applied; if DeepSpeed skipped it (fp16's loss scaler on an overflow, or ZeRO's
        check of a non-finite reduced gradient), the signal and weight state go back to
        where the step found them, and outside fp16 every rank raises WeightError."""
        applied = bool(self.engine.was_step_applied())  # DeepSpeed's own flag (host)
        self._last["skipped"] = not applied
        if self.aggregator is not None and self._loss_factor is not None:
            if applied:
                self.aggregator.end_step(self._last.get("loss", float("nan")))
            elif self._state_before_step is not None:
                self.aggregator.load_state_dict(self._state_before_step)
        self._loss_factor, self._state_before_step = None, None
        if applied:
            self.applied_steps += 1
        elif not self._fp16:
            raise WeightError(
                f"step {step}: the reduced gradient holds NaN or inf (a rank's gradient was not "
                "finite); DeepSpeed skipped the update on every rank and no parameter changed. "
                "Lower the learning rate, check the ranks' data, or resume from the last "
                "checkpoint")

    def clip_fp32_gradients(self) -> None:
        """DeepSpeed's stage-0 fp32 clipping, keeping the norm for the metrics. Local SGD /
        DiLoCo replicas train alone between syncs: each clips its own gradient, as a worker
        of spd_ext.staleness does (DeepSpeed's clip would average the norm over the dp group)."""
        engine = self.engine
        if self.replicas_diverge:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                  engine.gradient_clipping())
        elif self.pipeline:
            norm = self._clip_pipeline_gradients(engine.gradient_clipping())
        else:
            from deepspeed.runtime.utils import clip_grad_norm_

            norm = clip_grad_norm_(parameters=self.module.parameters(),
                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)
        self._last["grad_norm"] = norm

    def _clip_pipeline_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip a pipeline replica's reduced gradients to ``max_norm`` (stage 0, fp32).
        DeepSpeed's stage-0 clipping counts replicated parameters on the first rank of
        the grid's model-parallel group (every stage and shard of the replica) only, so
        later stages' LayerNorms would be left out; here each parameter counts once:
        sharded ones on every tensor-parallel rank, replicated ones on the first, a tied
        copy on its first stage."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        tp_rank = dist.get_rank(self.topology.tp_group) if self.topology.tp_size > 1 else 0
        counted = [p.grad for p in self.module.parameters() if p.grad is not None
                   and not getattr(p, "ds_pipe_replicated", False)
                   and (tp_rank == 0 or tensor_parallel_layout(p).sharded)]
        device = grads[0].device if grads else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for g in counted:
            total += g.double().pow(2).sum()
        dist.all_reduce(total, group=self.engine.mpu.get_model_parallel_group())
        norm = total.sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm.float()

    # -- reductions ---------------------------------------------------------------
    def _reduction_grads(self) -> list[torch.Tensor]:
        """The accumulated gradients DeepSpeed is about to reduce, in a fixed order."""
        if self._bf16_optimizer:
            return [g for g in self.engine.optimizer.get_grads_for_reduction()[0]
                    if g is not None]
        if self.stage == 1:
            opt = self.engine.optimizer
            grads = (opt.get_gradient_for_reduction(p) for group in opt.bit16_groups
                     for p in group)
        else:
            grads = (p.grad for p in self.module.parameters())
        return [g for g in grads if g is not None]

    def _refuse_non_finite(self, grads: list[torch.Tensor], step: int) -> None:
        """A NaN or inf gradient on one rank, even with a finite loss, would spread through
        the reduction into every rank's update. Like a NaN loss, on a check step it makes
        every rank of the job (all tensor- and data-parallel ranks, which must stop
        together) raise WeightError before any gradient is reduced or parameter changed;
        on other steps the flags stay on the device until the next check. Costs one pass
        over the local gradient and one all-reduce of world_size floats per step."""
        world, rank = dist.get_world_size(), dist.get_rank()
        device = grads[0].device if grads else torch.device("cpu")
        flags = torch.zeros(world, dtype=torch.float32, device=device)
        if grads:
            total = torch.stack([g.sum(dtype=torch.float64) for g in grads]).sum()
            flags[rank] = (~torch.isfinite(total)).float()
        all_reduce(flags, "sum")
        if not self.check_step(step):
            self._unchecked.note_gradients(step, flags)
            return
        self._unchecked.raise_if_any(step, self.cfg.metrics.interval)
        bad = [r for r, flag in enumerate(flags.tolist()) if flag != 0]
        if bad:
            raise WeightError(
                f"step {step}: rank{'s' if len(bad) > 1 else ''} {bad} ha"
                f"{'ve' if len(bad) > 1 else 's'} NaN or inf gradients; the step is refused on "
                "every rank and no parameter was changed. Lower the learning rate, check "
                "those ranks' data, or resume from the last checkpoint")

    def _grad_of(self, p: nn.Parameter) -> torch.Tensor | None:
        if self._bf16_optimizer:
            return getattr(p, "_hp_grad", None)  # its fp32 accumulation buffer
        if self.stage == 1:
            return self.engine.optimizer.get_gradient_for_reduction(p)
        return p.grad

    def _sum_partial_grads(self) -> None:
        """Replicated parameters applied to rank-local views (LayerNorms inside reduced-
        sync blocks) hold partial gradients: sum them over the tensor-parallel group."""
        grads = [g for g in (self._grad_of(p) for p in self._partial) if g is not None]
        if grads:
            flat = flatten(grads)
            all_reduce(flat, "sum", group=self.topology.tp_group)
            copy_back(flat, grads)
            if self._counter is not None:
                self._counter.grad_syncs += 1

    def _sum_partial_grad_in_backward(self, grad: torch.Tensor) -> torch.Tensor:
        """ZeRO-2: a partial gradient summed over the tensor-parallel group as autograd
        produces it, before DeepSpeed's reduce-scatter hooks take it (they run once it
        is accumulated). Every rank of the group runs the same graph, so the all-reduces
        come in the same order; one per such parameter and micro-batch."""
        grad = grad.clone()
        all_reduce(grad, "sum", group=self.topology.tp_group)
        if self._counter is not None:
            self._counter.grad_syncs += 1
        return grad

    def _weighted_reduce(self, grads: list[torch.Tensor], args: tuple, kwargs: dict) -> None:
        """ZeRO 0 and 1: the gradients hold ``factor * g_i`` (the loss was scaled by the
        rank's factor): gradient-based signals see ``g_i``, then a plain reduction (mean or
        sum, as DeepSpeed is configured) yields sum_i w_i g_i."""
        agg = self.aggregator
        assert agg is not None and self._loss_factor is not None
        # what the rank's gradient was multiplied by: its loss factor, and under fp16 at ZeRO
        # the loss scale (a host float DeepSpeed keeps; a dynamic scale changes over the run)
        factor = self._loss_factor.double() * self._loss_scale()
        agg.signal.begin_gradient()
        for i, g in enumerate(grads):
            agg.observe_local_piece(i, g.reshape(-1), factor)
        agg.signal.end_gradient()
        if self._fused_reduction:
            self._spd_reduce(grads, "mean" if self.engine.gradient_average else "sum", None)
        else:
            self._originals["allreduce_gradients"](*args, **kwargs)
        if self.stage == 0 and agg.signal.needs_previous_global:
            for i, g in enumerate(self._reduction_grads()):
                agg.remember_global_piece(i, g.reshape(-1))

    def _loss_scale(self) -> float:
        """The fp16 loss scale the rank's gradient carries (1 where it carries none).
        DeepSpeed's engine.backward scales the loss for its ZeRO optimizers only (stage 1
        and up); at stage 0 its fp16 wrappers receive unscaled gradients."""
        if not self._fp16 or self.stage == 0:
            return 1.0
        scale = getattr(self.engine.optimizer, "loss_scale", None)
        return float(scale) if isinstance(scale, (int, float)) else 1.0

    def _spd_reduce(self, grads: list[torch.Tensor], op: str,
                    weights: list[float] | None) -> None:
        """spd_ext's fused all-reduce over the dp group, in buckets of one dtype."""
        if self._grads_are_views():
            for buffer in self._grad_buffers.values():  # in place: the grads are its views
                all_reduce(buffer, op, weights=weights, group=self.dp_group)
            return
        limit = int(self.cfg.comm.bucket_mb * 2**20)
        bucket: list[torch.Tensor] = []
        size = 0

        def flush() -> None:
            nonlocal bucket, size
            if bucket:
                flat = flatten(bucket)
                all_reduce(flat, op, weights=weights, group=self.dp_group)
                copy_back(flat, bucket)
            bucket, size = [], 0

        for g in grads:
            if bucket and (g.dtype != bucket[0].dtype or size + g.numel() * g.element_size()
                           > limit):
                flush()
            bucket.append(g)
            size += g.numel() * g.element_size()
        flush()

    # -- metrics ------------------------------------------------------------------
    def _write_metrics(self, step: int) -> None:
        """On a check step: the step's values, read on the host, to DeepSpeed's monitor and
        the metrics file."""
        last = self.last
        values: dict[str, float] = {"loss": last.get("loss", float("nan"))}
        for r, w in enumerate(last.get("weights") or []):
            values[f"weight/rank{r}"] = w
        for r, s in enumerate(last.get("signals") or []):
            values[f"signal/rank{r}"] = s
        if self.strategy is not None:
            m = self.strategy.metrics
            if m.staleness:
                values["staleness"] = float(m.staleness[-1])
            values["sync_messages"] = float(m.messages)
        if self.fault_tolerant:
            values["islands"] = float(self.strategy.islands_present)
            values["outer_steps_voted_down"] = float(self.strategy.voted_down)
            if self.strategy.island_weight is not None:
                values["island_weight"] = self.strategy.island_weight
        for key in ("syncs_forward", "syncs_backward", "grad_norm"):
            if key in last:
                values[key] = float(last[key])
        values["skipped_optimizer"] = float(last.get("skipped_optimizer", False))
        engine = self.engine
        if dist.get_rank() == 0:
            if getattr(engine.monitor, "enabled", False):
                engine.monitor.write_events([(f"spd_ext/{k}", v, engine.global_samples)
                                             for k, v in values.items() if math.isfinite(v)])
            if self.log is not None:
                self.log.metrics(step=step + 1, **values)

    # -- checkpoints --------------------------------------------------------------
    @property
    def replicas_diverge(self) -> bool:
        """Local SGD / DiLoCo at stage 0: every rank's weights and optimizer state are its
        own between syncs, while DeepSpeed checkpoints data-parallel rank 0's only."""
        return self.mode.kind in ("local_sgd", "diloco") and not self.island_diloco

    def state_dict(self) -> dict:
        state = {"version": STATE_VERSION, "global_steps": self.engine.global_steps,
                 "applied_steps": self.applied_steps,
                 "aggregator": self.aggregator.state_dict() if self.aggregator else None,
                 "strategy": self.strategy.state_dict() if self.strategy else None}
        if self.replicas_diverge:
            state["replica"] = {
                "params": [p.detach().clone() for p in self.module.parameters()],
                "optimizer": self.engine.optimizer.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise RuntimeError(f"spd_ext state version {state.get('version')} is not "
                               f"{STATE_VERSION}: saved by another spd_ext version")
        for name in ("aggregator", "strategy"):
            obj, saved = getattr(self, name), state[name]
            if (obj is None) != (saved is None):
                raise RuntimeError(
                    f"the checkpoint's spd_ext state {'has' if saved is not None else 'lacks'} "
                    f"a {name} but this engine's \"spd_ext\" section "
                    f"{'does not use' if obj is None else 'uses'} one; resume with the "
                    "section the checkpoint was saved with")
            if obj is not None:
                obj.load_state_dict(saved)
        # states saved before steps could be skipped: every step was applied
        self.applied_steps = int(state.get("applied_steps", state["global_steps"]))
        if self.replicas_diverge:
            replica = state["replica"]
            with torch.no_grad():
                for p, saved in zip(self.module.parameters(), replica["params"]):
                    p.copy_(saved)
            self.engine.optimizer.load_state_dict(replica["optimizer"])

    def _state_path(self, root: str, tag: str) -> Path:
        return Path(root) / tag / "spd_ext" / f"rank{dist.get_rank():05d}.pt"

    def _deepspeed_dir(self, root: str) -> str:
        """Islands train apart between syncs and repeat each other's data-parallel ranks,
        so each island keeps its own DeepSpeed checkpoint (``<root>/island<k>``)."""
        if self.topology.islands == 1:
            return root
        return str(Path(root) / f"island{self.topology.island}")

    def save_checkpoint(self, save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        tag = f"global_step{self.engine.global_steps}" if tag is None else str(tag)
        self.check()  # never save weights a step left non-finite unnoticed
        state = self.state_dict()  # collective for delayed:k (waits for gradients in flight)
        out = self._originals["save_checkpoint"](self._deepspeed_dir(save_dir), tag, *args,
                                                 **kwargs)
        with atomic_path(self._state_path(save_dir, tag)) as tmp:
            torch.save(state, tmp)
        dist.barrier()  # every rank's files are written: only now may `latest` name the tag
        # DeepSpeed's signature: save_checkpoint(save_dir, tag, client_state, save_latest, ...)
        save_latest = kwargs.get("save_latest", args[1] if len(args) > 1 else True)
        if self.topology.islands > 1 and save_latest:
            if dist.get_rank() == 0:
                with atomic_path(Path(save_dir) / "latest") as tmp:
                    tmp.write_text(tag)
            dist.barrier()
        return out

    def load_checkpoint(self, load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        if tag is None and self.topology.islands > 1:
            latest = Path(load_dir) / "latest"
            if not latest.is_file():
                raise MissingFileError(f"{latest} is missing: no checkpoint of an islands run "
                                        f"in {load_dir}; pass tag= or the directory given to "
                                        "save_checkpoint")
            tag = latest.read_text().strip()
        out = self._originals["load_checkpoint"](self._deepspeed_dir(load_dir), tag, *args,
                                                 **kwargs)
        if out is None or out[0] is None:
            return out  # DeepSpeed found nothing to load and said so
        if tag is None:
            tag = (Path(load_dir) / "latest").read_text().strip()
        path = self._state_path(load_dir, str(tag))
        if not path.is_file():
            raise MissingFileError(
                f"{path} is missing: the checkpoint in {load_dir} (tag {tag}) was not saved by "
                "an engine with spd_ext attached, or with a different world size; resume "
                "from a checkpoint saved through spd_ext")
        self.load_state_dict(load_checkpoint(path, "spd_ext engine state"))
        return out


class DeferredFaults:
    """Non-finite losses, signals and gradients found on steps that do not read their
    values on the host: kept on the device (the first such step and the ranks) and raised
    as WeightError at the next check step (or checkpoint save)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._first: torch.Tensor | None = None  # first faulty step, -1 if none
        # at that step: the ranks whose loss or signal, whose gradient, was not finite
        self._signals: torch.Tensor | None = None
        self._grads: torch.Tensor | None = None

    def _note(self, step: int, bad: torch.Tensor, kind: str) -> None:
        bad = bad.reshape(-1)
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._signals = torch.zeros(self.world_size, dtype=torch.bool, device=bad.device)
            self._grads = torch.zeros_like(self._signals)
        self._first = torch.where((self._first < 0) & bad.any(), step, self._first)
        # the ranks of the first faulty step only: after it, NaN spreads to every rank
        at_first = self._first == step
        if kind == "signals":
            self._signals = torch.where(at_first, self._signals | bad, self._signals)
        else:
            self._grads = torch.where(at_first, self._grads | bad, self._grads)

    def note_signals(self, step: int, signals: torch.Tensor, weights: torch.Tensor) -> None:
        """``signals``, ``weights``: the data-parallel group's (any non-finite weight marks
        every rank of that group)."""
        bad = ~torch.isfinite(signals) | ~torch.isfinite(weights).all()
        if bad.numel() != self.world_size:  # a data-parallel group smaller than the world
            bad = bad.any().expand(self.world_size)
        self._note(step, bad, "signals")

    def note_gradients(self, step: int, flags: torch.Tensor) -> None:
        self._note(step, flags != 0, "gradients")

    def raise_if_any(self, step: int, interval: int) -> None:
        """WeightError on every rank if any noted step was faulty (a host read)."""
        if self._first is None:
            return
        assert self._signals is not None and self._grads is not None
        first, *flags = torch.cat([self._first.reshape(1), self._signals.long(),
                                   self._grads.long()]).tolist()
        self._first = self._signals = self._grads = None
        if first < 0:
            return
        signals = [r for r in range(self.world_size) if flags[r]]
        grads = [r for r in range(self.world_size) if flags[self.world_size + r]]
        what = "; ".join(part for part in (
            f"ranks {signals} had a NaN or inf loss or signal" if signals else "",
            f"ranks {grads} had NaN or inf gradients" if grads else "") if part)
        raise WeightError(
            f"step {first}: {what}, found at step {step}, the first to read them "
            f"(metrics.interval {interval} reads values on the host every {interval} steps): "
            "the steps since were applied and the parameters may no longer be finite. Resume "
            "from the last checkpoint; metrics.interval 1 refuses such a step before its "
            "update")


def _host(value: Any) -> Any:
    """A value of ``last`` as plain Python: tensors read on the host."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    return value


def _plain(cfg: SpdExtConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
