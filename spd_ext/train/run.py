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
import statistics
import sys
import time
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spd_ext.train.config import (
    COMPLETE,
    LATEST,
    RunPlan,
    check_environment,
    load_config,
    plan_run,
)
from spd_ext.utils.files import atomic_path, save_figure, write_json
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
        with atomic_path(path) as tmp:
            torch.save(state, tmp)


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
    from spd_ext.experiments.common import pyplot

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


def save_checkpoint(engine: Any, plan: RunPlan, step: int) -> str:
    """The engine's checkpoint (DeepSpeed's files and spd_ext's per-rank state), this rank's
    RNG and step; then, once every rank is done, the completion marker and ``latest``."""
    import torch
    import torch.distributed as dist

    ckpt = plan.checkpoint_dir
    tag = f"global_step{step}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False)
    state = {"step": step, "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    with atomic_path(_rank_state_path(ckpt, tag, rank)) as tmp:
        torch.save(state, tmp)
    dist.barrier()
    if rank == 0:
        write_json(ckpt / tag / "train" / COMPLETE,
                   {"step": step, "layout": plan.checkpoint_layout(), "time": time.time()})
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
    stage = (plan.ds_config.get("zero_optimization") or {}).get("stage", 0)
    return f"ZeRO-{stage} {'bf16' if plan.bf16 else 'fp32'}"


def _layout(plan: RunPlan) -> str:
    if plan.islands > 1:
        return f"{plan.islands} islands x {plan.world_size // plan.islands} ranks"
    return f"tp {plan.tp} x dp {plan.data_world}"


# -- the run ------------------------------------------------------------------------------
def run(plan: RunPlan, facts: dict, resume: bool = False) -> int:
    """Train on this rank (torch.distributed is initialized here if it is not yet)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    import spd_ext.deepspeed as sd
    from spd_ext.data import Corruption, ShardedSampler, TokenDataset
    from spd_ext.dp.aggregator import WeightError
    from spd_ext.train.trainer import make_optimizer
    from spd_ext.utils.run_log import RunLog
    from spd_ext.utils.table import format_table

    _quiet_deepspeed()
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)  # DeepSpeed's ZeRO calls, not ours
    owned = not dist.is_initialized()
    if owned:
        deepspeed.init_distributed(verbose=False)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":  # before the first collective (NCCL binds to it)
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} ranks, launched with {world}")
    cfg = plan.cfg
    t, d, s = cfg.training, cfg.data, cfg.sample
    main = rank == 0
    data_rank, data_world = rank // plan.tp, plan.data_world
    if main and not resume:
        _fresh_out_dir(plan)
    dist.barrier()

    data = TokenDataset(d.corpus, d.tokenizer, val_fraction=d.val_fraction)
    topology = sd.build_topology(plan.tp, plan.islands)
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
        start = load_checkpoint(engine, plan, facts["resume_tag"])
        if main:
            dropped = log.drop_after(start)
            log.event("resume", step=start, tag=facts["resume_tag"], dropped_records=dropped)
    progress = Progress(t.steps, start, t.log_interval, main)
    counter = getattr(model, "sync_counter", None)
    tokens_per_step = t.micro_batch * t.grad_accum * block * data_world
    gas = t.grad_accum

    if main:
        params = model.num_params()
        print(f"{PROG}: {cfg.name}: {world} rank(s), {_layout(plan)}, {_precision(plan)}, "
              f"pattern {model.config.pattern}, {params / 1e6:.2f}M parameters, "
              f"{tokens_per_step:,} tokens/step, steps {start}->{t.steps}, out "
              f"{plan.out_dir}", flush=True)

    def evaluate() -> float:
        """Mean clean validation loss over eval_batches fixed batches, split over the
        data-parallel replicas (every rank of a tensor-parallel group runs the same ones)."""
        engine.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(data_rank, t.eval_batches, data_world):
                x, y = sampler("val", -1 - i)
                total += float(engine(x.to(device), y.to(device))[1].float())
        engine.train()
        if counter is not None:
            counter.reset()  # the evaluation's syncs are not a training step's
        summed = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(summed)  # on the backend's device (NCCL reduces GPU tensors only)
        return summed.item() / (plan.tp * t.eval_batches)

    history: list[dict] = []
    step_times: list[float] = []
    started = time.perf_counter()
    engine.train()
    for step in range(start, t.steps):
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = 0.0
        try:
            for micro in range(gas):
                x, y = sampler("train", step * gas + micro)
                _, loss = engine(x.to(device), y.to(device))
                engine.backward(loss)
                engine.step()
                loss_sum += float(loss.detach().float())
        except WeightError as exc:  # raised on every rank together (NaN / inf gradients)
            progress.close()
            if main:
                print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
                log.event("stopped", step=step + 1, reason=one_line(exc))
                log.close()
            return 1
        seconds = time.perf_counter() - t0
        reduced = torch.tensor([loss_sum / gas], dtype=torch.float64, device=device)
        dist.all_reduce(reduced)
        mean_loss = reduced.item() / world
        if not math.isfinite(mean_loss):
            progress.close()
            if main:
                print(f"{PROG}: error: the training loss became {mean_loss} at step {step + 1}; "
                      "lower training.lr or raise training.warmup_steps, and resume from the "
                      "last checkpoint", file=sys.stderr)
                log.event("stopped", step=step + 1, reason=f"loss {mean_loss}")
                log.close()
            return 1
        step_times.append(seconds)
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
        done = step + 1
        if t.eval_interval and done % t.eval_interval == 0 and done < t.steps:
            val = evaluate()
            history.append({"step": done, "val_loss": val})
            if main:
                log.metrics(step=done, val_loss=val)
            progress.line(f"step {done}: val loss {val:.4f}")
        if t.checkpoint_interval and done % t.checkpoint_interval == 0 and done < t.steps:
            tag = save_checkpoint(engine, plan, done)
            progress.line(f"step {done}: checkpoint {plan.checkpoint_dir / tag}")
    progress.close()
    wall = time.perf_counter() - started
    val = evaluate()
    if main:
        log.metrics(step=t.steps, val_loss=val, final=True)
    history.append({"step": t.steps, "val_loss": val})
    tag = save_checkpoint(engine, plan, t.steps)
    export_model(model, data.tokenizer, plan.out_dir / "model.pt", main)

    sample = ""
    if s.tokens and data_rank == 0:
        tp_group = topology.tp_group if plan.tp > 1 else None
        sample = generate(engine.module, data.tokenizer, s.prompt, s.tokens, s.temperature,
                          s.top_k, block, t.seed, device, tp_group,
                          topology.tp_ranks[0] if plan.tp > 1 else 0)
        if counter is not None:
            counter.reset()
    dist.barrier()
    if main:
        trained = [h for h in history if "loss" in h]
        tail = [h["loss"] for h in trained[-10:]]
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
        title = (f"{cfg.name}: {model.config.pattern}, {_layout(plan)}, {_precision(plan)}, "
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
    dist.barrier()
    if owned:
        dist.destroy_process_group()
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
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the ranks got the SIGINT too; let them stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 130


def one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split())


def prepare(config: str, overrides: Sequence[str], world_size: int, resume: bool = False,
            overwrite: bool = False) -> tuple[RunPlan, dict]:
    """Load, plan and check a run (no collective); raises ValueError with one line."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in out_dir and --overwrite starts it over; "
                         "pass one of them")
    cfg = load_config(config, list(overrides))
    plan = plan_run(cfg, world_size)
    return plan, check_environment(plan, resume=resume, overwrite=overwrite)


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
        plan, facts = prepare(args.config, args.overrides, launched_world_size() or 1,
                              args.resume, args.overwrite)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        if rank0:
            print(f"spd-ext: error: {one_line(exc)}", file=sys.stderr)
        return 2
    single_process_environment()
    return run(plan, facts, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
