"""CUDA kernels against float64 references (skipped without a CUDA device).

Run on a GPU machine: `pytest tests/test_cuda.py` (the ops JIT-build on first use).
"""

from __future__ import annotations

import pytest
import torch

from spd_ext.ops import dequantize_blockwise, quantize_blockwise, weighted_reduce

from conftest import assert_within_bound

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 4097, 2**20 + 3])
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned, the scalar path
def test_weighted_reduce_cuda(dtype: torch.dtype, n: int, offset: int) -> None:
    g = torch.Generator().manual_seed(n + offset)
    xs = [(torch.randn(n + offset, generator=g) * 3).to(dtype).cuda()[offset:] for _ in range(5)]
    w = torch.randn(5, generator=g)
    out = torch.full((n + offset,), float("nan"), dtype=dtype, device="cuda")[offset:]
    weighted_reduce(xs, w.cuda(), out=out, impl="kernel")
    terms = [float(wj) * x.double().cpu() for wj, x in zip(w, xs)]
    assert_within_bound(out.cpu(), terms, f"cuda {dtype} n={n} offset={offset}")


def test_device_weights_change_without_a_host_sync() -> None:
    xs = [torch.ones(1000, device="cuda"), torch.full((1000,), 2.0, device="cuda")]
    w = torch.tensor([1.0, 0.0], device="cuda")
    a = weighted_reduce(xs, w, impl="kernel").clone()
    w.copy_(torch.tensor([0.0, 1.0]))  # a later step's weights, written on the device
    b = weighted_reduce(xs, w, impl="kernel")
    assert a.eq(1.0).all() and b.eq(2.0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, block", [(1, 256), (1000, 256), (70_001, 64), (2**20, 256)])
def test_cuda_quantization_matches_cpu_bitwise(dtype: torch.dtype, n: int, block: int) -> None:
    x = (torch.randn(n) * 3).to(dtype)
    ref = quantize_blockwise(x, block, impl="fallback")
    q = quantize_blockwise(x.cuda(), block, impl="kernel")
    assert torch.equal(q.values.cpu(), ref.values) and torch.equal(q.scales.cpu(), ref.scales)
    assert torch.equal(dequantize_blockwise(q, impl="kernel").cpu(),
                       dequantize_blockwise(ref, impl="fallback"))
    bad = x.cuda()
    bad[n // 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_blockwise(bad, block, impl="kernel")


def _ipc_ranks(rank: int, world: int) -> list[str]:
    import hashlib

    import torch.distributed as dist

    from spd_ext.comm import all_reduce, path

    torch.cuda.set_device(0)  # every process shares the one GPU (CUDA IPC works across them)
    failures: list[str] = []
    for dtype in DTYPES:
        for n in (1, 3, 4097, 2**16 + 5, 2**20 + 7):  # odd sizes, one-shot and two-shot
            g = torch.Generator().manual_seed(n)
            xs = [(torch.randn(n, generator=g) * 2).to(dtype) for _ in range(world)]
            w = torch.softmax(torch.randn(world, generator=g), 0)
            for op, kwargs, scale in (("sum", {}, [1.0] * world),
                                      ("weighted", {"weights": w.cuda()}, w.tolist())):
                t = xs[rank].cuda()
                if path(t) != "cuda-ipc":
                    failures.append(f"{dtype} n={n}: path {path(t)}")
                all_reduce(t, op, **kwargs)
                try:
                    assert_within_bound(t.cpu(), [s * x.double() for s, x in zip(scale, xs)],
                                        f"rank {rank} {dtype} n={n} {op}")
                except AssertionError as exc:
                    failures.append(str(exc))
                digest = hashlib.sha1(t.cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
                everyone: list = [None] * world
                dist.all_gather_object(everyone, digest)
                if len(set(everyone)) != 1:
                    failures.append(f"{dtype} n={n} {op}: ranks differ bitwise")
    t = torch.empty(4096, device="cuda")
    for step in range(1000):  # back to back: flag races show up as wrong sums
        t.fill_(float(rank + step))
        all_reduce(t)
        expect = world * step + world * (world - 1) / 2
        if step % 100 == 0 or step == 999:
            if not torch.all(t == expect):
                failures.append(f"call {step}: {t[0].item()} != {expect}")
                break
    return failures


@pytest.mark.parametrize("world", [2, 4])
def test_ipc_all_reduce_processes_sharing_the_gpu(world: int) -> None:
    from spd_ext.launch import spawn

    for failures in spawn(_ipc_ranks, world, timeout=600):
        assert not failures, "\n".join(failures[:5])


def _ipc_registered_ranks(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    from spd_ext.comm import all_reduce, ipc_buffer

    torch.cuda.set_device(0)
    failures: list[str] = []

    def check(t: torch.Tensor, expect: torch.Tensor, what: str) -> None:
        if not torch.allclose(t.double(), expect.double(), rtol=1e-6, atol=1e-6):
            failures.append(f"rank {rank} {what}: max error "
                            f"{(t.double() - expect.double()).abs().max().item():.3g}")

    # Zero-copy: the whole buffer, views at offsets, one-shot and two-shot sizes.
    buf = ipc_buffer(2**18 + 64)  # 1 MiB: past the one-shot threshold
    for lo, n in ((0, 2**18 + 64), (16, 1000), (64, 2**17), (4, 7)):
        view = buf[lo:lo + n]
        view.copy_(torch.arange(n, device="cuda", dtype=torch.float32) * (rank + 1))
        all_reduce(view)
        check(view, torch.arange(n, device="cuda") * (world * (world + 1) / 2), f"view {lo}+{n}")
    # CUDA graphs: set up outside capture, then replay with new data and weights each time.
    plain = torch.zeros(4096, device="cuda")
    registered = ipc_buffer(4096, torch.bfloat16)
    weights = torch.full((world,), 1.0 / world, device="cuda")
    all_reduce(plain)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        all_reduce(plain)
        all_reduce(registered, "weighted", weights=weights)
    for step in range(100):
        plain.fill_(float(rank + step))
        registered.fill_(float(rank + 1))
        w = torch.softmax(torch.arange(world, dtype=torch.float32) * (step % 3), 0)
        weights.copy_(w)
        graph.replay()
        check(plain, torch.full_like(plain, world * step + world * (world - 1) / 2),
              f"graph replay {step} (staged)")
        expect = sum(float(w[p]) * (p + 1) for p in range(world))
        if (registered.float() - expect).abs().max().item() > 2e-2:
            failures.append(f"rank {rank} graph replay {step} (registered): "
                            f"{registered[0].item()} != {expect}")
    # Ranks passing different memory (registered on rank 0 only): NaN, not a wrong sum.
    odd = buf[:1024] if rank == 0 else torch.ones(1024, device="cuda")
    all_reduce(odd)
    if not torch.isnan(odd).all():
        failures.append(f"rank {rank}: disagreeing ranks did not give NaN")
    # Capturing a group's first all-reduce cannot work (its set-up is collective): it says so.
    pair = dist.new_group(list(range(world)))
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            all_reduce(torch.ones(16, device="cuda"), group=pair)
        failures.append(f"rank {rank}: capture of a group's set-up did not raise")
    except RuntimeError as exc:
        if "before capturing" not in str(exc):
            failures.append(f"rank {rank}: unexpected error {exc}")
    return failures


@pytest.mark.parametrize("world", [2, 4])
def test_ipc_registered_buffers_and_cuda_graphs(world: int) -> None:
    from spd_ext.launch import spawn

    for failures in spawn(_ipc_registered_ranks, world, timeout=600):
        assert not failures, "\n".join(failures[:5])
