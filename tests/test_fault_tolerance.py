"""Fault-tolerant DiLoCo islands (spd_ext.deepspeed.fault_tolerance, torchft): islands as
separate `deepspeed` jobs (tests/ft_island.py, 2 CPU ranks each) around a torchft
lighthouse served by this process; islands killed with SIGKILL mid-step and mid-outer-step,
restarted, and the config's refusals."""

from __future__ import annotations

import importlib.util
import json
import math
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
    # islands weighed by their losses (softmax, temperature 0.05): renormalized over those
    # present, and the same on every rank of an island
    weighing = ("--island-weights", "loss", "--temperature", str(TEMPERATURE))
    survivor = island("0", lighthouse, tmp_path, "--steps", "10", "--wait-at", "6",
                      "--wait-for", str(ready), *weighing)
    dying = island("1", lighthouse, tmp_path, "--steps", "10", "--die-at", "3", *weighing)
    assert finish(dying, tmp_path, "1") != 0
    restarted = island("1", lighthouse, tmp_path, "--steps", "10", "--ready", str(ready),
                       *weighing)
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
    check_island_weights(ranks0, ranks1)


TEMPERATURE = 0.05


def check_island_weights(ranks0: list[dict], ranks1: list[dict]) -> None:
    """Each outer step's weights: exp(-L/T) of each island's mean loss, normalized over the
    islands in it (1 for an island alone), equal on the ranks of an island."""
    for ranks in (ranks0, ranks1):
        assert ranks[0]["weights"] == ranks[1]["weights"]
    of0 = {step: (loss, w) for step, loss, w in ranks0[0]["weights"]}
    of1 = {step: (loss, w) for step, loss, w in ranks1[0]["weights"]}
    # island 1's first run died before writing: the steps after its restart
    both = [step for step in of1 if step in of0 and of1[step][0] is not None]
    assert both, (of0, of1)
    for step in both:
        (l0, w0), (l1, w1) = of0[step], of1[step]
        assert w0 + w1 == pytest.approx(1.0, abs=1e-6), (step, w0, w1)
        assert w0 / w1 == pytest.approx(math.exp(-(l0 - l1) / TEMPERATURE), rel=1e-4)
        assert l0 != l1  # different data: the weights really differ
    assert 0.0 < of0[1][1] < 0.99  # both islands in the first outer step
    assert of0[3][1] == pytest.approx(1.0)  # island 1 dead: island 0 alone takes it whole


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
    (section(island_weights="signal"), r"island_weights is 'signal'.*uniform, loss"),
    (section(island_weights="loss", temperature=0), "temperature"),
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


# -- spd-ext train: the islands of one host ----------------------------------------------
def ft_config(out_dir: Path, **fault_tolerance) -> dict:
    from test_train_cli import tiny

    return tiny(out_dir, parallel={"islands": 2},
                training={"steps": 1200, "log_interval": 100, "eval_interval": 600,
                          "checkpoint_interval": 600},
                deepspeed={"zero_optimization": {"stage": 1},
                           "spd_ext": {"staleness": {"mode": "diloco:4"}}},
                fault_tolerance={"enabled": True, **fault_tolerance})


@whole_jobs
def test_spd_ext_train_restarts_a_killed_island_which_heals(tmp_path) -> None:
    """`spd-ext train` with fault_tolerance: 2 island jobs around the lighthouse it serves;
    island 1 is killed (SIGKILL) at step 100, island 0 trains on, island 1 restarts, heals
    from island 0 (its log says where it joined) and both end with the same model."""
    from test_train_cli import spd_ext_train, succeeded, write

    out = tmp_path / "out"
    config = write(tmp_path / "ft.json", ft_config(out, kill_at_step=100, kill_island=1))
    stdout = succeeded(spd_ext_train([str(config), "--nproc", "2"], tmp_path, timeout=300))
    assert "island 1 died" in stdout and "island 1 restarted (1/3" in stdout, stdout
    summary = json.loads((out / "islands.json").read_text())
    assert summary["finished"] == [0, 1] and summary["restarts"] == {"0": 0, "1": 1}, summary
    assert summary["val_loss"]["0"] == summary["val_loss"]["1"], summary
    events = [json.loads(line) for line in (out / "island1" / "log.jsonl").read_text(
        ).splitlines()]
    joined = [e for e in events if e.get("event") == "joined"]
    assert len(joined) == 1 and joined[0]["healed"] and joined[0]["step"] > 100, joined
    survivor = [e for e in (json.loads(line) for line in (out / "island0" / "log.jsonl")
                            .read_text().splitlines()) if "loss" in e]
    assert [e["step"] for e in survivor] == [1, *range(100, 1201, 100)] and \
        1 in {e["islands"] for e in survivor}, survivor  # alone while island 1 restarted
    import torch

    models = [torch.load(out / f"island{k}" / "model.pt", weights_only=True) for k in (0, 1)]
    state = [m["model"] if "model" in m else m for m in models]
    for key, value in state[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[1][key]), key


def test_train_config_refusals(tmp_path) -> None:
    from test_train_cli import write

    from spd_ext.train.config import ConfigError, load_config, plan_run

    def refused(match: str, world: int = 2, **ft) -> None:
        cfg = ft_config(tmp_path / "o")
        cfg["fault_tolerance"].update(ft)
        with pytest.raises(ConfigError, match=match):
            plan_run(load_config(str(write(tmp_path / "c.json", cfg)), []), world)

    refused("fault_tolerance.kill_at_step is set but fault_tolerance.enabled is false",
            enabled=False, kill_at_step=3)
    refused("min_islands 3 is more than the 2 parallel.islands", min_islands=3)
    refused("kill_island 2 is not one of the 2 parallel.islands", kill_island=2)
    refused("fault_tolerance.lighthouse 'nohost' is not host:port", lighthouse="nohost")
    refused("fault_tolerance.island 2 is not one of the 2 parallel.islands", island=2)
    refused("parallel.islands 2 does not divide the world size 3", world=3)


def test_an_island_job_refuses_an_unreachable_lighthouse_before_its_ranks(tmp_path) -> None:
    """An island started by hand (fault_tolerance.island set) with no lighthouse at the
    address: one line naming it, exit 2, no rank started."""
    from test_train_cli import spd_ext_train, write

    port = free_port()
    config = write(tmp_path / "ft.json", ft_config(tmp_path / "o", island=1,
                                                   lighthouse=f"localhost:{port}"))
    proc = spd_ext_train([str(config), "--nproc", "1"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"fault_tolerance.lighthouse http://localhost:{port}: no torchft lighthouse " \
        "answers there" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -- spd-ext experiment faults (its pieces; the whole experiment runs from the CLI) --------
def test_faults_experiment_checks_its_flags_and_tabulates(tmp_path) -> None:
    from spd_ext.errors import UsageError
    from spd_ext.experiments.faults import FaultsConfig, table

    with pytest.raises(UsageError, match="unknown arm 'all'"):
        FaultsConfig(arms=("all",)).check()
    with pytest.raises(UsageError, match="--steps 105 must be a multiple of --H 10"):
        FaultsConfig(steps=105).check()
    with pytest.raises(UsageError, match="at least 2"):
        FaultsConfig(islands=1).check()
    rows = [{"arm": "none", "failures": 0, "wall_s": 100.0, "steps_per_s": 3.0,
             "tokens_per_s": 1000.0, "final_val_loss": 2.0, "longest_pause_s": 1.0,
             "median_step_s": 0.1},
            {"arm": "islands", "failures": 2, "wall_s": 110.0, "steps_per_s": 2.7,
             "tokens_per_s": 850.0, "final_val_loss": 2.03, "longest_pause_s": 9.5,
             "median_step_s": 0.1}]
    text = table(rows)
    assert "85%" in text and "+0.030" in text and "9.5" in text, text


def test_kill_tree_reaches_processes_in_other_sessions() -> None:
    """The restart-everything arm kills `spd-ext train` and its launcher, which runs in a
    session of its own (was: only the first process group died and the orphaned job
    trained on beside the resumed one)."""
    import time as _time

    from spd_ext.experiments.faults import kill_tree

    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(60)'], start_new_session=True); print('up', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert parent.stdout.readline().strip() == "up"
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and _parent_of(p) == parent.pid]
    assert len(children) == 1
    kill_tree(parent.pid)
    parent.wait(timeout=10)
    deadline = _time.time() + 10
    while Path(f"/proc/{children[0]}").exists() and _time.time() < deadline:
        state = (Path(f"/proc/{children[0]}") / "stat").read_text().rpartition(")")[2].split()
        if state and state[0] == "Z":
            break
        _time.sleep(0.05)
    state = Path(f"/proc/{children[0]}/stat")
    assert not state.exists() or state.read_text().rpartition(")")[2].split()[0] == "Z"


def _parent_of(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return -1
