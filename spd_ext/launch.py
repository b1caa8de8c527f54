"""Run a function on N local CPU ranks with a hard timeout (tests, benchmarks, examples).

``spawn(fn, nproc, *args)`` starts ``nproc`` processes (spawn start method), initializes
torch.distributed in each (gloo by default, env:// on a free localhost port, the same
environment variables torchrun sets), calls ``fn(rank, world_size, *args)`` and returns
the per-rank results in rank order. A rank that raises, dies or outlives the timeout
stops every rank and raises in the caller with the rank named, so a hang costs seconds.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import queue
import re
import signal
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from spd_ext.errors import UsageError


class RankError(RuntimeError):
    """A rank raised, died or timed out under :func:`spawn`."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bind_cores(rank: int, nproc: int, threads: int) -> None:
    """Pin rank r to its own block of cores (when there are enough for every rank)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= nproc * threads:
        os.sched_setaffinity(0, cores[rank * threads:(rank + 1) * threads])


def _by_value(value: Any) -> bytes:
    """Serialize a result by value: torch's queue pickling would share tensors through file
    descriptors that vanish when this process exits. Results are plain data (what
    ``torch.load(weights_only=True)`` reads back: dicts, lists, tuples, numbers, strings,
    tensors), so the parent never runs an unpickler that can execute code; anything else
    is refused here, in the rank, naming it."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    raw = buffer.getvalue()
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for this
        raise TypeError(f"spawn: a rank function must return plain data (dicts, lists, "
                        f"tuples, numbers, strings, None, tensors); got {type(value).__name__}"
                        f": {str(exc).splitlines()[0]}") from None
    return raw


def _rank_main(fn: Callable[..., Any], rank: int, nproc: int, port: int, backend: str,
               threads: int, bind: bool, env: dict[str, str], pg_timeout: float,
               results: Any, args: tuple) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        # gloo's own connections on the loopback interface too (unless the caller chose)
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), **env,
    })
    import torch
    import torch.distributed as dist

    from spd_ext.comm.rendezvous import bound_store  # rank 0 serves it on 127.0.0.1 only

    torch.set_num_threads(threads)
    if bind:
        _bind_cores(rank, nproc, threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=nproc,
                                timeout=timedelta(seconds=pg_timeout),
                                store=bound_store(rank, nproc, "127.0.0.1", port, pg_timeout))
        value = fn(rank, nproc, *args)
        results.put(("ok", rank, _by_value(value)))
        # Gloo fails a rank whose peers tear their connections down while it still talks
        # to someone else, so nobody leaves before everyone is done.
        dist.barrier()
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _exit_story(rank: int, code: int | None) -> str:
    how = ""
    if code is not None and code < 0:
        try:
            how = f" (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"rank {rank} exited with code {code}{how} without returning a result"


def _reason(trace: str) -> str:
    """A rank's traceback's last line: the exception and its message."""
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no reason given"


# What a collective that waited too long says: gloo ("Timed out waiting 20000ms for recv
# operation"), spd_ext.comm ("timed out after 20 s waiting for rank 1", "did not arrive
# within", "did not reach step"), the rendezvous store ("Socket Timeout").
_WAITED_TOO_LONG = re.compile(r"timed out|timeout|did not (arrive|reach)", re.I)


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, a debugger): it cannot answer."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("T", "t")


def _who_stopped_answering(procs: list[Any], results: Any, waiter: int, done: dict,
                           window: float = 2.0) -> list[int]:
    """After rank ``waiter``'s collective timed out: the ranks that stopped answering. The
    waiter is the healthy one; a healthy peer blocked on it fails as soon as it is gone
    (gloo sees the connection close, spd_ext.comm the process exit) and reports, while a
    rank that stopped answering stays silent. So: the ranks neither done nor reporting
    nor exited within ``window`` seconds, the stopped processes among them if any."""
    reported = {waiter}
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        silent = [r for r, p in enumerate(procs) if r not in done and r not in reported
                  and p.exitcode is None]
        if not silent:
            return []
        try:
            _, rank, _ = results.get(timeout=0.1)
        except queue.Empty:
            continue
        reported.add(rank)  # an error (or a late result): it answers
    silent = [r for r, p in enumerate(procs) if r not in done and r not in reported
              and p.exitcode is None]
    return [r for r in silent if _stopped(procs[r].pid)] or silent


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, backend: str = "gloo",
          timeout: float = 120.0, threads_per_rank: int | None = None,
          env: dict[str, str] | None = None, pg_timeout: float | None = None,
          bind_cores: bool = False) -> list[Any]:
    """Run ``fn(rank, nproc, *args)`` on ``nproc`` ranks; return the results by rank.

    ``fn`` and ``args`` must be picklable (a module-level function). ``threads_per_rank``
    sets torch's intra-op threads in each rank (default: cores // nproc, at least 1).
    ``timeout`` (seconds; ``math.inf``: no deadline, a server) bounds the whole job;
    ``pg_timeout`` is the process group's own timeout (default: ``timeout``).
    ``bind_cores`` pins each rank to its own cores when there are enough (benchmarks).
    """
    if nproc < 1:
        raise UsageError(f"nproc must be at least 1, got {nproc}")
    pg_timeout = pg_timeout or timeout
    if not 0 < pg_timeout < math.inf:  # timeout=math.inf (no deadline) needs its own
        raise UsageError(f"the process group's timeout must be a finite number of seconds "
                         f"> 0, got {pg_timeout}; pass pg_timeout with timeout=math.inf")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // nproc)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, name=f"spd_ext-rank{rank}",
                    args=(fn, rank, nproc, port, backend, threads_per_rank, bind_cores,
                          dict(env or {}),
                          pg_timeout, results, args))
        for rank in range(nproc)
    ]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    exited_at: dict[int, float] = {}
    try:
        while len(done) < nproc:
            now = time.monotonic()
            if now > deadline:
                missing = sorted(set(range(nproc)) - set(done))
                raise RankError(f"ranks {missing} did not finish within {timeout:.0f} s "
                                f"(of {nproc}); they were stopped")
            try:
                kind, rank, value = results.get(timeout=min(0.2, deadline - now))
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank in done or p.exitcode is None:
                        continue
                    # A clean exit may still have its result in flight; give it a moment.
                    first = exited_at.setdefault(rank, now)
                    if p.exitcode != 0 or now - first > 5.0:
                        raise RankError(_exit_story(rank, p.exitcode)) from None
                continue
            if kind == "error":
                # A peer that died (killed, crashed) makes the others fail with connection
                # errors: name the dead rank first, it is the cause.
                time.sleep(0.3)
                dead = [r for r, p in enumerate(procs) if r != rank and r not in done
                        and p.exitcode is not None and p.exitcode != 0]
                reason = _reason(value)
                if dead:
                    raise RankError(f"{_exit_story(dead[0], procs[dead[0]].exitcode)}; then "
                                    f"rank {rank} failed: {reason}\n{value}")
                # The rank whose wait timed out is the healthy one: name the one it waited
                # for, which stopped answering.
                stalled = _who_stopped_answering(procs, results, rank, done) \
                    if _WAITED_TOO_LONG.search(reason) else []
                if stalled:
                    names = ", ".join(f"rank {r} (pid {procs[r].pid})" for r in stalled)
                    why = " (stopped: SIGSTOP or a debugger)" \
                        if any(_stopped(procs[r].pid) for r in stalled) else ""
                    raise RankError(f"{names} stopped answering{why}: rank {rank} timed out "
                                    f"waiting for it ({reason})\n{value}")
                raise RankError(f"rank {rank} failed: {reason}\n{value}")
            import torch

            done[rank] = torch.load(io.BytesIO(value), weights_only=True)  # see _by_value
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(done) == nproc else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [done[r] for r in range(nproc)]
