"""The example scripts run under the launchers users have (torchrun, deepspeed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spd_ext.launch import free_port

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


# -- the four user-facing examples: each under its real launcher, tiny sizes ------------------
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_data = pytest.mark.skipif(not os.environ.get("SPD_EXT_DATA_DIR"),
                                reason="needs tinyshakespeare.txt / gpt2.tiktoken from "
                                "SPD_EXT_DATA_DIR (no download in tests)")
TINY = ["--steps", "5", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4",
        "--block-size", "32"]


def _deepspeed(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(free_port()), script, *args]


def _final_line(out: str) -> str:
    return [line for line in out.splitlines() if line.startswith("done: ")][-1]


@needs_data
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
def test_nanogpt_deepspeed_example() -> None:
    out = _run(_deepspeed("examples/nanogpt_deepspeed.py", *TINY, "--eval-interval", "0"),
               timeout=120)
    assert re.fullmatch(r"done: 5 steps, train loss \d+\.\d+, val loss \d+\.\d+, "
                        r"weights \[0\.\d+, 0\.\d+\]", _final_line(out)), out
    assert "2 data-parallel ranks, ZeRO-1" in out


@needs_data
def test_tp_blocks_example_under_torchrun() -> None:
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "examples/tp_blocks_torchrun.py", *TINY],
               timeout=90)
    # parallel + spd: one forward all-reduce per step where two Megatron blocks need four
    assert re.fullmatch(r"done: 5 steps on 2 tensor-parallel ranks, loss \d+\.\d+, 1 forward "
                        r"syncs per step \(Megatron blocks: 4\), replicated weights agree: True",
                        _final_line(out)), out
    assert "syncs: forward 1, backward 1, LayerNorm grads 1" in out


@needs_data
@pytest.mark.skipif(not HAS_TRANSFORMERS or importlib.util.find_spec("tiktoken") is None,
                    reason="transformers / tiktoken not installed")
def test_hf_gpt2_sensitivity_example(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)) \
        .save_pretrained(tmp_path / "tiny-gpt2")
    out = _run([sys.executable, "examples/hf_gpt2_sensitivity.py", "--model",
                str(tmp_path / "tiny-gpt2"), "--eval-batches", "2", "--batch-size", "2",
                "--block-size", "64"], timeout=90)
    assert re.fullmatch(r"done: 3 patterns vs dense on 2 validation batches; smallest loss "
                        r"increase \S+ \([+-]\d+\.\d+, [23] syncs vs 4\)", _final_line(out)), out
    delta = float(re.search(r"vs Hugging Face: \|delta loss\| = (\S+)", out).group(1))
    assert delta < 1e-4, out  # tp*L is GPT-2
    for pattern in ("tp*2 (dense)", "[tp,spd]*1", "spd*2", "[spd,parallel]*1",
                    "block made spd"):
        assert pattern in out, out


@needs_data
@pytest.mark.skipif(not (HAS_DEEPSPEED and HAS_TRANSFORMERS),
                    reason="deepspeed / transformers not installed")
def test_hf_trainer_callback_example(tmp_path: Path) -> None:
    out = _run(_deepspeed("examples/hf_trainer_callback.py", *TINY, "--output-dir",
                          str(tmp_path / "trainer")), timeout=120)
    assert re.fullmatch(r"done: 5 steps, train loss \d+\.\d+, weights \[0\.\d+, 0\.\d+\]",
                        _final_line(out)), out
    assert re.search(r"step +5  loss \d+\.\d+  weights \[0\.\d+, 0\.\d+\]", out), out
