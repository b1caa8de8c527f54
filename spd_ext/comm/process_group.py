"""The torch.distributed backend ``"spd_ext"``: spd_ext's shared-memory collectives under
any code that calls ``torch.distributed`` (DeepSpeed ZeRO, DDP, FSDP2, torchtitan).

``torch.distributed.init_process_group("cpu:spd_ext")`` (or ``"spd_ext"``) makes every
group a :class:`SpdExtProcessGroup` once the backend is registered (``import
spd_ext.comm``, or :func:`register_backend`). Each group holds:

- an inner gloo group, registered as the group's CPU backend: what spd_ext does not carry
  (send/recv, all_to_all, gather/scatter, MIN/MAX/PRODUCT reductions, dtypes the reduction
  kernel lacks, ranks on several hosts) goes there, and so do the C++ callers that bypass
  Python (functional collectives' all-gather and reduce-scatter, ``DTensor.full_tensor``);
- the group's shared-memory segment (set up with the group, through its store), which
  carries all_reduce (sum, avg, premul-sum: spd_ext's weighted op when each rank passes its
  own factor), reduce, reduce_scatter_tensor, all_gather_into_tensor, all_gather,
  broadcast and barrier.

Calls are checked across ranks as ``spd_ext.comm.all_reduce``'s are: ranks that pass
different sizes, dtypes, ops or collectives all raise the same error, and a peer that
dies or stops is named within the timeout (the process group's). A call delegated to gloo
is first checked through the segment, so a rank whose call goes to gloo while a peer's
goes to shared memory raises instead of hanging.

Asynchronous calls (``async_op=True``) return a ``Work`` whose ``wait()`` raises the
call's error and whose future DDP's reducer chains on. By default they complete before
returning: with one core per rank a progress thread only competes with the rank's
compute (measured in docs/benchmarks.md). ``SPD_EXT_BACKEND_THREAD=reductions`` (or
``all``) runs them in issue order on the group's progress thread
(:class:`~spd_ext.comm.work.ProgressThread`), the kernel releasing the GIL, overlapping
what the caller does next. Calls on a group complete in the order they were issued.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.backend_names import SPD_EXT
from spd_ext.comm.torch_private import premul_sum_op

#: The name torch.distributed knows the backend by.
BACKEND_NAME = SPD_EXT

_REDUCTIONS = frozenset({"all_reduce", "all_reduce_coalesced", "reduce",
                         "reduce_scatter_tensor"})

#: What ``SPD_EXT_BACKEND_THREAD`` chooses from: which collectives an ``async_op=True``
#: call runs on the group's progress thread (the others complete before returning).
ASYNC_MODES: dict[str, frozenset[str]] = {
    # The default. With one core per rank (ranks pinned, the usual set-up) the thread
    # competes with the rank's own compute, and it needs the GIL before it can start a
    # call while the peers already wait in it: measured, no step got faster on the thread
    # and ZeRO-3's (parameter fetches awaited at once) got slower (docs/benchmarks.md).
    "none": frozenset(),
    # Reductions overlap what follows them (DDP's buckets, ZeRO-2's gradient buckets),
    # which pays where a rank has a core to spare for the thread.
    "reductions": _REDUCTIONS,
    "all": _REDUCTIONS | {"all_gather_into_tensor", "all_gather", "broadcast", "barrier"},
}

_OTHER_OP_BASE = 16  # op codes the segment compares for reductions gloo carries
_CPU = torch.device("cpu")


class CollectiveWork(dist.Work):
    """A collective in flight (or done), as torch.distributed's callers expect: ``wait()``
    blocks until it completes and raises its error; ``get_future()`` gives a future whose
    value is the list of output tensors (DDP's reducer reads it)."""

    def __init__(self, future: torch.futures.Future) -> None:
        super().__init__()
        self._future = future

    @classmethod
    def done(cls, result: list[torch.Tensor]) -> CollectiveWork:
        future: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        future.set_result(result)
        return cls(future)

    def wait(self, timeout: timedelta | None = None) -> bool:
        self._future.wait()  # raises the collective's error
        return True

    def get_future(self) -> torch.futures.Future:
        return self._future

    def result(self) -> list[torch.Tensor]:
        return self._future.value()


def threaded_collectives() -> frozenset[str]:
    """The collectives whose asynchronous calls run on the progress thread, as
    ``SPD_EXT_BACKEND_THREAD`` says (``none``, the default; ``reductions``; ``all``)."""
    from spd_ext.errors import UsageError

    mode = os.environ.get("SPD_EXT_BACKEND_THREAD", "none")
    if mode not in ASYNC_MODES:
        raise UsageError(f"SPD_EXT_BACKEND_THREAD={mode!r}: use one of "
                         f"{', '.join(ASYNC_MODES)}")
    return ASYNC_MODES[mode]


def _reduction(op: dist.ReduceOp, world_size: int) -> tuple[str, float] | None:
    """torch's reduce op as the kernel's (op, this rank's factor); None: gloo's to carry."""
    kind = op.op
    if kind == dist.ReduceOp.SUM:
        return "sum", 1.0
    if kind == dist.ReduceOp.AVG:
        return "mean", 1.0 / world_size
    if kind == dist.ReduceOp.PREMUL_SUM:
        factor = op.factor
        return "weighted", float(factor.item() if isinstance(factor, torch.Tensor) else factor)
    return None


def _op_code(op: dist.ReduceOp, reduction: tuple[str, float] | None) -> int:
    from spd_ext.ops.codes import OP_CODES

    return OP_CODES[reduction[0]] if reduction else _OTHER_OP_BASE + int(op.op)


def _scaled_for_gloo(tensors: list[torch.Tensor], opts: Any,
                     reduction: tuple[str, float] | None, factory: Callable[[], Any]) -> Any:
    """The options to hand gloo, which refuses PREMUL_SUM: for it, ``tensors`` scaled by the
    factor in place and the op made SUM; any other op as it was."""
    if reduction is None or reduction[0] != "weighted":
        return opts
    for tensor in tensors:
        tensor.mul_(reduction[1])
    return _as_sum(opts, factory)


def _as_sum(opts: Any, factory: Callable[[], Any]) -> Any:
    """``opts`` with its reduce op replaced by SUM (gloo refuses PREMUL_SUM: the caller has
    scaled the tensor by the factor)."""
    plain = factory()
    plain.reduceOp = dist.ReduceOp.SUM
    plain.timeout = opts.timeout
    for field in ("rootRank", "rootTensor"):  # reduce's
        if hasattr(opts, field):
            setattr(plain, field, getattr(opts, field))
    return plain


def _in_place(tensor: torch.Tensor, kernel: Callable[[torch.Tensor], None]) -> None:
    """Run an in-place ``kernel`` (which takes contiguous tensors) on ``tensor``, through a
    contiguous copy written back when ``tensor`` is strided."""
    flat = tensor if tensor.is_contiguous() else tensor.contiguous()
    kernel(flat)
    if flat is not tensor:
        tensor.copy_(flat)


def _cpu_contiguous(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


class SpdExtProcessGroup(dist.ProcessGroup):
    """One process group of the ``"spd_ext"`` backend (see the module's docstring)."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta,
                 global_ranks: list[int] | None = None) -> None:
        super().__init__(rank, size)
        self._threaded = threaded_collectives()
        self._timeout_s = timeout.total_seconds()
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, size,
                                           timeout)
        # Registered, gloo is what every collective this class does not override runs on,
        # and what gives the group its name (DeviceMesh, functional collectives need it).
        self._register_backend(_CPU, dist.ProcessGroup.BackendType.GLOO, self._gloo)
        self._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        # Imported here: spd_ext.comm.shm imports this module (its registry hands a group of
        # this backend its own segment).
        from spd_ext.comm.groups import SetupExchange
        from spd_ext.comm.shm import open_shm_group

        exchange = SetupExchange.over_store(dist.PrefixStore("spd_ext/", store), rank, size,
                                            list(global_ranks or range(size)),
                                            "torch.distributed backend", self._timeout_s)
        found = open_shm_group(exchange)
        #: the group's shared-memory context, or why it has none (then gloo carries all)
        self.shm_group = found
        self._shm = None if isinstance(found, str) else found
        #: calls carried by the segment so far, by collective (what reached spd_ext)
        self.shm_calls: Counter[str] = Counter()

    def getBackendName(self) -> str:  # noqa: N802 - torch's name for it
        return BACKEND_NAME

    def describe(self) -> str:
        """What carries this group's collectives, in words."""
        if self._shm is None:
            return f"gloo ({self.shm_group})"
        return (f"shared memory ({self.size()} ranks, chunk {self._shm.chunk_bytes} B); "
                "gloo for the rest")

    # -- how a call runs -------------------------------------------------------------------

    def _seconds(self, opts: Any) -> float:
        seconds = opts.timeout.total_seconds()
        return seconds if seconds > 0 else self._timeout_s

    def _run(self, collective: str, job: Callable[[], None], result: list[torch.Tensor],
             async_op: bool) -> CollectiveWork:
        """Run ``job`` on the segment: an asynchronous call of a collective the group runs
        threaded (:func:`threaded_collectives`) on the group's progress thread, after the
        calls queued there; any other call here, after those calls."""
        self.shm_calls[collective] += 1
        progress = self._shm.progress
        threaded = async_op and collective in self._threaded
        if not threaded and not progress.busy():
            job()
            return CollectiveWork.done(result)
        work = CollectiveWork(progress.submit(job, result))
        if not threaded:
            work.wait()
        return work

    def _check_then_delegate(self, tensor: torch.Tensor, collective: str, op: dist.ReduceOp,
                             reduction: tuple[str, float] | None, timeout: float) -> None:
        """Before a call goes to gloo: every rank checks through the segment (after the
        calls queued on it) that all make this call, so none waits in gloo for a peer whose
        call went to shared memory."""
        self._shm.progress.drain()
        self._shm.check_call_(tensor, collective, _op_code(op, reduction),
                              reduction[1] if reduction else 0.0, timeout)

    # -- collectives -----------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor],
                  opts: dist.AllreduceOptions | None = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllreduceOptions()
        reduction = _reduction(opts.reduceOp, self.size())
        if self._shm is None or len(tensors) != 1 or tensors[0].device.type != "cpu":
            return self._gloo_allreduce(tensors, opts, reduction)
        tensor, timeout = tensors[0], self._seconds(opts)
        if reduction is None or not self._shm.suits(tensor):
            self._check_then_delegate(tensor, "all_reduce", opts.reduceOp, reduction, timeout)
            return self._gloo_allreduce(tensors, opts, reduction)
        op, weight = reduction
        shm = self._shm

        return self._run("all_reduce", lambda: _in_place(
            tensor, lambda flat: shm.all_reduce_(flat, op, weight, 0, timeout)),
            tensors, opts.asyncOp)

    def _gloo_allreduce(self, tensors: list[torch.Tensor], opts: Any,
                        reduction: tuple[str, float] | None) -> dist.Work:
        opts = _scaled_for_gloo(tensors, opts, reduction, dist.AllreduceOptions)
        return self._gloo.allreduce(tensors, opts)

    def allreduce_coalesced(self, tensors: list[torch.Tensor],
                            opts: dist.AllreduceCoalescedOptions | None = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllreduceCoalescedOptions()
        reduction = _reduction(opts.reduceOp, self.size())
        if self._shm is None or reduction is None or not all(
                t.device.type == "cpu" and self._shm.suits(t) for t in tensors):
            opts = _scaled_for_gloo(tensors, opts, reduction, dist.AllreduceCoalescedOptions)
            return self._gloo.allreduce_coalesced(tensors, opts)
        op, weight = reduction
        timeout, shm = self._seconds(opts), self._shm

        def job() -> None:
            for tensor in tensors:
                _in_place(tensor, lambda flat: shm.all_reduce_(flat, op, weight, 0, timeout))

        return self._run("all_reduce_coalesced", job, tensors, opts.asyncOp)

    def reduce(self, tensors: list[torch.Tensor],
               opts: dist.ReduceOptions | None = None) -> dist.Work:
        opts = opts if opts is not None else dist.ReduceOptions()
        reduction = _reduction(opts.reduceOp, self.size())
        if self._shm is None or len(tensors) != 1 or opts.rootTensor != 0 or \
                reduction is None or not (tensors[0].device.type == "cpu"
                                          and self._shm.suits(tensors[0])):
            if self._shm is not None and len(tensors) == 1:
                self._check_then_delegate(tensors[0], "all_reduce", opts.reduceOp, reduction,
                                          self._seconds(opts))
            if self.rank() != opts.rootRank:  # gloo writes partial sums into it
                tensors = [t.clone() for t in tensors]
            opts = _scaled_for_gloo(tensors, opts, reduction, dist.ReduceOptions)
            return self._gloo.reduce(tensors, opts)
        tensor, op, weight = tensors[0], *reduction
        root, timeout, shm = opts.rootRank, self._seconds(opts), self._shm
        mine = self.rank() == root

        def job() -> None:
            # Every rank reduces (one-shot: as cheap as reducing on the root alone); the
            # others into a copy, leaving their input as it was.
            flat = tensor if mine and tensor.is_contiguous() else tensor.contiguous().clone()
            shm.all_reduce_(flat, op, weight, 0, timeout)
            if mine and flat is not tensor:
                tensor.copy_(flat)

        return self._run("reduce", job, tensors, opts.asyncOp)

    def broadcast(self, tensors: list[torch.Tensor],
                  opts: dist.BroadcastOptions | None = None) -> dist.Work:
        opts = opts if opts is not None else dist.BroadcastOptions()
        if self._shm is None or len(tensors) != 1 or opts.rootTensor != 0 or \
                tensors[0].device.type != "cpu":
            return self._gloo_broadcast(tensors, opts)
        tensor, root, timeout, shm = tensors[0], opts.rootRank, self._seconds(opts), self._shm

        return self._run("broadcast", lambda: _in_place(
            tensor, lambda flat: shm.broadcast_(flat, root, timeout)), tensors, opts.asyncOp)

    def _gloo_broadcast(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        if len(tensors) != 1 or tensors[0].is_contiguous():
            return self._gloo.broadcast(tensors, opts)
        # gloo ignores strides (it writes numel() elements from the storage's start)
        tensor = tensors[0]
        flat = tensor.contiguous()

        def copy_back(_: torch.futures.Future) -> list[torch.Tensor]:
            tensor.copy_(flat)
            return [tensor]

        return CollectiveWork(self._gloo.broadcast([flat], opts).get_future().then(copy_back))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
                          opts: dist.AllgatherOptions | None = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        if self._shm is None or not _cpu_contiguous(output, input):
            return self._gloo._allgather_base(output, input, opts)
        self._check_sizes("all_gather_into_tensor", "output", output, input)
        timeout, shm = self._seconds(opts), self._shm
        return self._run("all_gather_into_tensor",
                         lambda: shm.all_gather_(output, input, timeout), [output], opts.asyncOp)

    _allgather_base = all_gather_single  # the name torch used before 2.6

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor],
                  opts: dist.AllgatherOptions | None = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        if self._shm is None or len(input_tensors) != 1 or len(output_tensors) != 1 or \
                input_tensors[0].device.type != "cpu":
            return self._gloo.allgather(output_tensors, input_tensors, opts)
        outputs, input = output_tensors[0], input_tensors[0]
        if len(outputs) != self.size() or any(
                o.numel() != input.numel() or o.dtype != input.dtype or o.device.type != "cpu"
                for o in outputs):
            return self._gloo.allgather(output_tensors, input_tensors, opts)
        timeout, shm = self._seconds(opts), self._shm

        def job() -> None:
            flat = torch.empty(self.size() * input.numel(), dtype=input.dtype)
            shm.all_gather_(flat, input.contiguous().view(-1), timeout)
            for out, part in zip(outputs, flat.chunk(self.size())):
                out.copy_(part.view(out.shape))

        return self._run("all_gather", job, outputs, opts.asyncOp)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: dist.ReduceScatterOptions | None = None) -> dist.Work:
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        reduction = _reduction(opts.reduceOp, self.size())
        if self._shm is None or not _cpu_contiguous(output, input):
            return self._gloo_reduce_scatter(output, input, opts, reduction)
        self._check_sizes("reduce_scatter_tensor", "input", input, output)
        timeout = self._seconds(opts)
        if reduction is None or not self._shm.suits(input):
            self._check_then_delegate(output, "reduce_scatter", opts.reduceOp, reduction,
                                      timeout)
            return self._gloo_reduce_scatter(output, input, opts, reduction)
        op, weight = reduction
        shm = self._shm
        return self._run("reduce_scatter_tensor",
                         lambda: shm.reduce_scatter_(output, input, op, weight, timeout),
                         [output], opts.asyncOp)

    _reduce_scatter_base = reduce_scatter_single  # the name torch used before 2.6

    def _gloo_reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, opts: Any,
                             reduction: tuple[str, float] | None) -> dist.Work:
        if reduction is not None and reduction[0] == "weighted":
            input = input * reduction[1]  # the caller's input stays as it was
            opts = _as_sum(opts, dist.ReduceScatterOptions)
        return self._gloo._reduce_scatter_base(output, input, opts)

    def barrier(self, opts: dist.BarrierOptions | None = None) -> dist.Work:
        opts = opts if opts is not None else dist.BarrierOptions()
        if self._shm is None:
            return self._gloo.barrier(opts)
        timeout, shm = self._seconds(opts), self._shm
        return self._run("barrier",
                         lambda: shm.check_call_(torch.empty(0), "barrier", 0, 0.0, timeout),
                         [], opts.asyncOp)

    def _check_sizes(self, what: str, whole_name: str, whole: torch.Tensor,
                     part: torch.Tensor) -> None:
        """gloo's local check, before any rank waits: ``whole`` holds world_size x
        ``part``."""
        if whole.numel() != part.numel() * self.size() or whole.dtype != part.dtype:
            raise ValueError(f"{what}: the {whole_name} tensor must hold world_size "
                             f"({self.size()}) x {part.numel()} elements of {part.dtype}, got "
                             f"{whole.numel()} of {whole.dtype}")

    # -- life cycle ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Release the segment and the progress thread, then gloo (destroy_process_group
        calls this)."""
        self._release()
        super().shutdown()

    def abort(self) -> None:
        self._release()
        super().abort()

    def _release(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None


def _create(options: Any, backend_options: Any) -> SpdExtProcessGroup:
    """torch.distributed's creator of a group (its extended API: the group's global ranks
    name it in errors)."""
    return SpdExtProcessGroup(options.store, options.group_rank, options.group_size,
                              options.timeout, list(options.global_ranks_in_group))


def register_backend() -> None:
    """Make ``"spd_ext"`` a torch.distributed backend for CPU tensors (idempotent). Must run
    in every rank before ``init_process_group``; ``import spd_ext.comm`` runs it."""
    if BACKEND_NAME in dist.Backend.backend_list:
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True, devices=["cpu"])


def is_spd_ext_group(group: Any = None) -> bool:
    """Whether ``group`` (default: the world) is a group of the backend "spd_ext"."""
    return isinstance(dist.group.WORLD if group is None else group, SpdExtProcessGroup)


def weighted_op(weight: float) -> dist.ReduceOp:
    """The reduce op of spd_ext's weighted all-reduce through torch.distributed: each rank
    passes its own ``weight`` and the result is ``sum_i weight_i * tensor_i`` (torch's
    PREMUL_SUM; on gloo, spd_ext scales then sums)."""
    return premul_sum_op(float(weight))
