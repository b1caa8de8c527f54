"""``AllReduceWork``: an all-reduce in flight, as ``all_reduce(..., async_op=True)`` returns it.

Who carries the collective decides what stands behind the handle:

- torch.distributed (gloo, NCCL): torch's own ``Work``; the handle's future is the Work's
  future chained with the finishing touches (the mean's division, the copy back into a
  non-contiguous or low-precision tensor), which run where torch completes the Work.
- spd_ext's shared-memory kernel: a :class:`ProgressThread` per process group runs the
  group's calls one after another, in the order they were issued (every rank issues the
  same sequence, so the calls pair across ranks as the synchronous ones do). The C++
  call releases the GIL, so the caller's compute overlaps it.
- spd_ext's CUDA IPC kernel: it is already asynchronous to the host (queued on the
  current stream); the handle's future is a CUDA-aware one, so waiting on it orders the
  waiting stream after the kernel, as NCCL's Work does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from spd_ext.comm.groups import CommError


class AllReduceWork:
    """An all-reduce in flight. ``wait()`` returns the reduced tensor (raising the call's
    error, e.g. :class:`CommError`, if it failed); ``get_future()`` gives a
    ``torch.futures.Future`` whose value is that tensor, for ``then`` chains and DDP
    communication hooks."""

    def __init__(self, tensor: torch.Tensor, future: torch.futures.Future) -> None:
        self.tensor = tensor
        self._future = future

    @classmethod
    def completed(cls, tensor: torch.Tensor) -> AllReduceWork:
        """A handle for a call that finished before returning (one rank, a no-op)."""
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(tensor)
        return cls(tensor, future)

    def wait(self) -> torch.Tensor:
        """Block until the tensor holds the result (for CUDA: until the current stream is
        ordered after the kernel) and return it."""
        self._future.wait()
        return self.tensor

    def is_completed(self) -> bool:
        return self._future.done()

    def get_future(self) -> torch.futures.Future[torch.Tensor]:
        return self._future


_STOP = object()


class ProgressThread:
    """Runs one process group's asynchronous kernel calls in issue order on one daemon
    thread.

    One thread issues a group's calls at a time: a call from a second thread while the
    first one's calls are queued raises :class:`CommError`, as two threads calling the
    kernel at once do (their calls would pair with different calls on other ranks). A
    synchronous call made while calls are queued must go through :meth:`submit` too (see
    :meth:`busy`), so that it runs after them.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._owner: int | None = None
        self._thread: threading.Thread | None = None

    def busy(self) -> bool:
        """Whether calls are queued or running (read without the lock: a stale True only
        routes a call through the queue, and False can only be stale for the thread that
        issued them all, which is the caller)."""
        return self._pending > 0

    def submit(self, call: Callable[[], None], tensor: torch.Tensor) -> torch.futures.Future:
        """Queue ``call``; the future's value is ``tensor`` once it has run."""
        me = threading.get_ident()
        with self._lock:
            if self._pending and self._owner != me:
                raise CommError("spd_ext all_reduce: two threads called all_reduce on the "
                                "same process group at once; their calls would pair with "
                                "different calls on other ranks. Give each thread its own "
                                "process group (torch.distributed.new_group) or call from "
                                "one thread")
            self._pending += 1
            self._owner = me
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._queue.put((call, tensor, future))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            call, tensor, future = item
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                self._done()
                future.set_exception(exc)
            else:
                self._done()
                future.set_result(tensor)

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        """Let queued calls finish, then stop the thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
