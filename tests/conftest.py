"""Shared test helpers: the suite's one tolerance rule, poisoning, markers.

The tolerance rule (assert_close_to_golden, which applies tubevit_fast.numerics.judge): a fast
result computed in dtype d is compared with a float64 golden result of the same (unrounded)
inputs. Its largest error may be

    min(2 x ref_err + atol,  cap),   cap = 8 (eps(d) + eps(fp32) sqrt(K)) x max|golden|

ref_err is the error of PyTorch's own computation in d against the golden result
(FlashAttention's rule); cap is what d itself can excuse after a reduction of length K, so a
badly wrong reference (some CPU bf16 Conv3d shapes in torch 2.14 are off by orders of magnitude)
never widens the allowance: the test then holds the fast result to cap alone (the golden result
without the reference) and says so in a ReferenceInaccurate warning. Pass the op's real
reduction length K where it is known (a patch, a head dim, a sequence); the default,
DEFAULT_REDUCTION, is the largest in the suite.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch

# Triton picks the interpreter when a kernel is decorated, i.e. at import: decide before any
# kernel module is imported. Without a GPU the Triton tests run on CPU tensors through the
# interpreter; with one they run the compiled kernels on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's on-disk cache keys do not cover a custom op's Python implementation: a graph
# compiled against an older version of an op could be replayed. Compile afresh every run, in a
# folder removed when the run ends.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tubevit_fast_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import tubevit_fast.backends as backends  # noqa: E402
from tubevit_fast import numerics  # noqa: E402

# Where Triton-backend tests put their tensors.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


max_abs_err = numerics.max_abs_err
dtype_atol = numerics.default_atol
DEFAULT_REDUCTION = 4096


class ReferenceInaccurate(UserWarning):
    """PyTorch's own same-dtype result is further from the golden one than the dtype allows."""


def assert_close_to_golden(fast: torch.Tensor, golden: torch.Tensor, same_dtype_ref: torch.Tensor,
                           atol: float = 1e-5, name: str = "output", reduction: int = DEFAULT_REDUCTION,
                           dtype: torch.dtype | None = None) -> None:
    """The suite's tolerance rule (module docstring). dtype: the precision the fast result was
    computed in, when it differs from its storage (an fp32 lse of fp16 inputs); default fast's."""
    assert fast.shape == golden.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(golden.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values (unwritten output?)"
    verdict = numerics.judge(fast, golden, same_dtype_ref, dtype or fast.dtype, reduction, atol)
    if verdict.reference_broken:
        warnings.warn(ReferenceInaccurate(verdict.describe(name)), stacklevel=2)
    assert verdict.ok, verdict.describe(name)


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    # A developer's TUBEVIT_FAST_BACKEND / _SELFCHECK must not change what tests exercise, and
    # a test's self-check verdicts (cached per process) must not leak into the next test.
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    monkeypatch.delenv(backends.ENV_SELFCHECK, raising=False)
    yield
    backends.reset_selfchecks()


@pytest.fixture(autouse=True)
def _private_clip_index_cache(tmp_path_factory, monkeypatch):
    """The command lines cache their clip index under $XDG_CACHE_HOME: tests never touch the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))
