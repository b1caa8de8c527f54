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
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from spd_ext.errors import UsageError
from spd_ext.train.config import (
    COMPLETE,
    LATEST,
    RunPlan,
    check_environment,
    load_config,
    plan_run,
)
from spd_ext.utils.files import (
    WriteError,
    atomic_path,
    explained_write_errors,
    save_figure,
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


# -- progress -----------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _rate(tokens_per_second: float) -> str:
    if tokens_per_second >= 1e6:
        return f"{tokens_per_second / 1e6:.2f}M"
    return f"{tokens_per_second / 1e3:.1f}k" if tokens_per_second >= 1e3 else \
        f"{tokens_per_second:.0f}"


class Progress:
    """A live bar on a terminal (redrawn at most 10 times a second), plain lines every
    ``interval`` steps otherwise; only where ``enabled`` (rank 0)."""

    def __init__(self, total: int, start: int, interval: int, enabled: bool,
                 stream: Any = None) -> None:
        self.total, self.interval, self.enabled = total, interval, enabled
        self.stream = stream or sys.stdout
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.times: deque[float] = deque(maxlen=50)
        self._drawn = 0.0
        self._bar = False
        self.start = start

    def update(self, step: int, loss: float, seconds: float, tokens: int, extra: str = ""
               ) -> None:
        if not self.enabled:
            return
        self.times.append(seconds)
        mean = sum(self.times) / len(self.times)
        eta = mean * (self.total - step)
        text = (f"step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4f} | "
                f"{seconds * 1e3:.1f} ms/step | {_rate(tokens / max(mean, 1e-9))} tok/s | "
                f"ETA {_duration(eta)}" + (f" | {extra}" if extra else ""))
        if self.tty:
            now = time.monotonic()
            if now - self._drawn < 0.1 and step < self.total:
                return
            self._drawn = now
            width = 24
            done = int(width * step / self.total)
            bar = "#" * done + "." * (width - done)
            self.stream.write(f"\r\033[K[{bar}] {text}")
            self.stream.flush()
            self._bar = True
        elif step % self.interval == 0 or step == self.total or step == self.start + 1:
            print(text, file=self.stream, flush=True)

    def line(self, text: str) -> None:
        """A line that stays (evaluation, checkpoints)."""
        if not self.enabled:
            return
        if self._bar:
            self.stream.write("\r\033[K")
            self._bar = False
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self._bar:
            self.stream.write("\n")
            self.stream.flush()
            self._bar = False


# -- pieces of the run --------------------------------------------------------------------
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


def export_model(model: Any, tokenizer: Any, path: Path, main: bool) -> None:
    """The trained weights in the dense layout with their config and tokenizer, the file
    `spd-ext serve --checkpoint` and `spd-ext tp sensitivity` read (collective: every rank
    calls it; the main rank writes, atomically)."""
    import torch

    dense = model.dense_state_dict()
    if main:
        state = {"model": {k: v.cpu() for k, v in dense.items()},
                 "model_config": model.config.to_dict(), "tokenizer": tokenizer.state()}
        with explained_write_errors(path, "the model"), atomic_path(path) as tmp:
            torch.save(state, tmp)


def whole_copy(model: Any) -> Any:
    """A model of one rank with ``model``'s weights (whole: gathered by the caller)."""
    from spd_ext.tp import GPTConfig, ReducedSyncGPT

    copy = ReducedSyncGPT(GPTConfig(**{**model.config.to_dict(), "tp_size": 1}), seed=None)
    copy.load_dense_state_dict({k: v.detach().clone() for k, v in
                                model.dense_state_dict().items()})
    return copy.to(next(model.parameters()).device)


def generate(model: Any, tokenizer: Any, prompt: str, tokens: int, temperature: float,
             top_k: int | None, block_size: int, seed: int, device: Any,
             tp_group: Any = None, tp_src: int = 0) -> str:
    """Sample ``tokens`` tokens after ``prompt`` with the model's forward over the last
    ``block_size`` tokens (so a sample may outrun the context, which the KV-cached
    ``generate`` refuses); every rank of a tensor-parallel group calls this together and
    rank ``tp_src``'s choice is broadcast. The prompt was checked at set-up."""
    import torch
    import torch.distributed as dist

    from spd_ext.tp.generation import sample_next

    ids = tokenizer.encode(prompt)
    vocab = tokenizer.vocab_size  # below a padded model vocabulary
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for _ in range(tokens):
            logits, _ = model(idx[:, -block_size:])
            nxt = sample_next(logits[:, -1, :vocab], temperature, top_k, g)[:, None]
            if tp_group is not None:
                dist.broadcast(nxt, src=tp_src, group=tp_group)
            idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return tokenizer.decode(idx[0, len(ids):].tolist())


def plot_losses(history: list[dict], path: Path, title: str) -> bool:
    from spd_ext.utils.plot import pyplot

    plt = pyplot()
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if plt is None or not train:
        return False
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps, losses = zip(*train)
    ax.plot(steps, losses, lw=0.8, alpha=0.8, label="train (mean over ranks)")
    if val:
        vs, vl = zip(*val)
        ax.plot(vs, vl, marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _rank_state_path(checkpoint_dir: Path, tag: str, rank: int) -> Path:
    return checkpoint_dir / tag / "train" / f"rank{rank:05d}.pt"


def save_checkpoint(engine: Any, plan: RunPlan, step: int, tokenizer: Any,
                    mark: Callable[[str], None] = lambda phase: None) -> str:
    """The engine's checkpoint (DeepSpeed's files and spd_ext's per-rank state), this rank's
    RNG and step; then, once every rank is done, the completion marker and ``latest``.
    A write that fails raises WriteError (saying so when the disk is full)."""
    import torch
    import torch.distributed as dist

    ckpt = plan.checkpoint_dir
    tag = f"global_step{step}"
    rank = dist.get_rank()
    mark(f"saving checkpoint {tag}")
    with explained_write_errors(ckpt / tag, "checkpoint"):
        engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False)
        state = {"step": step, "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        with atomic_path(_rank_state_path(ckpt, tag, rank)) as tmp:
            torch.save(state, tmp)
    mark(f"checkpoint {tag} written, waiting for the other ranks")
    dist.barrier()
    if rank == 0:
        with explained_write_errors(ckpt / tag, "checkpoint"):
            write_json(ckpt / tag / "train" / COMPLETE,
                       {"step": step, "layout": plan.checkpoint_layout(tokenizer),
                        "decay_steps": plan.decay_steps, "time": time.time()})
            with atomic_path(ckpt / LATEST) as tmp:
                tmp.write_text(tag)
    dist.barrier()
    return tag


def load_checkpoint(engine: Any, plan: RunPlan, tag: str) -> int:
    import torch
    import torch.distributed as dist

    from spd_ext.utils.files import load_checkpoint as load_state

    out = engine.load_checkpoint(str(plan.checkpoint_dir), tag=tag)
    if out is None or out[0] is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {plan.checkpoint_dir}")
    state = load_state(_rank_state_path(plan.checkpoint_dir, tag, dist.get_rank()),
                       "spd-ext train rank state")
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return int(state["step"])


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
    if plan.islands > 1:
        per = plan.world_size // plan.islands
        inside = f"tp {plan.tp} x dp {per // plan.tp}" if plan.tp > 1 else f"{per} ranks"
        return f"{plan.islands} islands x {inside}"
    return f"tp {plan.tp} x dp {plan.data_world}"


# -- the run ------------------------------------------------------------------------------
def run(plan: RunPlan, facts: dict, resume: bool = False) -> int:
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
        init_launched_group(accelerator.communication_backend_name(), timeout)
        deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=timeout))
        # Every rank has mapped every DeepSpeed CPU all-reduce segment (69 MB each) by now:
        # their names go before anything else can fail and leave them in /dev/shm.
        release_deepspeed_shm_name()
    rank = dist.get_rank()
    watch = RankWatch.from_environment() if owned else None
    try:
        return _train(plan, facts, resume, watch.mark if watch else lambda phase: None)
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


def _train(plan: RunPlan, facts: dict, resume: bool, mark: Callable[[str], None]) -> int:
    import torch
    import torch.distributed as dist

    import spd_ext.deepspeed as sd
    from spd_ext.data import Corruption, ShardedSampler, TokenDataset
    from spd_ext.dp.aggregator import WeightError
    from spd_ext.train.trainer import make_optimizer
    from spd_ext.utils.run_log import RunLog
    from spd_ext.utils.table import format_table

    rank, world = dist.get_rank(), dist.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} ranks, launched with {world}")
    cfg = plan.cfg
    t, d, s = cfg.training, cfg.data, cfg.sample
    main = rank == 0
    data_rank, data_world = rank // plan.tp, plan.data_world
    mark("preparing the out_dir")
    if main and not resume:
        _fresh_out_dir(plan)
    dist.barrier()
    mark("building the model and the engine")

    data = TokenDataset(d.corpus, d.tokenizer, val_fraction=d.val_fraction)
    topology = plan.dims.build()
    torch.manual_seed(t.seed + data_rank)  # dropout: one stream per tensor-parallel group
    model = build_model(plan, data.vocab_size, topology)
    block = model.config.block_size
    corruption = (Corruption(**cfg.values["data"]["corruption"])
                  if d.sharding == "clean_vs_corrupt" else None)
    sampler = ShardedSampler(data, data_rank, data_world, t.micro_batch, block, t.seed,
                             sharding=d.sharding, corrupt_ranks=tuple(d.corrupt_ranks),
                             corruption=corruption)
    optimizer = make_optimizer(model, t)  # AdamW: the Trainer's parameter groups
    engine, *_ = sd.initialize(model=model, optimizer=optimizer, config=plan.ds_config)
    device = engine.device
    integration = engine.spd_ext
    run_name = cfg.values["wandb"]["name"] or plan.out_dir.name
    log = RunLog(plan.out_dir / "log.jsonl", run_name=run_name,
                 config={**cfg.to_dict(), "world_size": world}, quiet=True,
                 wandb_project=cfg.values["wandb"]["project"]) if main else None
    start = 0
    if resume:
        mark(f"loading checkpoint {facts['resume_tag']}")
        start = load_checkpoint(engine, plan, facts["resume_tag"])
        if main:
            dropped = log.drop_after(start)
            log.event("resume", step=start, tag=facts["resume_tag"], dropped_records=dropped)
    progress = Progress(t.steps, start, t.log_interval, main)
    counter = getattr(model, "sync_counter", None)
    tokens_per_step = t.micro_batch * t.grad_accum * block * data_world
    gas = t.grad_accum

    if main and facts.get("resume_note"):
        print(f"{PROG}: note: {facts['resume_note']}", flush=True)
    if main:
        params = model.num_params()
        print(f"{PROG}: {cfg.name}: {world} rank(s), {_layout(plan)}, {_precision(plan)}, "
              f"pattern {model.config.pattern}, {params / 1e6:.2f}M parameters, "
              f"{tokens_per_step:,} tokens/step, steps {start}->{t.steps}, out "
              f"{plan.out_dir}", flush=True)

    def evaluate() -> float:
        """Mean clean validation loss over eval_batches fixed batches, split over the
        data-parallel replicas (every rank of a tensor-parallel group runs the same ones)."""
        mark("evaluating")
        engine.eval()
        total = 0.0
        # ZeRO-3 gathers the parameters inside every forward (a collective): each rank runs
        # as many forwards, the ones past eval_batches uncounted
        rounds = -(-t.eval_batches // data_world)
        with torch.no_grad():
            for i in range(data_rank, rounds * data_world if plan.zero_stage == 3
                           else t.eval_batches, data_world):
                x, y = sampler("val", -1 - (i % t.eval_batches))
                loss = engine(x.to(device), y.to(device))[1]
                if i < t.eval_batches:
                    total += float(loss.float())
        engine.train()
        if counter is not None:
            counter.reset()  # the evaluation's syncs are not a training step's
        summed = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(summed)  # on the backend's device (NCCL reduces GPU tensors only)
        return summed.item() / (plan.tp * t.eval_batches)

    history: list[dict] = []
    step_times: list[float] = []
    recent: deque = deque(maxlen=10)  # the last steps' losses, on the device (the summary)
    started = time.perf_counter()
    engine.train()
    for step in range(start, t.steps):
        mark(f"step {step + 1}")
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        done = step + 1
        # The loss stays on the device except on log steps (as nanoGPT's loop): reading it
        # every micro-batch would stall a GPU's queue of kernels each time.
        logged = done % t.log_interval == 0 or done == t.steps or done == start + 1
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        try:
            for micro in range(gas):
                x, y = sampler("train", step * gas + micro)
                _, loss = engine(x.to(device), y.to(device))
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().double()
            if logged or (t.checkpoint_interval and done % t.checkpoint_interval == 0):
                # a NaN since the engine's last check (its metrics.interval is the log
                # interval) stops the run here, before a checkpoint could keep it
                integration.check()
        except WeightError as exc:  # raised on every rank together (NaN / inf gradients)
            progress.close()
            if main:
                print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
                log.event("stopped", step=step + 1, reason=one_line(exc))
                log.close()
            return 1
        seconds = time.perf_counter() - t0
        step_times.append(seconds)
        recent.append(loss_sum / gas)
        if logged:
            reduced = (loss_sum / gas).reshape(1)
            dist.all_reduce(reduced)  # on the backend's device (NCCL reduces GPU tensors)
            mean_loss = reduced.item() / world
            if not math.isfinite(mean_loss):
                progress.close()
                if main:
                    print(f"{PROG}: error: the training loss became {mean_loss} at step "
                          f"{step + 1}; lower training.lr or raise training.warmup_steps, and "
                          "resume from the last checkpoint", file=sys.stderr)
                    log.event("stopped", step=step + 1, reason=f"loss {mean_loss}")
                    log.close()
                return 1
            record: dict[str, Any] = {"step": step + 1, "loss": mean_loss, "lr": lr,
                                      "step_time": seconds,
                                      "tokens_per_sec": tokens_per_step / max(seconds, 1e-9)}
            last = integration.last
            for key, name in (("syncs_forward", "syncs_fwd"), ("syncs_backward", "syncs_bwd"),
                              ("grad_norm", "grad_norm")):
                if key in last:
                    record[name] = last[key]
            if last.get("weights") is not None:
                record["weights"] = list(last["weights"])
            if main:
                log.metrics(**record)
            history.append(record)
            weights = record.get("weights")
            extra = ("w " + ",".join(f"{w:.2f}" for w in weights)) if weights else ""
            progress.update(step + 1, mean_loss, seconds, tokens_per_step, extra)
        if t.eval_interval and done % t.eval_interval == 0 and done < t.steps:
            val = evaluate()
            history.append({"step": done, "val_loss": val})
            if main:
                log.metrics(step=done, val_loss=val)
            progress.line(f"step {done}: val loss {val:.4f}")
        if t.checkpoint_interval and done % t.checkpoint_interval == 0 and done < t.steps:
            tag = save_checkpoint(engine, plan, done, data.tokenizer, mark)
            progress.line(f"step {done}: checkpoint {plan.checkpoint_dir / tag}")
    progress.close()
    wall = time.perf_counter() - started
    val = evaluate()
    if main:
        log.metrics(step=t.steps, val_loss=val, final=True)
    history.append({"step": t.steps, "val_loss": val})
    tag = save_checkpoint(engine, plan, t.steps, data.tokenizer, mark)
    mark("exporting model.pt")
    sampled = engine.module
    if plan.zero_stage == 3:
        # ZeRO-3 holds each parameter partitioned over the data-parallel ranks: gather them
        # (collective) to export, and sample with a whole copy (a forward of the
        # partitioned module on one rank alone would wait for the others' shards)
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(model.parameters())):
            export_model(model, data.tokenizer, plan.out_dir / "model.pt", main)
            if s.tokens and data_rank == 0:
                sampled = whole_copy(model)
    else:
        export_model(model, data.tokenizer, plan.out_dir / "model.pt", main)

    sample = ""
    if s.tokens and data_rank == 0:
        mark("sampling")
        tp_group = topology.tp_group if plan.tp > 1 else None
        sample = generate(sampled, data.tokenizer, s.prompt, s.tokens, s.temperature,
                          s.top_k, block, t.seed, device, tp_group,
                          topology.tp_ranks[0] if plan.tp > 1 else 0)
        if counter is not None:
            counter.reset()
    # the summary's train loss: the mean over the ranks and the last 10 steps (one read)
    tail = torch.stack(list(recent)).reshape(-1) if recent else torch.zeros(0, device=device,
                                                                             dtype=torch.float64)
    dist.all_reduce(tail)
    tail = [v / world for v in tail.tolist()]
    dist.barrier()
    if main:
        trained = [h for h in history if "loss" in h]
        timed = step_times[min(5, len(step_times) // 4):]  # the first steps warm up
        step_s = statistics.median(timed) if timed else float("nan")
        last_train = trained[-1] if trained else {}
        summary = {
            "config": cfg.name, "world_size": world, "tp": plan.tp, "islands": plan.islands,
            "data_parallel": data_world, "pattern": model.config.pattern,
            "precision": _precision(plan), "params": model.num_params(),
            "steps": t.steps, "resumed_from": start if resume else None,
            "train_loss": sum(tail) / len(tail) if tail else float("nan"),
            "val_loss": val, "step_ms": step_s * 1e3,
            "tokens_per_sec": tokens_per_step / step_s if timed else float("nan"),
            "syncs_fwd": last_train.get("syncs_fwd"), "syncs_bwd": last_train.get("syncs_bwd"),
            "weights": last_train.get("weights"), "wall_seconds": wall,
            "checkpoint": str(plan.checkpoint_dir / tag),
        }
        write_json(plan.out_dir / "summary.json", summary)
        log.event("summary", **summary)
        rows = [["steps", f"{start}->{t.steps}" if resume else t.steps],
                ["train loss (last 10 steps)", summary["train_loss"]],
                ["val loss", val],
                ["step time, median (ms)", summary["step_ms"]],
                ["tokens/s", summary["tokens_per_sec"]],
                ["wall time (s)", wall]]
        if summary["syncs_fwd"] is not None:
            rows.append(["tp syncs per step (fwd / bwd)",
                         f"{summary['syncs_fwd']} / {summary['syncs_bwd']}"])
        if summary["weights"]:
            rows.append(["final dp weights", "[" + ", ".join(f"{w:.3f}" for w in
                                                             summary["weights"]) + "]"])
        print(format_table(["metric", "value"], rows))
        title = (f"{run_name}: {model.config.pattern}, {_layout(plan)}, {_precision(plan)}, "
                 f"{t.steps} steps")
        plot: Path | None = plan.out_dir / "loss.png"
        if not plot_losses(read_metrics(plan.out_dir / "log.jsonl"), plot, title):
            plot = None
        if sample:
            with atomic_path(plan.out_dir / "sample.txt") as tmp:
                tmp.write_text(sample)
            print(f"sample ({s.tokens} tokens, temperature {s.temperature}):\n{sample}\n")
        print(f"log: {plan.out_dir / 'log.jsonl'}" + (f"  plot: {plot}" if plot else "") +
              f"  checkpoint: {plan.checkpoint_dir / tag}  model: {plan.out_dir / 'model.pt'} "
              "(spd-ext serve --checkpoint)", flush=True)
        log.close()
    mark("finishing")
    dist.barrier()
    return 0


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


def launch(config: str, overrides: Sequence[str], nproc: int, resume: bool = False,
           overwrite: bool = False, master_port: int | None = None) -> int:
    """Start ``nproc`` local ranks of this module under the deepspeed launcher and wait;
    returns the launcher's exit status (130 after Ctrl-C)."""
    import subprocess

    import spd_ext
    from spd_ext.launch import free_port

    env = dict(os.environ)
    root = str(Path(spd_ext.__file__).resolve().parents[1])  # importable from any folder
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(master_port or free_port()), "--log_level", "warning",
           "--no_local_rank", "--module", "spd_ext.train.run", str(config),
           *[f"--set={item}" for item in overrides]]
    cmd += ["--resume"] if resume else []
    cmd += ["--overwrite"] if overwrite else []
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
                              args.resume, args.overwrite, hold=None if rank0 else False)
    except UsageError as exc:  # a defect keeps its traceback
        if rank0:
            print(f"spd-ext: error: {one_line(exc)}", file=sys.stderr)
        return 2
    single_process_environment()
    return run(plan, facts, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
