"""`spd-ext train` with ``fault_tolerance.enabled``: fault-tolerant DiLoCo islands on one
host. This process serves the torchft lighthouse (unless ``fault_tolerance.lighthouse``
names one), starts ``parallel.islands`` island jobs (each its own `deepspeed` launcher of
``--nproc / islands`` ranks, its own process group and out_dir ``OUT_DIR/island<k>``),
restarts an island that died (``--rejoin``: it heals from a live one; at most
``fault_tolerance.restarts`` times each), and prints one progress line for the run (the
islands present at the last outer step, restarts, kills). ``fault_tolerance.kill_every_s``
injects failures: every T seconds one island in turn is killed with SIGKILL (launcher and
ranks), as a machine lost would be.

Islands on separate machines: start `torchft_lighthouse --min_replicas 1` on one, then on
each machine ``spd-ext train CONFIG --nproc N --set fault_tolerance.enabled=true --set
fault_tolerance.island=K --set fault_tolerance.lighthouse=HOST:29510`` (the README shows
it); restart a dead island with ``--rejoin``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spd_ext.train.config import RunPlan
from spd_ext.train.run import (
    OUT_DIR_HELD_ENV,
    PROG,
    STOP_SIGNALS,
    _signal_group,
    job_environment,
    launcher_command,
)
from spd_ext.utils.files import write_json
from spd_ext.utils.table import format_table

#: how often the supervisor looks at its islands (s)
POLL_S = 0.2


@dataclass
class Island:
    index: int
    out_dir: Path
    proc: Any = None
    restarts: int = 0
    exit_code: int | None = None  # of the last job, once it ended
    finished: bool = False  # ended with exit code 0
    kills: int = 0
    log_offset: int = 0
    last: dict = field(default_factory=dict)  # the last metrics record read
    trained: bool = False  # a step logged since this job (re)started: it holds the state
    val_loss: float | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class IslandEvent:
    seconds: float
    island: int
    what: str  # "killed", "died", "restarted", "finished", "gave up"
    detail: str = ""


class IslandSupervisor:
    """Runs the island jobs of one fault-tolerant run to their end (see the module)."""

    def __init__(self, plan: RunPlan, config: str, overrides: Sequence[str], nproc: int
                 ) -> None:
        self.plan, self.config, self.overrides = plan, config, list(overrides)
        self.ft = plan.cfg.values["fault_tolerance"]
        self.count = plan.island_count
        if nproc % self.count:
            raise AssertionError("plan_run checked --nproc against parallel.islands")
        self.per_island = nproc // self.count
        self.islands = [Island(k, plan.out_dir / f"island{k}") for k in range(self.count)]
        self.events: list[IslandEvent] = []
        self.lighthouse_server: Any = None
        self.lighthouse = ""
        self._started = time.monotonic()
        self._stopping: list[int] = []

    # -- pieces --------------------------------------------------------------------------
    def _serve_lighthouse(self) -> None:
        from spd_ext.deepspeed.config import lighthouse_address
        from spd_ext.deepspeed.fault_tolerance import check_lighthouse
        from spd_ext.utils.optional import import_torchft

        if self.ft["lighthouse"] is not None:
            self.lighthouse = lighthouse_address(self.ft["lighthouse"],
                                                 "fault_tolerance.lighthouse")
            check_lighthouse(self.lighthouse, where="fault_tolerance.lighthouse")
            return
        import_torchft("spd-ext train's fault_tolerance section")
        from torchft._torchft import LighthouseServer

        # join_timeout: a quorum waits this long for an island that heartbeats but is not
        # at the outer step yet (a straggler); a dead island stops heartbeating and is
        # dropped after heartbeat_timeout
        self.lighthouse_server = LighthouseServer(
            bind="[::]:0", min_replicas=self.ft["min_islands"],
            join_timeout_ms=int(self.ft["quorum_timeout_s"] * 1000), heartbeat_timeout_ms=5000)
        port = self.lighthouse_server.address().rpartition(":")[2]
        self.lighthouse = f"http://localhost:{port}"

    def _start(self, island: Island, rejoin: bool) -> None:
        from spd_ext.launch import free_port

        island.out_dir.mkdir(parents=True, exist_ok=True)
        if not rejoin:  # a fresh run: the job empties its out_dir, after this one reads it
            (island.out_dir / "log.jsonl").unlink(missing_ok=True)
            (island.out_dir / "job.log").unlink(missing_ok=True)
            island.log_offset = 0
        env = job_environment(self.per_island * self.count)
        env.setdefault("RUST_LOG", "warn")
        env.pop(OUT_DIR_HELD_ENV, None)  # each island job holds its own out_dir
        sets = [*self.overrides, "fault_tolerance.enabled=true",
                f"fault_tolerance.island={island.index}",
                f"fault_tolerance.lighthouse={self.lighthouse.removeprefix('http://')}",
                f"training.out_dir={island.out_dir}"]
        cmd = [*launcher_command(self.config, sets, self.per_island, free_port()),
               "--rejoin" if rejoin else "--overwrite"]
        log = open(island.out_dir / "job.log", "a")  # noqa: SIM115 - the job's, kept open
        island.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        log.close()  # the child holds its own descriptor
        island.exit_code = None

    def _event(self, island: Island, what: str, detail: str = "") -> None:
        seconds = time.monotonic() - self._started
        self.events.append(IslandEvent(seconds, island.index, what, detail))
        print(f"{PROG}: {seconds:7.1f} s: island {island.index} {what}"
              + (f" ({detail})" if detail else ""), flush=True)

    def _read_progress(self, island: Island) -> None:
        path = island.out_dir / "log.jsonl"
        if not path.is_file():
            return
        try:
            with path.open("rb") as f:
                f.seek(island.log_offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # whole lines only
        island.log_offset += end
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "start":
                island.trained = False
            elif "val_loss" in record:
                island.val_loss = record["val_loss"]
            elif "loss" in record and "step" in record:
                island.last, island.trained = record, True

    def _progress_line(self, last_printed: int) -> int:
        steps = self.plan.cfg.values["training"]["steps"]
        records = [i.last for i in self.islands if i.trained and i.alive]
        if not records:
            return last_printed
        step = max(r["step"] for r in records)
        interval = self.plan.cfg.values["training"]["log_interval"]
        if step // interval == last_printed // interval and step != steps:
            return last_printed
        if step == last_printed:
            return last_printed
        losses = ", ".join(f"{i.last['loss']:.3f}" if i.last else "-" for i in self.islands)
        present = max((r.get("islands") or 0) for r in records)
        alive = sum(i.alive for i in self.islands)
        tokens = sum(r.get("tokens_per_sec", 0.0) for i, r in
                     ((i, i.last) for i in self.islands) if r and i.alive)
        print(f"step {step:>{len(str(steps))}}/{steps} | loss {losses} | islands "
              f"{present}/{self.count} in the last outer step, {alive} running | "
              f"{tokens / 1e3:.1f}k tok/s | restarts "
              f"{sum(i.restarts for i in self.islands)} | "
              f"{time.monotonic() - self._started:.0f} s", flush=True)
        return step

    # -- the run -------------------------------------------------------------------------
    def check_out_dirs(self, overwrite: bool) -> None:
        """A fresh run would wipe the islands' previous checkpoints: only with --overwrite."""
        from spd_ext.errors import UsageError
        from spd_ext.train.config import CHECKPOINTS, resume_tag

        for island in self.islands:
            tag = resume_tag(island.out_dir / CHECKPOINTS)
            if tag is not None and not overwrite:
                raise UsageError(f"{island.out_dir / CHECKPOINTS} already holds a run's "
                                 f"checkpoints (latest {tag}); pass --overwrite to start "
                                 "over, or set training.out_dir elsewhere")

    def run(self) -> int:
        self._serve_lighthouse()
        print(f"{PROG}: {self.plan.cfg.name}: {self.count} fault-tolerant islands x "
              f"{self.per_island} rank(s), lighthouse {self.lighthouse}, out "
              f"{self.plan.out_dir}/island<k> (each island's output in its job.log)",
              flush=True)
        received: list[int] = []
        in_main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, lambda s, f: received.append(s))
                    for sig in STOP_SIGNALS} if in_main else {}
        try:
            for island in self.islands:
                self._start(island, rejoin=False)
            return self._watch(received)
        finally:
            for island in self.islands:
                if island.alive:
                    _signal_group(island.proc.pid, signal.SIGKILL)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.lighthouse_server is not None:
                self.lighthouse_server.shutdown()

    def _watch(self, received: list[int]) -> int:
        kill_every = self.ft["kill_every_s"]
        next_kill = float("inf")  # the failures start once every island trains
        victim, printed = 0, 0
        while True:
            if received:
                print(f"{PROG}: {signal.Signals(received[0]).name}: stopping every island",
                      file=sys.stderr, flush=True)
                for island in self.islands:
                    if island.alive:
                        _signal_group(island.proc.pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while any(i.alive for i in self.islands) and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                return 128 + received[0]
            for island in self.islands:
                self._read_progress(island)
                if island.proc is None or island.exit_code is not None or island.alive:
                    continue
                island.exit_code = island.proc.returncode
                if island.exit_code == 0:
                    island.finished = True
                    self._event(island, "finished")
                    continue
                self._event(island, "died", f"exit {island.exit_code}; its output: "
                            f"{island.out_dir / 'job.log'}")
                if any(i.finished for i in self.islands):
                    self._event(island, "not restarted", "the other islands have finished")
                elif island.restarts >= self.ft["restarts"]:
                    self._event(island, "gave up", f"fault_tolerance.restarts "
                                f"{self.ft['restarts']} used")
                else:
                    island.restarts += 1
                    self._start(island, rejoin=True)
                    self._event(island, "restarted", f"{island.restarts}/"
                                f"{self.ft['restarts']}; it heals from a live island")
            printed = self._progress_line(printed)
            if kill_every and next_kill == float("inf") and all(i.last for i in self.islands):
                next_kill = time.monotonic() + kill_every
            if all(not i.alive for i in self.islands):
                break
            if time.monotonic() >= next_kill:
                # only while another island that trains since its start holds the state a
                # restarted one heals from (a failure of every island loses the run)
                holding = [i for i in self.islands if i.alive and i.trained]
                if len(holding) > 1:
                    target = holding[victim % len(holding)]
                    victim += 1
                    target.kills += 1
                    _signal_group(target.proc.pid, signal.SIGKILL)
                    self._event(target, "killed", "fault_tolerance.kill_every_s "
                                f"{kill_every:g}")
                next_kill = time.monotonic() + kill_every
            time.sleep(POLL_S)
        return self._summarize()

    def _summarize(self) -> int:
        finished = [i for i in self.islands if i.finished]
        rows = [[i.index, "finished" if i.finished else f"exit {i.exit_code}", i.restarts,
                 i.kills, i.last.get("step", "-") if i.last else "-",
                 i.val_loss if i.val_loss is not None else "-"] for i in self.islands]
        print(format_table(["island", "end", "restarts", "kills", "last step", "val loss"],
                           rows))
        summary = {"islands": self.count, "ranks_per_island": self.per_island,
                   "lighthouse": self.lighthouse,
                   "wall_seconds": time.monotonic() - self._started,
                   "finished": [i.index for i in finished],
                   "val_loss": {i.index: i.val_loss for i in self.islands},
                   "restarts": {i.index: i.restarts for i in self.islands},
                   "events": [e.__dict__ for e in self.events]}
        write_json(self.plan.out_dir / "islands.json", summary)
        needed = self.ft["min_islands"]
        if len(finished) < needed:
            print(f"{PROG}: error: {len(finished)} of {self.count} islands finished, fewer "
                  f"than fault_tolerance.min_islands {needed}; see each island's job.log in "
                  f"{self.plan.out_dir}", file=sys.stderr, flush=True)
            return 1
        return 0
