"""Shared test helpers: the suite's one tolerance rule, poisoning, markers."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Triton picks the interpreter when a kernel is decorated, i.e. at import: decide before any
# kernel module is imported. Without a GPU the Triton tests run on CPU tensors through the
# interpreter; with one they run the compiled kernels on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's on-disk cache keys do not cover a custom op's Python implementation: a graph
# compiled against an older version of an op could be replayed. Compile afresh every run.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tubevit_fast_inductor_"))

import tubevit_fast.backends as backends  # noqa: E402

# Where Triton-backend tests put their tensors.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def max_abs_err(x: torch.Tensor, golden: torch.Tensor) -> float:
    return (x.double() - golden.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_golden(fast: torch.Tensor, golden: torch.Tensor, same_dtype_ref: torch.Tensor,
                           atol: float = 1e-5, name: str = "output") -> None:
    """FlashAttention's rule: the fast result's error against a float64 golden result may be at
    most 2x the error of PyTorch's own computation in the same dtype, plus a small atol."""
    assert fast.shape == golden.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(golden.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values (unwritten output?)"
    err, ref_err = max_abs_err(fast, golden), max_abs_err(same_dtype_ref, golden)
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.3e} > 2 x reference error {ref_err:.3e} + {atol:.1e}"


def dtype_atol(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Absolute slack per dtype, for values of magnitude ~scale."""
    return scale * {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}[dtype]


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    # A developer's TUBEVIT_FAST_BACKEND / _SELFCHECK must not change what tests exercise, and
    # a test's self-check verdicts (cached per process) must not leak into the next test.
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    monkeypatch.delenv(backends.ENV_SELFCHECK, raising=False)
    yield
    backends.reset_selfchecks()
