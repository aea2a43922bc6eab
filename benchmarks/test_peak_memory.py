"""Sanity checks of BenchTools.peak_memory on CPU, against allocations of known size.

Not benchmarks: `--benchmark-only` skips them; `pytest benchmarks/` runs them (under 2 s).
"""
from __future__ import annotations

import torch

MiB = 2**20
CPU = torch.device("cpu")


def _filled(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8).fill_(1)  # filled: the pages are really used


def test_counts_a_freed_temporary(bench):
    def fn():
        big = _filled(100 * MiB)
        del big
        return _filled(30 * MiB)

    peak, method = bench.peak_memory(fn, CPU)
    assert 100 * MiB <= peak < 101 * MiB
    assert "profiler" in method


def test_excludes_what_was_held_before(bench):
    held = _filled(50 * MiB)
    peak, _ = bench.peak_memory(lambda: held + 1, CPU)
    assert 50 * MiB <= peak < 51 * MiB  # the sum's output only, not `held`


def test_mm_counts_its_output(bench):
    a, b = torch.randn(256, 512), torch.randn(512, 1024)
    peak, _ = bench.peak_memory(lambda: torch.mm(a, b), CPU)
    assert peak >= 256 * 1024 * 4


def test_backward_temporaries(bench):
    x = torch.randn(512, 1024)
    w = torch.randn(1024, 2048, requires_grad=True)
    out_bytes, grad_bytes = 512 * 2048 * 4, w.numel() * 4

    def fn():
        y = (x @ w).relu()
        return torch.autograd.grad(y.sum(), [w])

    peak, _ = bench.peak_memory(fn, CPU)
    # relu output (saved) + its gradient + dW are alive together at the end of backward.
    assert peak >= 2 * out_bytes + grad_bytes


def test_cached_under_key(bench):
    tools = type(bench)()  # a fresh cache, not the session's
    first = tools.peak_memory(lambda: _filled(MiB), CPU, key="k")
    assert tools.peak_memory(lambda: _filled(8 * MiB), CPU, key="k") == first
