"""`spd-ext train` run configuration: one YAML or JSON file, ``--set`` overrides, checks.

    model:     GPTConfig fields (pattern, n_layer, ...) or hf_path: a local Hugging Face GPT-2
    data:      corpus, tokenizer, non-IID sharding and corruption (spd_ext.data)
    training:  nanoGPT's knobs: steps, micro_batch, grad_accum, lr, min_lr, warmup_steps, ...
    parallel:  tp (tensor-parallel size), pp (pipeline stages), islands (DiLoCo islands);
               data parallel = the rest
    deepspeed: a ds_config JSON path (relative to this file) or an inline dict, with its
               "spd_ext" section (spd_ext.deepspeed.config)
    sample:    the text generated at the end; wandb: optional Weights & Biases logging

Every mistake is a ``ConfigError`` (a ValueError) naming the key, the value and the fix, raised
here before any rank is started: ``load_config`` checks keys and types (an unknown key names
the closest valid one), ``plan_run`` the values and their combinations for a world size,
``check_environment`` what lies outside the file (corpus, tokenizer, checkpoints).
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from spd_ext.backend_names import DIST_BACKENDS, SPD_EXT, TP_BACKENDS
from spd_ext.errors import UsageError
from spd_ext.parallel_dims import LayoutNames, ParallelDims
from spd_ext.tp.config import GPTConfig
from spd_ext.train.trainer_config import shared_options
from spd_ext.utils.options import Opt, check, closest, opt_from, parse_text

PADDED_GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64 (nanoGPT)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete.json"  # in <tag>/train/: written once every rank's files are on disk
_SHAPE_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")
#: the parallel sizes as a train config names them
LAYOUT_NAMES = LayoutNames(tp="parallel.tp", islands="parallel.islands", pp="parallel.pp",
                           launch=" (--nproc)")


class ConfigError(UsageError):
    """The run configuration (or what it points to) cannot be used; one line, with the fix."""


SCHEMA: dict[str, dict[str, Any]] = {
    "model": {
        # one declaration (kind, bounds, help) with the model's, another default
        "n_layer": opt_from(GPTConfig, "n_layer", 6),
        "n_head": opt_from(GPTConfig, "n_head", 6),
        "n_embd": opt_from(GPTConfig, "n_embd", 384),
        "block_size": opt_from(GPTConfig, "block_size", 256),
        "vocab_size": Opt(None, "int", "embedding rows (default: the tokenizer's vocabulary; "
                          f"{PADDED_GPT2_VOCAB} for gpt2)", nullable=True, low=1),
        "dropout": opt_from(GPTConfig, "dropout"),
        "bias": opt_from(GPTConfig, "bias", False),
        "pattern": Opt(None, "str", "block sync pattern such as 'tp*12', '[tp,spd]*6', "
                       "'grouped:4' (default tp*n_layer)", nullable=True),
        "hf_path": Opt(None, "str", "a local Hugging Face GPT-2 folder to start from (its "
                       "config.json sets the shape)", nullable=True),
    },
    "data": {
        "corpus": Opt("tinyshakespeare", "str", "a known corpus name or a UTF-8 text file"),
        "tokenizer": Opt("char", "str", "char or gpt2 (BPE)", choices=("char", "gpt2")),
        "val_fraction": Opt(0.1, "float", "the corpus tail held out for validation", low=0.0,
                            low_open=True, high=1.0, high_open=True),
        "sharding": Opt("iid", "str", "iid, or clean_vs_corrupt (corrupt_ranks see corrupted "
                        "batches)", choices=("iid", "clean_vs_corrupt")),
        "corrupt_ranks": Opt([], "ints", "data-parallel ranks whose batches are corrupted"),
        "corruption": {
            "kind": Opt("token_swap", "str", "how batches are corrupted",
                        choices=("token_swap", "shuffle", "label_noise", "duplicate")),
            "probability": Opt(0.3, "float", "corruption strength", low=0.0, high=1.0),
            "seed": Opt(0, "int", "seed of the corruption's randomness"),
            "window": Opt(8, "int", "shuffle: tokens per permuted window", low=2),
            "shift": Opt(False, "bool", "label_noise: shift targets instead of randomizing"),
        },
    },
    "training": {
        "steps": Opt(1000, "int", "optimizer steps to run (max_iters)", low=1),
        "micro_batch": Opt(16, "int", "sequences per rank per micro-batch", low=1),
        "grad_accum": Opt(1, "int", "micro-batches per optimizer step", low=1),
        **shared_options("lr", "min_lr", "warmup_steps"),
        "lr_decay_steps": Opt(None, "int", "steps of the cosine decay (default: steps)",
                              nullable=True, low=1),
        "schedule": Opt("cosine", "str", "cosine (after warm-up) or constant",
                        choices=("cosine", "constant")),
        # one declaration (default, bounds, help) with the Trainer's configuration
        **shared_options("weight_decay", "beta1", "beta2", "grad_clip", "eval_interval",
                         "eval_batches", "log_interval", "checkpoint_interval", "seed"),
        "out_dir": Opt(None, "str", "log, checkpoints, plot, sample (default: out/<config "
                       "name>)", nullable=True),
    },
    "parallel": {
        "tp": Opt(None, "int", "tensor-parallel size (default: the spd_ext section's "
                  "tensor_parallel.size, else 1)", nullable=True, low=1),
        "islands": Opt(None, "int", "DiLoCo islands (default: the spd_ext section's "
                       "staleness.islands, else 1)", nullable=True, low=1),
        "pp": Opt(1, "int", "pipeline stages: each holds a contiguous run of layers "
                  "(DeepSpeed's pipeline engine; training.grad_accum micro-batches per "
                  "step); world = pp x data parallel x tp", low=1),
        "pp_partition": Opt("parameters", "str", "how layers are split into stages: by "
                            "parameter count, equal layer counts, or equal block counts",
                            choices=("parameters", "uniform", "blocks")),
        "recompute": Opt(False, "bool", "activation checkpointing with pipeline stages: "
                         "every block's activations recomputed in backward"),
        "tp_backend": Opt(SPD_EXT, "str", "the tensor-parallel all-reduce: spd_ext "
                          "(spd_ext.comm: shared memory on CPU, CUDA IPC on GPU) or torch "
                          "(torch.distributed)", choices=TP_BACKENDS),
        "dist_backend": Opt("auto", "str", "the torch.distributed backend DeepSpeed's "
                            "collectives run on: auto (spd_ext on CPU, DeepSpeed's choice "
                            "on GPUs), spd_ext (shared memory, CPU ranks) or deepspeed (gloo "
                            "on CPU, NCCL on GPUs)", choices=DIST_BACKENDS),
        "rank_timeout": Opt(300.0, "float", "seconds a rank waits for the others (every "
                            "collective, checkpoint barrier and spd_ext all-reduce) before the "
                            "run stops, naming the rank that stopped answering", low=0.0,
                            low_open=True),
    },
    "fault_tolerance": {
        "enabled": Opt(False, "bool", "train the parallel.islands DiLoCo islands as separate "
                       "jobs that outlive each other's failures (torchft): a dead island is "
                       "dropped at the next outer step, restarted, and heals from a live one; "
                       "needs staleness.mode diloco:H"),
        "lighthouse": Opt(None, "str", "host:port of the torchft lighthouse the islands share "
                          "(default: spd-ext train serves one on this host)", nullable=True),
        "island": Opt(None, "int", "this job's island, 0..parallel.islands-1 (spd-ext train "
                      "sets it for the island jobs it starts; set it yourself for islands on "
                      "separate machines)", nullable=True, low=0),
        "min_islands": Opt(1, "int", "fewest islands an outer step may be taken with", low=1),
        "restarts": Opt(3, "int", "times spd-ext train restarts each island that died", low=0),
        "quorum_timeout_s": Opt(600.0, "float", "longest wait for the other islands at an "
                                "outer step (more than one inner phase)", low=0.0,
                                low_open=True),
        "island_weights": Opt("uniform", "str", "how the outer step weighs the islands, "
                              "renormalized over those present: uniform, or loss "
                              "(exp(-L/temperature) of each island's mean training loss "
                              "since the last outer step)", choices=("uniform", "loss")),
        "temperature": Opt(1.0, "float", "island_weights loss: the softmax temperature",
                           low=0.0, low_open=True),
        "kill_every_s": Opt(None, "float", "fault injection: spd-ext train kills one island "
                            "(SIGKILL, in turn) every this many seconds", nullable=True,
                            low=0.0, low_open=True),
        "kill_at_step": Opt(None, "int", "fault injection: island kill_island kills itself "
                            "(SIGKILL of its first rank) as it starts this step, once",
                            nullable=True, low=0),
        "kill_island": Opt(0, "int", "the island kill_at_step kills", low=0),
    },
    "deepspeed": Opt({"zero_optimization": {"stage": 0}}, "object",
                     "a ds_config JSON path (relative to the config file) or an inline dict"),
    "sample": {
        "tokens": Opt(200, "int", "tokens generated at the end (0: none)", low=0),
        "temperature": Opt(0.8, "float", "sampling temperature (0: greedy)", low=0.0),
        "top_k": Opt(200, "int", "sample among the k likeliest tokens", nullable=True, low=1),
        "prompt": Opt("\n", "str", "text the sample continues"),
    },
    "wandb": {
        "project": Opt(None, "str", "Weights & Biases project (off when unset or "
                       "WANDB_MODE=disabled)", nullable=True),
        "name": Opt(None, "str", "W&B run name (default: the out_dir name)", nullable=True),
    },
}

# ds_config keys the training section decides; a ds_config may repeat them only with the
# same value ("auto" too).
_OPTIMIZER_KEYS = ("optimizer", "scheduler")


@dataclass
class RunConfig:
    """A loaded configuration: ``values`` (nested dicts, every key present) and where it
    came from. Sections read as attributes: ``cfg.training.steps``."""

    values: dict
    source: Path | None = None
    explicit: set[str] = field(default_factory=set)  # dotted keys given in the file or --set

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return _namespace(values[name])
        raise AttributeError(name)

    @property
    def name(self) -> str:
        return self.source.stem if self.source else "run"

    @property
    def out_dir(self) -> Path:
        given = self.values["training"]["out_dir"]
        return Path(given) if given else Path("out") / self.name

    def to_dict(self) -> dict:
        return copy.deepcopy(self.values)


def _namespace(value: Any) -> Any:
    if isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() for k in value):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


# -- reading -----------------------------------------------------------------------------
def read_file(path: Path) -> dict:
    """A YAML (.yaml/.yml) or JSON file as a dict; errors name the file and the line."""
    if not path.is_file():
        hint = (" (it is a folder)" if path.is_dir() else
                "; pass a YAML or JSON run config such as configs/train/quickstart.yaml")
        raise ConfigError(f"config {path} is not a file{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"reading {path} needs PyYAML (pip install pyyaml); or write the "
                              "config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML:{where}: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: line {exc.lineno} column "
                              f"{exc.colno}: {exc.msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a mapping of sections "
                          f"({', '.join(SCHEMA)})")
    return data


def _all_keys(schema: dict = SCHEMA, prefix: str = "") -> list[str]:
    keys = []
    for key, spec in schema.items():
        keys.append(prefix + key)
        if isinstance(spec, dict):
            keys += _all_keys(spec, f"{prefix}{key}.")
    return keys


# nanoGPT's and DeepSpeed's names for keys that are called differently here
ALIASES = {
    "max_iters": "training.steps", "batch_size": "training.micro_batch",
    "learning_rate": "training.lr", "lr_decay_iters": "training.lr_decay_steps",
    "warmup_iters": "training.warmup_steps", "eval_iters": "training.eval_batches",
    "gradient_accumulation_steps": "training.grad_accum", "decay_lr": "training.schedule",
    "train_micro_batch_size_per_gpu": "training.micro_batch", "tp_size": "parallel.tp",
    "tensor_parallel": "parallel.tp", "dataset": "data.corpus", "init_from": "model.hf_path",
    "gradient_clipping": "training.grad_clip", "out": "training.out_dir",
}


def _unknown(dotted: str, valid: list[str], where: str) -> ConfigError:
    leaf = dotted.rsplit(".", 1)[-1]
    prefix = dotted[:-len(leaf)]
    match = closest(leaf, valid)
    hint = f"; did you mean {prefix + match!r}?" if match else ""
    if leaf in ALIASES:
        hint = f"; did you mean {ALIASES[leaf]!r}?"
    elif leaf in ("dp", "data_parallel"):
        hint = ("; the data-parallel size is not set: it is what remains, world size / "
                "parallel.tp")
    elif not match:  # a key put in the wrong section: look everywhere
        anywhere = closest(dotted, _all_keys()) or next(
            (k for k in _all_keys() if k.rsplit(".", 1)[-1] == leaf), None)
        hint = f"; did you mean {anywhere!r}?" if anywhere else ""
    return ConfigError(f"{where}: unknown key {dotted!r}{hint} (valid keys here: "
                       f"{', '.join(valid)})")


def _check_value(dotted: str, value: Any, opt: Opt, where: str) -> Any:
    return check(f"{where}: {dotted}", value, opt, ConfigError)


def _defaults(schema: dict = SCHEMA) -> dict:
    return {k: (_defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default))
            for k, v in schema.items()}


def _merge(into: dict, given: dict, schema: dict, prefix: str, where: str,
           explicit: set[str]) -> None:
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a mapping of "
                          f"keys ({', '.join(schema)}), got {given!r}")
    for key, value in given.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            raise _unknown(str(dotted), list(schema), where)
        spec = schema[key]
        if isinstance(spec, dict):
            _merge(into[key], value, spec, f"{dotted}.", where, explicit)
        elif spec.kind == "object":
            if not isinstance(value, (str, dict)):
                raise ConfigError(f"{where}: deepspeed must be a ds_config JSON path or an "
                                  f"inline mapping, got {value!r}")
            into[key] = copy.deepcopy(value)
            explicit.add(dotted)
        else:
            into[key] = _check_value(dotted, value, spec, where)
            explicit.add(dotted)


def _resolve_deepspeed(value: str | dict, base: Path, where: str) -> dict:
    """A ds_config path (relative to ``base``, else the working directory) as a dict."""
    if isinstance(value, dict):
        return value
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [base / path, Path.cwd() / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        looked = " or ".join(str(p) for p in dict.fromkeys(candidates))
        raise ConfigError(f"{where}: deepspeed {value!r} is not a file (looked for {looked}); "
                          "give a ds_config JSON such as configs/ds/zero1_fp32.json")
    try:
        data = json.loads(found.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ds_config {found} is not valid JSON: line {exc.lineno} column "
                          f"{exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"ds_config {found} holds a {type(data).__name__}, not a JSON object")
    return data


def _parse_text(text: str) -> Any:
    """A --set value without a schema (inside the ds_config): JSON / YAML scalars, lists and
    mappings; numbers such as 1e-3 as numbers; anything else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        import yaml

        value = yaml.safe_load(text)
    except Exception:  # PyYAML missing or the text is not YAML: keep the string
        value = text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse_set_value(text: str, opt: Opt, dotted: str) -> Any:
    return parse_text(f"--set {dotted}", text, opt, ConfigError)


def _apply_set(cfg: RunConfig, item: str) -> None:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE; write e.g. --set training.steps=100")
    parts = key.split(".")
    if parts[0] == "deepspeed":
        if len(parts) == 1:
            value = _parse_text(text) if text.strip().startswith("{") else text
            cfg.values["deepspeed"] = _resolve_deepspeed(value, Path.cwd(), "--set")
        else:
            node = cfg.values["deepspeed"]
            for part in parts[1:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {key}: deepspeed.{part} is {child!r}, not a "
                                      "mapping")
                node = child
            value = _parse_text(text)
            old = node.get(parts[-1])
            if old is not None and value is not None and not _same_kind(old, value):
                raise ConfigError(f"--set {key}={text}: the ds_config has {old!r} "
                                  f"({type(old).__name__}) there, got {value!r} "
                                  f"({type(value).__name__})")
            node[parts[-1]] = value
        cfg.explicit.add(key)
        return
    schema: Any = SCHEMA
    for i, part in enumerate(parts):
        if not isinstance(schema, dict) or part not in schema:
            valid = list(schema) if isinstance(schema, dict) else []
            raise _unknown(".".join(parts[:i + 1]), valid, "--set")
        schema = schema[part]
    if isinstance(schema, dict):
        raise ConfigError(f"--set {key}: {key} is a section; set one of its keys, e.g. "
                          f"{key}.{next(iter(schema))}=...")
    node = cfg.values
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = _parse_set_value(text, schema, key)
    cfg.explicit.add(key)


def _same_kind(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return True
    return type(old) is type(new)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()
                ) -> RunConfig:
    """The file (or the defaults, with no path) with ``overrides`` ("a.b=value") applied;
    keys and types are checked (see ``plan_run`` for the values' combinations)."""
    values = _defaults()
    cfg = RunConfig(values=values)
    base = Path.cwd()
    if path is not None:
        source = Path(path)
        data = read_file(source)
        cfg.source, base = source, source.resolve().parent
        _merge(values, data, SCHEMA, "", str(source), cfg.explicit)
    values["deepspeed"] = copy.deepcopy(_resolve_deepspeed(
        values["deepspeed"], base, str(cfg.source or "config")))
    for item in overrides:
        _apply_set(cfg, item)
    return cfg


# -- the run plan: every value checked against every other, for a world size -------------
@dataclass
class RunPlan:
    cfg: RunConfig
    dims: ParallelDims  # the layout: world = islands x pp x data parallel x parallel.tp
    ds_config: dict  # what spd_ext.deepspeed.initialize gets (with the "spd_ext" section)
    model: dict  # GPTConfig fields (vocab_size None: the tokenizer's)
    #: fault_tolerance: this job's island (None: the plan of all of them, which spd-ext
    #: train splits into island jobs) and how many islands there are
    island: int | None = None
    island_count: int = 1

    @property
    def fault_tolerant(self) -> bool:
        return bool(self.cfg.values["fault_tolerance"]["enabled"])

    @property
    def island_world(self) -> int:
        """Ranks per island job (fault_tolerance)."""
        return self.world_size // self.island_count if self.island is None else self.world_size

    def sampler_rank(self, data_rank: int) -> int:
        """A data rank among every island's (each island job counts its own from 0)."""
        return data_rank if self.island is None else self.island * self.data_world + data_rank

    @property
    def sampler_world(self) -> int:
        return self.data_world * (self.island_count if self.island is not None else 1)

    @property
    def world_size(self) -> int:
        return self.dims.world

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def islands(self) -> int:
        return self.dims.islands

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def data_world(self) -> int:
        """Data-parallel replicas that see distinct batches (every tp group, or pipeline of
        them, is one)."""
        return self.dims.data_ranks

    @property
    def out_dir(self) -> Path:
        return self.cfg.out_dir

    @property
    def checkpoint_dir(self) -> Path:
        return self.cfg.out_dir / CHECKPOINTS

    @property
    def bf16(self) -> bool:
        from spd_ext.deepspeed.config import precision_enabled

        return precision_enabled(self.ds_config, "bf16")

    @property
    def decay_steps(self) -> int:
        """The steps the cosine decay spans (training.lr_decay_steps, else training.steps)."""
        t = self.cfg.values["training"]
        return int(t["lr_decay_steps"] or t["steps"])

    @property
    def dist_backend(self) -> str:
        """``parallel.dist_backend`` as chosen ("auto", "spd_ext" or "deepspeed")."""
        return str(self.cfg.values["parallel"]["dist_backend"])

    @property
    def rank_timeout(self) -> float:
        return float(self.cfg.values["parallel"]["rank_timeout"])

    @property
    def zero_stage(self) -> int:
        from spd_ext.deepspeed.config import zero_stage

        return zero_stage(self.ds_config)

    def checkpoint_layout(self, tokenizer: Any) -> dict[str, Any]:
        """What a checkpoint's files depend on, by setting name: a resume must match it.
        ``tokenizer`` is the corpus's: the vocabulary and what each id means."""
        from spd_ext.data.tokenizers import tokenizer_identity

        layout: dict[str, Any] = {"--nproc": self.world_size, "parallel.tp": self.tp,
                                  "parallel.islands": self.islands, "parallel.pp": self.pp,
                                  "deepspeed.zero_optimization.stage": self.zero_stage,
                                  "bf16": self.bf16}
        for key in (*_SHAPE_KEYS, "pattern"):
            layout[f"model.{key}"] = self.model.get(key)
        if "vocab_size" in self.model and self.model["vocab_size"] is None:
            layout["model.vocab_size"] = tokenizer.vocab_size  # null: the tokenizer's
        # what the engine's spd_ext state in the checkpoint holds (weights' signals, the
        # staleness strategy's buffers): a resume without them cannot load it
        from spd_ext.deepspeed.config import SECTION, SpdExtConfig

        section = SpdExtConfig.from_dict(self.ds_config.get(SECTION))
        layout[f"deepspeed.{SECTION}.signal_weighting"] = \
            "on" if section.signal_weighting is not None else "off"
        layout[f"deepspeed.{SECTION}.staleness.mode"] = section.staleness.mode
        layout["data.tokenizer"] = tokenizer_identity(tokenizer)
        return layout


def _fail(message: str) -> ConfigError:
    return ConfigError(message)


def _owned(ds: dict, key: str, value: Any, setting: str) -> None:
    """A ds_config key the train config decides: absent, "auto" or equal is fine."""
    given = ds.get(key, "auto")
    if given != "auto" and given != value:
        raise _fail(f"deepspeed.{key} is {given!r} but the train config makes it {value!r} "
                    f"({setting}); remove {key} from the ds_config and set {setting.split(' ')[0]}")
    ds[key] = value


def plan_run(cfg: RunConfig, world_size: int) -> RunPlan:
    """Check every value and combination for ``world_size`` ranks (no files but the config,
    no collective); the ds_config DeepSpeed will get."""
    if world_size < 1:
        raise _fail(f"world size must be at least 1, got {world_size}")
    ft = cfg.values["fault_tolerance"]
    if ft["enabled"] and ft["island"] is not None:
        return plan_island(cfg, world_size)
    t = cfg.values["training"]
    if t["min_lr"] > t["lr"]:
        raise _fail(f"training.min_lr {t['min_lr']:g} is above training.lr {t['lr']:g}; set "
                    "min_lr <= lr (nanoGPT: lr / 10)")
    ds, dims, spd_cfg = _plan_deepspeed(cfg, world_size)
    island, island_count = _plan_islands(cfg, ds, dims)
    model = _plan_model(cfg, dims.tp, spd_cfg.tensor_parallel.pattern)
    if dims.pp > 1:
        n_layer = model.get("n_layer")
        if n_layer is not None and dims.pp > n_layer + 4:
            raise _fail(f"parallel.pp {dims.pp} is more stages than the model's {n_layer + 4} "
                        f"layers (embeddings, {n_layer} blocks, final LayerNorm, head); use at "
                        f"most {n_layer + 4}")
    _check_data_and_sample(cfg, dims.data_ranks * (island_count if island is not None else 1))
    return RunPlan(cfg=cfg, dims=dims, ds_config=ds, model=model, island=island,
                   island_count=island_count)


def _plan_islands(cfg: RunConfig, ds: dict, dims: ParallelDims) -> tuple[int | None, int]:
    """fault_tolerance: (this job's island or None, the island count). An island job (its
    island set) is one island of ``parallel.islands``: its "spd_ext" section gets
    ``fault_tolerance`` and loses ``staleness.islands``."""

    ft = cfg.values["fault_tolerance"]
    if not ft["enabled"]:
        given = [k for k in ("lighthouse", "island", "kill_every_s", "kill_at_step")
                 if ft[k] is not None]
        if given:
            raise _fail(f"fault_tolerance.{given[0]} is set but fault_tolerance.enabled is "
                        "false; set fault_tolerance.enabled=true or remove it")
        return None, dims.islands
    if ft["lighthouse"] is not None:
        from spd_ext.deepspeed.config import SpdExtConfigError, lighthouse_address

        try:
            lighthouse_address(ft["lighthouse"], "fault_tolerance.lighthouse")
        except SpdExtConfigError as exc:
            raise _fail(str(exc)) from None
    if ft["kill_island"] >= dims.islands:
        raise _fail(f"fault_tolerance.kill_island {ft['kill_island']} is not one of the "
                    f"{dims.islands} parallel.islands (0..{dims.islands - 1})")
    if ft["min_islands"] > dims.islands:
        raise _fail(f"fault_tolerance.min_islands {ft['min_islands']} is more than the "
                    f"{dims.islands} parallel.islands; lower it or train more islands")
    if dims.pp > 1:
        raise _fail("fault_tolerance with parallel.pp > 1: not supported yet (the healing "
                    "state of pipeline stages is not wired); train the islands without "
                    "pipeline stages")
    if dims.islands < 2:
        raise _fail("fault_tolerance.enabled needs parallel.islands of at least 2 (the "
                    "islands outlive each other), got 1; e.g. --set parallel.islands=3")
    return None, dims.islands


def plan_island(cfg: RunConfig, island_world: int) -> RunPlan:
    """The plan of one island job (fault_tolerance.island set) of ``island_world`` ranks:
    the whole run's plan checked first (parallel.islands x island_world ranks)."""
    ft, p = cfg.values["fault_tolerance"], cfg.values["parallel"]
    island = ft["island"]
    whole = copy.deepcopy(cfg)
    whole.values["fault_tolerance"]["island"] = None
    count = _agree("parallel.islands", p["islands"], "deepspeed.spd_ext.staleness.islands",
                   (cfg.values["deepspeed"].get("spd_ext") or {}).get("staleness", {}).get(
                       "islands") if isinstance(cfg.values["deepspeed"], dict) else None)
    if island >= count:
        raise _fail(f"fault_tolerance.island {island} is not one of the {count} "
                    f"parallel.islands (0..{count - 1})")
    plan_run(whole, island_world * count)  # every check of the whole run
    one = copy.deepcopy(cfg)
    one.values["parallel"]["islands"] = 1
    section = one.values["deepspeed"].setdefault("spd_ext", {})
    staleness = dict(section.get("staleness") or {})
    staleness.pop("islands", None)
    section["staleness"] = staleness
    section["fault_tolerance"] = {
        "lighthouse": ft["lighthouse"], "island": str(island), "islands": count,
        "min_islands": ft["min_islands"], "quorum_timeout_s": ft["quorum_timeout_s"],
        "island_weights": ft["island_weights"], "temperature": ft["temperature"]}
    one.values["fault_tolerance"] = {**ft, "enabled": False, "island": None,
                                     "lighthouse": None, "kill_every_s": None,
                                     "kill_at_step": None, "kill_island": 0}
    plan = plan_run(one, island_world)
    plan.cfg = cfg
    plan.island, plan.island_count = island, count
    return plan


def _plan_deepspeed(cfg: RunConfig, world_size: int) -> tuple[dict, ParallelDims, Any]:
    """The ds_config DeepSpeed gets (the train config's sizes and batch in it), the layout,
    and the checked "spd_ext" section."""
    from spd_ext.deepspeed.config import SECTION, SpdExtConfigError

    t = cfg.values["training"]
    ds = copy.deepcopy(cfg.values["deepspeed"])
    for key in _OPTIMIZER_KEYS:
        if key in ds:
            raise _fail(f"deepspeed.{key} is set, but the optimizer (AdamW) and its learning-"
                        "rate schedule come from the training section (lr, min_lr, "
                        f"warmup_steps, weight_decay, beta1, beta2); remove {key!r} from the "
                        "ds_config")
    for key, example in (("zero_optimization", "zero_optimization.stage=1"),
                         ("bf16", "bf16.enabled=true"), ("fp16", "fp16.enabled=true")):
        if key in ds and not isinstance(ds[key], dict):
            raise _fail(f"deepspeed.{key} must be a mapping, got {json.dumps(ds[key])}; e.g. --set "
                        f"deepspeed.{example}")
    section = ds.get(SECTION)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise _fail(f"deepspeed.{SECTION} must be a mapping, got {json.dumps(section)}")
    section = ds[SECTION] = copy.deepcopy(section)
    metrics = section.get("metrics", {})
    if isinstance(metrics, dict) and "interval" not in metrics:
        # the engine reads its values on the host only every log interval, as the loop does
        section["metrics"] = {**metrics, "interval": t["log_interval"]}
    dims = _plan_layout(cfg, section, world_size)
    ds_dp = dims.dp  # DeepSpeed's data-parallel group (in an island)
    micro, gas = t["micro_batch"], t["grad_accum"]
    _owned(ds, "train_micro_batch_size_per_gpu", micro, "training.micro_batch")
    _owned(ds, "gradient_accumulation_steps", gas, "training.grad_accum")
    _owned(ds, "train_batch_size", micro * gas * ds_dp,
           f"training.micro_batch x training.grad_accum x {ds_dp} data-parallel ranks")
    _owned(ds, "gradient_clipping", t["grad_clip"], "training.grad_clip")
    ds.setdefault("steps_per_print", 10**9)  # progress is spd-ext train's, not DeepSpeed's
    try:
        from spd_ext.deepspeed import parse_config
        from spd_ext.deepspeed.config import pipeline_ds_config, validate_pipeline

        _, spd_cfg = parse_config(ds, world_size=world_size)
        if dims.pp > 1:
            validate_pipeline(spd_cfg, ds, dims.tp, dims.islands)
            ds = pipeline_ds_config(ds)
    except SpdExtConfigError as exc:
        raise _fail(f"deepspeed: {exc}") from None
    _check_local_steps(t, spd_cfg.staleness.mode)
    return ds, dims, spd_cfg


def _plan_layout(cfg: RunConfig, section: dict, world_size: int) -> ParallelDims:
    """The sizes of the parallel section, agreed with the spd_ext section's (which gets
    them), as a checked layout."""
    from spd_ext.deepspeed.config import SECTION

    p = cfg.values["parallel"]
    tp_section = section.get("tensor_parallel") if isinstance(section.get("tensor_parallel"),
                                                               dict) else {}
    stale_section = section.get("staleness") if isinstance(section.get("staleness"),
                                                            dict) else {}
    tp = _agree("parallel.tp", p["tp"], f"deepspeed.{SECTION}.tensor_parallel.size",
                tp_section.get("size"))
    islands = _agree("parallel.islands", p["islands"], f"deepspeed.{SECTION}.staleness.islands",
                     stale_section.get("islands"))
    if tp > 1:
        section["tensor_parallel"] = {**tp_section, "size": tp}
    if islands > 1:
        section["staleness"] = {**stale_section, "islands": islands}
    try:
        return ParallelDims(world_size, tp, islands, LAYOUT_NAMES, pp=p["pp"])
    except UsageError as exc:
        raise _fail(str(exc)) from None


def _check_local_steps(t: dict, staleness_mode: str) -> None:
    """Between a local-SGD / DiLoCo mode's syncs each rank holds its own weights: the run
    must end, and evaluate, on a sync."""
    from spd_ext.staleness.modes import parse_mode

    mode = parse_mode(staleness_mode)
    if mode.kind not in ("local_sgd", "diloco"):
        return
    for key in ("steps", "eval_interval"):
        if t[key] % mode.value:
            raise _fail(
                f"training.{key} {t[key]} is not a multiple of staleness.mode {mode}'s "
                f"{mode.value} local steps: between syncs each rank holds its own weights, "
                "and evaluation and the exported model need the synchronized ones; make "
                f"it a multiple of {mode.value}")


def _plan_model(cfg: RunConfig, tp: int, pattern_in_section: str | None) -> dict:
    """The GPTConfig fields of the model (checked), or for a Hugging Face start what the
    config may change of it."""
    from spd_ext.deepspeed.config import SECTION
    from spd_ext.tp.patterns import PatternError

    m, d = cfg.values["model"], cfg.values["data"]
    explicit_shape = [k for k in _SHAPE_KEYS if f"model.{k}" in cfg.explicit]
    if m["hf_path"] is not None:
        if explicit_shape:
            raise _fail(f"model.{explicit_shape[0]} is set together with model.hf_path, whose "
                        "config.json decides the shape; remove it (keep pattern and dropout)")
        if d["tokenizer"] != "gpt2":
            raise _fail(f"model.hf_path loads GPT-2 weights, which need data.tokenizer gpt2 "
                        f"(got {d['tokenizer']!r})")
        return {"pattern": m["pattern"], "dropout": m["dropout"], "tp_size": tp}
    pattern = m["pattern"] or f"tp*{m['n_layer']}"
    vocab = m["vocab_size"]
    if vocab is None and d["tokenizer"] == "gpt2":
        vocab = PADDED_GPT2_VOCAB
    model = {k: m[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")}
    model.update(pattern=pattern, vocab_size=vocab, tp_size=tp)
    try:
        GPTConfig(**{**model, "vocab_size": vocab or 256})
    except (PatternError, ValueError) as exc:
        raise _fail(f"model: {exc}" + (" (tp_size is parallel.tp)" if "tp_size" in str(exc)
                                        else "")) from None
    if pattern_in_section is not None and pattern_in_section != pattern:
        raise _fail(f"deepspeed.{SECTION}.tensor_parallel.pattern {pattern_in_section!r} "
                    f"differs from model.pattern {pattern!r}; make them agree or leave the "
                    "section's pattern out")
    return model


def _check_data_and_sample(cfg: RunConfig, data_world: int) -> None:
    d, s = cfg.values["data"], cfg.values["sample"]
    if d["sharding"] == "clean_vs_corrupt":
        if not d["corrupt_ranks"]:
            raise _fail("data.sharding clean_vs_corrupt needs data.corrupt_ranks, e.g. [1]")
        bad = [r for r in d["corrupt_ranks"] if not 0 <= r < data_world]
        if bad:
            raise _fail(f"data.corrupt_ranks {bad} are outside the {data_world} data-parallel "
                        f"ranks of this world (0..{data_world - 1}); use ranks below "
                        f"{data_world} or launch more ranks")
    elif d["corrupt_ranks"]:
        raise _fail("data.corrupt_ranks is set but data.sharding is 'iid'; set data.sharding: "
                    "clean_vs_corrupt")
    if s["tokens"] and not s["prompt"]:
        raise _fail("sample.prompt is empty; give at least one character (default a newline)")
    if cfg.values["training"]["out_dir"] == "":
        raise _fail("training.out_dir is empty; give a folder or null for out/<config name>")


def _agree(key: str, value: int | None, section_key: str, section_value: Any) -> int:
    if value is not None and section_value is not None and value != section_value:
        raise _fail(f"{key} {value} differs from {section_key} {section_value!r}; set one of "
                    "them")
    chosen = value if value is not None else section_value
    if chosen is None:
        return 1
    if isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 1:
        raise _fail(f"{section_key} must be a positive integer, got {chosen!r}")
    return chosen


# -- outside the file: data, weights, checkpoints ----------------------------------------
_TAG = re.compile(r"^global_step(\d+)$")


def checkpoint_tags(checkpoint_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of the complete checkpoints in ``checkpoint_dir``, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for entry in checkpoint_dir.iterdir():
        match = _TAG.match(entry.name)
        if match and (entry / "train" / COMPLETE).is_file():
            found.append((int(match.group(1)), entry.name))
    return sorted(found)


def resume_tag(checkpoint_dir: Path) -> str | None:
    """The checkpoint to resume from: ``latest`` when it names a complete checkpoint, else
    the newest complete one (a save killed midway has no completion marker)."""
    complete = checkpoint_tags(checkpoint_dir)
    names = {tag for _, tag in complete}
    latest = checkpoint_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag in names:
            return tag
    return complete[-1][1] if complete else None


def _saved_info(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """A complete checkpoint's marker; a marker that is not a JSON object is refused (the
    layout check would pass it silently)."""
    marker = checkpoint_dir / tag / "train" / COMPLETE
    try:
        info = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        info = exc
    if not isinstance(info, dict):
        why = f"{type(info).__name__}: {info}" if isinstance(info, Exception) else \
            f"it holds {json.dumps(info)[:60]}, not an object"
        raise _fail(f"{marker} is corrupt ({why}), so checkpoint {tag} cannot be checked "
                    "against this config; move that checkpoint away to resume from an older "
                    "one, or start over with --overwrite")
    return info


def saved_layout(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """The layout a complete checkpoint was saved with ({} when its marker predates it)."""
    layout = _saved_info(checkpoint_dir, tag).get("layout", {})
    return layout if isinstance(layout, dict) else {}


def check_environment(plan: RunPlan, resume: bool = False, overwrite: bool = False,
                      dry_run: bool = False) -> dict:
    """What lies outside the config: DeepSpeed, the corpus and tokenizer (encoded into the
    token cache by the first process to get here; `spd-ext train` does it before starting the
    ranks, which then read the cache), the Hugging Face folder, the checkpoints.
    Returns facts for the run (vocab_size, the resume tag)."""
    import importlib.util

    facts: dict[str, Any] = {}
    if importlib.util.find_spec("deepspeed") is None:
        raise _fail("spd-ext train runs on DeepSpeed, which is not installed: pip install "
                    "'spd_ext[deepspeed]'")
    cfg, d, m = plan.cfg, plan.cfg.values["data"], plan.cfg.values["model"]
    from spd_ext.data import Corruption, ShardedSampler, TokenDataset

    try:
        data = TokenDataset(d["corpus"], d["tokenizer"], val_fraction=d["val_fraction"])
    except ImportError as exc:
        raise _fail(f"data.tokenizer {d['tokenizer']}: {exc}") from None
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(f"data.corpus: {exc}") from None
    facts["vocab_size"] = data.vocab_size
    sample = cfg.values["sample"]
    if sample["tokens"]:
        try:
            data.tokenizer.encode(sample["prompt"])
        except (ValueError, KeyError) as exc:
            raise _fail(f"sample.prompt {sample['prompt']!r} cannot be encoded by the "
                        f"{d['tokenizer']} tokenizer ({exc}); use text of the corpus") from None
    block = plan.model.get("block_size")
    if m["hf_path"] is not None:
        block = _check_hf(plan)
    elif plan.model["vocab_size"] is not None and plan.model["vocab_size"] < data.vocab_size:
        raise _fail(f"model.vocab_size {plan.model['vocab_size']} is below the {d['tokenizer']} "
                    f"tokenizer's {data.vocab_size} tokens; raise it or leave it null")
    t = cfg.values["training"]
    corruption = Corruption(**d["corruption"]) if d["sharding"] == "clean_vs_corrupt" else None
    try:
        for rank in range(plan.data_world):
            ShardedSampler(data, rank, plan.data_world, t["micro_batch"], block, t["seed"],
                           sharding=d["sharding"], corrupt_ranks=tuple(d["corrupt_ranks"]),
                           corruption=corruption)
        if len(data.split("val")) <= block + 1:
            raise UsageError(f"the validation split has {len(data.split('val'))} tokens, too "
                             f"few for block_size {block}; raise data.val_fraction or lower "
                             "model.block_size")
    except ValueError as exc:
        raise _fail(f"data: {exc}") from None
    ckpt = plan.checkpoint_dir
    tag = resume_tag(ckpt)
    if resume:
        if tag is None:
            raise _fail(f"--resume: no complete checkpoint in {ckpt}; run without --resume to "
                        "start training")
        saved, now = saved_layout(ckpt, tag), plan.checkpoint_layout(data.tokenizer)
        # a setting the checkpoint did not record (older files: null) is not compared
        differ = [k for k in now if saved.get(k) is not None and saved[k] != now[k]]
        if differ:
            was = ", ".join(f"{k} {saved[k]}" for k in differ)
            has = ", ".join(f"{k} {now[k]}" for k in differ)
            raise _fail(f"--resume: {ckpt / tag} was saved with {was} but this run has {has}; "
                        "resume with the saved settings, or start over in another "
                        "training.out_dir")
        from spd_ext.deepspeed.checkpoint import UnsafeCheckpointError, check_checkpoint_files

        try:  # before DeepSpeed, which would unpickle them with weights_only=False
            check_checkpoint_files(ckpt / tag)
        except UnsafeCheckpointError as exc:
            raise _fail(f"--resume: {exc}; resume only from checkpoints this program wrote") \
                from None
        step = int(_TAG.match(tag).group(1))
        if step >= t["steps"]:
            raise _fail(f"--resume: {ckpt / tag} is at step {step}: the run already finished "
                        f"its training.steps {t['steps']}; raise training.steps to continue")
        facts["resume_tag"] = tag
        saved_decay = _saved_info(ckpt, tag).get("decay_steps")
        if t["schedule"] == "cosine" and isinstance(saved_decay, int) \
                and saved_decay != plan.decay_steps:
            from spd_ext.train.trainer import scheduled_lr

            def lr(decay: int) -> float:
                return scheduled_lr(step, t["lr"], t["min_lr"], t["warmup_steps"], decay,
                                    t["schedule"])

            facts["resume_note"] = (
                f"the cosine decay now spans {plan.decay_steps} steps (the checkpoint's run: "
                f"{saved_decay}), so the learning rate at step {step} moves from "
                f"{lr(saved_decay):.3g} to {lr(plan.decay_steps):.3g}; set "
                f"training.lr_decay_steps={saved_decay} to keep the old schedule")
    elif tag is not None and not overwrite:
        if dry_run:  # a dry run writes nothing: say what the real run would need
            facts["checkpoints_note"] = (f"{ckpt} holds a run's checkpoints (latest {tag}): "
                                         "the run needs --resume or --overwrite")
            return facts
        raise _fail(f"{ckpt} already holds a run's checkpoints (latest {tag}); pass --resume "
                    "to continue it, --overwrite to start over, or set training.out_dir "
                    "elsewhere")
    return facts


def _check_hf(plan: RunPlan) -> int:
    """The Hugging Face folder's config against the pattern and the tp size; its block size."""
    import importlib.util

    from spd_ext.tp.patterns import PatternError, parse_pattern

    path = Path(plan.cfg.values["model"]["hf_path"]).expanduser()
    if importlib.util.find_spec("transformers") is None:
        raise _fail("model.hf_path needs transformers: pip install 'spd_ext[hf]'")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise _fail(f"model.hf_path {path} is not a Hugging Face model folder (no config.json); "
                    "download one with `huggingface-cli download gpt2` and pass its local path")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _fail(f"{config_file} is not valid JSON") from None
    n_layer, n_head = hf.get("n_layer"), hf.get("n_head")
    if not isinstance(n_layer, int) or not isinstance(n_head, int):
        raise _fail(f"{config_file} lacks n_layer / n_head: not a GPT-2 config")
    pattern = plan.model["pattern"] or f"tp*{n_layer}"
    try:
        parse_pattern(pattern, n_layer)
    except PatternError as exc:
        raise _fail(f"model.pattern: {exc}") from None
    if n_head % plan.tp or hf.get("n_embd", 0) % plan.tp:
        raise _fail(f"parallel.tp {plan.tp} does not divide {path}'s n_head {n_head} / n_embd "
                    f"{hf.get('n_embd')}")
    return int(hf.get("n_positions", 1024))


def describe(cfg: RunConfig) -> str:
    """The resolved configuration as YAML (JSON without PyYAML)."""
    try:
        import yaml

        return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=96)
    except ImportError:
        return json.dumps(cfg.to_dict(), indent=2)


def options_help() -> str:
    """Every section's keys with their defaults, for --help."""
    lines = []

    def walk(schema: dict, prefix: str) -> None:
        for key, spec in schema.items():
            if isinstance(spec, dict):
                walk(spec, f"{prefix}{key}.")
            else:
                default = json.dumps(spec.default)
                lines.append(f"  {prefix}{key} = {default}: {spec.help}")
    walk(SCHEMA, "")
    return "\n".join(lines)
