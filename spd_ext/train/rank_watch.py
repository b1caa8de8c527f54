"""Which rank stopped answering, for the rank whose collective timed out.

A collective that times out (gloo's, after the process group's timeout) tells the rank
that waited only that it waited. Each rank of `spd-ext train` therefore publishes, from a
small thread, where its main thread is (``mark("step 12")``, ``mark("saving checkpoint
global_step4")``) and a heartbeat, to the job's rendezvous store once a second. The rank
whose wait failed reads every other rank's entry and names the ones that explain it:

* no heartbeat for several seconds: the process is stopped, frozen or dead;
* a heartbeat, but in another phase for longer than the wait: its main thread is stuck
  there (a checkpoint write that never returns);
* otherwise its phase, as a clue.

The main thread pays nothing per step but a Python assignment; the thread's store calls
use a client of their own, with a short timeout, so a stopped store (rank 0 serves it)
is named too rather than waited for.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta

from spd_ext.comm.groups import host_id
from spd_ext.utils.files import process_exited

HEARTBEAT_S = 1.0
#: Heartbeats missed before a rank counts as not answering (a loaded host delays some).
MISSED_BEATS = 5
_KEY = "spd_ext/train/rank_watch"


class RankWatch:
    """This rank's published state, and the reading of the others' after a failure."""

    def __init__(self, rank: int, world_size: int, host: str, port: int,
                 store_timeout_s: float = 5.0) -> None:
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        self.phase, self.since = "starting", time.time()
        self._host = host_id()
        self._store = dist.TCPStore(host, port, world_size, False,
                                    timedelta(seconds=store_timeout_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="spd_ext-rank-watch",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(cls) -> RankWatch | None:
        """For a rank of a launched job (the store at MASTER_ADDR:MASTER_PORT); None for a
        single rank, which has nobody to wait for."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2:
            return None
        host = os.environ["MASTER_ADDR"]
        from spd_ext.comm.rendezvous import is_loopback

        return cls(int(os.environ["RANK"]), world, "127.0.0.1" if is_loopback(host) else host,
                   int(os.environ["MASTER_PORT"]))

    def mark(self, phase: str) -> None:
        """Where this rank's main thread is now (published within a heartbeat)."""
        self.phase, self.since = phase, time.time()

    def _publish(self) -> None:
        self._store.set(f"{_KEY}/{self.rank}", json.dumps(
            {"phase": self.phase, "since": self.since, "beat": time.time(),
             "pid": os.getpid(), "host": self._host}))

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - the store is gone or stopped: nothing to tell
                pass
            self._stop.wait(HEARTBEAT_S)

    def close(self) -> None:
        """Stop the thread (before the interpreter exits: it would die inside the store)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def blame(self, waited_s: float) -> str:
        """The ranks that explain why this rank's collective failed (it waits at most
        ``waited_s`` seconds), in one sentence."""
        entries = self._entries()
        # A rank that has missed a beat or two may be stopped, or only delayed: wait until
        # its silence decides it (a few seconds, once).
        quiet = [time.time() - e["beat"] for e in entries.values() if e is not None]
        undecided = [age for age in quiet if 1.5 * HEARTBEAT_S < age <= MISSED_BEATS * HEARTBEAT_S]
        if undecided:
            time.sleep(MISSED_BEATS * HEARTBEAT_S - min(undecided) + 0.2)
            entries = self._entries()
        now = time.time()
        culprits, others = [], []
        for rank, entry in entries.items():
            if entry is None:
                culprits.append("rank 0 stopped answering (the rendezvous store it serves did "
                                "not answer)" if rank == 0 else f"rank {rank} never reported")
                continue
            where = f"'{entry['phase']}' for {now - entry['since']:.0f} s"
            silent = now - entry["beat"]
            if entry["host"] == self._host and process_exited(entry["pid"]):
                culprits.append(f"rank {rank} (pid {entry['pid']}) has exited, last in {where}")
            elif silent > MISSED_BEATS * HEARTBEAT_S:
                culprits.append(f"rank {rank} (pid {entry['pid']}) stopped answering: no sign "
                                f"of life for {silent:.0f} s, last in {where}")
            elif entry["phase"] != self.phase and now - entry["since"] >= waited_s * 0.9:
                culprits.append(f"rank {rank} (pid {entry['pid']}) is stuck in {where}")
            else:
                others.append(f"rank {rank} in {where}")
        if not culprits:
            culprits = others or ["no other rank reported"]
        return f"rank {self.rank} was in '{self.phase}': " + "; ".join(culprits)

    def _entries(self) -> dict[int, dict | None]:
        """Every other rank's last published state (None: none, or the store is silent)."""
        entries: dict[int, dict | None] = {}
        for rank in range(self.world_size):
            if rank != self.rank:
                try:
                    entries[rank] = json.loads(self._store.get(f"{_KEY}/{rank}"))
                except Exception:  # noqa: BLE001 - no entry, or the store did not answer
                    entries[rank] = None
        return entries
