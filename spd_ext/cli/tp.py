"""`spd-ext tp ...`: a sync pattern's measured all-reduce and parameter counts, and each
block's loss sensitivity to dropping its sync."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from spd_ext.cli.flags import Help, add_options, config_from
from spd_ext.errors import UsageError
from spd_ext.experiments.config import SensitivityConfig
from spd_ext.tp.config import GPTConfig
from spd_ext.utils.options import closest, options_of

#: the shape `tp syncs` measures by default: GPT-2 124M, two shards
_SYNCS_SHAPE = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, tp_size=2)


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, formatter_class=Help, help=help)
    tp = p.add_subparsers(dest="tp", required=True, metavar="{syncs,sensitivity}")

    s = tp.add_parser("syncs", formatter_class=Help,
                      help="measure a pattern's sync count and parameter count",
                      description="Run one forward and backward pass on the meta device (no "
                      "compute) and print the all-reduces the library counts, per block.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--pattern", help=options_of(GPTConfig)["pattern"].help)
    src.add_argument("--config", help="a JSON file from configs/tp")
    add_options(s, _SYNCS_SHAPE, only=("n_layer", "n_head", "n_embd", "vocab_size", "tp_size"))
    s.set_defaults(func=tp_syncs)

    v = tp.add_parser("sensitivity", formatter_class=Help,
                      help="loss change when each block alone drops a sync",
                      description="For a trained dense model, the validation loss when each "
                      "block alone becomes an spd block (its attention all-reduce dropped).")
    add_options(v, SensitivityConfig())
    v.add_argument("--markdown", action="store_true", help="print a Markdown table")
    v.set_defaults(func=tp_sensitivity)


def gpt_config_file(path: str) -> GPTConfig:
    """The ``"model"`` section of a JSON config as a GPTConfig; every mistake in the file
    is one message naming the file."""
    if not Path(path).is_file():
        raise UsageError(f"--config {path} is not a file; pass a JSON file such as "
                         "configs/tp/gpt2-124m-12sync.json")
    try:
        spec = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text (JSON) file") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UsageError(f"{path} has no \"model\" object; a config holds "
                         "{\"model\": {\"pattern\": ..., \"n_layer\": ..., ...}}")
    valid = [f.name for f in fields(GPTConfig)]
    for key in spec["model"]:
        if key not in valid:
            close = closest(key, valid)
            hint = f"; did you mean {close!r}?" if close else ""
            raise UsageError(f"{path}: unknown model field {key!r}{hint} (fields: "
                             f"{', '.join(valid)})")
    try:
        return GPTConfig(**spec["model"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def tp_syncs(args: argparse.Namespace) -> int:
    import torch

    from spd_ext.tp import ReducedSyncGPT
    from spd_ext.utils.table import format_table

    if args.config:
        config = gpt_config_file(args.config)
    else:
        config = config_from(args, _SYNCS_SHAPE)
    with torch.device("meta"):
        model = ReducedSyncGPT(config, seed=None)
        idx = torch.zeros(1, 4, dtype=torch.long)
        _, loss = model(idx, idx)
        loss.backward()
    counts = model.sync_counter.step()
    print(f"pattern {config.pattern}: {counts['forward']} forward and {counts['backward']} "
          f"backward all-reduces per step, {model.num_params():,} parameters")
    order = sorted(counts["blocks"].items(),
                   key=lambda kv: int(kv[0].split(":")[0]) if kv[0][0].isdigit() else 1 << 30)
    rows = [[label, f, b] for label, (f, b) in order]
    print(format_table(["block", "forward", "backward"], rows))
    return 0


def tp_sensitivity(args: argparse.Namespace) -> int:
    from spd_ext.experiments import sensitivity

    cfg = config_from(args, SensitivityConfig())
    print(sensitivity.table(sensitivity.run(cfg), markdown=args.markdown))
    return 0
