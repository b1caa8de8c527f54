"""The shape of a reduced-sync GPT (:class:`GPTConfig`), declared as options.

Torch-free: the command line derives its model flags (``--n-layer``, ``--n-embd``, ...) and
their help from these declarations without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from spd_ext.errors import UsageError
from spd_ext.tp.patterns import parse_pattern
from spd_ext.utils.options import check_fields, option


@dataclass
class GPTConfig:
    block_size: int = option(1024, "context length", low=1)
    vocab_size: int = option(50304, "vocabulary size (GPT-2's 50257 padded to a multiple "
                             "of 64)", low=1)
    n_layer: int = option(12, "transformer blocks", low=1)
    n_head: int = option(12, "attention heads", low=1)
    n_embd: int = option(768, "model width", low=1)
    dropout: float = option(0.0, "dropout probability", low=0.0, high=1.0, high_open=True)
    bias: bool = option(True, "biases in linear layers and LayerNorms")
    pattern: str = option("tp*12", "block sync pattern such as 'tp*12', '[tp,spd]*6', "
                          "'grouped:4'")
    # one shard unless asked: a single-process model is the whole model
    tp_size: int = option(1, "tensor-parallel size", low=1)

    def __post_init__(self) -> None:
        check_fields(self)
        parse_pattern(self.pattern, self.n_layer)  # fail early, naming the bad token
        for name in ("n_head", "n_embd"):
            if getattr(self, name) % self.tp_size != 0:
                raise UsageError(f"{name} ({getattr(self, name)}) must be divisible by "
                                 f"tp_size ({self.tp_size})")
        if self.n_embd % self.n_head != 0:
            raise UsageError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)
