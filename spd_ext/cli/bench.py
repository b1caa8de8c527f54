"""`spd-ext bench ...`: kernel, collective and training-step microbenchmarks. Each
benchmark's flags derive from its configuration (spd_ext.bench.config); the benchmark
itself (and torch) loads only when it runs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from spd_ext.bench import config
from spd_ext.cli.flags import Help, add_options, add_table_args, config_from, write_json_output
from spd_ext.errors import UsageError


@dataclass(frozen=True)
class Benchmark:
    """One `spd-ext bench` command: its configuration and the module that runs it."""

    help: str
    description: str
    defaults: Any
    module: str  # offers run(cfg) -> rows and report(cfg, rows, markdown) -> str
    needs: str | None = None  # an optional package it cannot run without (its pip extra)

    def run(self, args: argparse.Namespace) -> int:
        cfg = config_from(args, self.defaults)
        if self.needs is not None and importlib.util.find_spec(self.needs) is None:
            raise UsageError(f"spd-ext bench {args.bench} needs {self.needs}: pip install "
                             f"'spd_ext[{self.needs}]'")
        bench = importlib.import_module(self.module)
        rows = bench.run(cfg)
        print(bench.report(cfg, rows, markdown=args.markdown))
        write_json_output(args.json, rows)
        return 0


BENCHMARKS = {
    "allreduce": Benchmark(
        "all-reduce on N local CPU ranks",
        "Time gloo, DeepSpeed's inference_all_reduce (if installed), spd_ext sum and spd_ext "
        "weighted all-reduce on N local CPU ranks and print a table.",
        config.AllReduceConfig(), "spd_ext.bench.allreduce"),
    "reduce": Benchmark(
        "weighted_reduce vs torch expressions",
        "Time weighted_reduce against torch.stack(xs).mul_(w).sum(0) and a chain of add_(x, "
        "alpha=w), with memcpy bandwidth for reference.",
        config.ReduceConfig(), "spd_ext.bench.reduce"),
    "quant": Benchmark(
        "8-bit block quantize / dequantize bandwidth",
        "Time 8-bit block quantization and dequantization (kernel and PyTorch) against a copy "
        "of the same tensor.",
        config.QuantBenchConfig(), "spd_ext.bench.quant"),
    "tp": Benchmark(
        "training step time per tensor-parallel sync pattern",
        "Time a tensor-parallel training step (forward, backward, optimizer) of a small GPT "
        "for each sync pattern on N local CPU ranks, through torch.distributed and/or "
        "spd_ext.comm.",
        config.TPBenchConfig(), "spd_ext.bench.tp"),
    "generate": Benchmark(
        "KV-cached generation latency per sync pattern",
        "Time KV-cached generation of a 12-layer GPT for each sync pattern on N local CPU "
        "ranks (tensor parallel N): prefill time, per-token decode latency p50/p99 and "
        "tokens/s, over torch.distributed and/or spd_ext.comm, for each batch size.",
        config.GenerateBenchConfig(), "spd_ext.bench.generate"),
    "deepspeed": Benchmark(
        "DeepSpeed engine step and gradient reduction",
        "Time a DeepSpeed (fp32) training step of a GPT of about 10M parameters on N local "
        "CPU ranks and its gradient reduction: DeepSpeed's own reduction vs spd_ext's fused "
        "all-reduce (\"comm\": {\"backend\": \"spd_ext\"}, stage 0 only), plain and "
        "signal-weighted, at a ZeRO stage.",
        config.DeepSpeedBenchConfig(), "spd_ext.bench.ds_engine", needs="deepspeed"),
    "layouts": Benchmark(
        "training step time per layout: data, tensor, pipeline parallel",
        "Time a DeepSpeed (fp32) training step of one GPT laid out three ways on N local CPU "
        "ranks, the same sequences per step in each: data parallel N, tensor parallel N "
        "(spd_ext's blocks) and N pipeline stages (DeepSpeed's pipeline engine with spd_ext's "
        "stage layers).",
        config.LayoutBenchConfig(), "spd_ext.bench.layouts", needs="deepspeed"),
    "ddp-hook": Benchmark(
        "DDP step: signal-weighted hook vs DDP's default",
        "Time a DistributedDataParallel training step of a GPT of about 10M parameters on N "
        "local CPU ranks with DDP's default all-reduce hook, spd_ext's signal-weighted hook "
        "(asynchronous: overlaps backward), and the same hook waiting for each bucket; the "
        "same buckets and bytes in each.",
        config.DDPHookBenchConfig(), "spd_ext.bench.ddp_hook"),
    "backend": Benchmark(
        "the torch.distributed backend spd_ext vs gloo",
        "Time each collective of the torch.distributed backend \"spd_ext\" (all_reduce, "
        "reduce_scatter_tensor, all_gather_into_tensor, broadcast) against gloo on N local "
        "CPU ranks, then training steps of a GPT of about 10M parameters on each backend: "
        "DeepSpeed ZeRO-2 and ZeRO-3 engines, DDP and FSDP2.",
        config.BackendBenchConfig(), "spd_ext.bench.backend"),
}


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, formatter_class=Help, help=help)
    # No metavar: argparse names every benchmark in the usage line.
    benches = p.add_subparsers(dest="bench", required=True)
    for bench_name, bench in BENCHMARKS.items():
        b = benches.add_parser(bench_name, formatter_class=Help, help=bench.help,
                               description=bench.description)
        add_options(b, bench.defaults)
        add_table_args(b)
        b.set_defaults(func=bench.run)
