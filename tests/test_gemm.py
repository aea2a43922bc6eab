"""tubevit_fast.torch_backend.gemm.linear: x @ w.T (+ bias) on oneDNN (CPU fp32/bf16) or torch.mm."""
import pytest
import torch

from tubevit_fast.torch_backend import gemm


def _operands(m, k, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype),
            torch.randn(n, generator=g).to(dtype))


@pytest.fixture(autouse=True, params=["onednn", "mm"])
def route(request, monkeypatch):
    """Every test runs on both GEMMs, whichever this machine's CPU prefers."""
    if request.param == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setattr(gemm, "cpu_gemm", lambda: request.param)
    return request.param


def test_onednn_is_available_and_chosen_by_vendor(monkeypatch):
    # The speed claims of the CPU path rest on this build having oneDNN's linear op.
    assert gemm.onednn_available() == (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    monkeypatch.undo()  # the real choice, not the fixture's
    gemm.cpu_gemm.cache_clear()
    for vendor, expected in (("GenuineIntel", "mm"), ("AuthenticAMD", "onednn")):
        monkeypatch.setattr(gemm, "_cpu_vendor", lambda: vendor)
        gemm.cpu_gemm.cache_clear()
        assert gemm.cpu_gemm() == (expected if gemm.onednn_available() else "mm")
    gemm.cpu_gemm.cache_clear()


def test_the_route_is_taken(route, monkeypatch):
    called = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: called.append(1) or real(*a))
    x, w, b = _operands(8, 12, 6)
    gemm.linear(x, w, b)
    assert bool(called) == (route == "onednn")


@pytest.mark.parametrize("m,k,n", [(392, 1536, 768), (7, 54, 20), (1, 3, 1)])
def test_fp32_error_is_that_of_fp32_accumulation(m, k, n):
    """No silent down-conversion at torch's default matmul precision (bf16/tf32 would miss by
    ~1e-2 relative): within fp32 rounding of the float64 product, on the order of torch.mm's."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _check_fp32_error(m, k, n)
    finally:
        torch.set_float32_matmul_precision(previous)


def _check_fp32_error(m, k, n):
    x, w, b = _operands(m, k, n)
    exact = x.double() @ w.double().t() + b.double()
    err = (gemm.linear(x, w, b).double() - exact).abs().max().item()
    mm_err = (torch.addmm(b, x, w.t()).double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err <= 1e-5 * scale and err <= 8 * mm_err + 1e-6 * scale


@pytest.mark.parametrize("layout", ["transposed", "stride0", "sliced"])
def test_any_strides(layout):
    x, w, _ = _operands(33, 40, 17)
    if layout == "transposed":  # the weight-gradient GEMM: dY^T A with both operands transposed views
        a, bmat = x.t().contiguous().t(), w.t().contiguous().t()
    elif layout == "stride0":  # a gradient made by .sum(): stride 0
        a, bmat = torch.ones(()).expand(33, 40), w
    else:
        a, bmat = torch.randn(33, 80)[:, ::2], w
    torch.testing.assert_close(gemm.linear(a, bmat), a @ bmat.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    x, w, b = _operands(9, 12, 5, dtype)
    want = (x.double() @ w.double().t() + b.double())
    # Exact inputs (the operands are already in dtype): only fp32 accumulation and the rounding of
    # the result (and of the bias add) remain, within a unit of the dtype's precision.
    tol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
    got = gemm.linear(x, w, None if dtype == torch.bfloat16 else b)
    if dtype == torch.bfloat16:
        want = want - b.double()
    assert got.dtype == dtype and got.shape == (9, 5)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_empty():
    x, w, b = _operands(0, 4, 3)
    assert gemm.linear(x, w, b).shape == (0, 3)


@pytest.mark.parametrize("bias_layout", ["sliced", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_any_strides(bias_layout, dtype):
    """oneDNN reads the bias as a dense vector: strided or expanded ones must be materialised."""
    x, w, _ = _operands(16, 24, 10, dtype)
    bias = (torch.randn(20)[::2] if bias_layout == "sliced" else torch.randn(1).expand(10)).to(dtype)
    want = x.double() @ w.double().t() + bias.double()
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps  # exact inputs: result rounding only
    torch.testing.assert_close(gemm.linear(x, w, bias).double(), want, rtol=tol, atol=tol)


def test_bias_of_another_dtype_and_bad_shapes():
    x, w, b = _operands(8, 12, 6)
    # fp32 x with an fp64 bias: torch.addmm's type promotion rules, no oneDNN primitive error.
    with pytest.raises(RuntimeError):
        gemm.linear(x, w, b.double())
    with pytest.raises(ValueError, match="bias must be"):
        gemm.linear(x, w, torch.randn(7))
    with pytest.raises(ValueError, match=r"x must be \(M, K\)"):
        gemm.linear(x, torch.randn(6, 11))
