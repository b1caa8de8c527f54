"""Hugging Face GPT-2 <-> ReducedSyncGPT.

The dense layout of ReducedSyncGPT is GPT-2's own (Conv1D weights [in, out]), so the
conversion renames keys and checks the architecture; sharding happens on load. Any
pattern and tensor-parallel size can be loaded (reduced patterns then approximate the
dense model zero-shot, SPD's use); only ``tp*L`` converts back, since the other patterns
are different architectures.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from spd_ext.errors import MissingFileError, UsageError
from spd_ext.tp.communicator import TensorParallelComm
from spd_ext.tp.config import GPTConfig
from spd_ext.tp.model import ReducedSyncGPT
from spd_ext.tp.patterns import parse_pattern

_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older versions


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("Hugging Face conversion needs transformers: "
                          "pip install 'spd_ext[hf]'") from None
    return transformers


def check_hf_config(hf_config: Any) -> None:
    """Refuse GPT-2 variants this model does not compute."""
    problems = []
    if getattr(hf_config, "activation_function", "gelu_new") not in ("gelu_new",
                                                                      "gelu_pytorch_tanh"):
        problems.append(f"activation_function={hf_config.activation_function} (needs gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "add_cross_attention"):
        if getattr(hf_config, flag, False):
            problems.append(f"{flag}=True")
    if not getattr(hf_config, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if problems:
        raise UsageError("unsupported GPT-2 configuration: " + ", ".join(problems))


def config_from_hf(hf_config: Any, pattern: str | None = None, tp_size: int = 1) -> GPTConfig:
    check_hf_config(hf_config)
    return GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                     n_layer=hf_config.n_layer, n_head=hf_config.n_head,
                     n_embd=hf_config.n_embd, dropout=0.0, bias=True,
                     pattern=pattern or f"tp*{hf_config.n_layer}", tp_size=tp_size)


def hf_to_dense(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel / GPT2Model state dict -> this model's dense layout."""
    dense = {}
    for key, value in state.items():
        if key == "lm_head.weight" or key.endswith(_BUFFERS):
            continue
        dense[key.removeprefix("transformer.")] = value
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], dense["wte.weight"]):
        raise UsageError("lm_head.weight differs from wte.weight; ReducedSyncGPT ties them")
    return dense


def dense_to_hf(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {f"transformer.{k}": v for k, v in dense.items()}
    state["lm_head.weight"] = dense["wte.weight"]
    return state


def from_hf(model_or_state: Any, hf_config: Any = None, pattern: str | None = None,
            tp_size: int = 1, comm: TensorParallelComm | None = None) -> ReducedSyncGPT:
    """A ReducedSyncGPT with the weights of a GPT2LMHeadModel (or its state dict + config)."""
    if hasattr(model_or_state, "state_dict"):
        hf_config = hf_config or model_or_state.config
        state = model_or_state.state_dict()
    else:
        state = model_or_state
        if hf_config is None:
            raise UsageError("pass hf_config with a bare state dict")
    config = config_from_hf(hf_config, pattern, tp_size)
    model = ReducedSyncGPT(config, comm, seed=None)
    model.load_dense_state_dict(hf_to_dense(state))
    return model


def to_hf(model: ReducedSyncGPT):
    """The equivalent GPT2LMHeadModel; only for pattern ``tp*L`` (exactly GPT-2)."""
    if set(parse_pattern(model.config.pattern, model.config.n_layer)) != {"tp"}:
        raise UsageError(f"only tp*L models are GPT-2; pattern {model.config.pattern!r} is a "
                         "different architecture")
    transformers = _require_transformers()
    c = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    hf = transformers.GPT2LMHeadModel(hf_config)
    missing, unexpected = hf.load_state_dict(dense_to_hf(model.dense_state_dict()), strict=False)
    missing = [k for k in missing if not k.endswith(_BUFFERS)]
    if missing or unexpected:
        raise UsageError(f"conversion left missing {missing} unexpected {unexpected}")
    return hf.eval()


def load_pretrained(path: str | os.PathLike, pattern: str | None = None, tp_size: int = 1,
                    comm: TensorParallelComm | None = None) -> ReducedSyncGPT:
    """Local Hugging Face GPT-2 weights (a folder with config.json and the weights)."""
    transformers = _require_transformers()
    if not os.path.isdir(path):
        raise MissingFileError(f"no Hugging Face model folder at {path}; download one with "
                                "`huggingface-cli download gpt2` and pass its local path")
    hf = transformers.GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    return from_hf(hf, pattern=pattern, tp_size=tp_size, comm=comm)
