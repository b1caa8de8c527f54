"""What `spd-ext serve` loads: an spd_ext checkpoint or a local Hugging Face GPT-2 folder,
checked in the launching process before any rank starts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spd_ext.errors import MissingFileError, UsageError
from spd_ext.tp import GPTConfig, ReducedSyncGPT, TensorParallelComm, parse_pattern
from spd_ext.utils.files import load_checkpoint


@dataclass
class ModelSource:
    """A model to serve: where its weights are, its config, its tokenizer."""

    kind: str  # "checkpoint" or "hf"
    path: str
    config: GPTConfig
    tokenizer: dict = field(default_factory=dict)  # {"name": "char", "chars": ...} or gpt2
    note: str = ""  # a warning for the operator, printed at start-up
    stages: int = 1  # pipeline stages (each config.tp_size ranks)

    @property
    def ranks(self) -> int:
        return self.stages * self.config.tp_size

    def describe(self) -> str:
        c = self.config
        stages = f", pipeline stages {self.stages}" if self.stages > 1 else ""
        return (f"{self.kind} {self.path}: GPT {c.n_layer}L/{c.n_embd}d/{c.n_head}h, context "
                f"{c.block_size}, pattern {c.pattern}, tensor parallel {c.tp_size}{stages}")

    def load_tokenizer(self) -> Any:
        from spd_ext.data.tokenizers import get_tokenizer

        return get_tokenizer(self.tokenizer["name"], state=self.tokenizer)

    def build(self, comm: TensorParallelComm | None = None) -> ReducedSyncGPT:
        """The model with its weights, this rank's shards only (``comm``: distributed)."""
        if self.kind == "hf":
            from spd_ext.tp.convert import load_pretrained

            return load_pretrained(self.path, pattern=self.config.pattern,
                                   tp_size=self.config.tp_size, comm=comm).eval()
        model = ReducedSyncGPT(self.config, comm, seed=None)
        model.load_dense_state_dict(load_checkpoint(self.path)["model"])
        return model.eval()

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """The whole model's weights in the dense layout."""
        if self.kind == "hf":
            from spd_ext.tp.convert import load_pretrained

            return load_pretrained(self.path, pattern=self.config.pattern,
                                   tp_size=1).dense_state_dict()
        return load_checkpoint(self.path)["model"]

    def build_staged(self, backend: str) -> Any:
        """This rank's pipeline stage (``stages`` of them, each tensor-parallel over
        config.tp_size ranks; collective: every rank builds its own)."""
        import torch.distributed as dist

        from spd_ext.parallel_dims import ParallelDims
        from spd_ext.tp import DistributedComm, EmulatedComm
        from spd_ext.tp.staged import StagedGPT, StageLinks

        tp = self.config.tp_size
        topology = ParallelDims(dist.get_world_size(), tp, pp=self.stages).build()
        comm = DistributedComm(topology.tp_group, backend=backend) if tp > 1 else \
            EmulatedComm(1)
        links = StageLinks.of(dist.get_rank(), self.stages, tp, topology.replica_ranks,
                              topology.replica_group)
        return StagedGPT.from_dense(self.config, self.dense_weights(), comm, links)


def inspect_source(checkpoint: str | None, hf: str | None, pattern: str | None,
                   tp_size: int, stages: int = 1) -> ModelSource:
    """Read the config (and for a checkpoint the whole file) and check the pattern, the
    tensor-parallel size and the pipeline stages against it; every problem is a ValueError
    naming the fix."""
    source = _inspect_source(checkpoint, hf, pattern, tp_size)
    if stages > 1:
        if stages > source.config.n_layer:
            raise UsageError(f"--pp {stages} is more stages than the model's "
                             f"{source.config.n_layer} blocks; use at most "
                             f"{source.config.n_layer}")
        source.stages = stages
    return source


def _inspect_source(checkpoint: str | None, hf: str | None, pattern: str | None,
                    tp_size: int) -> ModelSource:
    if (checkpoint is None) == (hf is None):
        raise UsageError("pass exactly one of --checkpoint (an spd_ext ckpt.pt) or --hf (a "
                         "local Hugging Face GPT-2 folder)")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        if not isinstance(state, dict) or not {"model", "model_config", "tokenizer"} <= set(state) \
                or not isinstance(state["model_config"], dict):
            raise UsageError(f"{checkpoint} lacks model_config/tokenizer: it was not written "
                             "by spd_ext (spd-ext experiment, or spd-ext train's model.pt)")
        fields = {**state["model_config"], "tp_size": tp_size}
        if pattern is not None:
            fields["pattern"] = pattern
        source = ModelSource("checkpoint", str(checkpoint), _config(fields), state["tokenizer"])
        _check_weights(checkpoint, state["model"], source.config)
        _check_tokenizer(checkpoint, state["tokenizer"], source.config.vocab_size)
        trained = state["model_config"].get("tp_size", tp_size)
        reduced = set(parse_pattern(source.config.pattern, source.config.n_layer)) - {"tp"}
        if trained != tp_size and reduced:
            source.note = (f"trained at tensor parallel {trained}; reduced-sync blocks compute "
                           f"a different function at tensor parallel {tp_size} (their "
                           "rank-local views depend on the split): expect different text")
        return source
    path = Path(hf).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"no Hugging Face model folder at {hf} (no config.json); "
                                "download one with `huggingface-cli download gpt2` and pass "
                                "its local path")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{config_file} is not valid JSON: line {exc.lineno}: {exc.msg}") \
            from None
    if hf_config.get("model_type") != "gpt2":
        raise UsageError(f"{hf} holds a {hf_config.get('model_type')!r} model; spd-ext serve "
                         "converts GPT-2 models only")
    n_layer = hf_config.get("n_layer", 12)
    fields = dict(block_size=hf_config.get("n_positions", 1024),
                  vocab_size=hf_config.get("vocab_size", 50257), n_layer=n_layer,
                  n_head=hf_config.get("n_head", 12), n_embd=hf_config.get("n_embd", 768),
                  dropout=0.0, bias=True, pattern=pattern or f"tp*{n_layer}", tp_size=tp_size)
    source = ModelSource("hf", os.fspath(path), _config(fields), {"name": "gpt2"})
    if set(parse_pattern(source.config.pattern, n_layer)) - {"tp"}:
        source.note = ("a dense GPT-2 served with reduced-sync blocks computes a different "
                       "function (zero-shot; `spd-ext tp sensitivity` measures the loss)")
    return source


def _check_weights(path: str, weights: Any, config: GPTConfig) -> None:
    """The checkpoint's weights against the model its config describes, by shape only (on
    the meta device: a config that would take 64 GB allocates nothing), before any rank
    starts."""
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise UsageError(f"{path}: its 'model' entry is not a state dict of tensors; the file "
                         "is damaged or was not written by spd_ext")
    with torch.device("meta"):
        expected = ReducedSyncGPT(config, seed=None).dense_shapes()
    model = (f"the model its model_config describes (n_layer {config.n_layer}, n_embd "
             f"{config.n_embd}, vocab_size {config.vocab_size}, block_size {config.block_size})")
    odd = [f"{what} {names[:3]}" for what, names in (
        ("missing", sorted(set(expected) - set(weights))),
        ("unexpected", sorted(set(weights) - set(expected)))) if names]
    if odd:
        raise UsageError(f"{path}: its weights do not fit {model}: {', '.join(odd)}; the file "
                         "is damaged or its model_config was edited")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise UsageError(f"{path}: its weight {name} is {tuple(weights[name].shape)} but "
                             f"{model} needs {tuple(shape)}; the file is damaged or its "
                             "model_config was edited")


def _check_tokenizer(path: str, state: Any, vocab_size: int) -> None:
    """A tokenizer the server can load, with no more tokens than the model has."""
    from spd_ext.data.tokenizers import CharTokenizer, GPT2Tokenizer

    name = state.get("name") if isinstance(state, dict) else None
    chars = state.get("chars") if name == "char" else None
    if name not in ("char", "gpt2") or (name == "char" and not (isinstance(chars, str)
                                                               and chars)):
        shown = repr(state) if len(repr(state)) <= 60 else repr(state)[:57] + "..."
        raise UsageError(f"{path}: its tokenizer {shown} is not one spd_ext writes (a char "
                         "tokenizer with its characters, or gpt2); the file is damaged or "
                         "was not written by spd_ext")
    tokens = CharTokenizer(chars).vocab_size if name == "char" else GPT2Tokenizer.vocab_size
    if tokens > vocab_size:
        raise UsageError(f"{path}: its {name} tokenizer has {tokens} tokens but the model's "
                         f"vocabulary only {vocab_size}; the file is damaged or its "
                         "model_config was edited")


def _config(fields: dict) -> GPTConfig:
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the model cannot be served this way: {exc}") from None
