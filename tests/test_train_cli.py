"""`spd-ext train`: configs, overrides and errors in process; whole runs as subprocesses (one
rank without a launcher, 2 and 4 CPU ranks under the deepspeed launcher, 2 under torchrun),
each with a hard timeout: tensor parallel 2, data parallel 2 with signal weighting and exact
resumes (after a save cut short, and half the steps then --resume), DiLoCo islands."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spd_ext import cli
from spd_ext.train.config import ConfigError, load_config, plan_run

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "configs" / "ds").glob("*.json"))
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed not installed")
ZERO1 = {"zero_optimization": {"stage": 1, "overlap_comm": False}}
WEIGHTING = {"signal": "loss_ema", "map": "softmax", "temperature": 0.05, "floor": 0.05,
             "warmup_steps": 1}


def tiny(out_dir: Path, **sections: dict) -> dict:
    """A model and run small enough that a step takes milliseconds."""
    cfg = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "pattern": "tp*2"},
        "data": {"corpus": "tinyshakespeare", "tokenizer": "char"},
        "training": {"steps": 6, "micro_batch": 4, "lr": 3e-3, "min_lr": 3e-4,
                     "warmup_steps": 2, "eval_interval": 3, "eval_batches": 2,
                     "log_interval": 1, "out_dir": str(out_dir)},
        "deepspeed": dict(ZERO1),
        "sample": {"tokens": 16},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return cfg


def write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}


def spd_ext_train(args: list[str], cwd: Path, timeout: float = 240,
                  module: str = "spd_ext.cli") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *(["train"] if module == "spd_ext.cli" else []), *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(args)} outlived {timeout} s:\n{exc.stdout}\n{exc.stderr}")


def succeeded(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-5000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc.stdout


def metrics(out_dir: Path) -> list[dict]:
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def train_losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(out_dir) if "loss" in r]


def resumed_from_step_3(run: Path, config: Path, tmp_path: Path) -> Path:
    """A copy of a finished 6-step 2-rank run whose step-6 save was cut short (no
    completion marker, ``latest`` naming it), resumed: it continues from step 3."""
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    (cut / "checkpoints" / "global_step6" / "train" / "complete.json").unlink()
    stdout = succeeded(spd_ext_train([str(config), "--nproc", "2", "--resume", "--set",
                                      f"training.out_dir={cut}"], tmp_path))
    assert "steps 3->6" in stdout
    return cut


# -- configs ----------------------------------------------------------------------------
def test_help_lists_the_flags_and_every_config_key(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in ("--nproc", "--set KEY=VALUE", "--resume", "--dry-run", "training.micro_batch",
                 "parallel.tp", "data.corruption.kind", "model.hf_path", "sample.top_k",
                 "wandb.project", "deepspeed ="):
        assert text in out, text


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_train_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    tp = cfg.values["parallel"]["tp"] or 1
    pp = cfg.values["parallel"]["pp"]
    islands = cfg.values["parallel"]["islands"] or 1
    for world in (tp * pp * islands, 2 * tp * pp * islands):
        plan = plan_run(cfg, world)
        assert plan.tp == tp and plan.pp == pp and "spd_ext" in plan.ds_config
        assert plan.ds_config["train_micro_batch_size_per_gpu"] == cfg.training.micro_batch
    assert isinstance(cfg.values["deepspeed"], dict)  # the path resolved next to the file


def test_gpt2_train_configs_cover_every_tensor_parallel_pattern() -> None:
    tp_patterns = {json.loads(p.read_text())["model"]["pattern"]
                   for p in (ROOT / "configs" / "tp").glob("*.json")}
    gpt2 = [load_config(p) for p in TRAIN_CONFIGS if p.stem.startswith("gpt2-124m")]
    assert {c.model.pattern for c in gpt2} == tp_patterns and len(gpt2) == len(tp_patterns)
    for c in gpt2:
        assert c.data.tokenizer == "gpt2" and c.training.steps == 20_000
        assert c.training.lr == 6e-4 and c.training.schedule == "cosine"
        assert c.values["deepspeed"]["bf16"]["enabled"] and c.parallel.tp in (2, 4)
    char = load_config(ROOT / "configs" / "train" / "shakespeare_char.yaml")
    assert (char.model.n_layer, char.model.n_head, char.model.n_embd, char.model.block_size,
            char.model.dropout, char.training.lr, char.training.steps, char.training.micro_batch,
            char.training.min_lr, char.training.warmup_steps, char.training.beta2) == \
        (6, 6, 384, 256, 0.2, 1e-3, 5000, 64, 1e-4, 100, 0.99)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
def test_ds_configs_carry_a_valid_spd_ext_section(path: Path) -> None:
    from spd_ext.deepspeed import parse_config

    raw = json.loads(path.read_text())
    assert "spd_ext" in raw
    stage, bf16 = path.stem.split("_")
    assert raw["zero_optimization"]["stage"] == int(stage[-1])
    assert bool(raw.get("bf16", {}).get("enabled")) == (bf16 == "bf16")
    parse_config({**raw, "train_batch_size": 2}, world_size=2)


def test_set_overrides_every_kind(tmp_path) -> None:
    path = write(tmp_path / "run.json", tiny(tmp_path / "out"))
    cfg = load_config(path, [
        "training.steps=7", "training.lr=1e-3", "model.bias=true", "model.pattern=spd*2",
        "data.corrupt_ranks=1", "data.sharding=clean_vs_corrupt", "training.lr_decay_steps=null",
        "sample.prompt=ROMEO:\\n", "data.corruption.probability=0.5",
        "deepspeed.spd_ext.signal_weighting={\"temperature\": 0.5}",
        "deepspeed.zero_optimization.stage=0"])
    t = cfg.training
    assert (t.steps, t.lr, t.lr_decay_steps) == (7, 1e-3, None)
    assert cfg.model.bias is True and cfg.model.pattern == "spd*2"
    assert cfg.data.corrupt_ranks == [1] and cfg.data.corruption.probability == 0.5
    assert cfg.sample.prompt == "ROMEO:\n"
    assert cfg.values["deepspeed"]["spd_ext"] == {"signal_weighting": {"temperature": 0.5}}
    plan = plan_run(cfg, 2)
    assert plan.ds_config["zero_optimization"]["stage"] == 0
    assert plan.ds_config["train_batch_size"] == 2 * 4
    # a path replaces the whole ds_config; YAML files read numbers like 1e-3 as numbers
    cfg = load_config(ROOT / "configs" / "train" / "quickstart.yaml",
                      [f"deepspeed={ROOT / 'configs' / 'ds' / 'zero1_bf16.json'}"])
    assert cfg.values["deepspeed"]["bf16"] == {"enabled": True}
    assert isinstance(cfg.training.lr, float)


def test_dry_run_prints_the_resolved_config(tmp_path, capsys) -> None:
    path = write(tmp_path / "run.json", tiny(tmp_path / "out"))
    assert cli.main(["train", str(path), "--dry-run", "--nproc", "2", "--set",
                     "training.steps=9", "--set", "parallel.tp=2"]) == 0
    out = capsys.readouterr().out
    assert "steps: 9" in out and "tp 2, pp 1, islands 1, data parallel 1" in out
    ds = json.loads(out.split("# ds_config: ", 1)[1])
    assert ds["spd_ext"]["tensor_parallel"] == {"size": 2} and ds["train_batch_size"] == 4


ERRORS = [
    ({"training": {"stpes": 5}}, [], "unknown key 'training.stpes'; did you mean "
     "'training.steps'?"),
    ({"trainig": {"steps": 5}}, [], "unknown key 'trainig'; did you mean 'training'?"),
    ({}, ["--set", "model.n_layers=3"], "unknown key 'model.n_layers'; did you mean "
     "'model.n_layer'?"),
    ({}, ["--set", "training.steps=ten"], "training.steps must be an integer >= 1, got 'ten'"),
    ({}, ["--set", "model.dropout=high"], "model.dropout must be a number"),
    ({"training": {"lr": "fast"}}, [], "training.lr must be a number >= 0, got 'fast'"),
    ({"model": {"bias": 1}}, [], "model.bias must be true or false"),
    ({}, ["--set", "parallel.tp=4", "--nproc", "2"],
     "parallel.tp 4 does not divide the world size 2"),
    ({}, ["--set", "data.tokenizer=bpe"], "choose one of char, gpt2"),
    ({}, ["--set", "deepspeed.spd_ext.signal_weigting.floor=0.1"],
     "did you mean 'signal_weighting'?"),
    ({"data": {"sharding": "clean_vs_corrupt", "corrupt_ranks": [3]}}, ["--nproc", "2"],
     "data.corrupt_ranks [3] are outside the 2 data-parallel ranks"),
    ({}, ["--set", "model.pattern=tp*3"], "gives 3 blocks but the model has n_layer=2"),
    ({"deepspeed": {"zero_optimization": {"stage": 2}, "spd_ext": {"signal_weighting": {
        "signal": "grad_norm_stability"}}}}, [], "signal grad_norm_stability with "
     "zero_optimization.stage 2"),
    ({"deepspeed": {"optimizer": {"type": "Adam"}}}, [], "remove 'optimizer' from the ds_config"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 8}}, [],
     "train_micro_batch_size_per_gpu is 8 but the train config makes it 4"),
    ({}, ["--resume"], "--resume: no complete checkpoint in"),
    ({"deepspeed": {"spd_ext": {"staleness": {"mode": "local_sgd:4"}}}}, [],
     "training.steps 6 is not a multiple of staleness.mode local_sgd:4's 4 local steps"),
    ({"sample": {"prompt": "\u00e9"}}, [], "sample.prompt '\u00e9' cannot be encoded by the "
     "char tokenizer"),
    ({}, ["--set", "parallel.tp_backend=spd"], "did you mean 'spd_ext'?"),
    ({"deepspeed": {"zero_optimization": 5}}, [], "deepspeed.zero_optimization must be a "
     "mapping, got 5"),
    ({}, ["--set", "deepspeed.bf16=true"], "deepspeed.bf16 must be a mapping, got true; e.g. "
     "--set deepspeed.bf16.enabled=true"),
    ({}, ["--set", "deepspeed=missing_ds.json"], "deepspeed 'missing_ds.json' is not a file"),
    ({"training": {"out_dir": "/proc/spd_ext/out"}}, [], "training.out_dir /proc/spd_ext/out "
     "cannot be written"),
    ({}, ["--set", "parallel.pp=2", "--nproc", "3"],
     "parallel.pp 2 does not divide the world size 3"),
    ({}, ["--set", "parallel.pp=2", "--set", "parallel.islands=2", "--nproc", "6"],
     "parallel.pp x parallel.tp x parallel.islands 4 does not divide the world size 6"),
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, ["--set", "parallel.pp=2", "--nproc",
                                                          "2"],
     "DeepSpeed's pipeline engine runs ZeRO 0 and 1 only"),
    ({"deepspeed": {"zero_optimization": {"stage": 0}, "spd_ext": {"staleness": {
        "mode": "delayed:1"}}}}, ["--set", "parallel.pp=2", "--nproc", "2"],
     "staleness.mode delayed:1 with pipeline stages: not supported"),
    ({}, ["--set", "parallel.pp=8", "--nproc", "8"],
     "parallel.pp 8 is more stages than the model's 6 layers"),
]


@pytest.mark.parametrize("cfg, args, message", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_config_errors_are_one_line_with_exit_2(tmp_path, capsys, cfg, args, message) -> None:
    base = tiny(tmp_path / "out")
    for name, values in cfg.items():
        base[name] = {**base.get(name, {}), **values} if name in base else values
    if "deepspeed" in cfg:
        base["deepspeed"] = cfg["deepspeed"]
    path = write(tmp_path / "run.json", base)
    assert cli.main(["train", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spd-ext: error: "), err
    assert message in err and "Traceback" not in err, err


def _fake_checkpoint(plan, tokenizer, step: int) -> None:
    """A complete checkpoint's marker, as save_checkpoint writes it (no weights needed: the
    layout is checked before any rank starts)."""
    from spd_ext.train.config import COMPLETE, LATEST

    tag = f"global_step{step}"
    marker = plan.checkpoint_dir / tag / "train" / COMPLETE
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"step": step, "layout": plan.checkpoint_layout(tokenizer),
                                  "decay_steps": plan.decay_steps}))
    (plan.checkpoint_dir / LATEST).write_text(tag)


def test_resume_with_another_corpus_is_refused_before_any_rank(tmp_path, capsys) -> None:
    """The char tokenizer's vocabulary comes from the corpus (model.vocab_size null): a
    resume on another corpus, with as many or more characters, is refused naming the
    tokenizer (was: accepted, then a size-mismatch traceback on every rank)."""
    from spd_ext.data import TokenDataset
    from spd_ext.train.run import prepare

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("abcdefg\n " * 400)
    second.write_text("ABCDEFGHI\n " * 400)
    path = write(tmp_path / "run.json", tiny(tmp_path / "out", data={"corpus": str(first)}))
    plan, _ = prepare(str(path), [], 1)
    _fake_checkpoint(plan, TokenDataset(str(first), "char").tokenizer, 3)
    _, facts = prepare(str(path), [], 1, resume=True)  # the same corpus resumes
    assert facts["resume_tag"] == "global_step3"
    assert cli.main(["train", str(path), "--resume", "--set", f"data.corpus={second}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was saved with model.vocab_size 9, data.tokenizer char " \
        "(9 characters" in err and "but this run has model.vocab_size 11" in err, err


@pytest.mark.parametrize("marker", ["{not json", "[1, 2]", "\udcff"])
def test_a_corrupt_checkpoint_marker_is_refused_on_resume(tmp_path, capsys, marker) -> None:
    """A completion marker that is not a JSON object: one line naming the file (was: read
    as an empty layout, so the resume's layout check passed whatever the config)."""
    from spd_ext.data import TokenDataset
    from spd_ext.train.config import COMPLETE
    from spd_ext.train.run import prepare

    path = write(tmp_path / "run.json", tiny(tmp_path / "out"))
    plan, _ = prepare(str(path), [], 1)
    _fake_checkpoint(plan, TokenDataset("tinyshakespeare", "char").tokenizer, 3)
    file = plan.checkpoint_dir / "global_step3" / "train" / COMPLETE
    file.write_bytes(marker.encode("utf-8", "surrogateescape"))
    assert cli.main(["train", str(path), "--resume", "--set", "model.n_embd=64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{file} is corrupt" in err and "--overwrite" in err, err


def test_resume_without_the_checkpoints_spd_ext_state_is_refused_before_any_rank(
        tmp_path, capsys) -> None:
    """Signal weighting switched off (or another staleness mode) on --resume: one line
    before any rank starts (was: every rank's traceback when the engine loaded the state)."""
    from spd_ext.data import TokenDataset
    from spd_ext.train.run import prepare

    path = write(tmp_path / "run.json", tiny(tmp_path / "out", deepspeed={
        **ZERO1, "spd_ext": {"signal_weighting": WEIGHTING}}))
    plan, _ = prepare(str(path), [], 2)
    _fake_checkpoint(plan, TokenDataset("tinyshakespeare", "char").tokenizer, 3)
    edited = write(tmp_path / "edited.json", tiny(tmp_path / "out"))  # the section removed
    assert cli.main(["train", str(edited), "--nproc", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was saved with deepspeed.spd_ext.signal_weighting on but " \
        "this run has deepspeed.spd_ext.signal_weighting off" in err, err


class _RunsCode:
    """Unpickling this runs a shell command (what a crafted checkpoint file does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@needs_deepspeed
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt",
                                  "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_crafted_deepspeed_file_is_refused_before_any_rank(tmp_path, capsys, name) -> None:
    """--resume reads every file of the checkpoint with weights_only=True (DeepSpeed's plain
    classes allowed) before DeepSpeed, which unpickles them fully, touches them."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from spd_ext.data import TokenDataset
    from spd_ext.train.run import prepare

    path = write(tmp_path / "run.json", tiny(tmp_path / "out"))
    plan, _ = prepare(str(path), [], 1)
    _fake_checkpoint(plan, TokenDataset("tinyshakespeare", "char").tokenizer, 3)
    tag_dir = plan.checkpoint_dir / "global_step3"
    # what DeepSpeed's own files hold loads: tensors, its loss scaler, enum and fragments
    for file in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": {"w": torch.ones(2)}, "loss_scaler": LossScaler(1.0),
                    "zero_stage": ZeroStageEnum(1),
                    "param_slice_mappings": [{"w": fragment_address(numel=2, start=0)}]},
                   tag_dir / file)
    assert prepare(str(path), [], 1, resume=True)[1]["resume_tag"] == "global_step3"
    marker = tmp_path / "code-ran"
    torch.save({"module": _RunsCode(marker)}, tag_dir / name)
    assert cli.main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1 and f"{tag_dir / name} is not a DeepSpeed checkpoint file " \
        "spd_ext can load" in err and "(here posix.system)" in err, err


@needs_deepspeed
def test_engine_checkpoint_loads_run_no_code(tmp_path) -> None:
    """An engine spd_ext attached to reads its checkpoint files without running code,
    whoever calls engine.load_checkpoint."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    from spd_ext.deepspeed.checkpoint import UnsafeCheckpointError, guard_checkpoint_loads

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    guard_checkpoint_loads(engine)
    marker = tmp_path / "code-ran"
    torch.save({"module": _RunsCode(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(UnsafeCheckpointError, match="crafted.pt is not a DeepSpeed checkpoint"):
        engine.checkpoint_engine.load(str(tmp_path / "crafted.pt"), map_location="cpu")
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(3)}}, tmp_path / "plain.pt")
    loaded = engine.checkpoint_engine.load(str(tmp_path / "plain.pt"),
                                           map_location=lambda storage, loc: storage)
    assert torch.equal(loaded["module"]["w"], torch.ones(3))


def test_resume_with_more_steps_says_the_schedule_changes(tmp_path) -> None:
    """Raising training.steps on --resume stretches the cosine decay (the learning rate at
    the resume step jumps): said on resume, with the setting that keeps the old one (was
    silent). Keeping lr_decay_steps keeps it and says nothing."""
    from spd_ext.data import TokenDataset
    from spd_ext.train.run import prepare

    path = write(tmp_path / "run.json", tiny(tmp_path / "out", training={"steps": 6}))
    plan, _ = prepare(str(path), [], 1)
    _fake_checkpoint(plan, TokenDataset("tinyshakespeare", "char").tokenizer, 4)
    _, facts = prepare(str(path), ["training.steps=12"], 1, resume=True)
    assert "the cosine decay now spans 12 steps (the checkpoint's run: 6)" in \
        facts["resume_note"] and "set training.lr_decay_steps=6" in facts["resume_note"]
    _, facts = prepare(str(path), ["training.steps=12", "training.lr_decay_steps=6"], 1,
                       resume=True)
    assert "resume_note" not in facts


def test_a_dry_run_beside_checkpoints_says_what_the_run_needs(tmp_path, capsys) -> None:
    """--dry-run writes nothing, so checkpoints in out_dir do not refuse it (they did); it
    says the real run needs --resume or --overwrite."""
    from spd_ext.data import TokenDataset
    from spd_ext.train.run import prepare

    path = write(tmp_path / "run.json", tiny(tmp_path / "out"))
    plan, _ = prepare(str(path), [], 1)
    _fake_checkpoint(plan, TokenDataset("tinyshakespeare", "char").tokenizer, 3)
    assert cli.main(["train", str(path), "--dry-run"]) == 0
    assert "the run needs --resume or --overwrite" in capsys.readouterr().out
    assert cli.main(["train", str(path)]) == 2  # the run itself is still refused


def test_missing_config_file_and_bad_syntax(tmp_path, capsys) -> None:
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml is not a file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: [1\n")
    assert cli.main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml is not valid YAML: line" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(None, ["training.steps"])


def test_errors_in_fresh_processes_have_no_traceback(tmp_path) -> None:
    """The console script and the launchers' module entry (every rank checks, rank 0 says)."""
    for module, args in (("spd_ext.cli", [str(tmp_path / "missing.yaml")]),
                         ("spd_ext.train.run", [str(write(tmp_path / "r.json",
                                                          {"modle": {}}))])):
        proc = spd_ext_train(args, tmp_path, timeout=60, module=module)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spd-ext: error: "), proc.stderr
    assert "did you mean 'model'?" in proc.stderr


# -- whole runs -------------------------------------------------------------------------
@needs_deepspeed
def test_one_rank_without_a_launcher(tmp_path) -> None:
    out = tmp_path / "out"
    path = write(tmp_path / "run.json", tiny(out, training={"steps": 4, "log_interval": 3}))
    stdout = succeeded(spd_ext_train([str(path), "--set", "training.eval_interval=2"], tmp_path,
                                     timeout=120))
    # the loss is read (and logged) on the first step, every log_interval steps and the last
    assert [s for s, _ in train_losses(out)] == [1, 3, 4]
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 4
    assert "val loss" in stdout and (out / "sample.txt").read_text()


@contextlib.contextmanager
def _training_job(path: Path, out_dir: Path, timeout: float = 180):
    """`spd-ext train PATH --nproc 2` running, once it has logged a step: (the process, its
    launcher and ranks). Whatever is left of it is killed afterwards."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "spd_ext.cli", "train", str(path), "--nproc",
                             "2"], cwd=path.parent, env=env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    job: list = []
    try:
        deadline = time.monotonic() + timeout
        while not (out_dir / "log.jsonl").is_file() or not train_losses(out_dir):
            assert proc.poll() is None, f"the run ended early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the run logged no step in time"
            time.sleep(0.5)
        job = psutil.Process(proc.pid).children(recursive=True)
        yield proc, job
    finally:
        for child in job:
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.kill()
        proc.wait()


@needs_deepspeed
def test_a_full_disk_is_named_in_one_line(tmp_path) -> None:
    """The out_dir on a 256 KiB file system: the first checkpoint does not fit, and the run
    says the disk is full in one line (was: "basic_ios::clear: iostream error" in a
    traceback)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs privileges: {mounted.stderr!r}")
    try:
        path = write(tmp_path / "run.json", tiny(disk / "out", training={
            "steps": 4, "checkpoint_interval": 2, "eval_interval": 0}))
        proc = spd_ext_train([str(path)], tmp_path, timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "the disk holding it is full" in errors[0] and \
            "--resume" in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _listening(processes: list) -> list[str]:
    import psutil

    found = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            found += [f"{c.laddr.ip}:{c.laddr.port} (pid {proc.pid})"
                      for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
    return found


@needs_deepspeed
def test_a_running_job_listens_on_loopback_holds_its_out_dir_and_stops_on_sigterm(
        tmp_path) -> None:
    """While `spd-ext train --nproc 2` trains: every socket of the job listens on 127.0.0.1
    (was: rank 0's rendezvous store on every interface, IPv4 and IPv6). A second run in
    the same out_dir is refused in one line naming the first's pid (was: accepted, deleting
    the first's log). SIGTERM to `spd-ext train` reaches the launcher and every rank, and
    it waits for them (was: the parent died at once and the ranks trained on)."""
    import psutil

    out = tmp_path / "out"
    path = write(tmp_path / "run.json", tiny(out, training={"steps": 100000,
                                                             "eval_interval": 0}))
    with _training_job(path, out) as (first, job):
        assert len(job) >= 3, job  # the launcher and two ranks
        sockets = _listening(job)
        assert sockets, "found no listening socket to check"
        assert all(entry.startswith("127.0.0.1:") for entry in sockets), sockets
        second = spd_ext_train([str(path), "--nproc", "2"], tmp_path, timeout=60)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"is in use by a run in progress (pid " \
            f"{first.pid}, for " in second.stderr, second.stderr
        assert train_losses(out), "the first run's log was touched"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(job, timeout=10)
        assert not alive, f"left running: {alive}"


def _rank_processes(parent: int) -> dict[int, object]:
    import psutil

    ranks = {}
    for proc in psutil.Process(parent).children(recursive=True):
        with contextlib.suppress(psutil.Error, KeyError, ValueError):
            if "spd_ext.train.run" in " ".join(proc.cmdline()):
                ranks[int(proc.environ()["RANK"])] = proc
    return ranks


@needs_deepspeed
def test_a_stopped_rank_is_named_within_the_rank_timeout(tmp_path) -> None:
    """SIGSTOP one rank mid-training: the other's next collective gives up after
    parallel.rank_timeout (was: DeepSpeed's 30-minute default, with spd-ext train offering
    no setting) and names the stopped rank, not itself; every process of the job exits."""
    import psutil

    out = tmp_path / "out"
    path = write(tmp_path / "run.json", tiny(out, training={"steps": 100000, "eval_interval": 0},
                                             parallel={"rank_timeout": 4}))
    with _training_job(path, out) as (job, processes):
        ranks = _rank_processes(job.pid)
        assert sorted(ranks) == [0, 1], ranks
        ranks[1].suspend()
        stopped = time.monotonic()
        # 4 s, a few to be sure the rank is silent, and the launcher's 30 s for a rank that
        # does not end on SIGTERM (a stopped one) before it kills it
        assert job.wait(timeout=90) != 0
        assert time.monotonic() - stopped < 60
        err = job.stderr.read()
        assert f"rank 1 (pid {ranks[1].pid}) stopped answering: no sign of life for" in err, err
        assert "parallel.rank_timeout 4 s" in err, err
        _, alive = psutil.wait_procs(processes, timeout=20)
        assert not alive, f"left running: {alive}"


def test_rank_watch_names_a_rank_stuck_in_another_phase() -> None:
    """A rank whose main thread hangs (a checkpoint write that never returns) still sends
    heartbeats; the rank that waited for it names it by the phase it is stuck in."""
    from datetime import timedelta

    import torch.distributed as dist

    from spd_ext.launch import free_port
    from spd_ext.train.rank_watch import RankWatch

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=10),
                           wait_for_workers=False)
    waiting, stuck = RankWatch(0, 2, "127.0.0.1", port), RankWatch(1, 2, "127.0.0.1", port)
    try:
        stuck.mark("saving checkpoint global_step4")
        stuck.since -= 30
        waiting.mark("checkpoint global_step4 written, waiting for the other ranks")
        time.sleep(2.5)  # both have published
        text = waiting.blame(20)
        assert text.startswith("rank 0 was in 'checkpoint global_step4 written"), text
        assert f"rank 1 (pid {os.getpid()}) is stuck in 'saving checkpoint global_step4' " \
            "for 3" in text, text
        stuck.mark("step 5")  # a rank in the same phase is only described
        time.sleep(1.5)
        assert "rank 1 in 'step 5'" in waiting.blame(20)
    finally:
        waiting.close()
        stuck.close()
        del server


@needs_deepspeed
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or
                    importlib.util.find_spec("tiktoken") is None,
                    reason="transformers / tiktoken not installed")
def test_starts_from_a_hugging_face_gpt2_folder(tmp_path) -> None:
    """model.hf_path: a local GPT-2 folder converted on load (its shape, GPT-2 BPE data)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=48)) \
        .save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    cfg = tiny(out, training={"steps": 2, "eval_interval": 0}, sample={"tokens": 4})
    cfg["model"] = {"hf_path": str(tmp_path / "hf"), "pattern": "spd*2"}
    cfg["data"]["tokenizer"] = "gpt2"
    path = write(tmp_path / "run.json", cfg)
    succeeded(spd_ext_train([str(path)], tmp_path, timeout=180))
    assert json.loads((out / "summary.json").read_text())["pattern"] == "spd*2"
    assert [s for s, _ in train_losses(out)] == [1, 2]
    cfg["model"]["n_layer"] = 2  # the folder decides the shape
    proc = spd_ext_train([str(write(path, cfg))], tmp_path, timeout=60)
    assert proc.returncode == 2 and "model.n_layer is set together with model.hf_path" in \
        proc.stderr


@needs_deepspeed
def test_tensor_parallel_2_under_the_deepspeed_launcher(tmp_path) -> None:
    out = tmp_path / "out"
    path = write(tmp_path / "run.json", tiny(out, model={"pattern": "spd*2"},
                                             parallel={"tp": 2}))
    stdout = succeeded(spd_ext_train([str(path), "--nproc", "2", "--set",
                                      "parallel.dist_backend=deepspeed"], tmp_path))
    assert "2 rank(s) on gloo" in stdout  # DeepSpeed's own choice on CPU
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 6
    # spd*2: one all-reduce per block forward and backward, measured on every step
    assert all((r["syncs_fwd"], r["syncs_bwd"]) == (2, 2) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["tp"], summary["data_parallel"], summary["pattern"]) == (2, 1, "spd*2")
    assert re.search(r"tp syncs per step \(fwd / bwd\) +2 / 2", stdout), stdout
    assert "sample (16 tokens" in stdout
    assert (out / "loss.png").stat().st_size > 0 and len((out / "sample.txt").read_text()) > 0
    assert (out / "checkpoints" / "latest").read_text() == "global_step6"
    # model.pt: the trained weights, whole, with their config and tokenizer (spd-ext serve)
    from spd_ext.serve import inspect_source

    source = inspect_source(str(out / "model.pt"), None, None, 1)
    assert source.config.pattern == "spd*2" and source.tokenizer["name"] == "char"
    model = source.build()
    x = torch.randint(source.config.vocab_size, (2, 8))
    assert torch.isfinite(model(x)[0]).all()
    assert model.wte.weight.shape[0] == source.config.vocab_size


@needs_deepspeed
def test_pipeline_stages_train_like_one_rank_and_resume(tmp_path) -> None:
    """parallel.pp 2 (2 ranks, 2 micro-batches a step) logs the losses, validation losses
    and model.pt of the same run on one rank (the same initial weights: ReducedSyncGPT's of
    the seed); resumed from its step-3 checkpoint it logs them again."""
    base = tiny(tmp_path / "one", model={"pattern": "ladder,parallel"},
                training={"grad_accum": 2, "checkpoint_interval": 3})
    one = tmp_path / "one"
    succeeded(spd_ext_train([str(write(tmp_path / "run.json", base))], tmp_path))
    pipe = tmp_path / "pipe"
    path = write(tmp_path / "run.json", tiny(pipe, **{k: base[k] for k in ("model", "training")},
                                             parallel={"pp": 2, "pp_partition": "blocks"}))
    stdout = succeeded(spd_ext_train([str(path), "--nproc", "2", "--set",
                                      f"training.out_dir={pipe}"], tmp_path))
    assert "pp 2 x tp 1 x dp 1" in stdout
    for a, b in ((one, pipe),):
        np.testing.assert_allclose([x for _, x in train_losses(b)],
                                   [x for _, x in train_losses(a)], rtol=1e-5)
        np.testing.assert_allclose([r["val_loss"] for r in metrics(b) if "val_loss" in r],
                                   [r["val_loss"] for r in metrics(a) if "val_loss" in r],
                                   rtol=1e-5)
    dense = [torch.load(d / "model.pt", weights_only=True)["model"] for d in (one, pipe)]
    for name, value in dense[0].items():
        torch.testing.assert_close(dense[1][name], value, atol=1e-5, rtol=1e-4)
    cut = resumed_from_step_3(pipe, path, tmp_path)
    assert train_losses(cut) == train_losses(pipe)


@needs_deepspeed
def test_pipeline_x_tensor_parallel_on_4_ranks(tmp_path) -> None:
    """parallel.pp 2 x parallel.tp 2 on 4 ranks through the whole command (its exactness
    against the unpipelined model: tests/test_pipeline.py): the layout line, each step's
    syncs (the first rank logs stage 0's: the spd block, one all-reduce forward and one
    backward per micro-batch), evaluation, checkpoint and model.pt."""
    both = tmp_path / "both"
    cfg = tiny(both, model={"pattern": "spd,tp"}, training={"grad_accum": 2},
               parallel={"tp": 2, "pp": 2, "pp_partition": "blocks"}, sample={"tokens": 4})
    stdout = succeeded(spd_ext_train([str(write(tmp_path / "run.json", cfg)), "--nproc", "4"],
                                     tmp_path, timeout=300))
    assert "pp 2 x tp 2 x dp 1" in stdout
    steps = [r for r in metrics(both) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all((r["syncs_fwd"], r["syncs_bwd"]) == (2, 2) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert len([r for r in metrics(both) if "val_loss" in r]) == 2
    assert (both / "checkpoints" / "latest").read_text() == "global_step6"
    dense = torch.load(both / "model.pt", weights_only=True)
    assert dense["model_config"]["tp_size"] == 2 and "h.1.mlp.c_fc.weight" in dense["model"]


@needs_deepspeed
def test_torchrun_tensor_parallel_dense_pattern(tmp_path) -> None:
    from spd_ext.launch import free_port

    out = tmp_path / "out"
    path = write(tmp_path / "run.json", tiny(out, training={"steps": 3}, parallel={"tp": 2},
                                             sample={"tokens": 4}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "spd_ext.train.run", str(path)]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun outlived 180 s:\n{exc.stdout}\n{exc.stderr}")
    succeeded(proc)
    steps = [r for r in metrics(out) if "loss" in r]
    assert [(r["step"], r["syncs_fwd"], r["syncs_bwd"]) for r in steps] == \
        [(1, 4, 4), (2, 4, 4), (3, 4, 4)]  # tp*2: two all-reduces per block each way


@needs_deepspeed
def test_signal_weighting_and_an_exact_resume(tmp_path) -> None:
    """dp 2, rank 1's shard corrupted, signal weighting, dropout, ZeRO-1: checkpoints at steps
    3 and 6. A copy whose step-6 save was cut short (no completion marker, ``latest`` naming
    it) resumes from step 3 and logs exactly the uninterrupted run's losses."""
    full = tmp_path / "full"
    cfg = tiny(full, model={"dropout": 0.1},
               data={"sharding": "clean_vs_corrupt", "corrupt_ranks": [1],
                     "corruption": {"kind": "token_swap", "probability": 0.5}},
               training={"checkpoint_interval": 3},
               deepspeed={**ZERO1, "spd_ext": {"signal_weighting": WEIGHTING}})
    path = write(tmp_path / "run.json", cfg)
    succeeded(spd_ext_train([str(path), "--nproc", "2"], tmp_path))
    steps = [r for r in metrics(full) if "loss" in r]
    assert all(abs(sum(r["weights"]) - 1) < 1e-9 for r in steps)
    assert steps[-1]["weights"][1] < 0.5 < steps[-1]["weights"][0]  # the corrupt rank counts less
    assert json.loads((full / "summary.json").read_text())["weights"] == steps[-1]["weights"]

    cut = resumed_from_step_3(full, path, tmp_path)
    assert train_losses(cut) == train_losses(full)
    assert [r["val_loss"] for r in metrics(cut) if "val_loss" in r] == \
        [r["val_loss"] for r in metrics(full) if "val_loss" in r]
    events = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e["tag"] == "global_step3" for e in events)
    # half the steps (the same 6-step schedule), then --resume with all of them
    half = tmp_path / "half"
    succeeded(spd_ext_train([str(path), "--nproc", "2", "--set", f"training.out_dir={half}",
                             "--set", "training.steps=3", "--set", "training.lr_decay_steps=6"],
                            tmp_path))
    assert [s for s, _ in train_losses(half)] == [1, 2, 3]
    succeeded(spd_ext_train([str(path), "--nproc", "2", "--resume", "--set",
                             f"training.out_dir={half}", "--set", "training.lr_decay_steps=6"],
                            tmp_path))
    assert train_losses(half) == train_losses(full)
    # a rerun without --resume refuses to overwrite the checkpoints
    proc = spd_ext_train([str(path), "--nproc", "2"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "pass --resume to continue it" in proc.stderr
    # --resume of a finished run refuses rather than rewriting its last checkpoint
    proc = spd_ext_train([str(path), "--nproc", "2", "--resume"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "already finished its training.steps 6" in proc.stderr
    # --resume with another layout than the checkpoint's names the settings that differ
    proc = spd_ext_train([str(path), "--nproc", "2", "--resume", "--set", "training.steps=9",
                          "--set", "deepspeed.zero_optimization.stage=0"], tmp_path, timeout=60)
    assert proc.returncode == 2 and ("was saved with deepspeed.zero_optimization.stage 1 but "
                                     "this run has deepspeed.zero_optimization.stage 0") \
        in proc.stderr, proc.stderr


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_signal_weighting_at_zero_2_and_3(tmp_path, stage: int) -> None:
    """The shipped configs/ds/zero{2,3}_bf16.json (signal weighting on) train 2 data-parallel
    ranks, rank 1's shard corrupted; at ZeRO-3 the evaluation's forwards stay collective
    (3 batches over 2 ranks) and the model is gathered for model.pt and the sample."""
    out = tmp_path / "out"
    cfg = tiny(out, data={"sharding": "clean_vs_corrupt", "corrupt_ranks": [1],
                          "corruption": {"kind": "token_swap", "probability": 0.5}},
               training={"eval_batches": 3})
    cfg["deepspeed"] = str(ROOT / "configs" / "ds" / f"zero{stage}_bf16.json")
    path = write(tmp_path / "run.json", cfg)
    stdout = succeeded(spd_ext_train([str(path), "--nproc", "2", "--set",
                                      "deepspeed.spd_ext.signal_weighting.warmup_steps=1"],
                                     tmp_path))
    assert f"ZeRO-{stage} bf16" in stdout
    assert "2 rank(s) on cpu:spd_ext" in stdout  # the default on CPU: parallel.dist_backend
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 6 and all(abs(sum(r["weights"]) - 1) < 1e-9 for r in steps)
    assert steps[-1]["weights"] != [0.5, 0.5]
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(v.numel() > 0 for v in state["model"].values())  # whole, not ZeRO-3's shards
    assert (out / "sample.txt").read_text()


@needs_deepspeed
def test_diloco_islands_on_4_ranks(tmp_path) -> None:
    out = tmp_path / "out"
    section = {"staleness": {"mode": "diloco:2", "islands": 2}}
    path = write(tmp_path / "run.json", tiny(out, training={"steps": 4, "eval_interval": 0},
                                             deepspeed={**ZERO1, "spd_ext": section},
                                             sample={"tokens": 0}))
    succeeded(spd_ext_train([str(path), "--nproc", "4"], tmp_path, timeout=300))
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["islands"], summary["world_size"], summary["data_parallel"]) == (2, 4, 4)
    ckpt = out / "checkpoints"
    assert (ckpt / "island0" / "global_step4").is_dir() and (ckpt / "island1").is_dir()
    assert (ckpt / "latest").read_text() == "global_step4"


_FAILS_TO_WRITE = """
import sys
import torch.distributed as dist
import spd_ext.train.run as train_run
from spd_ext.utils.files import WriteError

def disk_full(*args):
    raise WriteError("no space left on device")

train_run._train = disk_full
plan, facts = train_run.prepare(sys.argv[1], [], 1, hold=False)
code = train_run.run(plan, facts)
print(code, dist.is_initialized())
"""


def test_an_error_exit_ends_the_process_group(tmp_path) -> None:
    """A rank that stops on an error ends the torch.distributed group it started, as one
    that finishes does (was: only after success; NCCL leaks and warns of such a group)."""
    from spd_ext.launch import free_port

    path = write(tmp_path / "run.json", tiny(tmp_path / "out"))
    rank = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", _FAILS_TO_WRITE, str(path)], cwd=tmp_path,
                          env={**env(), **rank}, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-2:] == ["1", "False"], proc.stdout + proc.stderr
    assert "no space left on device" in proc.stderr
