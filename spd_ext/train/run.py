"""`spd-ext train`'s rank program: a ReducedSyncGPT trained through spd_ext.deepspeed.

    spd-ext train CONFIG [--set KEY=VALUE ...] --nproc 2          # starts the launcher itself
    deepspeed --num_gpus 8 --module spd_ext.train.run CONFIG [--set ...]  # or any launcher:
    torchrun --nproc_per_node 8 -m spd_ext.train.run CONFIG          # one process per rank

Every rank reads the same config and checks it before touching torch.distributed. The
model is ``ReducedSyncGPT`` sharded over the tensor-parallel group (``parallel.tp``), the
engine ``spd_ext.deepspeed.initialize`` (ZeRO 0/1, bf16, the ds_config's "spd_ext"
section: signal weighting, staleness, islands). Each data-parallel replica reads its own
shard (``spd_ext.data.ShardedSampler``; batches depend only on the step, so a resumed run
reads what an uninterrupted one would). Rank 0 prints progress, writes the JSONL log, the
loss plot, a text sample, a summary and model.pt (the weights for `spd-ext serve`).
Checkpoints go through the engine; ``latest`` is
written only once every rank's files are on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from spd_ext.backend_names import SPD_EXT, SPD_EXT_CPU_BACKEND
from spd_ext.errors import UsageError
from spd_ext.train.config import (
    RunPlan,
    check_environment,
    load_config,
    plan_run,
)
from spd_ext.train.loop import LoopResult, LoopSettings, TrainingDiverged, TrainingLoop
from spd_ext.utils.files import (
    WriteError,
    atomic_path,
    write_json,
)
from spd_ext.utils.locks import ProcessLock
from spd_ext.utils.run_log import read_metrics

PROG = "spd-ext train"


# -- schedule ----------------------------------------------------------------------------
def lr_at(step: int, training: Any) -> float:
    """The learning rate at ``step``: warm-up, then cosine decay over lr_decay_steps (default:
    steps) or ``schedule: constant``."""
    from spd_ext.train.trainer import scheduled_lr

    return scheduled_lr(step, training.lr, training.min_lr, training.warmup_steps,
                        training.lr_decay_steps or training.steps, training.schedule)


# -- pieces of the run --------------------------------------------------------------------
def _dist_backend(choice: str, accelerator: Any) -> str:
    """``init_process_group``'s backend for ``parallel.dist_backend``: spd_ext's on a CPU
    accelerator unless the run asks for DeepSpeed's own (gloo there, NCCL on GPUs)."""
    device = accelerator.device_name()
    if choice == "auto":
        choice = SPD_EXT if device == "cpu" else "deepspeed"
    if choice != SPD_EXT:
        return accelerator.communication_backend_name()
    if device != "cpu":
        raise UsageError(f"parallel.dist_backend spd_ext carries CPU tensors; this run's "
                         f"DeepSpeed accelerator is {device}: use auto or deepspeed")
    return SPD_EXT_CPU_BACKEND


def _quiet_deepspeed() -> None:
    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def build_model(plan: RunPlan, vocab_size: int, topology: Any):
    from spd_ext.tp import DistributedComm, GPTConfig, ReducedSyncGPT

    m = plan.cfg.values["model"]
    seed = plan.cfg.values["training"]["seed"]
    backend = plan.cfg.values["parallel"]["tp_backend"]
    if plan.pp > 1:
        return _build_pipeline(plan, vocab_size)
    comm = DistributedComm(topology.tp_group, backend=backend) if plan.tp > 1 else None
    if m["hf_path"] is not None:
        from spd_ext.tp.convert import load_pretrained

        model = load_pretrained(Path(m["hf_path"]).expanduser(), pattern=m["pattern"],
                                tp_size=plan.tp, comm=comm)
        if m["dropout"]:
            for module in model.modules():
                if module.__class__.__name__ == "Dropout":
                    module.p = m["dropout"]
            for block in model.h:
                block.attn.dropout = m["dropout"]
            model.config.dropout = m["dropout"]
        return model
    fields = {**plan.model, "vocab_size": plan.model["vocab_size"] or vocab_size}
    return ReducedSyncGPT(GPTConfig(**fields), comm, seed=seed)


def _build_pipeline(plan: RunPlan, vocab_size: int) -> Any:
    """The model as ``parallel.pp`` pipeline stages (spd_ext.deepspeed.pipeline_module);
    a Hugging Face start loads its dense weights into each rank's layers."""
    import spd_ext.deepspeed as sd
    from spd_ext.tp import GPTConfig

    m, p = plan.cfg.values["model"], plan.cfg.values["parallel"]
    seed = plan.cfg.values["training"]["seed"]
    if m["hf_path"] is not None:
        from spd_ext.tp.convert import load_pretrained

        dense_model = load_pretrained(Path(m["hf_path"]).expanduser(), pattern=m["pattern"],
                                      tp_size=1)
        fields = {**dense_model.config.to_dict(), "tp_size": plan.tp,
                  "dropout": m["dropout"] or 0.0}
        dense: dict | None = dense_model.dense_state_dict()
    else:
        fields = {**plan.model, "vocab_size": plan.model["vocab_size"] or vocab_size}
        dense = None
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints the partition
        pipe = sd.pipeline_module(GPTConfig(**fields), plan.pp,
                                  seed=seed if dense is None else None,
                                  partition_method=p["pp_partition"],
                                  activation_checkpointing=p["recompute"],
                                  tp_backend=p["tp_backend"], islands=plan.islands)
    if dense is not None:
        pipe.load_dense_state_dict(dense)
    return pipe


def _fresh_out_dir(plan: RunPlan) -> None:
    """A new run: the previous run's files in out_dir go (checkpoints only with --overwrite;
    without it, check_environment refused a folder holding complete ones)."""
    out = plan.out_dir
    shutil.rmtree(plan.checkpoint_dir, ignore_errors=True)
    for name in ("log.jsonl", "loss.png", "sample.txt", "summary.json", "model.pt"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _precision(plan: RunPlan) -> str:
    return f"ZeRO-{plan.zero_stage} {'bf16' if plan.bf16 else 'fp32'}"


def _layout(plan: RunPlan) -> str:
    if plan.pp > 1:
        inside = f"pp {plan.pp} x tp {plan.tp} x dp {plan.dims.dp}"
        return f"{plan.islands} islands x {inside}" if plan.islands > 1 else inside
    if plan.islands > 1:
        per = plan.world_size // plan.islands
        inside = f"tp {plan.tp} x dp {per // plan.tp}" if plan.tp > 1 else f"{per} ranks"
        return f"{plan.islands} islands x {inside}"
    return f"tp {plan.tp} x dp {plan.data_world}"


# -- the run ------------------------------------------------------------------------------
def run(plan: RunPlan, facts: dict, resume: bool = False, rejoin: bool = False) -> int:
    """Train on this rank. torch.distributed is initialized here if it is not yet: its
    rendezvous bound to the job's address (spd_ext.comm.rendezvous), every wait for
    another rank bounded by ``parallel.rank_timeout`` (gloo's collectives and spd_ext's),
    and a rank whose wait fails names the rank that stopped answering."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from spd_ext.comm.groups import is_peer_failure
    from spd_ext.comm.rendezvous import init_launched_group
    from spd_ext.deepspeed import release_deepspeed_shm_name
    from spd_ext.deepspeed.ops import load_deepspeed_comm_op
    from spd_ext.train.rank_watch import RankWatch

    _quiet_deepspeed()
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)  # DeepSpeed's ZeRO calls, not ours
    timeout = plan.rank_timeout
    os.environ["SPD_EXT_COMM_TIMEOUT"] = repr(timeout)  # spd_ext's collectives, as gloo's
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":  # before the first collective (NCCL binds to it)
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    owned = not dist.is_initialized()
    if owned:
        load_deepspeed_comm_op()  # under spd_ext's build lock: never a silent hang
        init_launched_group(_dist_backend(plan.dist_backend, accelerator), timeout)
        deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=timeout))
        # Every rank has mapped every DeepSpeed CPU all-reduce segment (69 MB each) by now:
        # their names go before anything else can fail and leave them in /dev/shm.
        release_deepspeed_shm_name()
    rank = dist.get_rank()
    watch = RankWatch.from_environment() if owned else None
    try:
        return _train(plan, facts, resume, watch.mark if watch else lambda phase: None,
                      rejoin)
    except WriteError as exc:
        print(f"{PROG}: error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        who = watch.blame(timeout) if watch else f"rank {rank}"
        print(f"{PROG}: error: a collective failed: {who} (parallel.rank_timeout "
              f"{timeout:g} s; rank {rank} saw: {one_line(exc)[:300]})", file=sys.stderr,
              flush=True)
        return 1
    finally:
        if watch is not None:
            watch.close()
        if owned:  # on every exit: a group left behind leaks its communicators (NCCL warns)
            dist.destroy_process_group()


@dataclass
class _Rank:
    """What this rank trains with (:func:`_build`)."""

    plan: RunPlan
    rank: int
    world: int
    data_rank: int
    data: Any  # the TokenDataset
    topology: Any
    model: Any
    sampler: Any
    optimizer: Any
    engine: Any
    log: Any  # a RunLog on rank 0, else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def tokens_per_step(self) -> int:
        t = self.plan.cfg.training
        return t.micro_batch * t.grad_accum * self.model.config.block_size * self.plan.data_world


def _build(plan: RunPlan, resume: bool, mark: Callable[[str], None],
           rejoin: bool = False) -> _Rank:
    """The out_dir (a fresh run's: emptied), data, model, sampler, engine and log."""
    import torch
    import torch.distributed as dist

    import spd_ext.deepspeed as sd
    from spd_ext.data import Corruption, ShardedSampler, TokenDataset
    from spd_ext.train.trainer import make_optimizer
    from spd_ext.utils.run_log import RunLog

    rank, world = dist.get_rank(), dist.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} ranks, launched with {world}")
    cfg = plan.cfg
    t, d = cfg.training, cfg.data
    data_rank = plan.dims.data_rank(rank)
    mark("preparing the out_dir")
    if rank == 0 and not resume and not rejoin:
        _fresh_out_dir(plan)
    dist.barrier()
    mark("building the model and the engine")
    data = TokenDataset(d.corpus, d.tokenizer, val_fraction=d.val_fraction)
    topology = plan.dims.build()
    # dropout: one stream per tensor-parallel group (of every island)
    torch.manual_seed(t.seed + plan.sampler_rank(data_rank))
    model = build_model(plan, data.vocab_size, topology)
    corruption = (Corruption(**cfg.values["data"]["corruption"])
                  if d.sharding == "clean_vs_corrupt" else None)
    sampler = ShardedSampler(data, plan.sampler_rank(data_rank), plan.sampler_world,
                             t.micro_batch,
                             model.config.block_size, t.seed, sharding=d.sharding,
                             corrupt_ranks=tuple(d.corrupt_ranks), corruption=corruption)
    optimizer = make_optimizer(model, t)  # AdamW: the Trainer's parameter groups
    engine, *_ = sd.initialize(model=model, optimizer=optimizer, config=plan.ds_config)
    log = RunLog(plan.out_dir / "log.jsonl", run_name=_run_name(plan),
                 config={**cfg.to_dict(), "world_size": world}, quiet=True,
                 wandb_project=cfg.values["wandb"]["project"]) if rank == 0 else None
    return _Rank(plan, rank, world, data_rank, data, topology, model, sampler, optimizer,
                 engine, log)


def _run_name(plan: RunPlan) -> str:
    return plan.cfg.values["wandb"]["name"] or plan.out_dir.name


def _loop(r: _Rank, facts: dict, mark: Callable[[str], None]) -> TrainingLoop:
    """The training loop of this rank: the engine's step and evaluation, the checkpointer."""
    from spd_ext.train.checkpoints import EngineCheckpointer
    from spd_ext.train.engine_step import EngineEvaluation, EngineStep, mean_over_ranks

    t, plan = r.plan.cfg.training, r.plan
    settings = LoopSettings(t.steps, t.log_interval, t.eval_interval, t.checkpoint_interval)

    def checks(done: int) -> bool:  # the NaN check runs where the loss is read or kept
        return settings.logs(done, loop.result.start) or \
            settings.due(done, t.checkpoint_interval)

    step = EngineStep(r.engine, r.sampler, t.grad_accum, r.tokens_per_step, checks,
                      pipeline=plan.pp > 1)
    evaluate = EngineEvaluation(r.engine, r.sampler, t.eval_batches, r.data_rank,
                                plan.data_world, plan.tp, plan.zero_stage,
                                getattr(r.model, "sync_counter", None), pipeline=plan.pp > 1)
    checkpointer = EngineCheckpointer(r.engine, plan, r.data.tokenizer, mark,
                                      facts.get("resume_tag"))
    loop = TrainingLoop(settings, step, r.optimizer, lambda s: lr_at(s, t), evaluate,
                        read_loss=mean_over_ranks, checkpointer=checkpointer, log=r.log,
                        mark=mark, diverged_hint="lower training.lr or raise "
                        "training.warmup_steps, and resume from the last checkpoint")
    return loop


def _announce(r: _Rank, facts: dict, start: int) -> None:
    plan, t = r.plan, r.plan.cfg.training
    if facts.get("resume_note"):
        print(f"{PROG}: note: {facts['resume_note']}", flush=True)
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "no process group"
    print(f"{PROG}: {plan.cfg.name}: {r.world} rank(s) on {backend}, {_layout(plan)}, "
          f"{_precision(plan)}, "
          f"pattern {r.model.config.pattern}, {r.model.num_params() / 1e6:.2f}M parameters, "
          f"{r.tokens_per_step:,} tokens/step, steps {start}->{t.steps}, out "
          f"{plan.out_dir}", flush=True)


def _stopped(r: _Rank, loop: TrainingLoop, exc: BaseException) -> int:
    """A run stopped on every rank together (NaN / inf loss or gradients): one line, exit 1."""
    if loop.progress is not None:
        loop.progress.close()
    if r.main:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        # a loss read after its step, a gradient check inside it
        step = getattr(exc, "step", loop.result.start + len(loop.result.step_times) + 1)
        r.log.event("stopped", step=step, reason=one_line(exc))
        r.log.close()
    return 1


def _train(plan: RunPlan, facts: dict, resume: bool, mark: Callable[[str], None],
           rejoin: bool = False) -> int:
    import torch.distributed as dist

    from spd_ext.deepspeed.fault_tolerance import OuterStepFailed
    from spd_ext.dp.aggregator import WeightError
    from spd_ext.train.progress import Progress

    r = _build(plan, resume, mark, rejoin)
    loop = _loop(r, facts, mark)
    start = loop.resume() if resume else 0
    if plan.fault_tolerant:
        mark("joining the islands")
        # a restarted island heals to the others' step (and never waits for all of them)
        start = r.engine.spd_ext.join_islands(wait_for_all=not rejoin)
        healed = r.engine.spd_ext.strategy.healed_at is not None
        if rejoin and not healed:  # alone: training from scratch would only mislead
            if r.main:
                message = (f"island {plan.island} restarted (--rejoin) but no live island "
                           "was there to heal from (the others finished or died); nothing "
                           "to rejoin: start the run again")
                print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
                r.log.event("stopped", step=start, reason=message)
                r.log.close()
            r.engine.spd_ext.close()
            return 1
        if r.main and start:
            r.log.event("joined", step=start, island=plan.island, healed=healed)
        ft = plan.cfg.values["fault_tolerance"]
        if ft["kill_at_step"] is not None and ft["kill_island"] == plan.island and \
                not rejoin and r.main:
            loop.step = _killed_at(loop.step, ft["kill_at_step"])
    t = plan.cfg.training
    loop.progress = Progress(t.steps, start, t.log_interval, r.main)
    if r.main:
        _announce(r, facts, start)
    r.engine.train()
    try:
        loop.run(start)
    except (WeightError, TrainingDiverged, OuterStepFailed) as exc:  # on every rank together
        return _stopped(r, loop, exc)
    result = loop.finish()
    sample = _export_and_sample(r, mark)
    train_loss = _recent_mean(result.recent, r.engine.device)
    if r.main:
        _summarize(r, result, train_loss, sample, start if resume else None)
    mark("finishing")
    dist.barrier()
    r.engine.spd_ext.close()
    return 0


def _killed_at(step_fn: Callable, at: int) -> Callable:
    """fault_tolerance.kill_at_step: this rank (the island's first) dies by SIGKILL as it
    starts step ``at``, as a machine lost would; its launcher then stops the island."""

    def step(index: int) -> Any:
        if index == at:
            print(f"{PROG}: fault injection: killing this island at step {at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return step_fn(index)

    return step


def _export_and_sample(r: _Rank, mark: Callable[[str], None]) -> str:
    """model.pt (every rank takes part; rank 0 writes), then the sample (the first
    data-parallel replica's ranks generate it together)."""
    from spd_ext.train.outputs import export_model, generate, whole_copy

    plan, s, model = r.plan, r.plan.cfg.sample, r.model
    mark("exporting model.pt")
    sampled = r.engine.module
    tp_group = r.topology.tp_group if plan.tp > 1 else None
    if plan.pp > 1:
        # the stages' layers gathered into one dense model (collective); the first rank
        # samples with it alone
        dense = export_model(model, r.data.tokenizer, plan.out_dir / "model.pt", r.main)
        if not s.tokens or not r.main:
            return ""
        sampled, tp_group = whole_copy(model, dense), None
    elif plan.zero_stage == 3:
        # ZeRO-3 holds each parameter partitioned over the data-parallel ranks: gather them
        # (collective) to export, and sample with a whole copy (a forward of the
        # partitioned module on one rank alone would wait for the others' shards)
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(model.parameters())):
            export_model(model, r.data.tokenizer, plan.out_dir / "model.pt", r.main)
            if s.tokens and r.data_rank == 0:
                sampled = whole_copy(model)
    else:
        export_model(model, r.data.tokenizer, plan.out_dir / "model.pt", r.main)
    if not s.tokens or r.data_rank != 0:
        return ""
    mark("sampling")
    sample = generate(sampled, r.data.tokenizer, s.prompt, s.tokens, s.temperature, s.top_k,
                      model.config.block_size, plan.cfg.training.seed, r.engine.device,
                      tp_group, r.topology.tp_ranks[0] if plan.tp > 1 else 0)
    counter = getattr(model, "sync_counter", None)
    if counter is not None:
        counter.reset()
    return sample


def _recent_mean(recent: list, device: Any) -> float:
    """The summary's train loss: the mean over the ranks and the last steps (one read;
    every rank calls it)."""
    import torch
    import torch.distributed as dist

    tail = torch.stack(recent).reshape(-1) if recent else torch.zeros(
        0, device=device, dtype=torch.float64)
    dist.all_reduce(tail)
    values = [v / dist.get_world_size() for v in tail.tolist()]
    dist.barrier()
    return sum(values) / len(values) if values else float("nan")


def _summarize(r: _Rank, result: LoopResult, train_loss: float, sample: str,
               resumed_from: int | None) -> None:
    """summary.json, the table, the plot and sample.txt (rank 0)."""
    from spd_ext.train.outputs import plot_losses
    from spd_ext.utils.table import format_table

    plan, t, s = r.plan, r.plan.cfg.training, r.plan.cfg.sample
    trained = [h for h in result.history if "loss" in h]
    timed = result.step_times[min(5, len(result.step_times) // 4):]  # the first warm up
    step_s = statistics.median(timed) if timed else float("nan")
    last = trained[-1] if trained else {}
    summary = {
        "config": plan.cfg.name, "world_size": r.world, "tp": plan.tp, "islands": plan.islands,
        "data_parallel": plan.data_world, "pattern": r.model.config.pattern,
        "precision": _precision(plan), "params": r.model.num_params(), "steps": t.steps,
        "resumed_from": resumed_from, "train_loss": train_loss, "val_loss": result.val_loss,
        "step_ms": step_s * 1e3,
        "tokens_per_sec": r.tokens_per_step / step_s if timed else float("nan"),
        "syncs_fwd": last.get("syncs_fwd"), "syncs_bwd": last.get("syncs_bwd"),
        "weights": last.get("weights"), "wall_seconds": result.seconds,
        "checkpoint": result.checkpoint,
    }
    write_json(plan.out_dir / "summary.json", summary)
    r.log.event("summary", **summary)
    print(format_table(["metric", "value"], _summary_rows(summary, result.start)))
    title = (f"{_run_name(plan)}: {r.model.config.pattern}, {_layout(plan)}, "
             f"{_precision(plan)}, {t.steps} steps")
    plot: Path | None = plan.out_dir / "loss.png"
    if not plot_losses(read_metrics(plan.out_dir / "log.jsonl"), plot, title):
        plot = None
    if sample:
        with atomic_path(plan.out_dir / "sample.txt") as tmp:
            tmp.write_text(sample)
        print(f"sample ({s.tokens} tokens, temperature {s.temperature}):\n{sample}\n")
    print(f"log: {plan.out_dir / 'log.jsonl'}" + (f"  plot: {plot}" if plot else "") +
          f"  checkpoint: {result.checkpoint}  model: {plan.out_dir / 'model.pt'} "
          "(spd-ext serve --checkpoint)", flush=True)
    r.log.close()


def _summary_rows(summary: dict, start: int) -> list[list]:
    steps = summary["steps"]
    rows = [["steps", f"{start}->{steps}" if summary["resumed_from"] is not None else steps],
            ["train loss (last 10 steps)", summary["train_loss"]],
            ["val loss", summary["val_loss"]],
            ["step time, median (ms)", summary["step_ms"]],
            ["tokens/s", summary["tokens_per_sec"]],
            ["wall time (s)", summary["wall_seconds"]]]
    if summary["syncs_fwd"] is not None:
        rows.append(["tp syncs per step (fwd / bwd)",
                     f"{summary['syncs_fwd']} / {summary['syncs_bwd']}"])
    if summary["weights"]:
        rows.append(["final dp weights", "[" + ", ".join(f"{w:.3f}" for w in
                                                         summary["weights"]) + "]"])
    return rows


def single_process_environment() -> None:
    """The variables a launcher sets, for one rank started by hand."""
    if "WORLD_SIZE" in os.environ:
        return
    from spd_ext.launch import free_port

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})


def launched_world_size() -> int | None:
    """The world size a launcher (deepspeed, torchrun) announced, else None."""
    text = os.environ.get("WORLD_SIZE", "")
    return int(text) if text.isdigit() else None


def job_environment(ranks_on_host: int | None = None) -> dict[str, str]:
    """This environment for a job started from here: spd_ext importable from any folder,
    and (given the ranks sharing this host) the cores divided among them."""
    import spd_ext

    env = dict(os.environ)
    root = str(Path(spd_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if ranks_on_host:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_on_host)))
    return env


def launcher_command(config: str, overrides: Sequence[str], nproc: int,
                     master_port: int) -> list[str]:
    """The deepspeed launcher starting ``nproc`` local ranks of this module."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(master_port), "--log_level", "warning", "--no_local_rank",
            "--module", "spd_ext.train.run", str(config),
            *[f"--set={item}" for item in overrides]]


def launch(config: str, overrides: Sequence[str], nproc: int, resume: bool = False,
           overwrite: bool = False, master_port: int | None = None,
           rejoin: bool = False) -> int:
    """Start ``nproc`` local ranks of this module under the deepspeed launcher and wait;
    returns the launcher's exit status (130 after Ctrl-C)."""
    import subprocess

    from spd_ext.launch import free_port

    env = job_environment(nproc)
    cmd = launcher_command(config, overrides, nproc, master_port or free_port())
    cmd += ["--resume"] if resume else []
    cmd += ["--overwrite"] if overwrite and not rejoin else []
    cmd += ["--rejoin"] if rejoin else []
    # its own process group: a signal to this process is forwarded to the whole job
    # (launcher and ranks) by wait_for_job, never lost with this process
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    return wait_for_job(proc)


#: Signals that stop `spd-ext train`: each is passed on to every process of the job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def wait_for_job(proc: Any, grace_s: float = 30.0) -> int:
    """Wait for a job started in its own process group (``start_new_session``), passing on
    SIGINT / SIGTERM / SIGHUP to every process in it; a job still there ``grace_s`` after
    the first signal, or processes of it left after its launcher exited, are killed.
    Returns the launcher's exit status, or 128 + the signal's number when stopped."""
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not received:
            print(f"{PROG}: {signal.Signals(signum).name}: stopping the job (pid {proc.pid} and "
                  f"its ranks)", file=sys.stderr, flush=True)
        received.append(signum)
        _signal_group(proc.pid, signum)

    in_main = threading.current_thread() is threading.main_thread()  # where handlers go
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS} if in_main else {}
    try:
        deadline = math.inf
        while proc.poll() is None:
            if received and deadline == math.inf:
                deadline = time.monotonic() + grace_s
            if time.monotonic() > deadline:
                _signal_group(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        # the launcher is gone: anything of its group still alive would be an orphan
        deadline = time.monotonic() + (grace_s if not received else 5.0)
        while _signal_group(proc.pid, 0):
            if time.monotonic() > deadline:
                _signal_group(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else proc.returncode


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; whether any process of it was there."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split())


#: Set for a launcher's ranks by the process that holds the run's out_dir for them.
OUT_DIR_HELD_ENV = "SPD_EXT_OUT_DIR_HELD"
RUN_LOCK_FILE = ".spd_ext-run.lock"


def hold_out_dir(out_dir: Path) -> ProcessLock:
    """The run's claim on ``out_dir``, held until this process exits: a second run there
    (which would delete this one's log and checkpoints) is refused naming this one."""
    lock = ProcessLock(out_dir / RUN_LOCK_FILE)
    try:
        holder = lock.acquire()
    except OSError as exc:
        raise UsageError(f"training.out_dir {out_dir} cannot be written ({exc.strerror}); "
                         "choose a folder this user can write") from None
    if holder is not None:
        raise UsageError(f"training.out_dir {out_dir} is in use by a run in progress "
                         f"({holder.describe()}); wait for it to end or stop it, or set "
                         "training.out_dir elsewhere")
    os.environ[OUT_DIR_HELD_ENV] = str(out_dir.resolve())  # for the ranks this one starts
    return lock


def prepare(config: str, overrides: Sequence[str], world_size: int, resume: bool = False,
            overwrite: bool = False, hold: bool | None = False,
            dry_run: bool = False) -> tuple[RunPlan, dict]:
    """Load, plan and check a run (no collective); raises ValueError with one line.
    ``hold``: claim the out_dir for this process first (``facts["out_dir_lock"]``); None:
    unless the process that started this one's launcher (`spd-ext train --nproc`) holds it."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in out_dir and --overwrite starts it over; "
                         "pass one of them")
    cfg = load_config(config, list(overrides))
    plan = plan_run(cfg, world_size)
    if plan.fault_tolerant and plan.island is not None:
        from spd_ext.deepspeed.config import FaultToleranceConfig
        from spd_ext.deepspeed.fault_tolerance import check_lighthouse

        check_lighthouse(FaultToleranceConfig(
            lighthouse=cfg.values["fault_tolerance"]["lighthouse"]).resolved_lighthouse(
                "fault_tolerance"), where="fault_tolerance.lighthouse")
    if hold is None:
        hold = os.environ.get(OUT_DIR_HELD_ENV) != str(plan.out_dir.resolve())
    lock = hold_out_dir(plan.out_dir) if hold else None
    try:
        facts = check_environment(plan, resume=resume, overwrite=overwrite, dry_run=dry_run)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if lock is not None:
        facts["out_dir_lock"] = lock
    return plan, facts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML or JSON run config (e.g. configs/train/quickstart.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set training.steps=100 --set "
                   "deepspeed.spd_ext.signal_weighting.temperature=0.5 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in OUT_DIR/checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an out_dir that holds a previous run's checkpoints")
    p.add_argument("--rejoin", action="store_true",
                   help="fault_tolerance: this island died and restarts: keep its out_dir and "
                   "heal from the live islands (spd-ext train passes it to the islands it "
                   "restarts)")


def main(argv: Sequence[str] | None = None) -> int:
    """The entry a launcher starts on every rank (``-m spd_ext.train.run``)."""
    parser = argparse.ArgumentParser(prog="python -m spd_ext.train.run",
                                     description="One rank of spd-ext train (started by a "
                                     "launcher); see `spd-ext train --help`.")
    add_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        # the first rank claims the out_dir (unless the process that started the ranks
        # holds it for them)
        plan, facts = prepare(args.config, args.overrides, launched_world_size() or 1,
                              args.resume, args.overwrite or args.rejoin,
                              hold=None if rank0 else False)
    except UsageError as exc:  # a defect keeps its traceback
        if rank0:
            print(f"spd-ext: error: {one_line(exc)}", file=sys.stderr)
        return 2
    single_process_environment()
    return run(plan, facts, resume=args.resume, rejoin=args.rejoin)


if __name__ == "__main__":
    sys.exit(main())
