"""`spd-ext experiment sadpt`: signal-aware data parallelism on clean and corrupted shards.

The signal-aware table on TinyShakespeare with a small char GPT: 2 CPU ranks, IID or non-IID
(rank 1 sees 30% token_swap), uniform averaging or signal weighting; then 4 ranks with
one corrupt rank, comparing uniform, weighted and the robust baselines. Every run starts
from the same model and batches; validation data is clean.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from spd_ext.data import Corruption, ShardedSampler, TokenDataset
from spd_ext.dp import MeanAggregator, RobustAggregator, SignalWeightedAggregator
from spd_ext.experiments.common import finished_runs, write_json
from spd_ext.experiments.config import RunSpec, SADPTConfig
from spd_ext.launch import spawn
from spd_ext.tp import ReducedSyncGPT
from spd_ext.train import Trainer
from spd_ext.utils.files import save_figure
from spd_ext.utils.plot import pyplot
from spd_ext.utils.table import format_table


def _aggregator(spec: RunSpec, cfg: SADPTConfig):
    if spec.aggregation == "uniform":
        return MeanAggregator()
    if spec.aggregation == "weighted":
        return SignalWeightedAggregator(cfg.signal, cfg.weighting, temperature=cfg.temperature,
                                        floor=cfg.floor, ema=cfg.weight_ema,
                                        warmup_steps=cfg.warmup_steps, record=True)
    return RobustAggregator(spec.aggregation, trim=1, tau=1.0)


def _rank(rank: int, world: int, spec: RunSpec, cfg: SADPTConfig) -> dict:
    data = TokenDataset(cfg.corpus, "char")
    corruption = Corruption(cfg.corruption, cfg.corruption_prob, seed=cfg.seed)
    sampler = ShardedSampler(data, rank, world, cfg.train.batch_size, cfg.model.block_size,
                             cfg.seed, sharding="clean_vs_corrupt" if spec.corrupt_ranks else "iid",
                             corrupt_ranks=spec.corrupt_ranks,
                             corruption=corruption if spec.corrupt_ranks else None)
    model = ReducedSyncGPT(replace(cfg.model, vocab_size=data.vocab_size), seed=cfg.seed)
    aggregator = _aggregator(spec, cfg)
    train_cfg = replace(cfg.train, seed=cfg.seed, out_dir=str(Path(cfg.out_dir) / spec.name))
    trainer = Trainer(model, sampler, train_cfg, hooks=aggregator, run_name=spec.name)
    result = trainer.train()
    history = getattr(aggregator, "history", [])
    return {
        "name": spec.name, "nproc": world, "corrupt_ranks": list(spec.corrupt_ranks),
        "aggregation": spec.aggregation, "val_loss": result.val_loss,
        "train_loss_rank": result.train_loss, "seconds": result.seconds,
        "final_weights": history[-1]["weights"] if history else None,
        "weights": [(h["step"], h["weights"]) for h in history][::5],
        "curve": [(h["step"], h["val_loss"]) for h in result.history if "val_loss" in h],
    }


def run(cfg: SADPTConfig) -> list[dict]:
    out = Path(cfg.out_dir)
    results_path = out / "results.json"
    done = finished_runs(results_path, lambda r: r["name"], [s.name for s in cfg.runs],
                         cfg.force)
    TokenDataset(cfg.corpus, "char")  # fail here, not in every rank, if the corpus is missing
    for i, spec in enumerate(cfg.runs):
        if spec.name in done:
            print(f"[sadpt] {spec.name}: already in {results_path}, skipped (--force reruns)")
            continue
        print(f"[sadpt] run {i + 1}/{len(cfg.runs)}: {spec.name} ({spec.nproc} ranks, corrupt "
              f"{list(spec.corrupt_ranks) or 'none'}, {spec.aggregation})", flush=True)
        done[spec.name] = spawn(_rank, spec.nproc, spec, cfg, timeout=3600)[0]
        write_json(results_path, list(done.values()))
    rows = [done[s.name] for s in cfg.runs if s.name in done]
    plot(rows, out / "sadpt.png")
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    body = []
    for r in rows:
        weights = ("[" + ", ".join(f"{w:.3f}" for w in r["final_weights"]) + "]"
                   if r["final_weights"] else "-")
        body.append([r["name"], r["nproc"], ",".join(map(str, r["corrupt_ranks"])) or "-",
                     r["aggregation"], r["val_loss"], r["seconds"], weights])
    return format_table(["run", "ranks", "corrupt", "aggregation", "clean val loss", "seconds",
                         "final weights"], body, markdown)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, (wax, lax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        if r["weights"]:
            steps = [s for s, _ in r["weights"]]
            for rank in range(r["nproc"]):
                tag = " (corrupt)" if rank in r["corrupt_ranks"] else ""
                wax.plot(steps, [w[rank] for _, w in r["weights"]],
                         label=f"{r['name']} rank {rank}{tag}")
        if r["curve"]:
            steps, losses = zip(*r["curve"])
            lax.plot(steps, losses, marker=".", label=r["name"])
    wax.set_xlabel("step")
    wax.set_ylabel("aggregation weight")
    wax.legend(fontsize=6)
    lax.set_xlabel("step")
    lax.set_ylabel("clean validation loss")
    lax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
