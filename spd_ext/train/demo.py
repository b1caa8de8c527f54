"""`make demo`: four `spd-ext train` runs on 2 CPU ranks under the deepspeed launcher (ZeRO-1),
one table and one plot.

    python -m spd_ext.train.demo [--out out/demo] [--tp-steps N] [--dp-steps N]

(a) Tensor parallelism 2 (a real all-reduce between the two ranks, torch.distributed's gloo):
    a small char GPT on TinyShakespeare with the dense pattern tp*4 (2 all-reduces per block)
    against spd*4 (1 per block): measured syncs per step, loss, step time.
(b) Data parallelism 2, rank 1's shard corrupted (30% of its tokens replaced at random):
    uniform averaging against signal weighting (the ds_config's "spd_ext" section); loss on
    clean validation data and the final weights.

Each run's exact config is written to OUT/configs/<run>.json (rerun one with
``spd-ext train OUT/configs/<run>.json --nproc 2 --overwrite``); its console output goes
to OUT/<run>.out.txt, its log, plot, sample and checkpoint to OUT/<run>/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from spd_ext.utils.files import save_figure, write_json
from spd_ext.utils.run_log import read_metrics
from spd_ext.utils.table import format_table

NPROC = 2
ZERO1 = {"zero_optimization": {"stage": 1, "overlap_comm": False},
         "steps_per_print": 10**9, "wall_clock_breakdown": False}
# The tensor-parallel all-reduce through torch.distributed (gloo between the two CPU ranks):
# about 1.5 ms each here, so the step time shows the sync count (spd_ext's shared-memory
# all-reduce, parallel.tp_backend spd_ext, takes microseconds and hides it).
TP_BACKEND = "torch"
SIGNAL_WEIGHTING = {"signal": "loss_ema", "map": "softmax", "temperature": 1.0, "floor": 0.05,
                    "warmup_steps": 20}


def base_config(steps: int, out: Path, name: str) -> dict:
    return {
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0,
                  "bias": False},
        "data": {"corpus": "tinyshakespeare", "tokenizer": "char"},
        "training": {"steps": steps, "micro_batch": 16, "grad_accum": 1, "lr": 2e-3,
                     "min_lr": 2e-4, "warmup_steps": 30, "weight_decay": 0.1, "beta2": 0.99,
                     "grad_clip": 1.0, "eval_interval": max(1, steps // 8),
                     "eval_batches": 20, "log_interval": max(1, steps // 10),
                     "checkpoint_interval": 0, "seed": 1337, "out_dir": str(out / name)},
        "deepspeed": copy.deepcopy(ZERO1),
        "sample": {"tokens": 200, "temperature": 0.8, "top_k": 40},
    }


def runs(out: Path, tp_steps: int, dp_steps: int) -> list[tuple[str, str, dict]]:
    """(name, what it shows, config) of the four runs."""
    out_list = []
    for pattern in ("tp*4", "spd*4"):
        name = "tp2_" + pattern.replace("*", "x")
        cfg = base_config(tp_steps, out, name)
        cfg["model"]["pattern"] = pattern
        cfg["parallel"] = {"tp": 2, "tp_backend": TP_BACKEND}
        out_list.append((name, f"tp 2, {pattern}", cfg))
    for weighted in (False, True):
        name = "dp2_corrupt_" + ("weighted" if weighted else "uniform")
        cfg = base_config(dp_steps, out, name)
        cfg["data"].update(sharding="clean_vs_corrupt", corrupt_ranks=[1],
                           corruption={"kind": "token_swap", "probability": 0.3})
        if weighted:
            cfg["deepspeed"]["spd_ext"] = {"signal_weighting": dict(SIGNAL_WEIGHTING)}
        out_list.append((name, "dp 2, rank 1 corrupt, " +
                         ("signal-weighted" if weighted else "uniform"), cfg))
    return out_list


def train(config_path: Path, output: Path, env: dict) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "spd_ext.cli", "train", str(config_path), "--nproc",
           str(NPROC), "--overwrite"]
    started = time.perf_counter()
    with open(output, "w") as sink:
        code = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    return code, time.perf_counter() - started


def table(rows: list[dict], markdown: bool = False) -> str:
    body = []
    for r in rows:
        syncs = (f"{r['syncs_fwd']} + {r['syncs_bwd']}" if r.get("syncs_fwd") is not None
                 else "-")
        weights = ("[" + ", ".join(f"{w:.2f}" for w in r["weights"]) + "]"
                   if r.get("weights") else "-")
        body.append([r["name"], r["what"], r["steps"], syncs, weights, r["val_loss"],
                     r["train_loss"], r["step_ms"], r["tokens_per_sec"], r["job_seconds"]])
    return format_table(["run", "setup", "steps", "tp syncs/step (fwd + bwd)", "final weights",
                         "val loss (clean)", "train loss", "step ms", "tokens/s", "job s"],
                        body, markdown)


def plot(rows: list[dict], logs: dict[str, list[dict]], path: Path) -> bool:
    from spd_ext.utils.plot import pyplot

    plt = pyplot()
    if plt is None:
        return False
    fig, (tp_ax, dp_ax, w_ax) = plt.subplots(1, 3, figsize=(15, 4.3))
    for r in rows:
        records = logs[r["name"]]
        val = [(h["step"], h["val_loss"]) for h in records if "val_loss" in h]
        ax = tp_ax if r["name"].startswith("tp") else dp_ax
        label = r["what"].split(", ", 1)[1] if r["name"].startswith("tp") else \
            r["what"].rsplit(", ", 1)[1]
        if r.get("syncs_fwd") is not None:
            label += f" ({r['syncs_fwd']}+{r['syncs_bwd']} syncs, {r['step_ms']:.0f} ms/step)"
        if val:
            ax.plot(*zip(*val), marker="o", label=label)
        weights = [(h["step"], h["weights"]) for h in records if h.get("weights")]
        if weights and any(abs(w[0] - 0.5) > 1e-9 for _, w in weights):
            steps = [s for s, _ in weights]
            for rank in range(len(weights[0][1])):
                w_ax.plot(steps, [w[rank] for _, w in weights],
                          label=f"rank {rank}" + (" (corrupt)" if rank == 1 else " (clean)"))
    tp_ax.set_title("(a) tensor parallel 2: dense vs reduced sync", fontsize=10)
    dp_ax.set_title("(b) data parallel 2, rank 1 corrupted", fontsize=10)
    w_ax.set_title("(b) signal weights", fontsize=10)
    for ax in (tp_ax, dp_ax):
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (clean)")
        ax.legend(fontsize=8)
    w_ax.set_xlabel("step")
    w_ax.set_ylabel("aggregation weight")
    if w_ax.lines:
        w_ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spd_ext.train.demo",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/demo", help="configs, logs, checkpoints, plot")
    parser.add_argument("--tp-steps", type=int, default=400, help="steps of each tp run")
    parser.add_argument("--dp-steps", type=int, default=400, help="steps of each dp run")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if args.tp_steps < 1 or args.dp_steps < 1:
        print("spd-ext demo: error: --tp-steps and --dp-steps must be at least 1",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")  # the demo's ranks are CPU processes
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // NPROC)))
    plan = runs(out, args.tp_steps, args.dp_steps)
    started = time.perf_counter()
    print(f"[demo] {len(plan)} runs of `spd-ext train --nproc {NPROC}` (deepspeed launcher, "
          f"CPU ranks, ZeRO-1) on TinyShakespeare; output in {out}/", flush=True)
    rows, logs = [], {}
    for i, (name, what, cfg) in enumerate(plan, 1):
        config_path = out / "configs" / f"{name}.json"
        write_json(config_path, cfg)
        output = out / f"{name}.out.txt"
        print(f"[demo] {i}/{len(plan)} {name}: {what}, {cfg['training']['steps']} steps ...",
              end=" ", flush=True)
        code, seconds = train(config_path, output, env)
        summary_path = Path(cfg["training"]["out_dir"]) / "summary.json"
        if code != 0 or not summary_path.is_file():
            print("failed")
            tail = output.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            print(f"spd-ext demo: error: run {name} exited with {code}; its output is in "
                  f"{output}", file=sys.stderr)
            return 1
        summary = json.loads(summary_path.read_text())
        logs[name] = read_metrics(Path(cfg["training"]["out_dir"]) / "log.jsonl")
        rows.append({"name": name, "what": what, "job_seconds": seconds, **summary})
        print(f"val loss {summary['val_loss']:.4f}, {summary['step_ms']:.0f} ms/step "
              f"({seconds:.0f} s)", flush=True)
    write_json(out / "results.json", rows)
    png = out / "demo.png"
    drawn = plot(rows, logs, png)
    print()
    print(table(rows, markdown=args.markdown))
    print(f"tp runs: the tensor-parallel all-reduces go through torch.distributed (gloo between "
          f"the CPU ranks; parallel.tp_backend {TP_BACKEND}). dp runs: 30% of rank 1's tokens "
          "are replaced at random; validation data is clean. step ms: median on rank 0.")
    print()
    if drawn:
        print(f"plot: {png}")
    print(f"logs: {out}/<run>/log.jsonl (console output {out}/<run>.out.txt, configs "
          f"{out}/configs/, results {out}/results.json); {time.perf_counter() - started:.0f} s "
          "in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
