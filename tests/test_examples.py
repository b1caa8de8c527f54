"""The example scripts run under the launchers users have (torchrun, deepspeed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spd_ext.comm.launch import free_port

from conftest import FORCED_FALLBACK

ROOT = Path(__file__).resolve().parents[1]
PATH = "via torch.distributed" if FORCED_FALLBACK else "via shared memory"


def _run(cmd: list[str], timeout: float = 240) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_allreduce_example_under_torchrun() -> None:
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "examples/allreduce.py", "--numel", "5000",
                "--dtype", "bfloat16"])
    assert "over 2 ranks" in out and "(all correct)" in out and PATH in out


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed not installed")
def test_allreduce_example_under_deepspeed_launcher() -> None:
    # the `deepspeed` launcher as this interpreter runs it: the venv's bin/ need not be on PATH
    out = _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(free_port()), "examples/allreduce.py", "--numel", "5000"])
    assert "over 2 ranks" in out and "(all correct)" in out and PATH in out
