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

import atexit
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

#: How long interpreter exit waits for a progress thread's queued calls (a call to a peer
#: that died raises after the group's timeout; exit should not wait that long).
EXIT_JOIN_SECONDS = 10.0

#: Progress threads started and not closed yet, stopped at interpreter exit.
_LIVE: set[ProgressThread] = set()


@atexit.register
def _close_live_threads() -> None:
    # A daemon thread left running is killed by Python's finalization the next time it
    # takes the GIL; if that happens inside C++ (the kernel call or torch's
    # Future.set_result, which release the GIL), the forced unwind crosses a noexcept
    # destructor and the process aborts with "terminate called without an active
    # exception" after all its work is done. atexit runs before finalization, so stopping
    # the threads here leaves none inside C++.
    for thread in list(_LIVE):
        thread.close(timeout=EXIT_JOIN_SECONDS)


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
                _LIVE.add(self)
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._queue.put((call, tensor, future))
        return future

    def drain(self) -> None:
        """Wait until the calls queued so far have run (their errors go to their own
        handles)."""
        if self.busy():
            self.submit(lambda: None, torch.empty(0)).wait()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            self._run_one(*item)
            # nothing of the call stays referenced while waiting for the next one: its
            # closure holds the process group, which must be free to go when destroyed
            del item

    def _run_one(self, call: Callable[[], None], tensor: torch.Tensor,
                 future: torch.futures.Future) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self._done()
            # torch's Future takes Exceptions only; anything else (KeyboardInterrupt)
            # would kill this thread and leave every later wait() hanging
            future.set_exception(exc if isinstance(exc, Exception) else
                                 RuntimeError(f"spd_ext all_reduce interrupted: {exc!r}"))
        else:
            self._done()
            future.set_result(tensor)

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def close(self, timeout: float | None = None) -> None:
        """Let queued calls finish, then stop the thread (waiting at most ``timeout``
        seconds for it, if given)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            if self._thread is not threading.current_thread():  # closed from a queued call
                self._thread.join(timeout)
            self._thread = None
            _LIVE.discard(self)
