"""spd_ext.comm.all_reduce on 2-4 CPU ranks (gloo), against float64 references.

Each multi-rank test spawns its ranks once and checks many cases inside them; ranks
return lists of failures so the assertion message says what went wrong where.
"""

from __future__ import annotations

import glob
import hashlib
import math
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from spd_ext.comm import CommError, all_reduce, describe, ipc_buffer, path
from spd_ext.comm.all_reduce import rank_weight
from spd_ext.launch import RankError, spawn

from conftest import FORCED_FALLBACK, assert_within_bound, needs_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHUNK_BYTES = 1 << 20  # spd_ext.comm.shm.DEFAULT_CHUNK_BYTES


def _sizes(dtype: torch.dtype) -> list[int]:
    chunk_elements = CHUNK_BYTES // torch.empty((), dtype=dtype).element_size()
    return [1, 3, 1023, 2**20 + 7, chunk_elements + 1]


def _data(n: int, world: int, dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor],
                                                                        torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, generator=g) * 2).to(dtype) for _ in range(world)]
    w = torch.softmax(torch.randn(world, generator=g), 0)
    return xs, w


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _check_all_ops(rank: int, world: int, x: torch.Tensor, xs: list[torch.Tensor],
                   w: torch.Tensor, label: str, failures: list[str],
                   digests: dict[str, str]) -> None:
    cases = {
        "sum": ({}, [x_.double() for x_ in xs]),
        "mean": ({}, [x_.double() / world for x_ in xs]),
        "weighted": ({"weights": w}, [float(wi) * x_.double() for wi, x_ in zip(w, xs)]),
    }
    for op, (kwargs, terms) in cases.items():
        t = x.clone()
        returned = all_reduce(t, op, **kwargs)
        if returned is not t:
            failures.append(f"{label} {op}: did not return its input tensor")
        try:
            assert_within_bound(t, terms, f"rank {rank} {label} {op}")
        except AssertionError as exc:
            failures.append(str(exc))
        digests[f"{label} {op}"] = _digest(t)


def _reference_ranks(rank: int, world: int) -> dict:
    failures: list[str] = []
    digests: dict[str, str] = {}
    for dtype in DTYPES:
        for n in _sizes(dtype):
            xs, w = _data(n, world, dtype, seed=n + world)
            _check_all_ops(rank, world, xs[rank], xs, w, f"{dtype} n={n}", failures, digests)
    # In-place writes are visible to autograd's version counter.
    t = torch.ones(10)
    before = t._version
    all_reduce(t)
    if t._version == before:
        failures.append("all_reduce did not bump the tensor's version")
    # Non-contiguous tensors go through a contiguous copy and come back in place.
    xs, w = _data(64 * 48, world, torch.float32, seed=5)
    expect = sum(x.double() for x in xs).view(64, 48).t()
    view = xs[rank].view(64, 48).t()
    all_reduce(view)
    if not torch.allclose(view.double(), expect, rtol=1e-6, atol=1e-6):
        failures.append("non-contiguous view not reduced in place")
    return {"failures": failures, "digests": digests,
            "path": path(torch.zeros(1)), "describe": describe()}


@pytest.mark.parametrize("world", [2, 4])
def test_matches_float64_reference_and_ranks_agree_bitwise(world: int) -> None:
    results = spawn(_reference_ranks, world, timeout=240)
    for r in results:
        assert not r["failures"], "\n".join(r["failures"][:5])
    for key, digest in results[0]["digests"].items():
        assert all(r["digests"][key] == digest for r in results), f"ranks disagree on {key}"
    expected_path = "torch.distributed" if FORCED_FALLBACK else "shm"
    assert all(r["path"] == expected_path for r in results), results[0]["describe"]


def _repeated_ranks(rank: int, world: int) -> list[str]:
    failures: list[str] = []
    # Sizes on both sides of the one-shot threshold and across a chunk boundary.
    for n in (1023, 150_001, 262_145):
        t = torch.empty(n, dtype=torch.bfloat16)
        for step in range(100):
            xs, w = _data(n, world, torch.bfloat16, seed=step * 31 + n)
            op = ("sum", "mean", "weighted")[step % 3]
            t.copy_(xs[rank])
            all_reduce(t, op, weights=w if op == "weighted" else None)
            scale = {"sum": [1.0] * world, "mean": [1.0 / world] * world,
                     "weighted": w.tolist()}[op]
            try:
                assert_within_bound(t, [s * x.double() for s, x in zip(scale, xs)],
                                    f"rank {rank} n={n} step {step} {op}")
            except AssertionError as exc:
                failures.append(str(exc))
                break
    return failures


@pytest.mark.parametrize("world", [2, 4])
def test_100_calls_with_changing_data(world: int) -> None:
    # 4 ranks on this 2-core machine also checks that waiting ranks yield to the rank
    # they wait for instead of starving it.
    for failures in spawn(_repeated_ranks, world, timeout=240):
        assert not failures, failures[0]


def _tiny_chunk_ranks(rank: int, world: int) -> list[str]:
    failures: list[str] = []
    digests: dict[str, str] = {}
    for dtype in DTYPES:
        for n in (1, 2, 3, 5, 17, 4099, 70_001):  # slices of 0..n elements per rank
            xs, w = _data(n, world, dtype, seed=n)
            _check_all_ops(rank, world, xs[rank], xs, w, f"{dtype} n={n}", failures, digests)
    return failures


def test_two_shot_with_tiny_chunks_and_uneven_slices() -> None:
    env = {"SPD_EXT_SHM_CHUNK_BYTES": "8192", "SPD_EXT_SHM_ONESHOT_MAX_BYTES": "1"}
    for failures in spawn(_tiny_chunk_ranks, 3, timeout=240, env=env):
        assert not failures, "\n".join(failures[:5])


def _fallback_paths_ranks(rank: int, world: int) -> dict:
    out: dict = {}
    ints = torch.arange(6, dtype=torch.int64) * (rank + 1)
    all_reduce(ints)
    out["int64 sum"] = ints.tolist()
    doubles = torch.full((5,), float(rank + 1), dtype=torch.float64)
    all_reduce(doubles, "weighted", weights=[0.25, 0.75])
    out["float64 weighted"] = doubles.tolist()
    out["int64 path"] = path(ints)
    # A subgroup gets its own shared-memory segment; every rank creates every group.
    groups = [dist.new_group([0]), dist.new_group([1])]
    mine = groups[rank]
    single = torch.full((3,), 2.0)
    all_reduce(single, "weighted", weights=[0.5], group=mine)
    out["singleton weighted"] = single.tolist()
    pair = dist.new_group([0, 1])
    t = torch.full((1000,), float(rank + 1))
    all_reduce(t, "mean", group=pair)
    out["subgroup mean"] = t[0].item()
    out["subgroup path"] = describe(pair)
    return out


def test_other_dtypes_and_groups() -> None:
    results = spawn(_fallback_paths_ranks, 2, timeout=120)
    for r in results:
        assert r["int64 sum"] == [0, 3, 6, 9, 12, 15]
        assert r["float64 weighted"] == pytest.approx([0.25 * 1 + 0.75 * 2] * 5)
        assert r["int64 path"] == "torch.distributed"
        assert r["singleton weighted"] == [1.0, 1.0, 1.0]
        assert r["subgroup mean"] == pytest.approx(1.5)
        assert r["subgroup path"].startswith("torch.distributed" if FORCED_FALLBACK
                                             else "shared memory")


def _weights_forms_ranks(rank: int, world: int) -> dict:
    out: dict = {}
    all_reduce(torch.ones(4))  # sets the group up: weights below take the per-call path
    forms = {
        "float32": torch.tensor([0.25, 0.75]),
        "float64": torch.tensor([0.25, 0.75], dtype=torch.float64),
        "bfloat16": torch.tensor([0.25, 0.75], dtype=torch.bfloat16),  # checked in Python
        "strided": torch.tensor([0.25, 9.0, 0.75, 9.0])[::2],
        "2-d": torch.tensor([[0.25], [0.75]]),
    }
    for name, w in forms.items():
        t = torch.full((1000,), float(rank + 1))
        all_reduce(t, "weighted", weights=w)
        out[name] = t[0].item()
    for name, w in {"nan": torch.tensor([float("nan"), 1.0]),
                    "inf float64": torch.tensor([float("inf"), 1.0], dtype=torch.float64),
                    "three": torch.tensor([0.2, 0.3, 0.5])}.items():
        try:
            all_reduce(torch.ones(8), "weighted", weights=w)
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    t = torch.full((10,), float(rank + 1))
    all_reduce(t)  # the group still works after refused calls
    out["sum after"] = t[0].item()
    return out


def test_every_form_of_weights_tensor() -> None:
    for r in spawn(_weights_forms_ranks, 2, timeout=120):
        for name in ("float32", "float64", "bfloat16", "strided", "2-d"):
            assert r[name] == pytest.approx(1.75), name
        assert "finite" in r["nan"] and "finite" in r["inf float64"]
        assert "got 3 weights for 2 ranks" in r["three"]
        assert r["sum after"] == 3.0


def _two_hosts_ranks(rank: int, world: int) -> dict:
    import spd_ext.comm.groups as groups

    groups.host_id = lambda: f"node{rank}/boot"  # pretend every rank is on its own host
    t = torch.full((1000,), float(rank + 1), dtype=torch.bfloat16)
    all_reduce(t, "weighted", weights=[0.25, 0.75])
    return {"value": t[0].item(), "describe": describe(), "path": path(t)}


@needs_kernels
def test_ranks_on_several_hosts_use_torch_distributed() -> None:
    for r in spawn(_two_hosts_ranks, 2, timeout=120):
        assert r["path"] == "torch.distributed"
        assert "ranks span 2 hosts (node0, node1)" in r["describe"]
        assert r["value"] == pytest.approx(1.75, rel=1e-2)


def _mismatch_ranks(rank: int, world: int) -> list[str]:
    messages = []
    for t in (torch.ones(100 + rank * 5000),  # sizes differ
              torch.ones(100, dtype=(torch.float32, torch.bfloat16)[rank]),  # dtypes differ
              torch.ones(0 if rank else 10)):  # one rank empty
        try:
            all_reduce(t, timeout=30)
            messages.append("no error")
        except CommError as exc:
            messages.append(str(exc))
    t = torch.full((10,), float(rank))  # the group still works afterwards
    all_reduce(t)
    messages.append(str(t[0].item()))
    return messages


@needs_kernels
def test_mismatched_tensors_raise_on_every_rank() -> None:
    for messages in spawn(_mismatch_ranks, 2, timeout=120):
        assert "rank 0 100 x float32" in messages[0] and "rank 1 5100 x float32" in messages[0]
        assert "bfloat16" in messages[1] and "same size and dtype" in messages[1]
        assert "rank 0 10 x" in messages[2] and "rank 1 0 x" in messages[2]
        assert messages[3] == "1.0"


def _missing_rank_ranks(rank: int, world: int) -> dict:
    all_reduce(torch.ones(10))  # both ranks set the group up
    if rank == 1:
        time.sleep(4)  # then rank 1 skips the next collective
        return {"pid": os.getpid()}
    start = time.monotonic()
    try:
        all_reduce(torch.ones(10), timeout=1.0)
        message = "no error"
    except CommError as exc:
        message = str(exc)
    try:
        all_reduce(torch.ones(10), timeout=1.0)
        after = "no error"
    except CommError as exc:
        after = str(exc)
    segments = glob.glob(f"/dev/shm/spd_ext_{os.getpid()}_*")
    return {"message": message, "after": after, "elapsed": time.monotonic() - start,
            "segments": segments}


@needs_kernels
def test_missing_rank_times_out_naming_it() -> None:
    rank0, rank1 = spawn(_missing_rank_ranks, 2, timeout=120)
    assert "waiting for rank 1" in rank0["message"], rank0["message"]
    assert f"pid {rank1['pid']}" in rank0["message"]
    assert "timed out after 1" in rank0["message"]
    assert rank0["elapsed"] < 10
    assert "unusable after an earlier failure" in rank0["after"]
    assert rank0["segments"] == [], "the segment name must be unlinked once all ranks attached"


def _attach_then(name: str, action: str, attached) -> None:
    from spd_ext.ops.shm_allreduce import builder

    ctx = builder.load().ShmAllReduce(name, 1, 2, 0, False)
    attached.set()
    if action == "sleep":
        time.sleep(30)
    del ctx
    os._exit(0)


@needs_kernels
@pytest.mark.parametrize("action", ["exit", "sleep"])
def test_dead_or_silent_peer_is_named(action: str) -> None:
    from spd_ext.ops.shm_allreduce import builder

    name = f"/spd_ext_test_{os.getpid()}_{action}"
    ctx = builder.load().ShmAllReduce(name, 0, 2, 1 << 16, True)
    spawn_ctx = mp.get_context("spawn")
    attached = spawn_ctx.Event()
    child = spawn_ctx.Process(target=_attach_then, args=(name, action, attached))
    try:
        child.start()
        assert attached.wait(60), "peer never attached"
        ctx.unlink()
        # For "exit" the child is now a zombie (nobody has waited for it): still detected.
        time.sleep(0.5)
        start = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            ctx.all_reduce_(torch.ones(10), 0, 1.0, 0, 1 << 18, 5.0)
        message = str(info.value)
        if action == "exit":
            assert f"rank 1 (pid {child.pid}) exited" in message, message
            assert time.monotonic() - start < 2.0, "a dead peer is detected quickly"
        else:
            assert "timed out after 5" in message and "rank 1" in message, message
        assert not os.path.exists(f"/dev/shm{name}")
    finally:
        child.kill()
        child.join()
        ctx.unlink()


def test_use_before_init_is_an_error() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce(torch.ones(3))


def test_a_closed_ipc_group_refuses_further_calls() -> None:
    """IpcGroup.close() drops the group's hold on its IPC context; a later call raises
    instead of using memory that may be unmapped (the kernel itself needs a GPU)."""
    from spd_ext.comm.cuda_ipc import IpcGroup

    group = IpcGroup(ctx=object(), rank=0, world_size=2, capacity=1 << 20,
                     oneshot_max_bytes=1 << 10)
    group.close()
    assert group.ctx is None
    with pytest.raises(CommError, match="CUDA IPC context was closed"):
        group.all_reduce_(torch.ones(4), "sum", 1.0)


@pytest.mark.parametrize(
    "op, weights, match",
    [
        ("max", None, "unknown op"),
        ("sum", [0.5, 0.5], "only used with op='weighted'"),
        ("weighted", None, "needs weights"),
        ("weighted", [1.0, 2.0, 3.0], "3 weights for 2 ranks"),
        ("weighted", [float("nan"), 1.0], "finite"),
        ("weighted", 0.5, "weights= takes every rank's weights"),
    ],
)
def test_bad_op_and_weights(op: str, weights, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rank_weight(op, weights, 0, 2)


@pytest.mark.parametrize("weights, weight, match", [
    (None, float("inf"), "finite"),
    ([0.5, 0.5], 0.5, "not both"),
    (None, [0.5, 0.5], "pass every rank's weights as weights="),
])
def test_bad_own_weight(weights, weight, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rank_weight("weighted", weights, 0, 2, weight)


def test_rank_weight_values() -> None:
    assert rank_weight("sum", None, 1, 4) == 1.0
    assert rank_weight("mean", None, 1, 4) == 0.25
    assert rank_weight("weighted", torch.tensor([0.1, 0.9]), 1, 2) == pytest.approx(0.9)
    assert rank_weight("weighted", None, 1, 2, weight=0.3) == pytest.approx(0.3)


def _raise_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise KeyError("boom")
    time.sleep(30)


def _hang(rank: int, world: int) -> None:
    time.sleep(60)


def test_spawn_names_the_failing_rank() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 failed:(.|\n)*KeyError: 'boom'"):
        spawn(_raise_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30


class _NotPlainData:
    pass


def _returns_an_object(rank: int, world: int) -> object:
    return {"tensor": torch.ones(2), "object": _NotPlainData()} if rank == 1 else {"ok": 1}


def test_spawn_results_are_plain_data_loaded_without_running_code() -> None:
    """The parent reads results with torch.load(weights_only=True): plain data and tensors
    come back; an arbitrary object is refused in the rank that returned it, by name."""
    out = spawn(_plain_result, 2, timeout=60)
    assert out[0]["values"] == [0, 1.5, "x", None] and torch.equal(out[1]["t"], torch.ones(3))
    with pytest.raises(RankError, match=r"rank 1 failed:(.|\n)*must return plain data"):
        spawn(_returns_an_object, 2, timeout=60)


def _plain_result(rank: int, world: int) -> dict:
    return {"values": [rank, 1.5, "x", None], "t": torch.ones(3), "pair": (rank, world)}


def _killed_rank_one(rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(4))  # rank 0 fails with a connection error


def test_spawn_names_a_killed_rank_before_the_errors_it_causes() -> None:
    with pytest.raises(RankError, match=r"^rank 1 exited with code -9 \(killed by SIGKILL\)"):
        spawn(_killed_rank_one, 2, timeout=60)


def test_spawn_times_out_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match=r"ranks \[0, 1\] did not finish within 3 s"):
        spawn(_hang, 2, timeout=3)
    assert time.monotonic() - start < 20


def _ipc_buffer_ranks(rank: int, world: int) -> list[str]:
    messages = []
    for kwargs in ({"shape": 16, "dtype": torch.int32}, {"shape": (4, -1)}, {"shape": 16}):
        try:
            ipc_buffer(**kwargs)
            messages.append(f"{kwargs}: no error")
        except (TypeError, ValueError, RuntimeError) as exc:
            messages.append(f"{type(exc).__name__}: {exc}")
    return messages


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_ipc_buffer_without_cuda_says_why() -> None:
    for messages in spawn(_ipc_buffer_ranks, 2, timeout=120):
        assert messages[0].startswith("TypeError: ipc_buffer supports"), messages[0]
        assert messages[1].startswith("UsageError: ipc_buffer: negative"), messages[1]
        assert messages[2].startswith("RuntimeError: spd_ext.comm.ipc_buffer: this group has "
                                      "no CUDA IPC path (torch.distributed ("), messages[2]
        assert "ipc_allreduce op is unavailable" in messages[2], messages[2]



def _dead_pid() -> int:
    proc = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    return proc.pid


def _reduce_once(rank: int, world: int) -> float:
    t = torch.ones(16)
    all_reduce(t)
    return t[0].item()


@needs_kernels
def test_group_setup_removes_segments_left_by_killed_ranks() -> None:
    """A rank killed while its group set up leaves ``/dev/shm/spd_ext_<pid>_<token>``
    (SIGKILL cannot be caught); the next set-up on the host removes names whose creator
    is gone and keeps those of live processes."""
    stale = f"/dev/shm/spd_ext_{_dead_pid()}_0123456789ab"
    live = f"/dev/shm/spd_ext_{os.getpid()}_0123456789ab"
    for name in (stale, live):
        with open(name, "wb") as f:
            f.write(b"\0" * 4096)
    try:
        assert spawn(_reduce_once, 2) == [2.0, 2.0]
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        for name in (stale, live):
            if os.path.exists(name):
                os.unlink(name)


def test_clean_command_lists_and_removes_stale_segments(capsys) -> None:
    import mmap

    from spd_ext.cli import main

    port = 40000 + os.getpid() % 20000
    names = {"stale": f"/dev/shm/spd_ext_{_dead_pid()}_0123456789ac",
             "live": f"/dev/shm/spd_ext_{os.getpid()}_0123456789ac",
             "ds_unmapped": f"/dev/shm/deepspeed_allreduce_buffer_0_127.0.0.1_{port}_0",
             "ds_mapped": f"/dev/shm/deepspeed_allreduce_buffer_0_127.0.0.1_{port}_1"}
    for name in names.values():
        with open(name, "wb") as f:
            f.write(b"\0" * 8192)
    with open(names["ds_mapped"], "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 8192)  # a live job's buffer: mapped, so kept
    try:
        assert main(["clean", "--dry-run"]) == 0
        listed = capsys.readouterr().out
        assert names["stale"] in listed and names["ds_unmapped"] in listed
        assert names["live"] not in listed and names["ds_mapped"] not in listed
        assert all(os.path.exists(n) for n in names.values())  # a dry run removes nothing
        assert main(["clean"]) == 0
        assert "removed: " + names["stale"] in capsys.readouterr().out
        assert [k for k, n in names.items() if os.path.exists(n)] == ["live", "ds_mapped"]
    finally:
        mapping.close()
        for name in names.values():
            if os.path.exists(name):
                os.unlink(name)


def test_sigterm_during_setup_unlinks_the_segment_name(tmp_path) -> None:
    """torchrun tears a job down with SIGTERM: rank 0, holding a named segment while its
    group sets up, unlinks the name before dying of the signal as it would have."""
    import subprocess
    import sys

    marker = tmp_path / "unlinked"
    code = f"""
import os, signal
from spd_ext.comm.shm import _unlink_on_sigterm
class Segment:
    def unlink(self):
        open({str(marker)!r}, "w").write("yes")
with _unlink_on_sigterm(Segment()):
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()
"""
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -15  # still dies of SIGTERM
    assert marker.read_text() == "yes"


_SETUP_RANK = """
import os, sys, time, torch, torch.distributed as dist
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
if rank == 0:
    from spd_ext.comm import all_reduce
    all_reduce(torch.ones(8))      # creates the segment, then waits for rank 1 to attach
else:
    from spd_ext.comm.groups import SetupExchange, single_host_reason
    exchange = SetupExchange(None, "shared-memory all-reduce")
    single_host_reason(exchange, True, "shm_allreduce", "")
    exchange.broadcast(None)       # rank 0 has created the segment and sent its name
    print("got the name", flush=True)
    time.sleep(600)                # killed here, before attaching
"""


@needs_kernels
def test_sigterm_unlinks_the_segment_name_after_the_peer_died_during_setup(tmp_path) -> None:
    """A rank killed during the group's set-up, then the survivor (rank 0, holding the
    segment's name while it waits for the dead peer) stopped with SIGTERM as torchrun
    does: the name is unlinked at once and the survivor dies of the signal, rather than
    waiting inside the store for the dead peer's timeout."""
    import subprocess
    import sys

    from spd_ext.launch import free_port

    before = set(glob.glob("/dev/shm/spd_ext_*"))
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "SPD_EXT_COMM_TIMEOUT": "120"}
    ranks = [subprocess.Popen([sys.executable, "-c", _SETUP_RANK], text=True,
                              stdout=subprocess.PIPE, env={**env, "RANK": str(r)})
             for r in range(2)]
    try:
        assert ranks[1].stdout.readline().strip() == "got the name"
        ranks[1].kill()
        ranks[1].wait(timeout=30)
        created = set(glob.glob(f"/dev/shm/spd_ext_{ranks[0].pid}_*")) - before
        assert created, "rank 0 holds no named segment"
        time.sleep(0.5)  # rank 0 is back inside its wait for the dead peer
        ranks[0].send_signal(signal.SIGTERM)
        assert ranks[0].wait(timeout=10) == -signal.SIGTERM
        assert not any(os.path.exists(name) for name in created)
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
        for name in set(glob.glob(f"/dev/shm/spd_ext_{ranks[0].pid}_*")) - before:
            os.unlink(name)  # left by a failure of this test


def _listening_addresses(rank: int, world: int) -> list[str]:
    """The local addresses this rank listens on (its sockets in /proc/net/tcp{,6})."""
    t = torch.ones(4)
    dist.all_reduce(t)  # gloo's connections are up
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN, ours
                    found.append(f"{table[-4:]} {fields[1]}")
    return found


def test_local_jobs_listen_on_loopback_only() -> None:
    """spawn's rendezvous store and gloo's sockets listen on 127.0.0.1, not on every
    interface (a single-host job has no reason to accept connections from elsewhere)."""
    for addresses in spawn(_listening_addresses, 2):
        assert addresses, "found no listening socket to check"
        for entry in addresses:
            table, local = entry.split()
            assert table == "/tcp" and local.startswith("0100007F:"), addresses


def _late_rank_at_setup_ranks(rank: int, world: int) -> dict:
    if rank == 1:
        time.sleep(6)  # never reaches the group's set-up in time
        return {}
    start = time.monotonic()
    try:
        all_reduce(torch.ones(10), timeout=2.0)
        message = "no error"
    except CommError as exc:
        message = str(exc)
    return {"message": message, "elapsed": time.monotonic() - start}


def test_setup_honours_the_timeout_and_names_the_missing_rank() -> None:
    rank0, _ = spawn(_late_rank_at_setup_ranks, 2, timeout=60)
    assert "group rank 1 (global rank 1) did not reach" in rank0["message"], rank0["message"]
    assert "within 2 s" in rank0["message"]
    assert rank0["elapsed"] < 5


def _off_kernel_mismatch_ranks(rank: int, world: int) -> dict:
    out: dict = {}
    all_reduce(torch.ones(4))  # set-up done: what follows is per call
    cases = {
        "float32 vs float64": torch.ones(100, dtype=(torch.float32, torch.float64)[rank]),
        "int64 vs int32": torch.ones(100, dtype=(torch.int64, torch.int32)[rank]),
        "float64 sizes": torch.ones(100 + 900 * rank, dtype=torch.float64),
        "complex sizes": torch.ones(10 + rank, dtype=torch.complex64),
    }
    for name, t in cases.items():
        try:
            all_reduce(t, timeout=20)
            out[name] = "no error"
        except CommError as exc:
            out[name] = str(exc)
    t = torch.full((5,), rank + 1, dtype=torch.float64)  # the group still works
    all_reduce(t)
    out["after"] = t.tolist()
    return out


def test_mismatches_off_the_kernel_path_raise_on_every_rank() -> None:
    for r in spawn(_off_kernel_mismatch_ranks, 2, timeout=120):
        assert "rank 0 100 x float32" in r["float32 vs float64"], r["float32 vs float64"]
        assert "rank 1 100 x float64" in r["float32 vs float64"]
        assert "rank 0 100 x int64" in r["int64 vs int32"]
        assert "rank 1 100 x int32" in r["int64 vs int32"]
        assert "rank 1 1000 x" in r["float64 sizes"]
        assert "rank 0 10 x" in r["complex sizes"] and "rank 1 11 x" in r["complex sizes"]
        assert r["after"] == [3.0] * 5


def _weights_agreement_ranks(rank: int, world: int) -> dict:
    out: dict = {}
    all_reduce(torch.ones(4))
    cases = {
        "lists differ": (torch.float32, [[0.5, 0.5], [0.3, 0.7]][rank]),
        "tensors differ": (torch.float32, torch.tensor([[0.5, 0.5], [0.3, 0.7]][rank])),
        "float64 lists differ": (torch.float64, [[0.5, 0.5], [0.3, 0.7]][rank]),
        "fp16 overflow": (torch.float16, [1e5, 1 - 1e5]),
        "own weight overflow": (torch.float32, [1e39, -1e39][rank]),
        "list and tensor agree": (torch.float32, [[0.25, 0.75], torch.tensor([0.25, 0.75])][rank]),
        "own weights": (torch.float32, [0.25, 0.75][rank]),
    }
    for name, (dtype, weights) in cases.items():
        t = torch.full((100,), float(rank + 1), dtype=dtype)
        try:
            own = isinstance(weights, float)  # this rank's own weight goes in weight=
            all_reduce(t, "weighted", timeout=20,
                       **({"weight": weights} if own else {"weights": weights}))
            out[name] = t[0].item()
        except (CommError, ValueError) as exc:
            out[name] = str(exc)
    return out


def test_weight_lists_must_agree_and_fit_the_dtype() -> None:
    for r in spawn(_weights_agreement_ranks, 2, timeout=120):
        for name in ("lists differ", "tensors differ", "float64 lists differ"):
            assert "different weight lists" in r[name], (name, r[name])
        assert "is not a finite float16 value" in r["fp16 overflow"], r["fp16 overflow"]
        assert "not a finite" in r["own weight overflow"], r["own weight overflow"]
        assert r["list and tensor agree"] == pytest.approx(1.75)
        assert r["own weights"] == pytest.approx(1.75)


def _slow_but_moving_ranks(rank: int, world: int) -> dict:
    os.environ["SPD_EXT_SHM_CHUNK_BYTES"] = "4096"  # read by rank 0 at set-up
    all_reduce(torch.ones(4))
    t = torch.ones(64 << 20)  # 256 MiB in 4 KiB chunks: 65536 calls of two waits each
    start = time.monotonic()
    all_reduce(t)
    # A fast host moves 256 MiB in well under the 0.1 s timeout: grow the call until it
    # takes about 0.4 s (at most 1 GiB), the same size on both ranks.
    scale = torch.tensor([min(4, math.ceil(0.4 / (time.monotonic() - start)))])
    dist.broadcast(scale, src=0)
    t = torch.ones(int(scale) * (64 << 20))
    dist.barrier()  # both ranks allocated: the first wait is not the peer's page faults
    start = time.monotonic()
    all_reduce(t)
    took = time.monotonic() - start
    # The timeout: a quarter of what the last call took, so the call outlasts it four times
    # over. A fixed 0.1 s failed on a loaded machine, where one wait alone can take longer
    # (the peer is not scheduled); there every wait and the call stretch alike. A call far
    # faster than the one measured (the load went away) shows nothing: measured again.
    for _ in range(4):
        timeout = torch.tensor([max(0.1, took / 4)], dtype=torch.float64)
        dist.all_reduce(timeout, op=dist.ReduceOp.MAX)
        t.fill_(1)
        dist.barrier()
        start = time.monotonic()
        all_reduce(t, timeout=timeout.item())
        took = time.monotonic() - start
        shown = torch.tensor([float(took > timeout.item())])
        dist.all_reduce(shown, op=dist.ReduceOp.MIN)
        if shown.item():
            break
    return {"elapsed": took, "timeout": timeout.item(), "value": t[-1].item(),
            "path": describe()}


@needs_kernels
def test_timeout_bounds_each_wait_not_the_whole_call() -> None:
    for r in spawn(_slow_but_moving_ranks, 2, timeout=120):
        assert "chunk 4096 B" in r["path"]
        assert r["value"] == 2.0
        # The call lasted longer than its timeout, yet no wait did: no error.
        assert r["elapsed"] > r["timeout"], \
            f"call too fast ({r['elapsed']:.2f} s, timeout {r['timeout']:.2f} s) to show anything"


def _mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("/dev/shm/spd_ext_" in line for line in f)  # not a JIT-built spd_ext_*.so


def _reinit_ranks(rank: int, world: int) -> dict:
    from torch.distributed import distributed_c10d as c10d

    counts = []
    store = c10d._get_default_store()
    for _ in range(5):
        group = dist.new_group([0, 1])
        all_reduce(torch.ones(10), group=group)
        dist.destroy_process_group(group)
        all_reduce(torch.ones(10))
        store = c10d._get_default_store()
        dist.destroy_process_group()
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        counts.append(_mappings())
    t = torch.full((4,), float(rank + 1))
    all_reduce(t)
    return {"counts": counts, "value": t[0].item()}


@needs_kernels
def test_destroyed_groups_release_their_segments() -> None:
    for r in spawn(_reinit_ranks, 2, timeout=120):
        assert r["value"] == 3.0
        # at most the segments of live groups: one per cycle would grow to 10
        assert max(r["counts"]) <= 2, r["counts"]


def _threads() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return sorted(names)


def _destroyed_group_threads_ranks(rank: int, world: int) -> dict:
    import gc

    before = _threads()
    group = dist.new_group([0, 1])
    all_reduce(torch.ones(10), group=group)
    all_reduce(torch.ones(10), group=group, async_op=True).wait()
    with_group = _threads()
    dist.destroy_process_group(group)
    del group
    gc.collect()
    # the last reference may go on the progress thread just after the call's future is
    # set, and a joined thread's task entry may linger a moment: wait a little for them
    deadline = time.monotonic() + 10
    while len(after := _threads()) != len(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"before": before, "with_group": with_group, "after": after}


def test_destroying_a_group_stops_its_threads() -> None:
    """spd_ext holds groups weakly: once torch.distributed destroys a group, the group goes
    with its gloo worker threads and spd_ext's progress thread. Kept alive until exit,
    gloo's threads raced Python's finalization and aborted ranks after their work."""
    for r in spawn(_destroyed_group_threads_ranks, 2, timeout=120):
        # thread names change as threads name themselves: count them
        assert len(r["with_group"]) > len(r["before"]), r
        assert len(r["after"]) == len(r["before"]), r


_OPTIMIZER_AFTER_INIT = """
import gc, os, socket, weakref
import spd_ext  # before init_process_group, as a training script imports it
import torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # imports torch._dynamo
from spd_ext.utils.process_exit import _gloo_workers
print("gloo workers while open:", _gloo_workers())
world = weakref.ref(dist.group.WORLD)
dist.destroy_process_group()
gc.collect()
print("default group alive after destroy:", world() is not None)
print("gloo workers after destroy:", _gloo_workers())
"""


def test_an_optimizer_built_after_init_does_not_keep_the_group() -> None:
    """torch.distributed.nn.functional captures the default group in its default arguments
    when first imported after init_process_group; spd_ext imports it first, so a destroyed
    group (and its gloo threads) goes before interpreter exit."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _OPTIMIZER_AFTER_INIT], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "default group alive after destroy: False" in proc.stdout, proc.stdout
    # what the exit handler waits for is seen (a rename in torch would make it wait for none)
    assert "gloo workers while open: 0" not in proc.stdout, proc.stdout
    assert "gloo workers after destroy: 0" in proc.stdout, proc.stdout


def _two_threads_ranks(rank: int, world: int) -> dict:
    import threading

    all_reduce(torch.ones(4))
    big = torch.ones(32 << 20)
    start = time.monotonic()
    all_reduce(big)
    # long enough (about 0.3 s, at most 1 GiB) for the second thread to arrive meanwhile
    scale = torch.tensor([min(8, math.ceil(0.3 / (time.monotonic() - start)))])
    dist.broadcast(scale, src=0)
    big = torch.ones(int(scale) * (32 << 20))
    dist.barrier()
    started = threading.Event()
    errors: list[str] = []

    def long_call() -> None:
        started.set()
        all_reduce(big)

    thread = threading.Thread(target=long_call)
    thread.start()
    started.wait()
    time.sleep(0.02)
    try:
        all_reduce(torch.ones(10))
        errors.append("no error")
    except CommError as exc:
        errors.append(str(exc))
    thread.join()
    t = torch.full((3,), float(rank + 1))
    all_reduce(t)  # the group still works
    return {"error": errors[0], "big": big[-1].item(), "after": t[0].item()}


def test_two_threads_on_one_group_are_refused() -> None:
    for r in spawn(_two_threads_ranks, 2, timeout=120):
        assert "two threads called all_reduce on the same process group" in r["error"], r
        assert r["big"] == 2.0 and r["after"] == 3.0
