"""What each benchmark is told, declared as options (`spd-ext bench ...` derives its flags,
defaults and help from these), and the checks made before any rank starts.

Torch-free: building the command line loads none of the benchmarks.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar

from spd_ext.backend_names import TP_BACKENDS, renamed_backend_hint
from spd_ext.errors import UsageError
from spd_ext.tp.config import GPTConfig
from spd_ext.utils.options import option, option_from

_DTYPES = "comma list of fp32,bf16,fp16"
_SIZES = "bytes per tensor: LO..HI[:FACTOR] (default factor 4) or a comma list"
_REPEATS = "timed loops per point (median)"
_WARMUP = "untimed calls per point"
_TARGET_MS = "approximate duration of one timed loop"

# -- all-reduce, weighted reduce, quantization ---------------------------------------------
ALLREDUCE_IMPLS = ("gloo", "deepspeed", "spd_ext", "spd_ext-weighted", "spd_ext-registered",
                   "spd_ext-graph")
ALLREDUCE_CUDA_ONLY = ("spd_ext-registered", "spd_ext-graph")


@dataclass
class AllReduceConfig:
    nproc: int = option(2, "ranks to spawn", low=1)
    dtypes: str = option("fp32,bf16", _DTYPES, flag="--dtype")
    sizes: str = option("4K..64M", _SIZES)
    impls: str = option("gloo,deepspeed,spd_ext,spd_ext-weighted",
                        "comma list of gloo,deepspeed,spd_ext,spd_ext-weighted, and with "
                        "--device cuda spd_ext-registered (a registered buffer: no staging "
                        "copy) and spd_ext-graph (the same in a replayed CUDA graph: close to "
                        "kernel time)", flag="--impl")
    warmup: int = option(5, _WARMUP, low=0)
    repeats: int = option(7, _REPEATS, low=1)
    target_ms: float = option(20.0, _TARGET_MS, low=0.0, low_open=True)
    threads_per_rank: int | None = option(None, "torch/OpenMP threads per rank (default: "
                                          "cores // nproc)", low=1)
    bind_cores: bool = option(True, "pin each rank to its own cores (pinned when there are "
                              "enough)")
    device: str = option("cpu", "cpu, or cuda (every rank on GPU 0: the CUDA IPC path)",
                         choices=("cpu", "cuda"))
    gap_us: float = option(0.0, "busy compute before every call, as a model's forward has "
                           "between its all-reduces (the time shown is the call's alone; CPU "
                           "only)", low=0.0, high=1e6)
    timeout: float = 1800.0
    extra: dict = field(default_factory=dict)

    def impl_list(self) -> list[str]:
        names = [s.strip() for s in self.impls.split(",") if s.strip()]
        bad = [n for n in names if n not in ALLREDUCE_IMPLS]
        if bad or not names:
            raise UsageError(f"unknown impl(s) {bad}; choose from {', '.join(ALLREDUCE_IMPLS)}")
        return names


@dataclass
class ReduceConfig:
    inputs: str = option("2,4,8", "comma list of input counts")
    sizes: str = option("64K..64M", "bytes per input, as for allreduce")
    dtypes: str = option("fp32,bf16", _DTYPES, flag="--dtype")
    warmup: int = option(3, _WARMUP, low=0)
    repeats: int = option(7, _REPEATS, low=1)
    target_ms: float = option(50.0, _TARGET_MS, low=0.0, low_open=True)
    threads: int | None = option(None, "torch/OpenMP threads (default: torch's)", low=1)
    device: str = option("cpu", "cpu or cuda", choices=("cpu", "cuda"))

    def input_counts(self) -> list[int]:
        try:
            counts = [int(s) for s in self.inputs.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--inputs must be a comma list of integers, got "
                             f"{self.inputs!r}") from None
        if not counts or min(counts) < 1:
            raise UsageError(f"--inputs needs counts >= 1, got {self.inputs!r}")
        return counts


@dataclass
class QuantBenchConfig:
    sizes: str = option("64K..64M", "bytes per tensor, as for allreduce")
    dtypes: str = option("fp32,bf16", _DTYPES, flag="--dtype")
    block_size: int = option(256, "elements sharing one scale (quantization block)", low=1)
    device: str = option("cpu", "cpu or cuda", choices=("cpu", "cuda"))
    warmup: int = 3
    repeats: int = option(7, _REPEATS, low=1)
    target_ms: float = 50.0


# -- tensor-parallel step and generation -------------------------------------------------
def split_patterns(spec: str) -> list[str]:
    """``--patterns``: ';'-separated (patterns contain commas)."""
    return [p.strip() for p in spec.split(";") if p.strip()]


def parse_backends(spec: str) -> list[str]:
    """``--backends``: a comma list of the tensor-parallel all-reduce backends."""
    names = [b.strip() for b in spec.split(",") if b.strip()]
    bad = [b for b in names if b not in TP_BACKENDS]
    if bad or not names:
        hint = "".join(renamed_backend_hint(b) for b in bad)
        raise UsageError(f"unknown backend(s) {bad}{hint}; use torch (torch.distributed on "
                         "the process group's backend) and/or spd_ext (spd_ext.comm)")
    return names


_SHARED_PATTERNS = "tp*12;[tp,spd]*6;spd*12;[spd,parallel]*6;grouped:4"


@dataclass
class TensorParallelBenchConfig:
    """What the tensor-parallel benchmarks share: ranks, patterns, backends, model shape."""

    nproc: int = option(2, "ranks = tensor-parallel size", low=1)
    patterns: str = option(_SHARED_PATTERNS, "';'-separated sync patterns")
    backends: str = option("torch,spd_ext", "comma list of torch (torch.distributed) and "
                           "spd_ext (spd_ext.comm)")
    n_layer: int = option_from(GPTConfig, "n_layer", 12)
    n_head: int = option_from(GPTConfig, "n_head", 4)
    n_embd: int = option_from(GPTConfig, "n_embd", 64)

    def pattern_list(self) -> list[str]:
        return split_patterns(self.patterns)

    def backend_list(self) -> list[str]:
        return parse_backends(self.backends)


@dataclass
class TPBenchConfig(TensorParallelBenchConfig):
    patterns: str = option(_SHARED_PATTERNS + ";ladder*12", "';'-separated sync patterns")
    batch_size: int = option(8, "sequences per step", low=1)
    seq_len: int = option(64, "tokens per sequence", low=1)
    vocab_size: int = 65
    warmup: int = 3
    repeats: int = option(7, "timed loops per pattern (median)", low=1)
    target_ms: float = 200.0
    compile: bool = option(False, "also time each pattern under torch.compile(model, "
                           "fullgraph=True) (spd_ext's collectives are torch operators; "
                           "compiling takes a while)")

    def modes(self) -> list[str]:
        return ["eager", "compiled"] if self.compile else ["eager"]

    def check(self) -> None:
        self.backend_list()
        if self.nproc < 2:
            raise UsageError(f"--nproc must be at least 2, got {self.nproc}")
        for p in self.pattern_list():
            GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, pattern=p,
                      tp_size=self.nproc)


@dataclass
class GenerateBenchConfig(TensorParallelBenchConfig):
    patterns: str = option(_SHARED_PATTERNS + ";parallel*12", "';'-separated sync patterns")
    n_embd: int = option_from(GPTConfig, "n_embd", 128)
    batch_sizes: str = option("1,8", "comma list of sequences per batch")
    vocab_size: int = option_from(GPTConfig, "vocab_size", 50304,
                                  help="vocabulary size (GPT-2's padded vocabulary by default)")
    prompt_len: int = option(32, "prompt tokens (prefill)", low=1)
    new_tokens: int = option(64, "tokens decoded per repeat", low=1)
    repeats: int = option(5, "timed generations per point", low=1)
    layouts: str = option("tp", "comma list of tp (tensor parallel nproc, every pattern) and "
                          "pp (nproc pipeline stages of one rank each: the blocks split by "
                          "layers, the patterns' syncs gone)")

    def layout_list(self) -> list[str]:
        names = [x.strip() for x in self.layouts.split(",") if x.strip()]
        bad = [x for x in names if x not in ("tp", "pp")]
        if not names or bad:
            raise UsageError(f"--layouts must be a comma list of tp and pp, got "
                             f"{self.layouts!r}")
        return names

    def batch_list(self) -> list[int]:
        try:
            sizes = [int(b) for b in self.batch_sizes.split(",") if b.strip()]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise UsageError(f"--batch-sizes must be a comma list of integers >= 1, got "
                             f"{self.batch_sizes!r}")
        return sizes

    def check(self) -> None:
        self.backend_list()
        self.batch_list()
        if self.nproc < 2:
            raise UsageError(f"--nproc must be at least 2, got {self.nproc}")
        if "pp" in self.layout_list() and self.nproc > self.n_layer:
            raise UsageError(f"the pp layout needs a block per stage: --nproc {self.nproc} is "
                             f"more than --n-layer {self.n_layer}")
        for name, least in (("prompt_len", 1), ("new_tokens", 2), ("repeats", 1)):
            if getattr(self, name) < least:  # new tokens: the first is the prefill's
                raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got "
                                 f"{getattr(self, name)}")
        patterns = self.pattern_list()
        for p in patterns:
            self.model_config(p)
        twice = sorted({p for p in patterns if patterns.count(p) > 1})
        if twice:
            raise UsageError(f"--patterns names {', '.join(twice)} more than once; each "
                             "pattern is one row")

    def model_config(self, pattern: str, tp: int | None = None) -> GPTConfig:
        return GPTConfig(block_size=self.prompt_len + self.new_tokens,
                         vocab_size=self.vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=0.0, pattern=pattern,
                         tp_size=self.nproc if tp is None else tp)


# -- training steps: DeepSpeed engine, DDP hook -------------------------------------------
#: each DeepSpeed variant's "spd_ext" section
DEEPSPEED_VARIANTS = {
    "deepspeed": {},
    "deepspeed-weighted": {"signal_weighting": {"warmup_steps": 0}},
    "spd_ext": {"comm": {"backend": "spd_ext"}},
    "spd_ext-weighted": {"signal_weighting": {"warmup_steps": 0},
                         "comm": {"backend": "spd_ext"}},
}
DDP_HOOK_VARIANTS = ("default", "weighted", "weighted-sync")


@dataclass
class TrainingStepBenchConfig:
    """What the training-step benchmarks share: the GPT they time, the ranks, the
    variants and the step counts."""

    nproc: int = option(2, "data-parallel ranks", low=1)
    variants: str = option("", "comma list of variants (default: all)")
    n_layer: int = option_from(GPTConfig, "n_layer", 6)
    n_head: int = option_from(GPTConfig, "n_head", 6)
    n_embd: int = option_from(GPTConfig, "n_embd", 384)
    batch_size: int = option(4, "sequences per rank and step", low=1)
    seq_len: int = option(64, "tokens per sequence", low=1)
    vocab_size: int = 65
    warmup: int = option(3, "untimed steps per variant", low=0)
    steps: int = option(10, "timed steps per variant (median)", low=1)

    #: the variant names a benchmark knows (set by each subclass)
    KNOWN_VARIANTS: ClassVar[Collection[str]] = ()

    def variant_list(self) -> list[str]:
        names = [v.strip() for v in self.variants.split(",") if v.strip()] \
            or list(self.KNOWN_VARIANTS)
        bad = [v for v in names if v not in self.KNOWN_VARIANTS]
        if bad:
            raise UsageError(f"unknown variant(s) {bad}; use a comma list of "
                             f"{', '.join(self.KNOWN_VARIANTS)}")
        return names

    def check(self) -> None:
        self.variant_list()
        if self.nproc < 2:
            raise UsageError(f"--nproc must be at least 2, got {self.nproc}")
        for name in ("steps", "batch_size", "seq_len", "n_layer"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        self.gpt_config()  # raises on an impossible shape (heads not dividing the width)

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(block_size=self.seq_len, vocab_size=self.vocab_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         pattern=f"tp*{self.n_layer}", tp_size=1)

    def describe_ranks_and_model(self, rows: list[dict]) -> str:
        """"N CPU ranks of HOST (C cores); GPT L/d/h (P parameters, G MiB of gradients"
        (the caller closes the parenthesis)."""
        params = rows[0]["params"] if rows else 0
        mb = rows[0]["grad_bytes"] / 2**20 if rows else 0
        return (f"{self.nproc} CPU ranks of {platform.node()} ({os.cpu_count()} cores); GPT "
                f"{self.n_layer}L/{self.n_embd}d/{self.n_head}h ({params / 1e6:.1f}M "
                f"parameters, {mb:.1f} MiB of gradients")

    def describe_timing(self) -> str:
        return (f"batch {self.batch_size} x {self.seq_len} per rank; median of {self.steps} "
                f"steps after {self.warmup} (variants interleaved step by step; best: the "
                "fastest step), slowest rank")


#: the layouts `spd-ext bench layouts` times: every rank a replica, every rank a shard of
#: the blocks, every rank a stage
LAYOUTS = ("dp", "tp", "pp")


@dataclass
class LayoutBenchConfig(TrainingStepBenchConfig):
    nproc: int = option(2, "ranks: each layout's data-parallel, tensor-parallel or pipeline "
                        "size", low=1)
    variants: str = option(",".join(LAYOUTS), "comma list of layouts: dp (every rank a "
                           "replica), tp (tensor parallel nproc), pp (nproc pipeline stages)")
    micro_batches: int = option(4, "micro-batches per step of the tp and pp layouts (each "
                                "batch x nproc / micro-batches sequences)", low=1)
    pattern: str = option("", "the sync pattern of the tp and pp layouts (default tp*L)")

    KNOWN_VARIANTS: ClassVar[Collection[str]] = LAYOUTS

    def check(self) -> None:
        super().check()
        total = self.batch_size * self.nproc
        if self.micro_batches < 1 or total % self.micro_batches:
            raise UsageError(f"--micro-batches {self.micro_batches} does not divide the step's "
                             f"{total} sequences (--batch-size x --nproc); use a divisor")
        if "pp" in self.variant_list() and self.nproc > self.n_layer:
            raise UsageError(f"the pp layout needs a block per stage: --nproc {self.nproc} is "
                             f"more than --n-layer {self.n_layer}")
        self.layout_config(self.nproc)

    def layout_config(self, tp: int) -> GPTConfig:
        """The model of a layout (tensor-parallel ``tp``, the pattern of --pattern)."""
        fields = {**self.gpt_config().to_dict(), "tp_size": tp}
        if self.pattern:
            fields["pattern"] = self.pattern
        try:
            return GPTConfig(**fields)
        except UsageError as exc:
            raise UsageError(f"the model does not fit tensor parallel {tp}: {exc}") from None


@dataclass
class DeepSpeedBenchConfig(TrainingStepBenchConfig):
    variants: str = option("", "comma list of deepspeed, deepspeed-weighted, spd_ext, "
                           "spd_ext-weighted (default: every variant the stage allows)")
    stage: int = option(0, "ZeRO stage of the engines (the spd_ext variants need 0)",
                        low=0, high=3)

    KNOWN_VARIANTS: ClassVar[Collection[str]] = tuple(DEEPSPEED_VARIANTS)

    def variant_list(self) -> list[str]:
        if self.stage == 0 or self.variants.strip():
            names = super().variant_list()
        else:  # spd_ext's fused reduction replaces DeepSpeed's at stage 0 only
            names = [v for v in self.KNOWN_VARIANTS if not DEEPSPEED_VARIANTS[v].get("comm")]
        fused = [v for v in names if DEEPSPEED_VARIANTS[v].get("comm")]
        if fused and self.stage != 0:
            raise UsageError(f"variant(s) {fused} need --stage 0: spd_ext's fused all-reduce "
                             "replaces DeepSpeed's reduction at ZeRO stage 0 only; use "
                             "--variants deepspeed,deepspeed-weighted")
        return names

    def check(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise UsageError(f"--stage must be 0, 1, 2 or 3, got {self.stage}")
        super().check()


@dataclass
class DDPHookBenchConfig(TrainingStepBenchConfig):
    variants: str = option(",".join(DDP_HOOK_VARIANTS),
                           f"comma list of {', '.join(DDP_HOOK_VARIANTS)}")
    steps: int = option(15, "timed steps per variant (median)", low=1)
    bucket_mb: float = option(4.0, "DDP's bucket_cap_mb", low=0.0, low_open=True)

    KNOWN_VARIANTS: ClassVar[Collection[str]] = DDP_HOOK_VARIANTS

    def check(self) -> None:
        super().check()
        if self.bucket_mb <= 0:
            raise UsageError(f"--bucket-mb must be positive, got {self.bucket_mb}")


# -- the torch.distributed backend "spd_ext" against gloo ----------------------------------
BACKEND_COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
BACKEND_STEPS = ("zero2", "zero3", "ddp", "fsdp2")


@dataclass
class BackendBenchConfig(TrainingStepBenchConfig):
    collectives: str = option(",".join(BACKEND_COLLECTIVES),
                              f"comma list of {', '.join(BACKEND_COLLECTIVES)} (none: skip)")
    sizes: str = option("4K..64M", "bytes of each collective's whole tensor (all_reduce's, "
                        "reduce_scatter's input, all_gather's output): LO..HI[:FACTOR] "
                        "(default factor 4) or a comma list")
    dtypes: str = option("fp32", _DTYPES, flag="--dtype")
    repeats: int = option(7, _REPEATS, low=1)
    target_ms: float = option(20.0, _TARGET_MS, low=0.0, low_open=True)
    variants: str = option(",".join(BACKEND_STEPS), "training steps to time, comma list of "
                           f"{', '.join(BACKEND_STEPS)} (none: skip)")
    steps: int = option(8, "timed steps per variant (median)", low=1)
    threads_per_rank: int | None = option(None, "torch/OpenMP threads per rank (default: "
                                          "cores // nproc)", low=1)

    KNOWN_VARIANTS: ClassVar[Collection[str]] = BACKEND_STEPS

    def variant_list(self) -> list[str]:
        return [] if self.variants.strip() == "none" else super().variant_list()

    def collective_list(self) -> list[str]:
        if self.collectives.strip() == "none":
            return []
        names = [c.strip() for c in self.collectives.split(",") if c.strip()]
        bad = [c for c in names if c not in BACKEND_COLLECTIVES]
        if bad or not names:
            raise UsageError(f"unknown collective(s) {bad}; use a comma list of "
                             f"{', '.join(BACKEND_COLLECTIVES)} or none")
        return names

    def check(self) -> None:
        self.collective_list()
        super().check()
        if not self.collective_list() and not self.variant_list():
            raise UsageError("--collectives none and --variants none leave nothing to time")
