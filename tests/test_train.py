"""The trainer: schedule, checkpoints (atomic, resumable), failure on divergence."""

from __future__ import annotations

import json

import pytest
import torch

from spd_ext.data import TokenDataset
from spd_ext.tp import GPTConfig, ReducedSyncGPT
from spd_ext.train import TrainConfig, Trainer, TrainerHooks, lr_at


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SPD_EXT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    return TokenDataset(path, "char")


def _model(vocab: int, pattern: str = "spd*2") -> ReducedSyncGPT:
    return ReducedSyncGPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=2, n_head=2,
                                    n_embd=16, pattern=pattern, tp_size=2), seed=0)


def test_lr_schedule() -> None:
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=0.1, min_lr=0.2)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_training_lowers_the_loss_and_logs(corpus, tmp_path) -> None:
    cfg = TrainConfig(max_steps=30, batch_size=8, lr=1e-2, warmup_steps=3, eval_interval=10,
                      eval_batches=2, log_interval=5, out_dir=str(tmp_path / "run"), quiet=True)
    model = _model(corpus.vocab_size)
    trainer = Trainer(model, corpus.sampler(8, 16, seed=0), cfg)
    first = trainer.evaluate()
    result = trainer.train()
    assert result.val_loss < first - 0.3
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text()
               .splitlines()]
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    assert any(r.get("syncs_fwd") == 2 for r in records)  # spd*2: one sync per block
    assert (tmp_path / "run" / "ckpt.pt").is_file()
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_resume_after_a_crash_continues_exactly(corpus, tmp_path) -> None:
    def cfg(out: str, resume: bool = False) -> TrainConfig:
        return TrainConfig(max_steps=10, batch_size=4, lr=1e-2, warmup_steps=2,
                           eval_interval=0, eval_batches=2, log_interval=1,
                           checkpoint_interval=5, out_dir=str(tmp_path / out), resume=resume,
                           quiet=True)

    straight = Trainer(_model(corpus.vocab_size), corpus.sampler(4, 16, 0), cfg("a"))
    straight.train()

    class Crash(TrainerHooks):
        def after_backward(self, model, step: int, loss: float) -> None:
            if step == 7:
                raise KeyboardInterrupt  # after the step-5 checkpoint

    crashed = Trainer(_model(corpus.vocab_size), corpus.sampler(4, 16, 0), cfg("b"),
                      hooks=Crash())
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = Trainer(_model(corpus.vocab_size), corpus.sampler(4, 16, 0), cfg("b", True))
    assert resumed.step == 5
    resumed.train()
    # the log holds every step once: the crashed run's steps 6-7 were dropped on resume
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text()
               .splitlines()]
    steps = [r["step"] for r in records if "event" not in r and "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 10
    assert [r.get("dropped_records") for r in records if r.get("event") == "resume"] == [2]
    for k, v in straight.model.dense_state_dict().items():
        torch.testing.assert_close(resumed.model.dense_state_dict()[k], v, rtol=1e-6, atol=1e-7)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_model(corpus.vocab_size), corpus.sampler(4, 16, 0), cfg("c", True))


def test_hooks_are_called_in_order_and_must_implement_the_protocol(corpus) -> None:
    """The Trainer calls all five hooks, unconditionally; an object that implements only
    some of them is refused up front, naming what is missing."""
    calls: list[str] = []

    class Recorder(TrainerHooks):
        def before_step(self, step: int) -> None:
            calls.append(f"before {step}")

        def after_backward(self, model, step: int, loss: float) -> dict:
            calls.append(f"backward {step}")
            return {"seen": step}

        def after_step(self, model, step: int) -> None:
            calls.append(f"after {step}")

        def finish(self, model) -> None:
            calls.append("finish")

    cfg = TrainConfig(max_steps=2, batch_size=2, warmup_steps=0, eval_interval=0,
                      eval_batches=1, log_interval=1, quiet=True)
    Trainer(_model(corpus.vocab_size), corpus.sampler(2, 16, 0), cfg, hooks=Recorder()).train()
    assert calls == ["before 0", "backward 0", "after 0", "before 1", "backward 1", "after 1",
                     "finish"]

    class Partial:
        def after_backward(self, model, step: int, loss: float) -> None:
            pass

    with pytest.raises(TypeError, match="lack before_step, after_step, evaluation_weights, "
                                        "finish; derive the class from"):
        Trainer(_model(corpus.vocab_size), corpus.sampler(2, 16, 0), cfg, hooks=Partial())


def test_the_trainer_knows_sharded_models_by_their_protocol(corpus) -> None:
    from spd_ext.tp import ShardedModel

    cfg = TrainConfig(max_steps=1, batch_size=2, quiet=True)
    model = _model(corpus.vocab_size)
    assert isinstance(model, ShardedModel)
    assert Trainer(model, corpus.sampler(2, 16, 0), cfg).sharded is model
    plain = torch.nn.Linear(2, 2)
    assert not isinstance(plain, ShardedModel)
    assert Trainer(plain, corpus.sampler(2, 16, 0), cfg).sharded is None


def test_divergence_stops_with_a_clear_error(corpus) -> None:
    model = _model(corpus.vocab_size)
    with torch.no_grad():
        model.wte.weight.fill_(float("nan"))
    trainer = Trainer(model, corpus.sampler(4, 16, 0),
                      TrainConfig(max_steps=3, batch_size=4, eval_batches=1, quiet=True))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        trainer.train()


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path) -> None:
    from spd_ext.utils.files import atomic_path, read_json, write_json

    path = tmp_path / "sub" / "results.json"
    write_json(path, [1])
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_path(path) as tmp:
            tmp.write_text("[2, ")
            raise RuntimeError("crash mid-write")
    assert read_json(path, None) == [1]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_killed_writer_leaves_no_temporary_behind(tmp_path) -> None:
    """A writer killed outright (SIGKILL) cannot clean up: the next write removes its
    ``.tmp<pid>`` file; a live writer's temporary is left alone."""
    import os
    import subprocess
    import sys

    from spd_ext.utils.files import read_json, write_json

    path = tmp_path / "ckpt.json"
    code = ("import os, sys; from pathlib import Path; from spd_ext.utils.files import "
            "atomic_path\nwith atomic_path(Path(sys.argv[1])) as tmp:\n"
            "    tmp.write_text('half')\n    os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)])
    assert proc.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith("ckpt.json.tmp")
    live = tmp_path / f"ckpt.json.tmp{os.getppid()}"
    live.write_text("a live writer's")
    write_json(path, {"step": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", live.name]
    assert read_json(path, None) == {"step": 5}


class _Payload:
    """What a crafted checkpoint carries: unpickling it would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_load_without_running_code(corpus, tmp_path, capsys) -> None:
    """Trainer resume and `spd-ext tp sensitivity` read checkpoints with weights_only=True:
    a crafted file is refused without running its code; garbage, truncated and
    tensor-only files get one line naming the file."""
    from spd_ext.cli import main

    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted" / "ckpt.pt"
    crafted.parent.mkdir()
    torch.save({"model": _Payload(str(marker)), "step": 1}, crafted)
    cfg = TrainConfig(max_steps=2, batch_size=4, eval_batches=1, out_dir=str(crafted.parent),
                      resume=True, quiet=True)
    with pytest.raises(ValueError, match="weights_only=True so that a file cannot run code"):
        Trainer(_model(corpus.vocab_size), corpus.sampler(4, 16, 0), cfg)
    assert main(["tp", "sensitivity", "--checkpoint", str(crafted)]) == 2
    assert "cannot run code" in capsys.readouterr().err
    assert not marker.exists()

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    good = tmp_path / "good.pt"
    torch.save({"model": {}, "model_config": {}, "tokenizer": {}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    for path, message in ((garbage, "is not a readable checkpoint"),
                          (truncated, "is not a readable checkpoint"),
                          (tensor_only, "holds a Tensor, not a checkpoint dict")):
        assert main(["tp", "sensitivity", "--checkpoint", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err and "Traceback" not in err
