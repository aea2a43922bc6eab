"""attention: the reference's own maths, the Triton kernels (interpreter on CPU, compiled on a GPU)
and the torch backend against a float64 golden result, forward and backward; the custom ops under
opcheck and torch.compile; dispatch; bad input."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from conftest import TRITON_DEVICE, assert_close_to_golden, dtype_atol
from tubevit_fast import backends
from tubevit_fast.ops import attention as ops_attention
from tubevit_fast.kernels.attention import HEAD_DIMS as TRITON_HEAD_DIMS
from tubevit_fast.ops.attention import _attention_bwd_op, _attention_fwd_op, attention, check_attention_inputs
from tubevit_fast.reference.attention import attention_reference

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    """Dense (batch, nq, nk) or packed varlen (per-segment query and key lengths)."""
    heads: int
    head_dim: int
    batch: int = 0
    nq: int = 0
    nk: int = 0
    seg_q: tuple = ()
    seg_k: tuple = ()

    @property
    def varlen(self) -> bool:
        return bool(self.seg_q)

    @property
    def id(self) -> str:
        if self.varlen:
            return (f"varlen-q{','.join(map(str, self.seg_q))}-k{','.join(map(str, self.seg_k))}"
                    f"-H{self.heads}-D{self.head_dim}")
        n = f"N{self.nq}" if self.nq == self.nk else f"Nq{self.nq}-Nk{self.nk}"
        return f"B{self.batch}-{n}-H{self.heads}-D{self.head_dim}"


def dense(batch, nq, nk, heads, head_dim):
    return Case(heads, head_dim, batch=batch, nq=nq, nk=nk)


def varlen(seg_q, seg_k, heads, head_dim):
    return Case(heads, head_dim, seg_q=tuple(seg_q), seg_k=tuple(seg_k))


CASES = [
    *(dense(2, 33, 33, 2, d) for d in TRITON_HEAD_DIMS),     # every Triton head dim, ragged tails
    dense(1, 7, 7, 1, 64),                                     # shorter than one tile
    dense(2, 7, 33, 2, 96),                                    # Nq != Nk
    dense(3, 1, 33, 2, 128),                                   # pooling head: one query per sample
    varlen([7, 1, 33, 16], [7, 1, 33, 16], 2, 80),             # self-attention, a length-1 segment
    varlen([1, 1, 1], [7, 1, 20], 2, 64),                      # pooling head, packed
    varlen([5, 0, 3], [9, 4, 1], 1, 32),                       # a segment with keys but no queries
    varlen([4, 3, 2], [5, 0, 6], 2, 96),                       # queries without keys: out 0, lse -inf
]


def cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make_inputs(case: Case, device):
    """Fresh random q, k, v, dout (float64, on `device`) and cu_seqlens (or None)."""
    if case.varlen:
        q_shape = (sum(case.seg_q), case.heads, case.head_dim)
        k_shape = (sum(case.seg_k), case.heads, case.head_dim)
        cu = (cu_seqlens(case.seg_q, device), cu_seqlens(case.seg_k, device))
    else:
        q_shape = (case.batch, case.nq, case.heads, case.head_dim)
        k_shape = (case.batch, case.nk, case.heads, case.head_dim)
        cu = (None, None)
    q, dout = (torch.randn(q_shape, dtype=torch.float64, device=device) for _ in range(2))
    k, v = (torch.randn(k_shape, dtype=torch.float64, device=device) for _ in range(2))
    return (q, k, v), dout, cu


def reference_results(inputs, dout, cu, dtype, scale=None):
    """[out, dq, dk, dv] and lse of the reference computed in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out, lse = attention_reference(*leaves, *cu, softmax_scale=scale, return_lse=True)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype))], lse


@pytest.fixture
def poison_empty(monkeypatch):
    """Every floating torch.empty/empty_like the ops make during the test starts as NaN, so an
    output element left unwritten shows up as a non-finite value."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def wrapper(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))


def check_op_against_golden(backend: str, case: Case, dtype, device, softmax_scale=None):
    """Forward and backward custom ops of `backend` vs the float64 reference (call with poison_empty)."""
    inputs, dout, cu = make_inputs(case, device)
    golden, golden_lse = reference_results(inputs, dout, cu, torch.float64, softmax_scale)
    same_dtype, same_dtype_lse = reference_results(inputs, dout, cu, dtype, softmax_scale)
    q, k, v = (t.to(dtype) for t in inputs)
    max_q, max_k, scale = check_attention_inputs(q, k, v, *cu, softmax_scale=softmax_scale)
    out, lse = _attention_fwd_op(q, k, v, *cu, max_q, max_k, scale, backend)
    grads = _attention_bwd_op(dout.to(dtype), q, k, v, out, lse, *cu, max_q, max_k, scale, backend)
    atol = dtype_atol(dtype)
    for name, fast, gold, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), golden, same_dtype):
        assert fast.dtype == dtype, name
        assert_close_to_golden(fast, gold, ref, atol=atol, name=name)
    assert lse.dtype == torch.float32
    # Queries without keys have lse -inf; the rest must meet the usual rule.
    no_keys = torch.isneginf(golden_lse)
    assert torch.equal(torch.isneginf(lse), no_keys), "lse: -inf exactly where a query has no keys"
    assert_close_to_golden(lse[~no_keys], golden_lse[~no_keys], same_dtype_lse[~no_keys],
                           atol=dtype_atol(torch.float32), name="lse", dtype=dtype)


# ---- the reference ---------------------------------------------------------------------------

def test_reference_is_the_softmax_formula():
    """Per (b, h, query i): weights exp(s_ij) / sum_j exp(s_ij) with s_ij = scale q_i . k_j, then
    sum_j w_ij v_j; lse_i = log sum_j exp(s_ij). Written out with Python loops."""
    q, k, v = (torch.randn(2, n, 2, 32, dtype=torch.float64) for n in (3, 5, 5))
    out, lse = attention_reference(q, k, v, softmax_scale=0.3, return_lse=True)
    for b in range(2):
        for h in range(2):
            for i in range(3):
                scores = [0.3 * float(q[b, i, h] @ k[b, j, h]) for j in range(5)]
                total = sum(math.exp(s) for s in scores)
                expected = sum(math.exp(s) / total * v[b, j, h] for j, s in enumerate(scores))
                torch.testing.assert_close(out[b, i, h], expected, rtol=1e-12, atol=1e-12)
                assert abs(lse[b, h, i].item() - math.log(total)) < 1e-5  # lse is stored as fp32


def test_reference_varlen_is_dense_per_segment():
    q, k, v = torch.randn(9, 2, 64), torch.randn(12, 2, 64), torch.randn(12, 2, 64)
    cu_q, cu_k = cu_seqlens([4, 0, 5], "cpu"), cu_seqlens([3, 2, 7], "cpu")
    out, lse = attention_reference(q, k, v, cu_q, cu_k, return_lse=True)
    assert lse.shape == (2, 9)
    for (q0, q1), (k0, k1) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        seg_out, seg_lse = attention_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                               return_lse=True)
        torch.testing.assert_close(out[q0:q1], seg_out[0])
        torch.testing.assert_close(lse[:, q0:q1], seg_lse[0])


# ---- fast backends against the float64 golden result -------------------------------------------

TRITON_AVAILABLE = backends.unavailable_reason("attention", "triton", TRITON_DEVICE) is None
# Without a GPU the kernels run in Triton's interpreter, which computes bf16 dots wrongly:
# bf16 is covered there by the AOT audit (tubevit_fast.audit) instead.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if TRITON_DEVICE.type == "cuda" else [])
TRITON_MARKS = [pytest.mark.interpreter if TRITON_DEVICE.type == "cpu" else pytest.mark.gpu,
                pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend unavailable here")]
BACKENDS = ["reference", "torch", pytest.param("triton", marks=TRITON_MARKS)]


def device_for(backend: str) -> torch.device:
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def triton_test(fn):
    for mark in TRITON_MARKS:
        fn = mark(fn)
    return fn


@triton_test
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.usefixtures("poison_empty")
def test_triton_matches_golden(case, dtype):
    check_op_against_golden("triton", case, dtype, TRITON_DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.usefixtures("poison_empty")
def test_torch_backend_matches_golden(case, dtype):
    check_op_against_golden("torch", case, dtype, torch.device("cpu"))


SCALE_CASES = [dense(2, 9, 12, 2, 64), varlen([3, 1, 6], [5, 2, 6], 2, 32)]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("case", SCALE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("scale", [0.37, -0.37, 0.0])
@pytest.mark.usefixtures("poison_empty")
def test_custom_softmax_scale_forward_and_backward(backend, case, scale):
    """A scale far from 1/sqrt(Dh), dense and packed, through the custom ops' forward and backward
    (a backend that drops the scale anywhere, or applies it twice, fails). Negative and zero
    scales too: a kernel that takes the row max before scaling must not assume a positive scale,
    and one that masks with -inf must not compute -inf * 0."""
    check_op_against_golden(backend, case, torch.float32, device_for(backend), softmax_scale=scale)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("case", SCALE_CASES, ids=lambda c: c.id)
@pytest.mark.usefixtures("poison_empty")
def test_large_negative_scale_does_not_overflow(backend, case):
    """softmax_scale -6 on scores spread over tens of units: a forward that stabilises the softmax
    with the row's largest raw score (its smallest scaled one) overflows fp32 in exp. q and k sit on
    a 1/4 grid, so every score is exact and the scale amplifies no rounding. Forward only: at
    |lse| of tens the backward's P, recomputed from the fp32 lse, is inherently less exact than
    the reference's (about 1e-5 relative), for FlashAttention-style kernels generally."""
    (q, k, v), _, cu = make_inputs(case, device_for(backend))
    q, k = (q * 4).round() / 4, (k * 4).round() / 4
    golden, golden_lse = attention_reference(q, k, v, *cu, softmax_scale=-6.0, return_lse=True)
    same_dtype, same_dtype_lse = attention_reference(q.float(), k.float(), v.float(), *cu, softmax_scale=-6.0,
                                                     return_lse=True)
    max_q, max_k, scale = check_attention_inputs(q.float(), k.float(), v.float(), *cu, softmax_scale=-6.0)
    out, lse = _attention_fwd_op(q.float(), k.float(), v.float(), *cu, max_q, max_k, scale, backend)
    assert_close_to_golden(out, golden, same_dtype, atol=dtype_atol(torch.float32), name="out")
    # lse is in the hundreds here: a few fp32 ulps of it exceed the usual absolute atol.
    lse_atol = 4 * torch.finfo(torch.float32).eps * golden_lse.abs().max().item()
    assert_close_to_golden(lse, golden_lse, same_dtype_lse, atol=lse_atol, name="lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SCALE_CASES, ids=lambda c: c.id)
def test_public_attention_passes_the_scale_on(backend, case):
    """attention(..., softmax_scale=) end to end on every backend, the reference included."""
    inputs, dout, cu = make_inputs(case, device_for(backend))
    golden, _ = reference_results(inputs, dout, cu, torch.float64, 0.37)
    same_dtype, _ = reference_results(inputs, dout, cu, torch.float32, 0.37)
    leaves = [t.float().requires_grad_() for t in inputs]
    out = attention(*leaves, *cu, softmax_scale=0.37, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout.float())
    for name, fast, gold, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), golden, same_dtype):
        assert_close_to_golden(fast, gold, ref, atol=dtype_atol(torch.float32), name=name)


def test_fp32_triton_launches_ask_for_ieee_dots():
    """The interpreter ignores DOT_PRECISION, so assert what the launches request: exact ("ieee")
    dots for fp32 (tf32 would miss fp32 tolerances on a GPU), tensor cores for 16-bit inputs."""
    from tubevit_fast.kernels import attention as kernels

    assert kernels._kernel_flags(torch.empty(1, 2, 3, 64), False)["DOT_PRECISION"] == "ieee"
    for dtype in (torch.float16, torch.bfloat16):
        assert kernels._kernel_flags(torch.empty(1, 2, 3, 64, dtype=dtype), True)["DOT_PRECISION"] == "tf32"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [dense(2, 9, 12, 2, 80), varlen([3, 1, 6], [5, 2, 6], 2, 32)],
                         ids=lambda c: c.id)
def test_public_attention_autograd(case, backend):
    """attention(...) end to end: dispatch, the custom op's registered autograd, default scale."""
    inputs, dout, cu = make_inputs(case, device_for(backend))
    golden, _ = reference_results(inputs, dout, cu, torch.float64)
    same_dtype, _ = reference_results(inputs, dout, cu, torch.float32)
    leaves = [t.float().requires_grad_() for t in inputs]
    out = attention(*leaves, *cu, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout.float())
    for name, fast, gold, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), golden, same_dtype):
        assert_close_to_golden(fast, gold, ref, atol=dtype_atol(torch.float32), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_strided_inputs(backend):
    """A non-default scale and q/k/v as strided views of one packed qkv tensor (timm's layout)."""
    qkv = torch.randn(2, 11, 3, 2, 64, dtype=torch.float64, device=device_for(backend))
    q, k, v = qkv.float().unbind(2)
    assert not q.is_contiguous()
    out = attention(q, k, v, softmax_scale=0.05, backend=backend)
    golden = attention_reference(*qkv.unbind(2), softmax_scale=0.05)
    assert_close_to_golden(out, golden, attention_reference(q, k, v, softmax_scale=0.05))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_selfcheck_passes_and_catches_a_wrong_backend(backend, monkeypatch):
    """The first-use GPU self-check (run here on CPU): passes for the real backend, raises
    AssertionError for one whose output is 1% off."""
    device = device_for(backend)
    for layout in ("dense", "varlen"):
        ops_attention._make_selfcheck(backend, device, torch.float32, 80, layout)()
    impl = ops_attention._impl(backend)
    real_forward = impl.attention_forward

    def off_by_one_percent(*args):
        out, lse = real_forward(*args)
        return out * 1.01, lse

    monkeypatch.setattr(impl, "attention_forward", off_by_one_percent)
    with pytest.raises(AssertionError, match="out: error"):
        ops_attention._make_selfcheck(backend, device, torch.float32, 64, "dense")()


def test_auto_and_env_override_on_cpu(monkeypatch):
    q, k, v = torch.randn(1, 5, 2, 32), torch.randn(1, 6, 2, 32), torch.randn(1, 6, 2, 32)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="torch"), rtol=0, atol=0)
    monkeypatch.setenv(backends.ENV_BACKEND, "reference")
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), rtol=0, atol=0)


def test_cuda_backend_is_a_clear_error_on_cpu_tensors():
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        attention(q, q, q, backend="cuda")


def test_unsupported_inputs_are_skipped_by_auto_and_refused_by_name(monkeypatch):
    """The extension runs fp16/bf16 at its compiled head dims only: "auto" passes over it for
    other inputs, naming it raises. (Device availability is faked: there is no GPU here.)"""
    from tubevit_fast import extension

    monkeypatch.setattr(backends, "unavailable_reason", lambda op, backend, device: None)
    monkeypatch.setattr(backends, "auto_order", lambda *args: ("cuda", "torch"))
    monkeypatch.setattr(extension, "supported_head_dims", lambda: (64, 128))
    q = torch.randn(1, 4, 2, 32)
    torch.testing.assert_close(attention(q, q, q), attention(q, q, q, backend="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"backend 'cuda' runs float16/bfloat16 only"):
        attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match=r"built for head dims \(64, 128\), got 32"):
        attention(q.half(), q.half(), q.half(), backend="cuda")


# ---- the torch backend's routes (PyTorch's fused kernels) ------------------------------------------

from tubevit_fast.torch_backend import attention as torch_attention  # noqa: E402


@pytest.mark.parametrize("dtype, head_dim, expected", [
    (torch.bfloat16, 64, ["flash", "efficient", "math"]),
    (torch.float16, 16, ["flash", "efficient", "math"]),
    (torch.float16, 12, ["math"]),                  # flash needs a multiple of 8, efficient of 16 bytes
    (torch.float32, 12, ["efficient", "math"]),
    (torch.float32, 260, ["math"]),
    (torch.float64, 64, ["math"]),
], ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_routes_follow_what_each_kernel_takes(dtype, head_dim, expected):
    q = torch.empty(1, 4, 2, head_dim, dtype=dtype, device="meta")
    assert torch_attention.routes(q, device_type="cuda") == expected
    assert torch_attention.routes(q, device_type="cpu") == ["cpu_flash"]


@pytest.mark.parametrize("route, dtype", [("flash", torch.bfloat16), ("efficient", torch.float32),
                                          ("math", torch.float64)])
def test_cuda_routes_call_the_aten_kernels_with_the_right_arguments(route, dtype):
    """The private ATen kernels of the CUDA routes, run on meta tensors (their meta kernels check
    the arguments and give the shapes): out like q, lse (B, H, Nq), gradients like q, k, v."""
    q, do = (torch.empty(2, 37, 3, 64, dtype=dtype, device="meta") for _ in range(2))
    k, v = (torch.empty(2, 45, 3, 64, dtype=dtype, device="meta") for _ in range(2))
    out, lse = torch_attention.DENSE_FORWARD[route](q, k, v, 0.3)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 3, 37) and lse.dtype == torch_attention.lse_dtype(dtype)
    grads = torch_attention.DENSE_BACKWARD[route](do, q, k, v, out, lse, 0.3)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_flash_varlen_route_calls_the_cu_seqlens_kernels():
    q, do = (torch.empty(57, 3, 64, dtype=torch.bfloat16, device="meta") for _ in range(2))
    k, v = (torch.empty(60, 3, 64, dtype=torch.bfloat16, device="meta") for _ in range(2))
    cu_q = torch.tensor([0, 1, 20, 57], dtype=torch.int32, device="meta")
    cu_k = torch.tensor([0, 3, 3, 60], dtype=torch.int32, device="meta")
    out, lse = torch_attention.VARLEN_FORWARD["flash"](q, k, v, cu_q, cu_k, 37, 57, 0.3)
    assert out.shape == q.shape and lse.shape == (3, 57) and lse.dtype == torch.float32
    grads = torch_attention.VARLEN_BACKWARD["flash"](do, q, k, v, out, lse, cu_q, cu_k, 37, 57, 0.3)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_no_keys_rows_are_found_on_the_device():
    cu_q, cu_k = cu_seqlens([2, 1, 0, 3], "cpu"), cu_seqlens([4, 0, 2, 0], "cpu")
    assert torch_attention._no_keys(cu_q, cu_k, 6).tolist() == [False, False, True, True, True, True]


@pytest.mark.parametrize("route", ["math", "cpu_flash"])
@pytest.mark.parametrize("case", [dense(2, 9, 12, 2, 12), varlen([4, 3, 0, 2], [5, 0, 6, 3], 2, 24)],
                         ids=lambda c: c.id)
@pytest.mark.usefixtures("poison_empty")
def test_routes_run_on_cpu_against_golden(route, case):
    """The math route is the CUDA fallback (float64, odd head dims): run here with the per-segment
    varlen wrapper every route but flash uses, at a custom scale."""
    inputs, dout, cu = make_inputs(case, torch.device("cpu"))
    leaves = [t.clone().requires_grad_() for t in inputs]
    golden = attention_reference(*leaves, *cu, softmax_scale=0.2)
    golden_grads = torch.autograd.grad(golden, leaves, dout)
    q, k, v = inputs
    if case.varlen:
        out, lse = torch_attention.VARLEN_FORWARD[route](q, k, v, *cu, max(case.seg_q), max(case.seg_k), 0.2)
        grads = torch_attention.VARLEN_BACKWARD[route](dout, q, k, v, out, lse, *cu, max(case.seg_q),
                                                       max(case.seg_k), 0.2)
    else:
        out, lse = torch_attention.DENSE_FORWARD[route](q, k, v, 0.2)
        grads = torch_attention.DENSE_BACKWARD[route](dout, q, k, v, out, lse, 0.2)
    for name, fast, gold in zip(("out", "dq", "dk", "dv"), (out, *grads), (golden, *golden_grads)):
        torch.testing.assert_close(fast, gold, rtol=1e-9, atol=1e-9, msg=name)


def test_sdpa_grads_are_the_softmax_gradient_formulas():
    """_sdpa_grads (the math route's backward) against autograd through the reference, fp32 and
    fp64, at a custom scale (a dropped scale factor on dQ or dK shows here)."""
    for dtype in (torch.float32, torch.float64):
        q, k, v = (torch.randn(2, n, 2, 16, dtype=dtype, requires_grad=True) for n in (5, 7, 7))
        do = torch.randn(2, 5, 2, 16, dtype=dtype)
        expected = torch.autograd.grad(attention_reference(q, k, v, softmax_scale=0.37), (q, k, v), do)
        for name, got, want in zip("qkv", torch_attention._sdpa_grads(do, q, k, v, 0.37), expected):
            torch.testing.assert_close(got, want, msg=f"d{name}")


def test_a_route_that_refuses_an_input_hands_it_to_the_next():
    def refuse(*args):
        raise RuntimeError("not for this input")

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("no room")

    table = {"a": refuse, "b": lambda x: x + 1, "oom": out_of_memory}
    assert torch_attention._run_first(["a", "b"], table, 1) == 2
    with pytest.raises(torch.OutOfMemoryError):
        torch_attention._run_first(["oom", "b"], table, 1)
    with pytest.raises(RuntimeError, match="not for this input"):
        torch_attention._run_first(["b", "a"][1:], table, 1)


# ---- torch.library / torch.compile ---------------------------------------------------------------

def _opcheck_both(backend: str, device):
    """Schema, fake kernel (shapes, dtypes, strides), autograd registration and AOT dispatch."""
    for case in (dense(2, 5, 7, 2, 32), varlen([3, 1], [2, 4], 2, 32)):
        inputs, dout, cu = make_inputs(case, device)
        q, k, v = (t.float().requires_grad_() for t in inputs)
        max_q, max_k, scale = check_attention_inputs(q, k, v, *cu)
        torch.library.opcheck(_attention_fwd_op, (q, k, v, *cu, max_q, max_k, scale, backend))
        out, lse = _attention_fwd_op(q.detach(), k.detach(), v.detach(), *cu, max_q, max_k, scale, backend)
        torch.library.opcheck(_attention_bwd_op, (dout.float(), q.detach(), k.detach(), v.detach(), out, lse,
                                                  *cu, max_q, max_k, scale, backend))


def test_opcheck_torch_backend():
    _opcheck_both("torch", torch.device("cpu"))


@triton_test
def test_opcheck_triton_backend():
    _opcheck_both("triton", TRITON_DEVICE)


def test_torch_compile_fullgraph_dense_and_varlen():
    torch._dynamo.reset()

    def model(q, k, v, qp, kp, vp, cu_q, cu_k):
        dense_out = attention(q, k, v)
        packed_out = attention(qp, kp, vp, cu_q, cu_k, max_seqlen_q=4, max_seqlen_k=5)
        return dense_out.square().sum() + packed_out.square().sum()

    def inputs():
        torch.manual_seed(0)
        shapes = ((2, 5), (2, 6), (2, 6), (5,), (7,), (7,))
        tensors = [torch.randn(*s, 2, 32, requires_grad=True) for s in shapes]
        return tensors + [cu_seqlens([4, 1], "cpu"), cu_seqlens([2, 5], "cpu")]

    eager_args, compiled_args = inputs(), inputs()
    eager = model(*eager_args)
    compiled = torch.compile(model, fullgraph=True)(*compiled_args)
    torch.testing.assert_close(compiled, eager)
    eager_grads = torch.autograd.grad(eager, eager_args[:6])
    compiled_grads = torch.autograd.grad(compiled, compiled_args[:6])
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


# ---- bad input -------------------------------------------------------------------------------

def _bad(**changes):
    """Valid dense (or, with varlen=True, packed) arguments with some replaced."""
    if changes.pop("varlen", False):
        args = dict(q=torch.randn(6, 2, 32), k=torch.randn(7, 2, 32), v=torch.randn(7, 2, 32),
                    cu_seqlens_q=cu_seqlens([2, 4], "cpu"), cu_seqlens_k=cu_seqlens([3, 4], "cpu"))
    else:
        args = dict(q=torch.randn(2, 5, 2, 32), k=torch.randn(2, 6, 2, 32), v=torch.randn(2, 6, 2, 32))
    args.update(changes)
    return args


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD_INPUTS = {
    "q-not-a-tensor": (lambda: _bad(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    "int-dtype": (lambda: _bad(q=torch.ones(2, 5, 2, 32, dtype=torch.int64)), TypeError,
                  "supported: float32"),
    "complex": (lambda: _bad(q=torch.randn(2, 5, 2, 32, dtype=torch.complex64)), TypeError, "supported: float32"),
    "dtype-mismatch": (lambda: _bad(k=torch.randn(2, 6, 2, 32).half()), TypeError, "share one dtype"),
    "device-mismatch": (lambda: _bad(v=torch.randn(2, 6, 2, 32, device="meta")), ValueError, "one device"),
    "rank-3-dense": (lambda: _bad(q=torch.randn(5, 2, 32)), ValueError, "need cu_seqlens"),
    "rank-5": (lambda: _bad(k=torch.randn(2, 6, 2, 32, 1), v=torch.randn(2, 6, 2, 32, 1)), ValueError,
               r"k must be \(B, N, H, Dh\)"),
    "heads-mismatch": (lambda: _bad(k=torch.randn(2, 6, 3, 32), v=torch.randn(2, 6, 3, 32)), ValueError,
                       "q has 2 heads but k/v have 3"),
    "head-dim-mismatch": (lambda: _bad(k=torch.randn(2, 6, 2, 64), v=torch.randn(2, 6, 2, 64)), ValueError,
                          "q has head dim 32 but k/v have 64"),
    "kv-shape-mismatch": (lambda: _bad(v=torch.randn(2, 7, 2, 32)), ValueError, "same shape"),
    "head-dim-too-large": (lambda: _bad(q=torch.randn(2, 5, 2, 257), k=torch.randn(2, 6, 2, 257),
                                        v=torch.randn(2, 6, 2, 257)), ValueError,
                           "head dim 257 is not supported: head dims run from 1 to 256"),
    "batch-mismatch": (lambda: _bad(k=torch.randn(3, 6, 2, 32), v=torch.randn(3, 6, 2, 32)), ValueError,
                       "q has batch 2 but k/v have batch 3"),
    "cu-only-q": (lambda: _bad(varlen=True, cu_seqlens_k=None), ValueError,
                  "both cu_seqlens_q and cu_seqlens_k"),
    "cu-only-k": (lambda: _bad(cu_seqlens_k=_i32(0, 6)), ValueError, "both cu_seqlens_q and cu_seqlens_k"),
    "varlen-4d": (lambda: _bad(cu_seqlens_q=_i32(0, 5), cu_seqlens_k=_i32(0, 6)), ValueError,
                  "varlen inputs are packed 3-D"),
    "cu-not-a-tensor": (lambda: _bad(varlen=True, cu_seqlens_q=[0, 2, 6]), TypeError,
                        "cu_seqlens_q must be a torch.Tensor"),
    "cu-int64": (lambda: _bad(varlen=True, cu_seqlens_k=torch.tensor([0, 3, 7])), TypeError,
                 "cu_seqlens_k must be int32"),
    "cu-device": (lambda: _bad(varlen=True, cu_seqlens_q=torch.zeros(3, dtype=torch.int32, device="meta")),
                  ValueError, "cu_seqlens_q is on meta"),
    "cu-2d": (lambda: _bad(varlen=True, cu_seqlens_q=_i32(0, 2, 6).view(1, 3)), ValueError, "must be 1-D"),
    "cu-length-mismatch": (lambda: _bad(varlen=True, cu_seqlens_k=_i32(0, 3, 5, 7)), ValueError,
                           "cu_seqlens_q has 3 entries but cu_seqlens_k has 4"),
    "cu-not-starting-at-0": (lambda: _bad(varlen=True, cu_seqlens_q=_i32(1, 2, 6)), ValueError, "start at 0"),
    "cu-decreasing": (lambda: _bad(varlen=True, cu_seqlens_q=_i32(0, 4, 2, 6), cu_seqlens_k=_i32(0, 3, 5, 7)),
                      ValueError, "non-decreasing"),
    "cu-last-not-total": (lambda: _bad(varlen=True, cu_seqlens_k=_i32(0, 3, 6)), ValueError,
                          "ends at 6 but the packed tensor has 7 rows"),
    "max-seqlen-too-small": (lambda: _bad(varlen=True, max_seqlen_q=3), ValueError,
                             r"max_seqlen_q=3 is smaller than the longest segment \(4\)"),
    "max-seqlen-not-int": (lambda: _bad(varlen=True, max_seqlen_k=4.0), TypeError,
                           "max_seqlen_k must be an int"),
    # Dense kernels take the sequence length from max_seqlen: a larger one read and wrote past it.
    "dense-max-seqlen-not-the-length": (lambda: _bad(max_seqlen_q=8), ValueError,
                                        "max_seqlen_q=8 for dense inputs of length 5"),
    "dense-max-seqlen-k-not-the-length": (lambda: _bad(max_seqlen_k=9), ValueError,
                                          "max_seqlen_k=9 for dense inputs of length 6"),
    # The kernels read cu_seqlens as a plain array: a strided view gave them other values.
    "cu-strided": (lambda: _bad(varlen=True, cu_seqlens_q=_i32(0, 9, 2, 9, 6)[::2]), ValueError,
                   "cu_seqlens_q must be contiguous"),
    "scale-not-a-number": (lambda: _bad(softmax_scale="0.1"), TypeError, "softmax_scale must be a float"),
    "unknown-backend": (lambda: _bad(backend="fast"), ValueError, "unknown backend 'fast'"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_a_clear_error(name):
    make_args, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=message):
        attention(**make_args())


# ---- the AOT audit's view of the kernels ----------------------------------------------------------

def test_audit_targets_cover_every_kernel_config_and_head_dim():
    """What tubevit_fast.audit compiles (it runs outside the interpreter; here only the listing)."""
    from tubevit_fast.kernels import attention as kernels

    for dtype in ("fp16", "bf16", "fp32"):
        single = dtype == "fp32"
        targets = kernels.audit_targets(dtype)
        labels = [(t.kernel, t.config) for t in targets]
        assert len(set(labels)) == len(labels)
        per_kernel = {name: len(configs) for name, configs in (
            ("_attention_fwd_kernel", kernels._FWD_CONFIGS_FP32 if single else kernels._FWD_CONFIGS),
            ("_attention_bwd_dkdv_kernel", kernels._DKDV_CONFIGS_FP32 if single else kernels._DKDV_CONFIGS),
            ("_attention_bwd_dq_kernel", kernels._DQ_CONFIGS_FP32 if single else kernels._DQ_CONFIGS),
            ("_attention_bwd_preprocess_kernel", [None]))}
        for name, n_configs in per_kernel.items():
            mine = [t for t in targets if t.kernel == name]
            assert len(mine) == n_configs * len(kernels.HEAD_DIMS), name
            assert {t.constexprs["HEAD_DIM"] for t in mine} == set(TRITON_HEAD_DIMS)
            # fp32 dots are exact FMAs: no tensor-core instruction is expected there.
            assert all(t.matmul == (name != "_attention_bwd_preprocess_kernel" and not single) for t in mine)
            precision = {t.constexprs.get("DOT_PRECISION") for t in mine} - {None}
            assert precision <= ({"ieee"} if single else {"tf32"}), (name, precision)
        for t in targets:
            assert set(t.signature) == set(t.fn.arg_names)
            assert {n for n, s in t.signature.items() if s == "constexpr"} == set(t.constexprs)
            assert f"*{dtype}" in t.signature.values()
    with pytest.raises(ValueError, match="fp16"):
        kernels.audit_targets("fp8")
