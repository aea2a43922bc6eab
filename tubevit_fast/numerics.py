"""How close a fast result must be to the truth: the one tolerance rule of the self-checks and tests.

A fast op computed in `dtype` is compared with a float64 golden result computed from the same
(unrounded) inputs. Its largest absolute error may be

    allowed = min(2 * ref_err + atol,  cap)
    cap     = CAP_FACTOR * (eps(dtype) + eps(fp32) * sqrt(K)) * scale

- 2 * ref_err + atol is FlashAttention's rule: at most twice the error PyTorch itself makes
  computing the same thing in the same dtype (ref_err, measured against the golden result),
  plus a small absolute slack for values near zero.
- cap bounds that from above by what the dtype allows, so a reference that is itself badly
  wrong (it happens: some CPU bf16 Conv3d shapes in torch 2.14 are off by orders of magnitude)
  cannot widen the allowance until zeros or noise would pass. eps(dtype) covers rounding the
  inputs and the output (relative to scale = the largest |golden| value); eps(fp32) * sqrt(K)
  covers fp32 accumulation over a reduction of length K, the only part that grows with K.
  A reference whose own error exceeds cap is reported (`Verdict.reference_broken`); the fast
  result is then held to cap alone, i.e. judged against the golden result without the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CAP_FACTOR = 8.0
_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def default_atol(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Absolute slack per dtype, for values of magnitude ~scale."""
    return scale * _ATOL[dtype]


def error_cap(dtype: torch.dtype, scale: float, reduction: int = 1) -> float:
    """The largest error `dtype` can excuse at output magnitude `scale` after a reduction of length K."""
    eps = torch.finfo(dtype).eps
    return CAP_FACTOR * (eps + torch.finfo(torch.float32).eps * math.sqrt(max(reduction, 1))) * scale


def max_abs_err(x: torch.Tensor, golden: torch.Tensor) -> float:
    return (x.double() - golden.double()).abs().max().item() if x.numel() else 0.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    error: float            # max |fast - golden|
    allowed: float
    reference_error: float  # max |same-dtype reference - golden|
    cap: float
    reference_broken: bool  # the reference's own error exceeds cap

    def describe(self, name: str) -> str:
        text = (f"{name}: error {self.error:.3e} vs allowed {self.allowed:.3e} "
                f"(2 x reference error {self.reference_error:.3e} + atol, capped at {self.cap:.3e})")
        if self.reference_broken:
            text += "; the same-dtype reference exceeds the dtype's bound itself, judged against the golden result alone"
        return text


def judge(fast: torch.Tensor, golden: torch.Tensor, same_dtype_ref: torch.Tensor, dtype: torch.dtype,
          reduction: int = 1, atol: float | None = None) -> Verdict:
    """Apply the rule (module docstring) to `fast`, computed in `dtype`, against `golden` (float64)."""
    scale = golden.double().abs().max().item() if golden.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    atol = default_atol(dtype) if atol is None else atol
    err, ref_err = max_abs_err(fast, golden), max_abs_err(same_dtype_ref, golden)
    cap = max(error_cap(dtype, scale, reduction), atol)
    allowed = min(2 * ref_err + atol, cap)
    finite = bool(torch.isfinite(fast).all()) if fast.numel() else True
    return Verdict(finite and err <= allowed, err, allowed, ref_err, cap, ref_err > cap)
