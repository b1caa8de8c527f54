"""The training loop and its parts, each without a launcher: the loop with a stand-in step,
evaluation and checkpointer; the DeepSpeed step, evaluation and checkpointer with a
stand-in engine on a one-rank gloo group."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from spd_ext.train.loop import LoopSettings, StepResult, TrainingDiverged, TrainingLoop
from spd_ext.utils.run_log import RunLog


class _Steps:
    """A step that records what it was called with and returns the losses it is given."""

    def __init__(self, losses: dict[int, float] | None = None) -> None:
        self.losses, self.calls = losses or {}, []

    def __call__(self, step: int) -> StepResult:
        self.calls.append(step)
        return StepResult(torch.tensor(self.losses.get(step, 1.0 / (step + 1))), 10,
                          {"syncs_fwd": 2})


class _Checkpoints:
    def __init__(self, resume_at: int = 0) -> None:
        self.saved: list[int] = []
        self.resume_at = resume_at

    def save(self, step: int) -> str:
        self.saved.append(step)
        return f"ckpt/{step}"

    def load(self) -> tuple[int, dict]:
        return self.resume_at, {"tag": f"global_step{self.resume_at}"}


def _loop(steps: _Steps, checkpoints: _Checkpoints | None = None, log: RunLog | None = None,
          reads: list | None = None, **settings) -> TrainingLoop:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    evaluations = iter(range(100))

    def read(loss: torch.Tensor) -> float:
        if reads is not None:
            reads.append(float(loss))
        return float(loss)

    return TrainingLoop(LoopSettings(**{"steps": 10, "log_interval": 4, **settings}), steps,
                        optimizer, lambda step: 0.1 * (step + 1),
                        lambda: float(next(evaluations)), read_loss=read,
                        checkpointer=checkpoints, log=log)


def test_the_loop_logs_evaluates_and_checkpoints_at_its_intervals() -> None:
    steps, checkpoints, reads = _Steps(), _Checkpoints(), []
    loop = _loop(steps, checkpoints, reads=reads, eval_interval=5, checkpoint_interval=3)
    result = loop.run(0)
    assert steps.calls == list(range(10))
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)  # lr_at(9)
    logged = [h["step"] for h in result.history if "loss" in h]
    assert logged == [1, 4, 8, 10]  # the first step, every 4th, the last
    assert len(reads) == 4  # the loss is read on log steps only
    assert [h["step"] for h in result.history if "val_loss" in h] == [5]  # not the last's
    assert checkpoints.saved == [3, 6, 9]
    assert result.tokens == 100 and len(result.step_times) == 10 and len(result.recent) == 10
    record = next(h for h in result.history if h.get("step") == 4)
    assert record["lr"] == pytest.approx(0.4) and record["syncs_fwd"] == 2
    assert record["tokens_per_sec"] > 0 and record["loss"] == pytest.approx(0.25)
    final = loop.finish()
    assert final.history[-1]["final"] is True and final.val_loss == 1.0
    assert checkpoints.saved[-1] == 10 and final.checkpoint == "ckpt/10"


def test_a_loss_that_is_not_finite_stops_the_loop_where_it_is_read() -> None:
    """NaN at step index 5 (step 6, not a log step) is found at step 8, the next log step:
    the loss stays on the device in between."""
    steps = _Steps({5: math.nan, 6: math.nan, 7: math.nan})
    loop = _loop(steps)
    with pytest.raises(TrainingDiverged, match="training loss became nan at step 8") as info:
        loop.run(0)
    assert info.value.step == 8 and steps.calls == list(range(8))
    assert isinstance(info.value, FloatingPointError)


def test_resume_forgets_the_logged_steps_after_the_checkpoint(tmp_path) -> None:
    path = tmp_path / "log.jsonl"
    log = RunLog(path, quiet=True)
    first = _loop(_Steps(), log=log, log_interval=1)
    first.run(0)
    log.close()
    log = RunLog(path, quiet=True)
    loop = _loop(_Steps(), _Checkpoints(resume_at=6), log=log, log_interval=1)
    start = loop.resume()
    assert start == 6
    result = loop.run(start)
    assert [h["step"] for h in result.history] == [7, 8, 9, 10]
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    resume = next(r for r in records if r.get("event") == "resume")
    assert resume["tag"] == "global_step6" and resume["dropped_records"] == 4
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == list(range(1, 11))  # each step once


# -- the DeepSpeed parts, with a stand-in engine ---------------------------------------------
@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


class _Engine:
    """What the engine parts call: forward, backward, step, train / eval, spd_ext."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.weight = torch.nn.Parameter(torch.tensor(2.0))
        self.calls: list[str] = []
        self.spd_ext = SimpleNamespace(checks=0, islands_present=None,
                                       last={"syncs_forward": 3, "grad_norm": 0.5,
                                             "weights": (0.25, 0.75)})
        self.spd_ext.check = lambda: setattr(self.spd_ext, "checks", self.spd_ext.checks + 1)
        self.saved: list[str] = []

    def __call__(self, x, y):
        return None, (self.weight * x.float().mean() - y.float().mean()) ** 2

    def backward(self, loss) -> None:
        self.calls.append("backward")
        loss.backward()

    def step(self) -> None:
        self.calls.append("step")

    def train(self) -> None:
        self.calls.append("train")

    def eval(self) -> None:
        self.calls.append("eval")

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        assert save_latest is False  # `latest` is the checkpointer's alone
        self.saved.append(tag)


def _sampler(split: str, index: int):
    value = torch.full((2, 3), float(index % 5))
    return value, value + 1


def test_the_engine_step_accumulates_micro_batches_and_checks_where_asked(one_rank) -> None:
    from spd_ext.train.engine_step import EngineStep, mean_over_ranks

    engine = _Engine()
    step = EngineStep(engine, _sampler, grad_accum=3, tokens_per_step=18,
                      checks=lambda done: done % 2 == 0)
    out = step(0)
    assert engine.calls == ["backward", "step"] * 3 and engine.spd_ext.checks == 0
    losses = [float(engine(*_sampler("train", i))[1].detach()) for i in range(3)]
    assert float(out.loss) == pytest.approx(sum(losses) / 3)
    assert out.tokens == 18
    assert out.metrics == {"syncs_fwd": 3, "grad_norm": 0.5, "weights": [0.25, 0.75]}
    step(1)
    assert engine.spd_ext.checks == 1  # done = 2
    assert mean_over_ranks(out.loss) == pytest.approx(float(out.loss))


def test_the_engine_evaluation_is_the_mean_over_its_batches(one_rank) -> None:
    from spd_ext.train.engine_step import EngineEvaluation

    engine = _Engine()
    counter = SimpleNamespace(resets=0)
    counter.reset = lambda: setattr(counter, "resets", counter.resets + 1)
    evaluate = EngineEvaluation(engine, _sampler, eval_batches=4, data_rank=0, data_world=1,
                                tp=1, zero_stage=0, counter=counter)
    expected = sum(float(engine(*_sampler("val", -1 - i))[1].detach()) for i in range(4)) / 4
    assert evaluate() == pytest.approx(expected)
    assert engine.calls == ["eval", "train"] and counter.resets == 1


def test_the_engine_checkpointer_names_latest_only_after_the_marker(one_rank, tmp_path) -> None:
    from spd_ext.train.checkpoints import EngineCheckpointer
    from spd_ext.utils.files import WriteError

    checkpoint_dir = tmp_path / "checkpoints"
    plan = SimpleNamespace(checkpoint_dir=checkpoint_dir, decay_steps=10,
                           checkpoint_layout=lambda tokenizer: {"tp": 1})
    engine = _Engine()
    saver = EngineCheckpointer(engine, plan, tokenizer=None)
    assert saver.save(4) == str(checkpoint_dir / "global_step4")
    marker = json.loads((checkpoint_dir / "global_step4" / "train" / "complete.json").read_text())
    assert marker["step"] == 4 and marker["layout"] == {"tp": 1}
    assert (checkpoint_dir / "latest").read_text() == "global_step4"
    # the marker of the next checkpoint cannot be written: latest keeps naming the last
    (checkpoint_dir / "global_step8" / "train" / "complete.json").mkdir(parents=True)
    with pytest.raises(WriteError):
        saver.save(8)
    assert (checkpoint_dir / "latest").read_text() == "global_step4"
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    saver.save(6)
    torch.rand(3)
    engine.load_checkpoint = lambda load_dir, tag: (f"{load_dir}/{tag}", {})
    step, about = EngineCheckpointer(engine, plan, None, resume_tag="global_step6").load()
    assert (step, about) == (6, {"tag": "global_step6"})
    torch.testing.assert_close(torch.rand(3), expected)  # this rank's RNG as saved


def test_the_file_checkpointer_restores_weights_optimizer_step_and_rng(tmp_path) -> None:
    from spd_ext.train.checkpoints import FileCheckpointer
    from spd_ext.train.trainer_config import TrainConfig

    def parts():
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, optimizer = parts()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saver = FileCheckpointer(tmp_path / "ckpt.pt", model, optimizer, TrainConfig(),
                             extra={"note": "kept"})
    assert saver.save(7) == str(tmp_path / "ckpt.pt")
    after = torch.rand(2)
    fresh, fresh_optimizer = parts()
    torch.rand(5)
    loader = FileCheckpointer(tmp_path / "ckpt.pt", fresh, fresh_optimizer, TrainConfig())
    assert loader.load() == (7, {"path": str(tmp_path / "ckpt.pt")})
    torch.testing.assert_close(fresh.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    torch.testing.assert_close(torch.rand(2), after)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        FileCheckpointer(tmp_path / "none.pt", fresh, fresh_optimizer, TrainConfig()).load()
