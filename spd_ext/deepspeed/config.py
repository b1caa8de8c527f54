"""The ``"spd_ext"`` section of a ds_config: schema, defaults and validation.

    "spd_ext": {
      "signal_weighting": {"signal": "loss_ema", "map": "softmax", "temperature": 1.0,
                           "floor": 0.05, "warmup_steps": 20},
      "staleness": {"mode": "diloco:50", "islands": 2},
      "tensor_parallel": {"size": 2, "pattern": "spd*12"},
      "comm": {"backend": "spd_ext"},
      "metrics": {"jsonl": "out/spd_ext.jsonl", "interval": 1},
      "fault_tolerance": {"lighthouse": "host:29510", "island": "0", "min_islands": 1}
    }

Everything is checked here, before DeepSpeed sees the config and before any collective
runs, so a mistake is one ``SpdExtConfigError`` naming the key, the value and the fix on
every rank alike. ``validate_against_deepspeed`` checks the combinations with the rest of
the ds_config (ZeRO stage, precision) that cannot be sound.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from spd_ext.backend_names import SPD_EXT, renamed_backend_hint
from spd_ext.dp.signals import SIGNALS
from spd_ext.dp.weights import WEIGHT_MAPS, check_floor
from spd_ext.errors import UsageError
from spd_ext.parallel_dims import LayoutNames, ParallelDims
from spd_ext.staleness.modes import Mode, parse_mode
from spd_ext.tp.patterns import PatternError, parse_pattern
from spd_ext.utils.options import check_fields, closest, option

SECTION = "spd_ext"
#: the section's keys for the parallel sizes, as its messages name them
SECTION_NAMES = LayoutNames(tp="tensor_parallel.size", islands="staleness.islands")
ENGINE_MODES = ("ssgd", "delayed", "local_sgd", "diloco")  # the collective staleness modes
BACKENDS = ("deepspeed", SPD_EXT)


class SpdExtConfigError(UsageError):
    """The ``"spd_ext"`` section (or its combination with the ds_config) is unusable."""


def _closest(key: str, valid: list[str]) -> str:
    match = closest(key, valid)
    return f"; did you mean {match!r}?" if match else ""


def _check_keys(where: str, given: dict, valid: list[str]) -> None:
    if not isinstance(given, dict):
        raise SpdExtConfigError(f"{where} must be a JSON object, got {type(given).__name__} "
                                f"{given!r}")
    for key in given:
        if key not in valid:
            raise SpdExtConfigError(f"{where}: unknown key {key!r}{_closest(key, valid)} "
                                    f"(valid keys: {', '.join(valid)})")


@dataclass
class SignalWeightingConfig:
    signal: str = "loss_ema"
    map: str = "softmax"
    temperature: float = option(1.0, "softmax temperature", low=0.0, low_open=True)
    floor: float = option(0.05, "least weight of any rank", low=0.0, high=1.0)
    ema: float = option(0.0, "EMA smoothing of the weights", low=0.0, high=1.0,
                        high_open=True)
    warmup_steps: int = option(20, "steps of uniform weights first", low=0)
    signal_args: dict = field(default_factory=dict)

    def check(self, where: str) -> None:
        for name in ("signal", "map"):
            value = getattr(self, name)
            if not isinstance(value, str):
                choices = SIGNALS if name == "signal" else WEIGHT_MAPS
                raise SpdExtConfigError(f"{where}.{name} must be one name (a string): one of "
                                        f"{', '.join(choices)}; got {value!r}")
        if self.signal not in SIGNALS:
            raise SpdExtConfigError(f"{where}.signal: unknown signal {self.signal!r}"
                                    f"{_closest(str(self.signal), list(SIGNALS))}; use one of "
                                    f"{', '.join(SIGNALS)}")
        if self.map not in WEIGHT_MAPS:
            raise SpdExtConfigError(f"{where}.map: unknown weight map {self.map!r}; use one of "
                                    f"{', '.join(WEIGHT_MAPS)}")
        if self.map == "inverse" and SIGNALS[self.signal].higher_is_better:
            raise SpdExtConfigError(f"{where}: map 'inverse' needs a lower-is-better signal "
                                    f"(loss_ema), not {self.signal!r}; use map 'softmax'")
        check_fields(self, where, SpdExtConfigError)
        if not isinstance(self.signal_args, dict):
            raise SpdExtConfigError(f"{where}.signal_args must be an object, got "
                                    f"{self.signal_args!r}")
        try:
            SIGNALS[self.signal](**self.signal_args)
        except (TypeError, ValueError) as exc:
            raise SpdExtConfigError(f"{where}.signal_args {self.signal_args!r} do not fit "
                                    f"signal {self.signal!r}: {exc}") from None


@dataclass
class StalenessConfig:
    mode: str = "ssgd"
    islands: int = option(1, "DiLoCo islands", low=1)
    outer_lr: float = option(0.7, "DiLoCo's outer learning rate", low=0.0, low_open=True)
    outer_momentum: float = option(0.9, "DiLoCo's outer Nesterov momentum", low=0.0,
                                   high=1.0, high_open=True)

    def check(self, where: str) -> None:
        if not isinstance(self.mode, str):
            raise SpdExtConfigError(f"{where}.mode must be a string such as 'diloco:50', got "
                                    f"{self.mode!r}")
        try:
            mode = parse_mode(self.mode)
        except ValueError as exc:
            raise SpdExtConfigError(f"{where}.mode: {exc}") from None
        if mode.kind not in ENGINE_MODES:
            raise SpdExtConfigError(
                f"{where}.mode {self.mode!r} needs a parameter server, which does not run "
                f"inside a DeepSpeed engine; use one of ssgd, delayed:k, local_sgd:H, diloco:H "
                "(or spd_ext.staleness.parameter_server outside DeepSpeed)")
        check_fields(self, where, SpdExtConfigError)
        if self.islands > 1 and mode.kind != "diloco":
            raise SpdExtConfigError(
                f"{where}.islands = {self.islands} needs mode diloco:H (islands average their "
                f"pseudo-gradients every H steps), got mode {self.mode!r}; set islands to 1 or "
                "use diloco")

    @property
    def parsed(self) -> Mode:
        return parse_mode(self.mode)


@dataclass
class TensorParallelConfig:
    size: int = option(1, "tensor-parallel size", low=1)
    pattern: str | None = None

    def check(self, where: str) -> None:
        check_fields(self, where, SpdExtConfigError)
        if self.pattern is not None:
            if not isinstance(self.pattern, str):
                raise SpdExtConfigError(f"{where}.pattern must be a string such as 'spd*12', "
                                        f"got {self.pattern!r}")
            k = self.pattern.strip().partition("grouped:")[2]
            try:  # grouped:K needs a layer count: K layers make one group
                parse_pattern(self.pattern, int(k) if k.isdigit() and int(k) > 0 else None)
            except PatternError as exc:
                raise SpdExtConfigError(f"{where}.pattern: {exc}") from None


@dataclass
class CommConfig:
    backend: str = "deepspeed"
    bucket_mb: float = option(64.0, "MB per fused all-reduce", low=0.0, low_open=True)

    def check(self, where: str) -> None:
        if self.backend not in BACKENDS:
            raise SpdExtConfigError(f"{where}.backend: unknown backend {self.backend!r}"
                                    f"{renamed_backend_hint(self.backend)}; use 'deepspeed' "
                                    "(DeepSpeed's own reduction) or 'spd_ext' (spd_ext's "
                                    "fused all-reduce at ZeRO stage 0; the torch.distributed "
                                    "backend 'spd_ext' at every stage)")
        check_fields(self, where, SpdExtConfigError)


@dataclass
class MetricsConfig:
    jsonl: str | None = None
    interval: int = option(1, "steps between metrics records", low=1)

    def check(self, where: str) -> None:
        if self.jsonl is not None and not isinstance(self.jsonl, str):
            raise SpdExtConfigError(f"{where}.jsonl must be a file path, got {self.jsonl!r}")
        check_fields(self, where, SpdExtConfigError)


@dataclass
class FaultToleranceConfig:
    """This job is one DiLoCo island among others, each its own job; the outer step runs
    across the islands alive through torchft (spd_ext.deepspeed.fault_tolerance)."""

    lighthouse: str | None = None  # host:port of torchft's lighthouse (else TORCHFT_LIGHTHOUSE)
    island: str = ""  # this island's name among the others (else SPD_EXT_ISLAND, else "0")
    min_islands: int = option(1, "fewest islands an outer step may be taken with", low=1)
    islands: int | None = option(None, "islands expected at the start: a fresh run waits "
                                 "(up to quorum_timeout_s) until that many have joined", low=1)
    quorum_timeout_s: float = option(600.0, "longest wait for the other islands at an outer "
                                     "step (more than one inner phase)", low=0.0, low_open=True)
    timeout_s: float = option(60.0, "longest wait for one cross-island collective or state "
                              "transfer", low=0.0, low_open=True)
    retries: int = option(3, "outer steps voted down in a row before the island gives up",
                          low=0)
    island_weights: str = option(
        "uniform", "how the outer step weighs the islands' pseudo-gradients, renormalized "
        "over the islands present: uniform, or loss (exp(-L/temperature), L: the island's "
        "mean training loss since the last outer step)", choices=("uniform", "loss"))
    temperature: float = option(1.0, "island_weights loss: the softmax temperature",
                                low=0.0, low_open=True)

    def check(self, where: str) -> None:
        check_fields(self, where, SpdExtConfigError)
        if self.lighthouse is not None:
            lighthouse_address(self.lighthouse, f"{where}.lighthouse")
        if not isinstance(self.island, str):
            raise SpdExtConfigError(f"{where}.island must be a string such as \"0\", got "
                                    f"{self.island!r}")

    def resolved_lighthouse(self, where: str) -> str:
        """The lighthouse's URL, from the section or TORCHFT_LIGHTHOUSE."""
        import os

        given = self.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")
        if not given:
            raise SpdExtConfigError(f"{where}.lighthouse is not set (nor TORCHFT_LIGHTHOUSE): "
                                    "give the host:port of the torchft lighthouse the islands "
                                    "share (start one with `torchft_lighthouse --min_replicas "
                                    "1`)")
        return lighthouse_address(given, f"{where}.lighthouse")

    def resolved_island(self) -> str:
        import os

        return self.island or os.environ.get("SPD_EXT_ISLAND", "") or "0"


def lighthouse_address(text: Any, where: str) -> str:
    """``host:port`` or ``http://host:port`` as the URL torchft's clients take."""
    if not isinstance(text, str):
        raise SpdExtConfigError(f"{where} must be a string host:port, got {text!r}")
    bare = text.strip().removeprefix("http://")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in bare:
        raise SpdExtConfigError(f"{where} {text!r} is not host:port (e.g. localhost:29510)")
    return f"http://{bare}"


_SUBSECTIONS: dict[str, type] = {
    "signal_weighting": SignalWeightingConfig, "staleness": StalenessConfig,
    "tensor_parallel": TensorParallelConfig, "comm": CommConfig, "metrics": MetricsConfig,
    "fault_tolerance": FaultToleranceConfig,
}


@dataclass
class SpdExtConfig:
    """The parsed section; ``signal_weighting`` is None when weighting is off."""

    signal_weighting: SignalWeightingConfig | None = None
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    tensor_parallel: TensorParallelConfig = field(default_factory=TensorParallelConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fault_tolerance: FaultToleranceConfig | None = None

    @classmethod
    def from_dict(cls, section: dict | None) -> SpdExtConfig:
        section = {} if section is None else section
        _check_keys(f'"{SECTION}"', section, list(_SUBSECTIONS))
        parsed: dict[str, Any] = {}
        for key, value in section.items():
            where = f"{SECTION}.{key}"
            if value is None or value is False:
                if key not in ("signal_weighting", "fault_tolerance"):
                    raise SpdExtConfigError(f"{where} cannot be {value!r}; leave it out for "
                                            "the defaults")
                continue
            sub = _SUBSECTIONS[key]
            if value is True and key == "signal_weighting":
                value = {}
            _check_keys(where, value, [f.name for f in fields(sub)])
            obj = sub(**value)
            obj.check(where)
            parsed[key] = obj
        return cls(**parsed)

    @property
    def active(self) -> bool:
        """Whether anything differs from plain DeepSpeed."""
        return (self.signal_weighting is not None or self.staleness.parsed.kind != "ssgd"
                or self.tensor_parallel.size > 1 or self.comm.backend != "deepspeed"
                or self.fault_tolerance is not None)

    @property
    def island_diloco(self) -> bool:
        """DiLoCo across islands: several in this job, or this job one of several
        (fault_tolerance)."""
        return self.staleness.islands > 1 or self.fault_tolerance is not None


# How DeepSpeed's pydantic models read a boolean given as a string or number ("false" is
# False there): the section must read the ds_config as DeepSpeed will.
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def _ds_bool(where: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SpdExtConfigError(f"{where} must be true or false, got {value!r}")


def zero_stage(ds_config: dict) -> int:
    """The ds_config's ZeRO stage, read as DeepSpeed reads it (SpdExtConfigError if it is
    not one)."""
    zero = ds_config.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):  # DeepSpeed reads a bare true/false as stage 1/0
        return int(_ds_bool("zero_optimization", zero))
    stage = zero.get("stage", 0)
    if isinstance(stage, str) and stage.strip().isdigit():
        stage = int(stage)
    if isinstance(stage, float) and stage.is_integer():
        stage = int(stage)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise SpdExtConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def precision_enabled(ds_config: dict, key: str) -> bool:
    """Whether the ds_config's ``key`` section ("fp16", "bf16") is enabled, as DeepSpeed
    reads ``enabled`` (the string "false" is False)."""
    section = ds_config.get(key) or {}
    if not isinstance(section, dict):
        raise SpdExtConfigError(f"{key} must be an object such as {{\"enabled\": true}}, got "
                                f"{section!r}")
    return _ds_bool(f"{key}.enabled", section.get("enabled", False))


def validate_against_deepspeed(cfg: SpdExtConfig, ds_config: dict,
                               world_size: int | None) -> None:
    """Refuse combinations with the rest of the ds_config that cannot be sound."""
    stage = zero_stage(ds_config)
    mode = cfg.staleness.parsed
    if not cfg.active:
        return
    sw = cfg.signal_weighting
    ft = cfg.fault_tolerance
    if ft is not None:
        if mode.kind != "diloco":
            raise SpdExtConfigError(
                f"fault_tolerance with staleness.mode {mode}: fault-tolerant training drops and "
                "heals whole DiLoCo islands at their outer steps; set staleness.mode to "
                "diloco:H")
        if cfg.staleness.islands > 1:
            raise SpdExtConfigError(
                f"fault_tolerance with staleness.islands {cfg.staleness.islands}: with fault "
                "tolerance each job is one island (started on its own, dying and healing on "
                "its own); set staleness.islands to 1 and start one job per island")
        if "pipeline" in ds_config and isinstance(ds_config["pipeline"], dict) and \
                ds_config["pipeline"].get("stages", 1) not in (1, None):
            raise SpdExtConfigError(
                "fault_tolerance with a pipeline: not supported yet (the healing state of "
                "pipeline stages is not wired); train the islands without pipeline stages")
        if stage == 3:
            raise SpdExtConfigError(
                "fault_tolerance with zero_optimization.stage 3: not supported yet (a healing "
                "island's ZeRO-3 partitions are not transferred); use stage 1 or 2")
    # what besides signal weighting is on: each has its own limits below
    islands = cfg.island_diloco
    islands_label = ("fault_tolerance" if ft is not None else
                     f"staleness.islands {cfg.staleness.islands}")
    others = [what for what, on in (
        (islands_label, islands),
        (f"staleness.mode {mode}", mode.kind != "ssgd" and not islands),
        (f"tensor_parallel.size {cfg.tensor_parallel.size}", cfg.tensor_parallel.size > 1),
        # at ZeRO >= 1 the backend only carries DeepSpeed's own collectives
        ("comm.backend 'spd_ext'", cfg.comm.backend == SPD_EXT and stage == 0)) if on]
    if stage == 3 and cfg.tensor_parallel.size > 1:
        raise SpdExtConfigError(
            f"tensor_parallel.size {cfg.tensor_parallel.size} with zero_optimization.stage 3: "
            "ZeRO-3 partitions every parameter over the data-parallel ranks and gathers it "
            "inside each forward, while spd_ext's tensor-parallel blocks hold their shards "
            "whole and give replicated parameters partial gradients that must be summed over "
            "the tensor-parallel group before DeepSpeed's reduce-scatter; not supported: use "
            "stage 2 (tensor parallelism shards the weights already) or 0 / 1")
    if stage >= 2:
        # islands act on the fp32 partitions after the step; tensor parallelism sums its
        # partial gradients inside backward (engine.py; ZeRO-3 refused above)
        beyond = [what for what in others
                  if not what.startswith(("staleness.islands", "fault_tolerance",
                                          "tensor_parallel"))]
        if beyond:
            raise SpdExtConfigError(
                f"{beyond[0]} with zero_optimization.stage {stage}: ZeRO-{stage} reduces "
                "gradients bucket by bucket during backward (reduce-scatter hooks), so spd_ext "
                "cannot delay them, average replicas, or reduce them itself; not supported at "
                "this stage yet: use stage 0 or 1 (signal weighting and DiLoCo islands work "
                "at every stage)")
        if sw is not None and SIGNALS[sw.signal].observes_gradients:
            raise SpdExtConfigError(
                f"signal_weighting.signal {sw.signal} with zero_optimization.stage {stage}: "
                "the signal reads this rank's own gradient, which ZeRO-2/3 never hold whole "
                "(they reduce-scatter it during backward); use loss_ema at this stage, or "
                "stage 0 or 1")
    if precision_enabled(ds_config, "fp16") and others:
        raise SpdExtConfigError(
            f"fp16 with {others[0]}: dynamic loss scaling skips steps on overflow, which would "
            "desynchronize staleness schedules and tensor-parallel sums from the applied "
            "updates; use bf16 (\"bf16\": {\"enabled\": true}) or fp32 (signal weighting "
            "alone works with fp16: a skipped step leaves its signals untouched)")
    zero = ds_config.get("zero_optimization") or {}
    if stage == 1 and isinstance(zero, dict) and \
            _ds_bool("zero_optimization.overlap_comm", zero.get("overlap_comm", False)):
        raise SpdExtConfigError(
            "zero_optimization.overlap_comm with spd_ext at stage 1: spd_ext checks each "
            "rank's own gradient for NaN and inf (and shows it to the signals) at the "
            "accumulation boundary, which overlap_comm reduces earlier, during backward; set "
            "overlap_comm to false, or use stage 2")
    data_types = ds_config.get("data_types") or {}
    grad_accum = data_types.get("grad_accum_dtype") if isinstance(data_types, dict) else None
    if precision_enabled(ds_config, "bf16") and grad_accum not in (None, "bf16"):
        raise SpdExtConfigError(
            f"data_types.grad_accum_dtype {grad_accum!r} with bf16: DeepSpeed then routes "
            "gradients through its BF16_Optimizer, whose buffers spd_ext does not drive; leave "
            "grad_accum_dtype out")
    if mode.kind in ("delayed", "local_sgd") or (mode.kind == "diloco" and not islands):
        if stage != 0:
            raise SpdExtConfigError(
                f"staleness.mode {mode} with zero_optimization.stage {stage}: ZeRO-1 "
                "partitions the optimizer state and all-gathers the updated weights every "
                "step, so the replicas can never drift apart (and a delayed gradient would "
                "be reduce-scattered anyway); use stage 0, or diloco:H with islands > 1 "
                "(ZeRO-1 inside each island)")
        if precision_enabled(ds_config, "bf16"):
            raise SpdExtConfigError(
                f"staleness.mode {mode} with bf16 at stage 0: DeepSpeed keeps the fp32 master "
                "weights inside its optimizer wrapper, out of reach of the averaging; use fp32, "
                "or diloco:H with islands > 1 and ZeRO-1 (bf16 works there)")
    if sw is not None and sw.signal == "cosine_to_prev_global" and stage == 1:
        raise SpdExtConfigError(
            f"signal_weighting.signal cosine_to_prev_global with zero_optimization.stage "
            f"{stage}: the signal needs the whole reduced gradient, which ZeRO keeps "
            "partitioned across ranks; use loss_ema or grad_norm_stability, or stage 0")
    if mode.kind != "ssgd" and cfg.signal_weighting is not None:
        raise SpdExtConfigError(
            f"signal_weighting with staleness.mode {mode}: the weights are computed for the "
            "gradient of the current step, but this mode applies an older gradient or none; "
            "use one of the two")
    if mode.kind != "ssgd" and cfg.tensor_parallel.size > 1 and not islands:
        raise SpdExtConfigError(
            f"tensor_parallel.size {cfg.tensor_parallel.size} with staleness.mode {mode}: not "
            "supported together yet (the staleness modes average whole replicas); use one of "
            "the two, or DiLoCo islands (staleness.islands > 1), which work with tensor "
            "parallelism")
    if islands and stage == 0:
        raise SpdExtConfigError(
            f"{islands_label} needs zero_optimization.stage 1, 2 or "
            "3 (each island runs ZeRO on its own ranks; the outer step acts on the fp32 "
            "master partitions), got stage 0")
    offload = [key for key in ("offload_optimizer", "offload_param")
               if isinstance(zero, dict) and isinstance(zero.get(key), dict)
               and str(zero[key].get("device", "none")).lower() not in ("none", "")]
    if islands and offload:
        raise SpdExtConfigError(
            f"{islands_label} with zero_optimization.{offload[0]}: "
            "the outer step averages the fp32 master partitions across islands on the "
            "training device, and offloaded ones live in host memory or NVMe; remove "
            f"{offload[0]}")
    if cfg.comm.backend == SPD_EXT and mode.kind != "ssgd":
        raise SpdExtConfigError(
            f"comm.backend 'spd_ext' with staleness.mode {mode}: the staleness modes carry their "
            "own communication through spd_ext already; leave comm.backend out")
    if world_size is not None:
        try:
            dims = ParallelDims(world_size, cfg.tensor_parallel.size, cfg.staleness.islands,
                                SECTION_NAMES)
            if cfg.signal_weighting is not None:
                check_floor(cfg.signal_weighting.floor, dims.data_ranks,
                            "signal_weighting.floor", "data-parallel ranks")
        except UsageError as exc:
            raise SpdExtConfigError(str(exc)) from None


#: the ds_config "pipeline" entries a reduced-sync pipeline needs: its stage boundaries carry
#: each tensor-parallel rank's own residual stream, which DeepSpeed's partitioning of
#: activations over the tensor-parallel group (it assumes them replicated) would mix up
PIPELINE_DS_CONFIG = {"pipe_partitioned": False, "grad_partitioned": False}


def pipeline_ds_config(ds_config: dict) -> dict:
    """``ds_config`` with PIPELINE_DS_CONFIG's entries (refused where it sets others)."""
    pipeline = ds_config.get("pipeline") or {}
    if not isinstance(pipeline, dict):
        raise SpdExtConfigError(f"pipeline must be a mapping, got {pipeline!r}")
    pipeline = dict(pipeline)
    for key, value in PIPELINE_DS_CONFIG.items():
        if pipeline.get(key, value) != value:
            raise SpdExtConfigError(
                f"pipeline.{key} {pipeline[key]!r}: a reduced-sync pipeline passes each "
                "tensor-parallel rank's own residual stream to the next stage, which "
                f"DeepSpeed's partitioning would mix up; set it to {value} or leave it out")
        pipeline[key] = value
    return {**ds_config, "pipeline": pipeline}


def validate_pipeline(cfg: SpdExtConfig, ds_config: dict, model_tp: int,
                      model_islands: int = 1) -> None:
    """What the section cannot do on a pipeline whose stages are tensor-parallel over
    ``model_tp`` ranks, in ``model_islands`` islands (no collective)."""
    stage = zero_stage(ds_config)
    if stage >= 2:
        raise SpdExtConfigError(
            f"zero_optimization.stage {stage} with pipeline stages: DeepSpeed's pipeline engine "
            "runs ZeRO 0 and 1 only; use stage 1")
    if cfg.tensor_parallel.size not in (1, model_tp):
        raise SpdExtConfigError(
            f"tensor_parallel.size {cfg.tensor_parallel.size} on a pipeline whose stages are "
            f"tensor-parallel over {model_tp} rank(s) (the model's tp_size); leave "
            "tensor_parallel out of the section or make the sizes agree")
    if cfg.staleness.islands != model_islands:
        raise SpdExtConfigError(
            f"staleness.islands {cfg.staleness.islands} with a pipeline built for "
            f"{model_islands} island(s): the islands split the pipeline's ranks; pass "
            f"islands={cfg.staleness.islands} to pipeline_module (or make the section agree)")
    mode = cfg.staleness.parsed
    if mode.kind != "ssgd" and cfg.staleness.islands == 1:
        raise SpdExtConfigError(
            f"staleness.mode {mode} with pipeline stages: not supported (the staleness modes "
            "average or delay a whole replica's gradient, which a pipeline spreads over its "
            "stages); use DiLoCo islands of whole pipelines (staleness.islands > 1 with "
            "diloco:H, ZeRO-1) or synchronous training")
    sw = cfg.signal_weighting
    if sw is not None and SIGNALS[sw.signal].observes_gradients:
        raise SpdExtConfigError(
            f"signal_weighting.signal {sw.signal} with pipeline stages: the signal reads the "
            "replica's whole gradient, which a pipeline spreads over its stages while the "
            "weights are decided on the last; use loss_ema")


def check_metrics_path(cfg: SpdExtConfig) -> None:
    """The metrics file can be written: tried on every rank alike, before any engine
    exists (only the first rank writes it; permission bits alone say nothing to root)."""
    from pathlib import Path

    if cfg.metrics.jsonl is None:
        return
    path = Path(cfg.metrics.jsonl)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise SpdExtConfigError(f"metrics.jsonl {str(path)!r} cannot be written "
                                f"({exc.strerror or exc}); choose a writable path") from None
    if not existed:
        path.unlink(missing_ok=True)  # the first rank creates it when it writes


def split_config(ds_config: dict | str | None) -> tuple[dict | None, dict | None]:
    """``(ds_config without the section, the section)``; a path is read as JSON."""
    if ds_config is None:
        return None, None
    if isinstance(ds_config, str):
        import json
        from pathlib import Path

        path = Path(ds_config)
        if not path.is_file():
            raise SpdExtConfigError(f"DeepSpeed config {ds_config!r} is not a file; pass a "
                                    "path to a JSON ds_config or a dict")
        try:
            ds_config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SpdExtConfigError(f"DeepSpeed config {ds_config!r} is not valid JSON: line "
                                    f"{exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(ds_config, dict):
        raise SpdExtConfigError(f"DeepSpeed config must be a dict or a path, got "
                                f"{type(ds_config).__name__}")
    rest = {k: v for k, v in ds_config.items() if k != SECTION}
    return rest, ds_config.get(SECTION)
