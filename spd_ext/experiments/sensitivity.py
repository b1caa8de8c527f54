"""`spd-ext tp sensitivity`: how much each block's attention sync matters (SPD's analysis).

For a trained dense model, the validation loss when exactly one block is turned into an
``spd`` block (its attention all-reduce dropped, zero-shot), against the dense model.
Blocks whose loss barely moves are the ones SPD can drop syncs from first.
"""

from __future__ import annotations

import math
import os

import torch

from spd_ext.data import TokenDataset
from spd_ext.errors import MissingFileError, UsageError
from spd_ext.experiments.config import SensitivityConfig
from spd_ext.tp import GPTConfig, ReducedSyncGPT
from spd_ext.utils.files import load_checkpoint
from spd_ext.utils.table import format_table


def _load(cfg: SensitivityConfig) -> tuple[dict, GPTConfig, TokenDataset]:
    if (cfg.checkpoint is None) == (cfg.hf is None):
        raise UsageError("pass exactly one of --checkpoint (spd_ext ckpt.pt) or --hf (a local "
                         "Hugging Face GPT-2 folder)")
    if cfg.checkpoint is not None:
        if not os.path.isfile(cfg.checkpoint):
            raise MissingFileError(f"no checkpoint at {cfg.checkpoint}")
        state = load_checkpoint(cfg.checkpoint)
        if not {"model", "model_config", "tokenizer"} <= set(state):
            raise UsageError(f"{cfg.checkpoint} lacks model_config/tokenizer; it was not written "
                             "by an spd_ext experiment")
        model_cfg = GPTConfig(**{**state["model_config"], "tp_size": cfg.tp_size})
        data = TokenDataset(cfg.corpus, state["tokenizer"]["name"])
        if data.tokenizer.state() != state["tokenizer"]:
            raise UsageError(f"the checkpoint's tokenizer does not match {cfg.corpus}'s; "
                             "evaluate on the corpus it was trained on")
        return state["model"], model_cfg, data
    from spd_ext.tp.convert import load_pretrained

    model = load_pretrained(cfg.hf, tp_size=cfg.tp_size)
    return model.dense_state_dict(), model.config, TokenDataset(cfg.corpus, "gpt2")


@torch.no_grad()
def run(cfg: SensitivityConfig) -> list[dict]:
    dense, model_cfg, data = _load(cfg)
    block = cfg.block_size or min(model_cfg.block_size, 256)
    batches = data.sampler(cfg.batch_size, block, cfg.seed)
    eval_set = [batches("val", -1 - i) for i in range(cfg.eval_batches)]

    def val_loss(pattern: list[str]) -> float:
        model = ReducedSyncGPT(GPTConfig(**{**model_cfg.to_dict(), "pattern": ",".join(pattern)}),
                               seed=None)
        model.load_dense_state_dict(dense)
        model.eval()
        return sum(model(x, y)[1].item() for x, y in eval_set) / len(eval_set)

    n = model_cfg.n_layer
    base = val_loss(["tp"] * n)
    rows = [{"block": "none (dense)", "val_loss": base, "delta": 0.0}]
    for i in range(n):
        loss = val_loss(["spd" if j == i else "tp" for j in range(n)])
        rows.append({"block": str(i), "val_loss": loss, "delta": loss - base})
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    base = rows[0]["val_loss"]
    body = [[r["block"], r["val_loss"], r["delta"], math.exp(r["val_loss"]),
             100 * (math.exp(r["val_loss"]) / math.exp(base) - 1)] for r in rows]
    return format_table(["block made spd", "val loss", "delta loss", "perplexity",
                         "perplexity change %"], body, markdown)
