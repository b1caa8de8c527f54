"""Fault-tolerant DiLoCo islands (spd_ext.deepspeed.fault_tolerance, torchft): islands as
separate `deepspeed` jobs (tests/ft_island.py, 2 CPU ranks each) around a torchft
lighthouse served by this process; islands killed with SIGKILL mid-step and mid-outer-step,
restarted, and the config's refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spd_ext.launch import free_port

from conftest import FORCED_FALLBACK

ROOT = Path(__file__).resolve().parents[1]
HAVE = all(importlib.util.find_spec(m) is not None for m in ("deepspeed", "torchft"))
pytestmark = pytest.mark.skipif(not HAVE, reason="needs deepspeed and torchft "
                                "(pip install 'spd_ext[deepspeed,ft]')")
# the island jobs exercise no kernel: the forced-fallback pass leaves them to the first pass
whole_jobs = pytest.mark.skipif(FORCED_FALLBACK, reason="island jobs run in the kernel pass")
LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]
JOB_TIMEOUT = 240


@pytest.fixture
def lighthouse():
    os.environ.setdefault("RUST_LOG", "warn")  # read as torchft loads
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=60_000,
                              heartbeat_timeout_ms=3000)
    port = server.address().rpartition(":")[2]
    yield f"localhost:{port}"
    server.shutdown()


def island(name: str, lighthouse: str, out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    log = open(out / f"island{name}.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()),
         str(ROOT / "tests" / "ft_island.py"), "--island", name, "--lighthouse", lighthouse,
         "--out", str(out), *args], cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, out: Path, name: str) -> int:
    try:
        return proc.wait(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"island {name} outlived {JOB_TIMEOUT} s:\n"
                    f"{(out / f'island{name}.log').read_text()[-5000:]}")


def results(out: Path, name: str) -> list[dict]:
    files = [out / f"{name}.rank{r}.json" for r in range(2)]
    missing = [f for f in files if not f.is_file()]
    assert not missing, (out / f"island{name}.log").read_text()[-5000:]
    return [json.loads(f.read_text()) for f in files]


@whole_jobs
def test_a_killed_island_drops_out_and_heals_from_a_live_one_on_restart(tmp_path,
                                                                         lighthouse) -> None:
    """Island 1 dies (SIGKILL) inside step 3; island 0 goes on alone with no restart; island
    1 restarted joins, heals (step, anchor, momentum, optimizer partition) from island 0 and,
    after its first outer step, holds exactly island 0's parameters, rank by rank."""
    ready = tmp_path / "restarted.ready"
    survivor = island("0", lighthouse, tmp_path, "--steps", "10", "--wait-at", "6",
                      "--wait-for", str(ready))
    dying = island("1", lighthouse, tmp_path, "--steps", "10", "--die-at", "3")
    assert finish(dying, tmp_path, "1") != 0
    restarted = island("1", lighthouse, tmp_path, "--steps", "10", "--ready", str(ready))
    assert finish(restarted, tmp_path, "1") == 0, (tmp_path / "island1.log").read_text()[-5000:]
    assert finish(survivor, tmp_path, "0") == 0, (tmp_path / "island0.log").read_text()[-5000:]
    ranks0, ranks1 = results(tmp_path, "0"), results(tmp_path, "1")
    for a, b in zip(ranks0, ranks1):
        assert a["start"] == 0 and a["trained"] == list(range(10)), a
        # both at the first outer step, alone after the kill, both again after the heal
        assert a["present"][0] == [1, 2] and [3, 1] in a["present"], a["present"]
        assert a["present"][-1] == [9, 2], a["present"]
        assert b["healed_at"] == b["start"] > 3 and b["trained"][0] == b["start"], b
        assert a["params"] == b["params"]  # bit for bit: the same outer step, same state


@whole_jobs
def test_a_kill_inside_the_outer_step_is_voted_down_and_retried(tmp_path,
                                                                lighthouse) -> None:
    """Island 1 dies inside the outer step after step 3, in the quorum but before the
    all-reduce: island 0's all-reduce fails, its outer step is voted down (never applied
    from a partial sum) and retried with the islands alive (island 0 alone)."""
    survivor = island("0", lighthouse, tmp_path, "--steps", "6")
    dying = island("1", lighthouse, tmp_path, "--steps", "6", "--die-in-outer-step", "3")
    assert finish(dying, tmp_path, "1") != 0
    assert finish(survivor, tmp_path, "0") == 0, (tmp_path / "island0.log").read_text()[-5000:]
    log = (tmp_path / "island0.log").read_text()
    assert "island 0: the outer step at step 4 was voted down" in log, log[-4000:]
    for rank in results(tmp_path, "0"):
        assert rank["voted_down"] == 1 and rank["present"] == [[1, 2], [3, 1], [5, 1]], rank


# -- the config (no job) -----------------------------------------------------------------
def section(**ft) -> dict:
    return {"train_batch_size": 4, "zero_optimization": {"stage": 1},
            "spd_ext": {"staleness": {"mode": "diloco:4"},
                        "fault_tolerance": {"lighthouse": "localhost:29510", **ft}}}


@pytest.mark.parametrize("change, match", [
    ({"spd_ext": {"staleness": {"mode": "ssgd"}, "fault_tolerance": {}}},
     "fault_tolerance with staleness.mode ssgd: .* set staleness.mode to diloco:H"),
    ({"spd_ext": {"staleness": {"mode": "diloco:4", "islands": 2}, "fault_tolerance": {}}},
     "each job is one island"),
    ({"zero_optimization": {"stage": 0}}, "fault_tolerance needs zero_optimization.stage 1"),
    ({"zero_optimization": {"stage": 3}}, "fault_tolerance with zero_optimization.stage 3"),
])
def test_refused_sections(change: dict, match: str) -> None:
    from spd_ext.deepspeed import SpdExtConfigError, parse_config

    with pytest.raises(SpdExtConfigError, match=match):
        parse_config({**section(), **change}, world_size=2)


@pytest.mark.parametrize("address", ["localhost", "localhost:x", "host:99999", 7])
def test_a_malformed_lighthouse_address_is_refused(address) -> None:
    from spd_ext.deepspeed import SpdExtConfigError, parse_config

    with pytest.raises(SpdExtConfigError, match="fault_tolerance.lighthouse"):
        parse_config(section(lighthouse=address), world_size=2)


def test_an_unreachable_lighthouse_is_named(monkeypatch) -> None:
    from spd_ext.deepspeed import SpdExtConfigError
    from spd_ext.deepspeed.fault_tolerance import check_lighthouse

    port = free_port()  # nothing listens there
    with pytest.raises(SpdExtConfigError, match=rf"lighthouse http://localhost:{port}: no "
                       "torchft lighthouse answers there .* start one"):
        check_lighthouse(f"http://localhost:{port}", timeout_s=2)
    _, cfg = __import__("spd_ext.deepspeed", fromlist=["x"]).parse_config(
        section(lighthouse=None), world_size=2)
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    with pytest.raises(SpdExtConfigError, match="lighthouse is not set"):
        cfg.fault_tolerance.resolved_lighthouse("spd_ext.fault_tolerance")
