"""`spd-ext experiment staleness`: synchronous, delayed, local, DiLoCo and parameter-server
training side by side, with and without a straggler.

Two tasks: the XOR-with-polynomial-features logistic regression (fast; SGD) and a
small char GPT on TinyShakespeare (AdamW). Every mode runs on the same number of CPU
ranks; collective modes use all of them as workers, parameter-server modes use rank 0 as
the server and the rest as workers. Each step sleeps a base delay (simulated compute);
with the straggler, the first worker sleeps ``straggler_factor`` times longer every
``straggler_every`` steps. Reported: final loss of the job's weights, steps and seconds
until the loss first reaches the target, staleness, idle fraction, messages per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from spd_ext.comm.buckets import copy_back
from spd_ext.data import ShardedSampler, TokenDataset
from spd_ext.errors import UsageError
from spd_ext.experiments.common import finished_runs, write_json
from spd_ext.experiments.config import StalenessConfig, TaskSpec
from spd_ext.launch import spawn
from spd_ext.staleness import (
    ParameterServer,
    PSConfig,
    PSProcessGroups,
    Straggler,
    StragglerHooks,
    make_strategy,
    parse_mode,
    train_worker,
)
from spd_ext.tp import GPTConfig, ReducedSyncGPT
from spd_ext.train import TrainConfig, Trainer
from spd_ext.train.tasks import XORTask
from spd_ext.utils.files import atomic_path
from spd_ext.utils.plot import pyplot
from spd_ext.utils.table import format_table


class _Task:
    """A task's model, data shards, optimizer and evaluation, for one rank."""

    def __init__(self, spec: TaskSpec, cfg: StalenessConfig) -> None:
        self.spec = spec
        if spec.name == "xor":
            self.xor = XORTask(seed=cfg.seed)
            self.make_model = self.xor.model
        else:
            self.data = TokenDataset(cfg.corpus, "char")
            self.gpt = GPTConfig(block_size=64, vocab_size=self.data.vocab_size, n_layer=2,
                                 n_head=4, n_embd=64, pattern="tp*2", tp_size=1)
            self.make_model = lambda: ReducedSyncGPT(self.gpt, seed=cfg.seed)
        self.seed = cfg.seed

    def sampler(self, worker: int, workers: int):
        if self.spec.name == "xor":
            return self.xor.sampler(worker, workers)
        return ShardedSampler(self.data, worker, workers, 16, 64, self.seed)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self.spec.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.spec.lr)
        return torch.optim.AdamW(model.parameters(), lr=self.spec.lr, weight_decay=0.0)

    @torch.no_grad()
    def loss_of(self, model: torch.nn.Module, weights: torch.Tensor | None = None) -> float:
        if weights is not None:
            copy_back(weights, list(model.parameters()))
        batches = self.sampler(0, 1)
        n = 1 if self.spec.name == "xor" else 5
        return sum(model(*batches("val", -1 - i))[1].item() for i in range(n)) / n


def _first_reach(curve: list[tuple[float, float, float]], target: float) -> tuple[float, float]:
    for step, seconds, loss in curve:
        if loss <= target:
            return step, seconds
    return float("nan"), float("nan")


def _rank(rank: int, world: int, task_name: str, mode_text: str, straggled: bool,
          cfg: StalenessConfig) -> dict:
    spec = cfg.task(task_name)
    mode = parse_mode(mode_text)
    task = _Task(spec, cfg)
    model = task.make_model()
    first_worker = 1 if mode.server else 0
    straggler = Straggler(spec.base_delay, slow_rank=first_worker if straggled else None,
                          factor=cfg.straggler_factor, every=cfg.straggler_every, seed=cfg.seed)
    if not mode.server:
        strategy = make_strategy(mode, model)
        train_cfg = TrainConfig(max_steps=spec.steps, batch_size=16, lr=spec.lr, min_lr=spec.lr,
                                warmup_steps=0, grad_clip=0.0, eval_interval=spec.eval_every,
                                eval_batches=1 if spec.name == "xor" else 5,
                                log_interval=spec.steps, quiet=True)
        trainer = Trainer(model, task.sampler(rank, world), train_cfg,
                          hooks=StragglerHooks(strategy, straggler, rank),
                          optimizer=task.optimizer(model))
        result = trainer.train()
        curve = [(h["step"], h["elapsed"], h["val_loss"]) for h in result.history
                 if "val_loss" in h]
        return {"curve": curve, "final_loss": result.val_loss, "seconds": result.seconds,
                "workers": [strategy.metrics.summary()]}
    groups = PSProcessGroups.create()
    ps_cfg = PSConfig(mode, optimizer=spec.optimizer, lr=spec.lr, straggler_timeout=2.0)
    workers = world - 1
    if rank == 0:
        probe = task.make_model()
        curve: list[tuple[float, float, float]] = []
        per_step = 1 if mode.kind == "syncps" else workers  # updates making one step

        def on_update(version: int, weights: torch.Tensor) -> None:
            if version % (spec.eval_every * per_step) == 0:
                curve.append((version / per_step, time.perf_counter() - server.started,
                              task.loss_of(probe, weights)))

        server = ParameterServer(model, ps_cfg, groups, on_update)
        final = server.serve()
        seconds = time.perf_counter() - server.started
        staleness = [s for values in server.log.staleness.values() for s in values]
        return {"curve": curve, "final_loss": task.loss_of(probe, final), "seconds": seconds,
                "server_staleness_mean": sum(staleness) / max(len(staleness), 1),
                "server_staleness_max": max(staleness, default=0.0),
                "dropped_late": server.log.dropped_late}
    metrics = train_worker(model, ps_cfg, groups, task.sampler(rank - 1, workers), spec.steps,
                           straggler)
    return {"workers": [metrics.summary()]}


def _summarize(task_name: str, mode_text: str, straggled: bool, results: list[dict],
               spec: TaskSpec) -> dict:
    head = results[0]
    workers = [w for r in results for w in r.get("workers", [])]
    step, seconds = _first_reach(head["curve"], spec.target)
    if "server_staleness_mean" in head:
        stale_mean, stale_max = head["server_staleness_mean"], head["server_staleness_max"]
    else:
        stale_mean = sum(w["staleness_mean"] for w in workers) / len(workers)
        stale_max = max(w["staleness_max"] for w in workers)
    return {
        "task": task_name, "mode": mode_text, "straggler": straggled,
        "final_loss": head["final_loss"], "seconds": head["seconds"],
        "steps_to_target": step, "seconds_to_target": seconds, "target": spec.target,
        "staleness_mean": stale_mean, "staleness_max": stale_max,
        "idle_fraction": sum(w["idle_fraction"] for w in workers) / len(workers),
        "messages_per_step": sum(w["messages_per_step"] for w in workers) / len(workers),
        "curve": head["curve"], "dropped_late": head.get("dropped_late", 0),
    }


def _write_worker_log(out: Path, key: tuple, results: list[dict]) -> None:
    """One JSON line per worker (and the server): the per-worker metrics of a run."""
    task_name, mode_text, straggled = key
    name = f"{task_name}_{mode_text.replace(':', '')}_{'straggler' if straggled else 'even'}"
    lines = []
    for rank, r in enumerate(results):
        for w in r.get("workers", []):
            lines.append({"run": name, **w})
        if "server_staleness_mean" in r:
            lines.append({"run": name, "rank": rank, "role": "server",
                          **{k: v for k, v in r.items() if k != "curve"}})
    path = out / "workers" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))


def run(cfg: StalenessConfig) -> list[dict]:
    out = Path(cfg.out_dir)
    results_path = out / "results.json"
    for m in cfg.modes:
        parse_mode(m)
    if cfg.nproc < 2:
        raise UsageError(f"--nproc must be at least 2, got {cfg.nproc}")
    if "gpt" in cfg.tasks:
        TokenDataset(cfg.corpus, "char")  # fail early if the corpus is missing
    runs = [(t, m, s) for t in cfg.tasks for s in cfg.stragglers for m in cfg.modes]
    done = finished_runs(results_path, lambda r: (r["task"], r["mode"], r["straggler"]), runs,
                         cfg.force)
    for i, key in enumerate(runs):
        if key in done:
            continue
        task_name, mode_text, straggled = key
        print(f"[staleness] {i + 1}/{len(runs)} {task_name} {mode_text} "
              f"{'with' if straggled else 'without'} straggler", flush=True)
        results = spawn(_rank, cfg.nproc, task_name, mode_text, straggled, cfg, timeout=1800)
        _write_worker_log(out, key, results)
        done[key] = _summarize(task_name, mode_text, straggled, results, cfg.task(task_name))
        write_json(results_path, list(done.values()))
    rows = [done[k] for k in runs if k in done]
    plot(list(done.values()), out / "staleness.png")
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    body = [[r["task"], "yes" if r["straggler"] else "no", r["mode"], r["final_loss"],
             r["steps_to_target"], r["seconds_to_target"], r["seconds"], r["staleness_mean"],
             r["staleness_max"], r["idle_fraction"], r["messages_per_step"]] for r in rows]
    return format_table(["task", "straggler", "mode", "final loss", "steps to target",
                         "s to target", "total s", "staleness mean", "staleness max",
                         "idle frac", "msgs/step"], body, markdown)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    panels = sorted({(r["task"], r["straggler"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, straggled) in zip(axes[0], panels):
        for r in rows:
            if (r["task"], r["straggler"]) == (task, straggled) and r["curve"]:
                _, seconds, losses = zip(*r["curve"])
                ax.plot(seconds, losses, marker=".", label=r["mode"])
        ax.axhline(next(r["target"] for r in rows if r["task"] == task), color="gray",
                   linestyle=":", linewidth=1)
        ax.set_title(f"{task}, {'with' if straggled else 'no'} straggler")
        ax.set_xlabel("wall-clock seconds")
        ax.set_ylabel("loss of the job's weights")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
