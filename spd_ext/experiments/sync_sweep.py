"""`spd-ext experiment sync-sweep`: validation loss against tensor-parallel sync count.

Trains one small character-level GPT on TinyShakespeare per block pattern, in the
emulated mode (all shards in one process, so a 2-core machine can run it), with the same
initialization seed, the same batches and the same number of steps. Prints val loss
against the sync count the library measured, and plots it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from spd_ext.data import TokenDataset
from spd_ext.experiments.common import finished_runs, write_json
from spd_ext.experiments.config import SyncSweepConfig
from spd_ext.tp import ReducedSyncGPT
from spd_ext.train import Trainer
from spd_ext.utils.plot import pyplot
from spd_ext.utils.table import format_table


def run_name(pattern: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in pattern).strip("_")


def run(cfg: SyncSweepConfig) -> list[dict]:
    """Train every pattern (skipping ones already in results.json unless ``force``)."""
    out = Path(cfg.out_dir)
    results_path = out / "results.json"
    done = finished_runs(results_path, lambda r: r["pattern"], cfg.patterns, cfg.force)
    data = TokenDataset(cfg.corpus, "char")
    for i, pattern in enumerate(cfg.patterns):
        if pattern in done:
            print(f"[sync-sweep] {pattern}: already in {results_path}, skipped (--force reruns)")
            continue
        model_cfg = replace(cfg.model, vocab_size=data.vocab_size, pattern=pattern)
        model = ReducedSyncGPT(model_cfg, seed=cfg.seed)
        train_cfg = replace(cfg.train, seed=cfg.seed, out_dir=str(out / run_name(pattern)))
        name = f"{i + 1}/{len(cfg.patterns)} {pattern}"
        trainer = Trainer(model, data.sampler(train_cfg.batch_size, model_cfg.block_size, cfg.seed),
                          train_cfg, run_name=name,
                          checkpoint_extra={"model_config": model_cfg.to_dict(),
                                            "tokenizer": data.tokenizer.state()})
        started = time.time()
        result = trainer.train()
        syncs = next(h for h in trainer.log.history if "syncs_fwd" in h)
        done[pattern] = {
            "pattern": pattern, "syncs_fwd": syncs["syncs_fwd"], "syncs_bwd": syncs["syncs_bwd"],
            "val_loss": result.val_loss, "train_loss": result.train_loss,
            "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
            "params": model.num_params(), "steps": result.steps, "finished": started,
            "curve": [(h["step"], h["val_loss"]) for h in result.history if "val_loss" in h],
        }
        write_json(results_path, list(done.values()))  # after every run: nothing lost
    rows = [done[p] for p in cfg.patterns if p in done]
    plot(rows, out / "sync_sweep.png", cfg)
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    base = next((r["val_loss"] for r in rows if r["pattern"].startswith("tp*")), None)
    body = []
    for r in sorted(rows, key=lambda r: -r["syncs_fwd"]):
        delta = r["val_loss"] - base if base is not None else float("nan")
        body.append([r["pattern"], r["syncs_fwd"], r["syncs_bwd"], r["val_loss"], delta,
                     r["train_loss"], r["seconds"], r["tokens_per_second"]])
    return format_table(["pattern", "syncs fwd", "syncs bwd", "val loss", "vs tp", "train loss",
                         "seconds", "tokens/s"], body, markdown)


def plot(rows: list[dict], path: Path, cfg: SyncSweepConfig) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, (ax, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        ax.scatter(r["syncs_fwd"], r["val_loss"], color="tab:blue")
        ax.annotate(r["pattern"], (r["syncs_fwd"], r["val_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
        steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
        curves.plot(steps, losses, marker="o", label=f"{r['pattern']} ({r['syncs_fwd']})")
    ax.set_xlabel("tensor-parallel syncs per forward pass (measured)")
    ax.set_ylabel("validation loss")
    shape = cfg.model
    ax.set_title(f"char GPT {shape.n_layer}L/{shape.n_embd}d, T={shape.tp_size} emulated, "
                 f"{rows[0]['steps']} steps")
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss")
    curves.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
