"""spd_ext under torch.compile: its collectives and kernels are operators of the ``spd_ext``
namespace with fake implementations, so a distributed model compiles without a graph
break (``fullgraph=True``) and trains exactly as it does eagerly."""
from __future__ import annotations

import torch

from spd_ext.comm import library  # noqa: F401  (registers the operators)
from spd_ext.launch import spawn
from spd_ext.tp import DistributedComm, GPTConfig, ReducedSyncGPT

PATTERN = "tp,spd,parallel,palm,ladder"  # every block: async regions and partial grads


def _losses(rank: int, world: int, backend: str) -> dict:
    config = GPTConfig(block_size=16, vocab_size=61, n_layer=5, n_head=2 * world,
                       n_embd=8 * world, pattern=PATTERN, tp_size=world)
    runs = {}
    for name in ("eager", "compiled"):
        model = ReducedSyncGPT(config, DistributedComm(backend=backend), seed=5)
        call = torch.compile(model, fullgraph=True) if name == "compiled" else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, counts = [], []
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            idx, tgt = (torch.randint(61, (3, 11), generator=g) for _ in range(2))
            _, loss = call(idx, tgt)
            loss.backward()
            model.sync_partial_grads_()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            c = model.sync_counter.step()
            counts.append((c["forward"], c["backward"]))
        runs[name] = (losses, counts)
    return runs


def test_a_compiled_distributed_model_trains_as_the_eager_one() -> None:
    for runs in spawn(_losses, 2, "spd_ext", timeout=600):
        (eager, eager_counts), (compiled, compiled_counts) = runs["eager"], runs["compiled"]
        assert torch.allclose(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5), runs
        assert compiled_counts == eager_counts, runs
        assert eager[-1] < eager[0]  # it trains


def test_the_operators_fake_implementations_agree_with_the_kernels() -> None:
    """torch.library.opcheck: schema, fake (meta) implementation and dispatch of each
    operator against its real implementation."""
    x = torch.randn(7, 5)
    torch.library.opcheck(torch.ops.spd_ext.weighted_reduce.default,
                          ([x, torch.randn(7, 5)], [0.25, 0.75]))
    torch.library.opcheck(torch.ops.spd_ext.quantize_blockwise.default, (x, 4))
    values, scales = torch.ops.spd_ext.quantize_blockwise(x, 4)
    torch.library.opcheck(torch.ops.spd_ext.dequantize_blockwise.default,
                          (values, scales, 4, [7, 5], torch.float32))
