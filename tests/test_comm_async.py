"""``all_reduce(..., async_op=True)``: handles that return before the peers arrive, complete
in issue order, carry errors to ``wait()``, and serve DDP communication hooks."""

from __future__ import annotations

import time

import pytest
import torch

from spd_ext.comm import AllReduceWork, CommError, all_reduce, path
from spd_ext.launch import spawn

PATHS = ["default", "torch.distributed"]


def _force_torch_path(rank: int) -> None:
    import spd_ext.comm.groups as groups

    groups.host_id = lambda: f"node{rank}/boot"  # every rank on its own host: no segment


def _async_ranks(rank: int, world: int, which: str) -> dict:
    if which == "torch.distributed":
        _force_torch_path(rank)
    all_reduce(torch.zeros(1))  # set-up (collective, synchronous)
    out: dict = {"path": path(torch.zeros(1))}
    if rank == 1:
        time.sleep(0.6)  # rank 0's handles must come back before rank 1 even calls
    start = time.perf_counter()
    a = torch.full((1000,), float(rank + 1))
    b = torch.full((7,), float(rank + 1), dtype=torch.bfloat16)
    c = torch.full((4, 6), float(rank + 1), dtype=torch.float64).t()  # non-contiguous
    works = [all_reduce(a, async_op=True), all_reduce(b, "mean", async_op=True)]
    out["issue_s"] = time.perf_counter() - start  # kernel dtypes: nothing waited for
    out["done_at_issue"] = works[0].is_completed()
    # float64 is off the kernel: the ranks' agreement on it is waited for, as on torch's path
    works.append(all_reduce(c, "weighted", weights=[0.25, 0.75], async_op=True))
    out["types"] = sorted({type(w).__name__ for w in works})
    chained = works[0].get_future().then(lambda f: f.value().sum().item())
    d = torch.full((5,), float(rank + 1))
    all_reduce(d)  # synchronous, issued after the three: completes after them, in order
    out["sync"] = d[0].item()
    out["values"] = [w.wait()[0].item() for w in works[:2]] + [works[2].wait()[0, 0].item()]
    out["same_tensors"] = [works[0].wait() is a, works[1].wait() is b, works[2].wait() is c]
    out["chained"] = chained.wait()
    out["c_layout"] = c.is_contiguous()
    return out


@pytest.mark.parametrize("which", PATHS)
def test_async_handles_return_before_the_peers_arrive_and_complete_in_order(which) -> None:
    results = spawn(_async_ranks, 2, which, timeout=120)
    for r in results:
        if which == "torch.distributed":
            assert r["path"] == "torch.distributed"
        assert r["types"] == ["AllReduceWork"]
        assert r["values"] == [3.0, 1.5, pytest.approx(0.25 * 1 + 0.75 * 2)]
        assert r["same_tensors"] == [True, True, True] and not r["c_layout"]
        assert r["sync"] == 3.0 and r["chained"] == 3000.0
    if results[0]["path"] != "torch.distributed":  # on CPU, torch's path waits for the
        # peers' agreement on the call first (so a mismatch raises instead of aborting)
        assert results[0]["issue_s"] < 0.3, results[0]  # returned before rank 1 called
        assert not results[0]["done_at_issue"]


def _error_at_wait_ranks(rank: int, world: int) -> str:
    all_reduce(torch.zeros(1))
    if rank == 1:
        time.sleep(3)  # never joins in time
        return "slept"
    work = all_reduce(torch.ones(10), async_op=True, timeout=1.0)
    try:
        work.wait()
    except CommError as exc:
        return str(exc)
    return "no error"


def test_a_timeout_reaches_wait_as_comm_error() -> None:
    from conftest import FORCED_FALLBACK
    if FORCED_FALLBACK:
        pytest.skip("the torch.distributed path's timeout is the process group's own")
    message = spawn(_error_at_wait_ranks, 2, timeout=60)[0]
    assert "did not" in message or "timed out" in message or "timeout" in message, message


def _two_threads_async_ranks(rank: int, world: int) -> dict:
    import threading

    all_reduce(torch.zeros(1))
    if rank == 1:
        time.sleep(0.5)
    work = all_reduce(torch.ones(1000), async_op=True)  # queued while rank 1 sleeps
    error: list[str] = []

    def other_thread() -> None:
        try:
            all_reduce(torch.ones(3))
            error.append("no error")
        except CommError as exc:
            error.append(str(exc))

    if rank == 0:
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    t = torch.full((3,), float(rank + 1))
    all_reduce(t)
    return {"error": error[0] if error else "", "work": work.wait()[0].item(),
            "after": t[0].item()}


def test_a_second_thread_is_refused_while_calls_are_queued() -> None:
    from conftest import FORCED_FALLBACK
    if FORCED_FALLBACK:
        pytest.skip("the queue is the shared-memory kernel's; torch.distributed orders itself")
    results = spawn(_two_threads_async_ranks, 2, timeout=60)
    assert "two threads called all_reduce" in results[0]["error"], results[0]
    assert [r["work"] for r in results] == [2.0, 2.0]
    assert [r["after"] for r in results] == [3.0, 3.0]


def test_one_rank_and_completed_handles() -> None:
    work = AllReduceWork.completed(torch.ones(2))
    assert work.is_completed() and work.wait().tolist() == [1.0, 1.0]
    assert work.get_future().value().tolist() == [1.0, 1.0]


_EXIT_CHECK = """
import atexit, threading
# Registered before spd_ext is imported, so it runs after spd_ext's own atexit handler.
atexit.register(lambda: print("progress threads at exit:",
                              [t.name for t in threading.enumerate() if "progress" in t.name]))
import torch
from spd_ext.comm.work import ProgressThread
progress = ProgressThread("spd_ext-test-progress")
t = torch.ones(3)
progress.submit(lambda: t.mul_(2), t).wait()
print("value:", t.tolist())
"""


def test_progress_threads_are_stopped_before_interpreter_exit() -> None:
    """A daemon progress thread still alive when Python finalizes is killed inside C++
    the next time it takes the GIL, which aborts the process ("terminate called without an
    active exception") after its work is done; spd_ext stops them at exit first."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _EXIT_CHECK], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "value: [2.0, 2.0, 2.0]" in proc.stdout
    assert "progress threads at exit: []" in proc.stdout, proc.stdout


def _off_kernel_async_ranks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    all_reduce(torch.zeros(1))  # set-up
    if rank == 1:
        time.sleep(0.3)  # rank 0 issues its broadcast while its all-reduce is being checked
    t = torch.full((4,), float(rank + 1), dtype=torch.float64)  # not a kernel dtype
    work = all_reduce(t, async_op=True)
    if rank == 1:
        time.sleep(0.3)  # rank 1's all-reduce reaches gloo before its broadcast
    b = torch.full((4,), 10.0 * (rank + 1), dtype=torch.float64)
    dist.broadcast(b, src=0)
    work.wait()
    error = ""
    try:
        all_reduce(torch.ones(2, dtype=torch.int64), "weighted", weights=[0.5, 0.5])
    except TypeError as exc:
        error = str(exc)
    return {"sum": t.tolist(), "broadcast": b.tolist(), "error": error}


def test_an_async_call_off_the_kernel_keeps_issue_order_with_other_collectives() -> None:
    """A float64 all-reduce on a shared-memory group goes through torch.distributed; issued
    with async_op=True it must pair with the peers' all-reduce, not with a broadcast the
    caller issued after it (run from the progress thread, it could be issued after it)."""
    for r in spawn(_off_kernel_async_ranks, 2, timeout=60):
        assert r["sum"] == [3.0] * 4 and r["broadcast"] == [10.0] * 4, r
        assert "needs a floating-point tensor" in r["error"], r
