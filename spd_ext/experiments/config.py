"""What each experiment is told, declared as options (`spd-ext experiment ...` and
`spd-ext tp sensitivity` derive their flags, defaults and help from these).

Torch-free: building the command line loads none of the experiments. Each training
experiment holds the model's shape (a :class:`~spd_ext.tp.config.GPTConfig`) and the
training loop's configuration (a :class:`~spd_ext.train.trainer_config.TrainConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spd_ext.errors import UsageError
from spd_ext.tp.config import GPTConfig
from spd_ext.train.trainer_config import TrainConfig
from spd_ext.utils.options import option, option_from

_CORPUS = "corpus name or path"
_OUT = "results, logs, checkpoints, plot"
_FORCE = "rerun the selected runs even if they are already in OUT/results.json"

@dataclass
class ExperimentRun:
    """What every experiment is told: its corpus, its seed, where its results go and
    whether finished runs are rerun."""

    corpus: str = option("tinyshakespeare", _CORPUS, flag="--data")
    seed: int = option_from(TrainConfig, "seed", 1337)
    out_dir: str = option("out/experiment", _OUT, flag="--out")
    force: bool = option(False, _FORCE)


# -- sync sweep ----------------------------------------------------------------------------
# The GPT-2 124M patterns (configs/tp), scaled down by width only.
SYNC_SWEEP_PATTERNS = ("tp*12", "[tp,spd]*6", "[tp,spd,spd]*4", "spd*12", "[spd,parallel]*6",
                       "[spd,parallel,parallel]*4", "grouped:2", "grouped:3", "grouped:4",
                       "grouped:6")


@dataclass
class SyncSweepConfig(ExperimentRun):
    patterns: tuple[str, ...] = SYNC_SWEEP_PATTERNS
    # the shape every pattern trains (its pattern and vocabulary are set per run)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(
        n_layer=12, n_head=4, n_embd=64, block_size=128, tp_size=2, pattern="tp*12"))
    out_dir: str = option("out/sync-sweep", _OUT, flag="--out")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=800, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=50,
        eval_interval=200, eval_batches=20, log_interval=50))


# -- signal-aware data parallelism ---------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    name: str
    nproc: int
    corrupt_ranks: tuple[int, ...]
    aggregation: str  # uniform | weighted | trimmed_mean | median | centered_clipping


def default_runs() -> tuple[RunSpec, ...]:
    return (
        RunSpec("iid_uniform", 2, (), "uniform"),
        RunSpec("iid_weighted", 2, (), "weighted"),
        RunSpec("noniid_uniform", 2, (1,), "uniform"),
        RunSpec("noniid_weighted", 2, (1,), "weighted"),
        RunSpec("4rank_uniform", 4, (3,), "uniform"),
        RunSpec("4rank_weighted", 4, (3,), "weighted"),
        RunSpec("4rank_trimmed_mean", 4, (3,), "trimmed_mean"),
        RunSpec("4rank_median", 4, (3,), "median"),
        RunSpec("4rank_centered_clipping", 4, (3,), "centered_clipping"),
    )


@dataclass
class SADPTConfig(ExperimentRun):
    runs: tuple[RunSpec, ...] = field(default_factory=default_runs)
    corruption: str = option("token_swap", "how the corrupted shard is corrupted: token_swap, "
                             "shuffle, label_noise or duplicate")
    corruption_prob: float = option(0.3, "probability that each token (window, target) of "
                                    "the corrupted shard is changed", low=0.0, high=1.0)
    signal: str = option("loss_ema", "per-rank trust signal (spd_ext.dp.SIGNALS)")
    weighting: str = option("softmax", "signals -> weights (spd_ext.dp.WEIGHT_MAPS)")
    temperature: float = option(1.0, "softmax temperature", low=0.0, low_open=True)
    floor: float = option(0.05, "minimum weight of any rank (at most 1/ranks)", low=0.0,
                          high=1.0, high_open=True)
    weight_ema: float = option(0.0, "EMA smoothing of weights", low=0.0, high=1.0,
                               high_open=True)
    warmup_steps: int = option(20, "steps of uniform weights first", low=0, flag="--warmup")
    # the dense model every run trains (its vocabulary is the corpus's)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(
        n_layer=4, n_head=4, n_embd=96, block_size=64, pattern="tp*4"))
    out_dir: str = option("out/sadpt", _OUT, flag="--out")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=500, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=30,
        eval_interval=50, eval_batches=10, log_interval=50))

    def check(self) -> None:
        """The names and the floor against the largest run, before any rank starts (loads
        spd_ext.dp and spd_ext.data)."""
        from spd_ext.data import CORRUPTIONS
        from spd_ext.dp import SIGNALS, WEIGHT_MAPS
        from spd_ext.dp.weights import check_floor
        from spd_ext.utils.options import closest

        for flag, value, known in (("--corruption", self.corruption, CORRUPTIONS),
                                   ("--signal", self.signal, SIGNALS),
                                   ("--weighting", self.weighting, WEIGHT_MAPS)):
            if value not in known:
                match = closest(value, known)
                hint = f"; did you mean {match!r}?" if match else ""
                raise UsageError(f"{flag} {value!r} is not known{hint} (choose one of "
                                 f"{', '.join(sorted(known))})")
        check_floor(self.floor, max(r.nproc for r in self.runs), "--floor",
                    hint=", or fewer ranks with --runs")

    def select_runs(self, names: str) -> None:
        """Keep only the runs of the comma list ``names`` (in its order)."""
        wanted = [r.strip() for r in names.split(",") if r.strip()]
        known = {r.name: r for r in self.runs}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise UsageError(f"unknown run(s) {unknown}; choose from {', '.join(known)}")
        self.runs = tuple(known[w] for w in wanted)


# -- staleness -----------------------------------------------------------------------------
STALENESS_MODES = ("ssgd", "delayed:2", "local_sgd:8", "diloco:8", "ssp:2", "asgd", "syncps")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    steps: int
    optimizer: str  # sgd | adamw
    lr: float
    target: float  # loss counted as "reached"
    base_delay: float  # seconds of simulated compute per step
    eval_every: int  # steps


TASKS = {
    "xor": TaskSpec("xor", steps=1000, optimizer="sgd", lr=0.5, target=0.40, base_delay=0.01,
                    eval_every=20),
    "gpt": TaskSpec("gpt", steps=200, optimizer="adamw", lr=3e-3, target=2.6, base_delay=0.02,
                    eval_every=20),
}


@dataclass
class StalenessConfig(ExperimentRun):
    modes: tuple[str, ...] = STALENESS_MODES
    tasks: tuple[str, ...] = ("xor", "gpt")
    stragglers: tuple[bool, ...] = (False, True)
    nproc: int = option(4, "ranks (PS modes: 1 server + N-1 workers)", low=2)
    straggler_factor: float = option(5.0, "the slow rank's step delay, in multiples of the "
                                     "others'", low=1.0)
    straggler_every: int = option(10, "the slow rank is slow on every N-th step", low=1)
    out_dir: str = option("out/staleness", _OUT, flag="--out")
    task_overrides: dict = field(default_factory=dict)  # name -> {field: value}

    def task(self, name: str) -> TaskSpec:
        if name not in TASKS:
            raise UsageError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
        base = TASKS[name]
        return TaskSpec(**{**base.__dict__, **self.task_overrides.get(name, {})})


# -- per-block sync sensitivity ------------------------------------------------------------
@dataclass
class SensitivityConfig:
    checkpoint: str | None = option(None, "ckpt.pt written by an spd_ext experiment (tp*L run)")
    hf: str | None = option(None, "a local Hugging Face GPT-2 folder instead")
    corpus: str = option("tinyshakespeare", _CORPUS, flag="--data")
    tp_size: int = option(2, "emulated shards", low=1)
    eval_batches: int = option_from(TrainConfig, "eval_batches", 20)
    batch_size: int = option_from(TrainConfig, "batch_size", 16)
    block_size: int | None = None  # default: the model's
    seed: int = 0
