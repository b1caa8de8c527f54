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
import signal
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


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


_LISTENERS: list[socket.socket] = []


def _loopback_store(rank: int, nproc: int, port: int, timeout: float) -> Any:
    """The rendezvous store, listening on 127.0.0.1 only: every rank of these jobs is on
    this host, and torch's own TCPStore server would listen on every interface. Rank 0
    binds the socket itself and hands it to the store (``master_listen_fd``)."""
    import torch.distributed as dist

    listener = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
    store = dist.TCPStore("127.0.0.1", port, nproc, rank == 0, timedelta(seconds=timeout),
                          master_listen_fd=listener.fileno() if listener else None)
    if listener is not None:
        _LISTENERS.append(listener)  # the store serves on this fd: keep it open
    return store


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

    torch.set_num_threads(threads)
    if bind:
        _bind_cores(rank, nproc, threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=nproc,
                                timeout=timedelta(seconds=pg_timeout),
                                store=_loopback_store(rank, nproc, port, pg_timeout))
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
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    pg_timeout = pg_timeout or timeout
    if not 0 < pg_timeout < math.inf:  # timeout=math.inf (no deadline) needs its own
        raise ValueError(f"the process group's timeout must be a finite number of seconds "
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
                if dead:
                    raise RankError(f"{_exit_story(dead[0], procs[dead[0]].exitcode)}; then "
                                    f"rank {rank} failed:\n{value}")
                raise RankError(f"rank {rank} failed:\n{value}")
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
