"""What a `spd-ext train` run leaves beside its checkpoints: model.pt (the dense weights for
`spd-ext serve` and `spd-ext tp sensitivity`), a text sample, the loss plot and the
summary (summary.json and the table printed at the end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spd_ext.utils.files import atomic_path, explained_write_errors, save_figure

__all__ = ["export_model", "generate", "plot_losses", "whole_copy"]


def export_model(model: Any, tokenizer: Any, path: Path, main: bool) -> dict:
    """The trained weights in the dense layout with their config and tokenizer, the file
    `spd-ext serve --checkpoint` and `spd-ext tp sensitivity` read (collective: every rank
    calls it; the main rank writes, atomically). Returns the dense state dict."""
    import torch

    dense = model.dense_state_dict()
    if main:
        state = {"model": {k: v.cpu() for k, v in dense.items()},
                 "model_config": model.config.to_dict(), "tokenizer": tokenizer.state()}
        with explained_write_errors(path, "the model"), atomic_path(path) as tmp:
            torch.save(state, tmp)
    return dense


def whole_copy(model: Any, dense: dict | None = None) -> Any:
    """A model of one rank with ``model``'s weights: ``dense``, else its dense state dict
    (whole: gathered by the caller, or collective)."""
    from spd_ext.tp import GPTConfig, ReducedSyncGPT

    dense = model.dense_state_dict() if dense is None else dense
    copy = ReducedSyncGPT(GPTConfig(**{**model.config.to_dict(), "tp_size": 1}), seed=None)
    copy.load_dense_state_dict({k: v.detach().clone() for k, v in dense.items()})
    return copy.to(next(model.parameters()).device)


def generate(model: Any, tokenizer: Any, prompt: str, tokens: int, temperature: float,
             top_k: int | None, block_size: int, seed: int, device: Any,
             tp_group: Any = None, tp_src: int = 0) -> str:
    """Sample ``tokens`` tokens after ``prompt`` with the model's forward over the last
    ``block_size`` tokens (so a sample may outrun the context, which the KV-cached
    ``generate`` refuses); every rank of a tensor-parallel group calls this together and
    rank ``tp_src``'s choice is broadcast. The prompt was checked at set-up."""
    import torch
    import torch.distributed as dist

    from spd_ext.tp.generation import sample_next

    ids = tokenizer.encode(prompt)
    vocab = tokenizer.vocab_size  # below a padded model vocabulary
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for _ in range(tokens):
            logits, _ = model(idx[:, -block_size:])
            nxt = sample_next(logits[:, -1, :vocab], temperature, top_k, g)[:, None]
            if tp_group is not None:
                dist.broadcast(nxt, src=tp_src, group=tp_group)
            idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return tokenizer.decode(idx[0, len(ids):].tolist())


def plot_losses(history: list[dict], path: Path, title: str) -> bool:
    from spd_ext.utils.plot import pyplot

    plt = pyplot()
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if plt is None or not train:
        return False
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps, losses = zip(*train)
    ax.plot(steps, losses, lw=0.8, alpha=0.8, label="train (mean over ranks)")
    if val:
        vs, vl = zip(*val)
        ax.plot(vs, vl, marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True
