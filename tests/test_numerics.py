"""The suite's tolerance rule (tubevit_fast.numerics.judge, used by tests/conftest.py and the
self-checks): FlashAttention's 2x-the-reference's-error rule, capped by what the dtype allows."""
import math

import pytest
import torch

from conftest import ReferenceInaccurate, assert_close_to_golden
from tubevit_fast import numerics


def _golden(n=200, scale=3.84):
    torch.manual_seed(0)
    g = torch.rand(n, dtype=torch.float64) * 2 - 1
    return g * (scale / g.abs().max())


def test_twice_the_reference_error_passes_and_three_times_fails():
    golden = _golden()
    noise = torch.randn_like(golden).sign() * 1e-3
    ref = golden + noise
    assert numerics.judge(golden + 2 * noise, golden, ref, torch.bfloat16, atol=0.0).ok
    assert not numerics.judge(golden + 3 * noise, golden, ref, torch.bfloat16, atol=0.0).ok


def test_a_broken_reference_cannot_widen_the_allowance():
    """The case that motivated the cap: a bf16 reference 7.46 off on values of at most 3.84 let
    zeros pass under the uncapped rule. With the cap, zeros and noise fail; the right answer
    passes, judged against the golden result alone, and the broken reference is reported."""
    golden = _golden()
    broken_ref = golden + 7.46
    zeros = torch.zeros_like(golden)
    noise = torch.randn_like(golden)
    for wrong in (zeros, noise):
        verdict = numerics.judge(wrong, golden, broken_ref, torch.bfloat16, reduction=1536)
        assert verdict.reference_broken and not verdict.ok
        assert verdict.allowed == verdict.cap < 0.1 * 3.84
    right = golden.to(torch.bfloat16)
    verdict = numerics.judge(right, golden, broken_ref, torch.bfloat16, reduction=1536)
    assert verdict.ok and verdict.reference_broken
    with pytest.warns(ReferenceInaccurate, match="judged against the golden result alone"):
        assert_close_to_golden(right, golden, broken_ref, atol=2e-2, reduction=1536)
    with pytest.raises(AssertionError, match="error"), pytest.warns(ReferenceInaccurate):
        assert_close_to_golden(zeros.to(torch.bfloat16), golden, broken_ref, atol=2e-2, reduction=1536)


def test_the_cap_follows_the_dtype_and_grows_like_sqrt_k():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert numerics.error_cap(dtype, 1.0, 1) == pytest.approx(
            numerics.CAP_FACTOR * (torch.finfo(dtype).eps + torch.finfo(torch.float32).eps))
        assert numerics.error_cap(dtype, 2.0, 100) == pytest.approx(2 * numerics.error_cap(dtype, 1.0, 100))
    growth = numerics.error_cap(torch.float32, 1.0, 10_000) / numerics.error_cap(torch.float32, 1.0, 100)
    assert growth <= math.sqrt(10_000 / 100)


def test_non_finite_output_fails():
    golden = _golden()
    fast = golden.clone()
    fast[3] = float("nan")
    assert not numerics.judge(fast, golden, golden, torch.float32).ok
