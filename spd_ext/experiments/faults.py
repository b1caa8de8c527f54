"""`spd-ext experiment faults`: fault-tolerant DiLoCo islands against failures.

Three arms of the same run (a small char GPT on TinyShakespeare, K islands of diloco:H,
ZeRO-1 inside each), each a whole `spd-ext train` command:

* ``none``: fault-tolerant islands, no failure;
* ``islands``: fault-tolerant islands, one island killed (SIGKILL, in turn) every T seconds;
  `spd-ext train` restarts it and it heals from a live one while the others train on;
* ``restart_all``: the torchelastic behaviour at the same failure rate: the islands in one
  job, the whole job killed every T seconds and restarted from its last checkpoint.

Reported per arm: wall time, steps per second of run progress, tokens trained per second
(every island's logged steps; the steps a restart redoes count once), final validation
loss, failures, and for the islands the longest pause of a survivor (the longest gap
between two of its steps, against its median step). A plot of validation loss against
wall-clock time; every finished arm is kept in OUT/results.json.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spd_ext.errors import UsageError
from spd_ext.experiments.common import finished_runs, write_json
from spd_ext.train.config import CHECKPOINTS, resume_tag
from spd_ext.train.run import job_environment
from spd_ext.utils.files import atomic_path
from spd_ext.utils.plot import pyplot
from spd_ext.utils.table import format_table

ARMS = ("none", "islands", "restart_all")


@dataclass
class FaultsConfig:
    islands: int = 3
    ranks_per_island: int = 1
    steps: int = 1500
    H: int = 10
    kill_every_s: float = 60.0
    checkpoint_interval: int = 100  # the restart-everything arm's (every arm saves as often)
    eval_interval: int = 250
    out_dir: Path = Path("out/faults")
    arms: tuple[str, ...] = ARMS
    force: bool = False
    timeout_s: float = 3600.0  # one arm, whole

    def check(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise UsageError(f"--arms: unknown arm {unknown[0]!r}; use {', '.join(ARMS)}")
        if self.islands < 2:
            raise UsageError(f"--islands {self.islands}: fault tolerance needs at least 2")
        for name in ("steps", "eval_interval", "checkpoint_interval"):
            if getattr(self, name) % self.H:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a "
                                 f"multiple of --H {self.H} (islands meet every H steps)")

    @property
    def nproc(self) -> int:
        return self.islands * self.ranks_per_island

    def train_config(self, out: Path) -> dict:
        return {
            "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64,
                      "dropout": 0.0},
            "data": {"corpus": "tinyshakespeare", "tokenizer": "char"},
            "training": {"steps": self.steps, "micro_batch": 16, "lr": 3e-3, "min_lr": 3e-4,
                         "warmup_steps": 50, "eval_interval": self.eval_interval,
                         "eval_batches": 20, "log_interval": 1,
                         "checkpoint_interval": self.checkpoint_interval, "seed": 1337,
                         "out_dir": str(out)},
            "parallel": {"islands": self.islands},
            "fault_tolerance": {"enabled": True, "restarts": 1000, "quorum_timeout_s": 600},
            "deepspeed": {"zero_optimization": {"stage": 1},
                          "spd_ext": {"staleness": {"mode": f"diloco:{self.H}"}}},
            "sample": {"tokens": 0},
        }


@dataclass
class ArmRun:
    """What one arm's command did."""

    arm: str
    started: float
    wall_s: float = 0.0
    failures: int = 0
    exit_code: int = 0
    notes: list[str] = field(default_factory=list)


def _command(cfg: FaultsConfig, config: Path, *sets: str, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "spd_ext.cli", "train", str(config), "--nproc",
            str(cfg.nproc), *[f"--set={s}" for s in sets],
            "--resume" if resume else "--overwrite"]


def _run_islands(cfg: FaultsConfig, config: Path, arm: str, out: Path) -> ArmRun:
    sets = [f"training.out_dir={out}"]
    if arm == "islands":
        sets.append(f"fault_tolerance.kill_every_s={cfg.kill_every_s:g}")
    run = ArmRun(arm, time.time())
    with open(out.parent / f"{arm}.log", "w") as log:
        proc = subprocess.run(_command(cfg, config, *sets), env=job_environment(), stdout=log,
                              stderr=subprocess.STDOUT, timeout=cfg.timeout_s)
    run.wall_s, run.exit_code = time.time() - run.started, proc.returncode
    islands = json.loads((out / "islands.json").read_text())
    run.failures = sum(1 for e in islands["events"] if e["what"] == "killed")
    return run


def _run_restart_all(cfg: FaultsConfig, config: Path, out: Path) -> ArmRun:
    """The islands in one job, killed whole every kill_every_s and resumed from its last
    checkpoint (a fresh start while there is none)."""
    sets = [f"training.out_dir={out}", "fault_tolerance.enabled=false",
            "fault_tolerance.restarts=3"]
    run = ArmRun("restart_all", time.time())
    resume = False
    with open(out.parent / "restart_all.log", "w") as log:
        while True:
            proc = subprocess.Popen(_command(cfg, config, *sets, resume=resume),
                                    env=job_environment(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=cfg.kill_every_s)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)  # spd-ext train, its launcher's own group, every rank
                proc.wait()
                run.failures += 1
                tag = resume_tag(out / CHECKPOINTS)  # the last complete checkpoint
                if tag == f"global_step{cfg.steps}":  # trained: killed while exporting
                    break
                resume = tag is not None
                if time.time() - run.started > cfg.timeout_s:
                    raise UsageError(f"restart_all outlived {cfg.timeout_s:g} s") from None
                continue
            run.exit_code = code
            break
    run.wall_s = time.time() - run.started
    return run


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process descended from it (a job's processes may sit in
    process groups of their own: `spd-ext train` starts its launcher in a new session)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _logs(out: Path, arm: str) -> list[list[dict]]:
    paths = ([out / "log.jsonl"] if arm == "restart_all" else
             sorted(out.glob("island*/log.jsonl")))
    found = []
    for path in paths:
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line a kill cut short
        found.append(records)
    return found


def _measure(cfg: FaultsConfig, run: ArmRun, out: Path, tokens_per_island_step: int) -> dict:
    logs = _logs(out, run.arm)
    steps_trained = 0
    pauses, medians = [], []
    val_curve: dict[int, tuple[float, float]] = {}
    final_val = None
    for records in logs:
        records = [r for r in records if "event" not in r]
        steps = {r["step"] for r in records if "loss" in r and "step" in r}
        steps_trained += len(steps)
        times = [r["time"] - run.started for r in records if "loss" in r]
        gaps = [b - a for a, b in zip(times, times[1:]) if b >= a]
        if gaps:
            pauses.append(max(gaps))
            medians.append(statistics.median(gaps))
        for r in records:
            if "val_loss" in r and "step" in r and "event" not in r:
                val_curve.setdefault(r["step"], (r["time"] - run.started, r["val_loss"]))
                if r.get("final"):
                    final_val = r["val_loss"]
    per_step = tokens_per_island_step * (cfg.islands if run.arm == "restart_all" else 1)
    return {"arm": run.arm, "exit_code": run.exit_code, "wall_s": run.wall_s,
            "failures": run.failures, "steps_per_s": cfg.steps / run.wall_s,
            "tokens_per_s": steps_trained * per_step / run.wall_s,
            "final_val_loss": final_val, "longest_pause_s": max(pauses) if pauses else None,
            "median_step_s": statistics.median(medians) if medians else None,
            "val_curve": sorted((t, v, s) for s, (t, v) in val_curve.items())}


def run(cfg: FaultsConfig) -> list[dict]:
    cfg.check()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    results = cfg.out_dir / "results.json"
    done = finished_runs(results, lambda r: r["arm"], cfg.arms, cfg.force)
    config = cfg.out_dir / "train.json"
    with atomic_path(config) as tmp:
        tmp.write_text(json.dumps(cfg.train_config(cfg.out_dir / "run"), indent=1))
    tokens = 16 * 64 * cfg.ranks_per_island
    for arm in cfg.arms:
        if arm in done:
            continue
        out = cfg.out_dir / arm
        print(f"faults: {arm} ({cfg.islands} islands, kill every {cfg.kill_every_s:g} s)"
              if arm != "none" else f"faults: {arm} ({cfg.islands} islands)", flush=True)
        try:
            arm_run = (_run_restart_all(cfg, config, out) if arm == "restart_all" else
                       _run_islands(cfg, config, arm, out))
        except subprocess.TimeoutExpired:
            raise UsageError(f"faults: arm {arm} outlived {cfg.timeout_s:g} s; see "
                             f"{cfg.out_dir / (arm + '.log')}") from None
        if arm_run.exit_code != 0:
            raise UsageError(f"faults: arm {arm} failed (exit {arm_run.exit_code}); see "
                             f"{cfg.out_dir / (arm + '.log')}")
        done[arm] = _measure(cfg, arm_run, out, tokens)
        write_json(results, list(done.values()))
    rows = [done[a] for a in ARMS if a in done]
    plot(rows, cfg.out_dir / "faults.png")
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    base = next((r for r in rows if r["arm"] == "none"), None)
    body = []
    for r in rows:
        rel = (f"{r['tokens_per_s'] / base['tokens_per_s']:.0%}" if base else "-")
        dval = (f"{r['final_val_loss'] - base['final_val_loss']:+.3f}"
                if base and r["final_val_loss"] is not None else "-")
        body.append([r["arm"], r["failures"], f"{r['wall_s']:.0f}", f"{r['steps_per_s']:.2f}",
                     f"{r['tokens_per_s']:.0f}", rel, r["final_val_loss"], dval,
                     "-" if r["longest_pause_s"] is None else f"{r['longest_pause_s']:.1f}",
                     "-" if r["median_step_s"] is None else f"{r['median_step_s'] * 1e3:.0f}"])
    return format_table(["arm", "failures", "wall (s)", "steps/s", "tokens/s",
                         "vs none", "val loss", "vs none", "longest pause (s)",
                         "median step (ms)"], body, markdown=markdown)


def plot(rows: list[dict], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["val_curve"]:
            t, v, _ = zip(*r["val_curve"])
            ax.plot(t, v, marker="o", label=f"{r['arm']} ({r['failures']} failures)")
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("validation loss")
    ax.set_title("fault-tolerant DiLoCo islands vs restart-from-checkpoint")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
