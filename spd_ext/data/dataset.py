"""A corpus encoded once into a memory-mapped uint16 token file (as nanoGPT's ``.bin``)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from spd_ext.data.corpus import cache_dir, read_corpus, resolve_corpus
from spd_ext.data.tokenizers import CharTokenizer, GPT2Tokenizer, get_tokenizer
from spd_ext.errors import UsageError
from spd_ext.utils.files import atomic_path


def windows(tokens: np.ndarray, starts: torch.Tensor,
            block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets) of the windows of ``tokens`` starting at ``starts``."""
    rows = np.stack([tokens[i:i + block_size + 1] for i in starts.tolist()]).astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


class TokenDataset:
    """Train / validation token streams of one corpus under one tokenizer.

    The first ``1 - val_fraction`` of the tokens train, the rest validate (nanoGPT's split).
    Encoded tokens are cached under ``$SPD_EXT_CACHE_DIR/tokens`` keyed by the corpus
    content and the tokenizer, written atomically.
    """

    def __init__(self, corpus: str | os.PathLike = "tinyshakespeare", tokenizer: str = "char",
                 val_fraction: float = 0.1, data_dir: str | os.PathLike | None = None,
                 loader: str = "plain") -> None:
        """``loader="datasets"`` reads the file through Hugging Face datasets."""
        if not 0.0 < val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.path = resolve_corpus(corpus, data_dir)
        text = read_corpus(self.path, loader)
        if len(text) < 2:
            raise UsageError(f"corpus {self.path} holds {len(text)} characters: too short to "
                             "train on (it needs at least a few blocks of text)")
        raw = text.encode("utf-8")
        self.tokenizer: CharTokenizer | GPT2Tokenizer = get_tokenizer(tokenizer, text=text)
        if self.tokenizer.vocab_size > 1 << 16:
            raise UsageError("token ids must fit uint16")
        key = hashlib.sha1(raw + json.dumps(self.tokenizer.state()).encode()).hexdigest()[:16]
        self.cache_path = cache_dir() / "tokens" / f"{self.path.stem}-{tokenizer}-{key}.bin"
        if not self.cache_path.is_file():
            with atomic_path(self.cache_path) as tmp:
                np.asarray(self.tokenizer.encode(text), dtype=np.uint16).tofile(tmp)
        tokens = np.memmap(self.cache_path, dtype=np.uint16, mode="r")
        n_val = max(1, int(len(tokens) * val_fraction))
        self.splits = {"train": tokens[:-n_val], "val": tokens[-n_val:]}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        try:
            return self.splits[name]
        except KeyError:
            raise UsageError(f"unknown split {name!r}; use 'train' or 'val'") from None

    def windows(self, split: str, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor,
                                                                                  torch.Tensor]:
        """Inputs and next-token targets for windows starting at ``starts``."""
        return windows(self.split(split), starts, block_size)

    def batch(self, split: str, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``block_size`` tokens (inputs, targets)."""
        data = self.split(split)
        if len(data) <= block_size + 1:
            raise UsageError(f"the {split} split has {len(data)} tokens, too few for "
                             f"block_size {block_size}")
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
        return self.windows(split, starts, block_size)

    def sampler(self, batch_size: int, block_size: int, seed: int):
        """``f(split, step) -> (x, y)``: the same batches for the same (seed, step), so runs
        that differ only in the model see identical data. Negative steps are evaluation
        batches (fixed per index)."""

        def batches(split: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step + (0 if step >= 0 else
                                                                           10**9))
            return self.batch(split, batch_size, block_size, g)

        return batches
