"""Elastic parameter-server jobs (PSConfig(elastic=True), spd_ext's PSSessions on torchft
sessions): a worker SIGKILLed mid-run is dropped and named while the others train on, a
new process joins the running job, and the job stops early only below min_workers.

The job's processes are started here one by one (not with spd_ext.launch.spawn, which
ends a job when a rank dies): the ranks of one world (servers 0..S-1, then two workers,
the second killed at its step 5), and a joiner outside it that knows only the servers'
addresses."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from spd_ext.launch import free_port

from conftest import FORCED_FALLBACK

HAVE = importlib.util.find_spec("torchft") is not None
pytestmark = pytest.mark.skipif(not HAVE, reason="needs torchft (pip install 'spd_ext[ft]')")
# the jobs exercise no kernel: the forced-fallback pass leaves them to the first pass
whole_jobs = pytest.mark.skipif(FORCED_FALLBACK, reason="elastic jobs run in the kernel pass")
STEPS = 40
WAIT = 60.0  # seconds any one wait of the job may take before the test fails


def _config(mode: str, min_workers: int, servers: int):
    from spd_ext.staleness import PSConfig, parse_mode

    return PSConfig(parse_mode(mode), lr=0.5, elastic=True, min_workers=min_workers,
                    dead_timeout=30.0, straggler_timeout=30.0, servers=servers)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def _write(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)


def _job_rank(rank: int, port: int, out: str, mode: str, min_workers: int,
              servers: int) -> None:
    """Rank ``rank`` of the job: a server, the first worker, or the second (killed at its
    step 5). Writes what it saw to out/rank<r>.json."""
    import torch.distributed as dist

    from spd_ext.staleness import (
        ParameterServer,
        PSSessions,
        ServerStopped,
        WorkerKill,
        train_worker,
    )
    from spd_ext.train.tasks import XORTask

    torch.set_num_threads(1)
    out_dir = Path(out)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=servers + 2)
    cfg = _config(mode, min_workers, servers)
    task = XORTask(n=3000, batch_size=32, seed=0)
    model = task.model()
    sessions = PSSessions.create(cfg)
    result: dict = {"pid": os.getpid()}
    try:
        if rank < servers:
            if rank == 0:
                _write(out_dir / "address.json", {"addresses": sessions.addresses})
            server = ParameterServer(model, cfg, sessions)
            probe = task.model()
            start_loss = _loss(task, probe, torch.cat([q.detach().flatten()
                                                      for q in model.parameters()]))
            theta = server.serve()
            result.update(events=server.log.events, joined=server.log.joined,
                          dropped=server.log.dropped, updates=server.log.updates,
                          start_loss=start_loss, final_loss=_loss(task, probe, theta))
        else:
            def on_step(step: int, loss: float) -> None:
                if rank == servers and step == 10 and min_workers == 1:
                    _wait_for(out_dir / "joined.json")  # so the job outlives the join
                time.sleep(0.02)

            metrics = train_worker(model, cfg, sessions, task.sampler(rank - servers, 2),
                                   STEPS, on_step=on_step,
                                   kill=WorkerKill(servers + 1, at_step=5))
            result.update(steps=metrics.steps)
    except ServerStopped as exc:
        result["stopped"] = str(exc)
    _write(out_dir / f"rank{rank}.json", result)


def _joiner(out: str, mode: str, servers: int) -> None:
    """A new worker outside the job's world: it knows only the server's address."""
    from spd_ext.staleness import PSSessions, train_worker
    from spd_ext.train.tasks import XORTask

    torch.set_num_threads(1)
    out_dir = Path(out)
    _wait_for(out_dir / "address.json")
    addresses = json.loads((out_dir / "address.json").read_text())["addresses"]
    cfg = _config(mode, 1, servers)
    task = XORTask(n=3000, batch_size=32, seed=0)
    model = task.model()
    sessions = PSSessions.join(addresses, cfg)
    _write(out_dir / "joined.json", {"id": sessions.worker_id, "start": sessions.start_step})
    metrics = train_worker(model, cfg, sessions, task.sampler(1, 2), STEPS)  # rank 2's shard
    _write(out_dir / "joiner.json", {"pid": os.getpid(), "id": sessions.worker_id,
                                     "start": sessions.start_step, "steps": metrics.steps})


@torch.no_grad()
def _loss(task, model: torch.nn.Module, theta: torch.Tensor) -> float:
    from spd_ext.comm.buckets import copy_back

    copy_back(theta, list(model.parameters()))
    return model(*task.sampler(0, 1)("val", -1))[1].item()


def _run(tmp_path: Path, mode: str, min_workers: int, join: bool, servers: int = 1) -> dict:
    ctx = mp.get_context("spawn")
    port = free_port()
    job = [ctx.Process(target=_job_rank,
                       args=(r, port, str(tmp_path), mode, min_workers, servers))
           for r in range(servers + 2)]
    for p in job:
        p.start()
    procs, killed = list(job), job[-1]
    try:
        killed.join(WAIT)
        assert killed.exitcode == -signal.SIGKILL, "the last worker was to be killed at step 5"
        if join:
            joiner = ctx.Process(target=_joiner, args=(str(tmp_path), mode, servers))
            joiner.start()
            procs.append(joiner)
        for p in procs:
            p.join(WAIT)
            assert p is killed or p.exitcode == 0, f"{p.name} exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    read = {f.stem: json.loads(f.read_text()) for f in tmp_path.glob("*.json")}
    return read


@whole_jobs
@pytest.mark.parametrize("mode, servers", [("asgd", 1), ("ssp:1", 1), ("syncps", 2)])
def test_a_killed_worker_is_dropped_and_a_new_one_joins(tmp_path: Path, mode: str,
                                                       servers: int) -> None:
    got = _run(tmp_path, mode, min_workers=1, join=True, servers=servers)
    first, dead, new = servers, servers + 1, servers + 2  # the workers' ids
    survivor, joiner = got[f"rank{first}"], got["joiner"]
    for s in range(servers):
        server = got[f"rank{s}"]
        assert "stopped" not in server and "stopped" not in survivor, (server, survivor)
        assert server["dropped"] == [dead] and server["joined"] == [new]
        # the log names both: the dead worker with its pid, the new one with its pid
        dropped = [e for e in server["events"] if e.startswith(f"worker {dead} (pid")]
        joined = [e for e in server["events"]
                  if e.startswith(f"worker {new} (pid {joiner['pid']})")]
        assert dropped and "dropped: its session failed" in dropped[0]  # at once, not by silence
        assert joined and "joined at step" in joined[0]
        # every server returns the whole (gathered) weights, trained
        assert server["final_loss"] < 0.8 * server["start_loss"]
        assert server["final_loss"] == got["rank0"]["final_loss"]
    assert f"rank{dead}" not in got  # killed: it wrote nothing
    assert survivor["steps"] == STEPS  # the SSP bound / SyncPS barrier stopped waiting for it
    # the joiner started where the others were, with the current weights, and finished
    assert joiner["id"] == new and joiner["start"] >= 5
    assert joiner["steps"] == STEPS - joiner["start"]


@whole_jobs
def test_the_job_stops_below_min_workers_naming_the_dead_worker(tmp_path: Path) -> None:
    got = _run(tmp_path, "asgd", min_workers=2, join=False)
    server, survivor = got["rank0"], got["rank1"]
    assert "worker 2 (pid" in server["stopped"] and "min_workers=2" in server["stopped"]
    assert "fewer workers than the job's min_workers remain" in survivor["stopped"]


def test_elastic_configuration_errors() -> None:
    from spd_ext.staleness import PSConfig, PSSessions, WorkerKill, parse_mode

    with pytest.raises(ValueError, match="one of at_step and after_s"):
        WorkerKill(1)
    with pytest.raises(ValueError, match="must be >= 0"):
        WorkerKill(1, after_s=-1.0)
    assert WorkerKill(2, after_s=3.0).due(2, 0, 3.5) and not WorkerKill(2, at_step=4).due(1, 9, 0)

    with pytest.raises(ValueError, match="min_workers must be >= 1"):
        PSConfig(parse_mode("asgd"), elastic=True, min_workers=0)
    with pytest.raises(ValueError, match="min_workers=3 but the job starts 2 worker"):
        PSConfig(parse_mode("asgd"), elastic=True, min_workers=3).check_world(3)
    with pytest.raises(ValueError, match="needs PSConfig\\(elastic=True\\)"):
        PSSessions.join(["http://localhost:1/new_session"], PSConfig(parse_mode("asgd")))
    with pytest.raises(ValueError, match="2 server\\(s\\).*1 address"):
        PSSessions.join(["http://localhost:1/new_session"],
                        PSConfig(parse_mode("asgd"), elastic=True, servers=2))
    with pytest.raises(ValueError, match="no parameter server answers at http://localhost:"):
        PSSessions.join([f"http://localhost:{free_port()}/new_session"],
                        PSConfig(parse_mode("asgd"), elastic=True))
