"""The CPU path's GEMM: x @ w.T (+ bias), on oneDNN where that is faster than torch.mm.

For fp32 CPU tensors torch.mm calls MKL's sgemm. On an AMD Zen 5 (2 threads) MKL takes a code
path that reaches about 205 GFLOP/s, while oneDNN's inner-product primitive (the one Inductor's
CPU linear fusion calls, `mkldnn::_linear_pointwise`) reaches 430-470 GFLOP/s on the
tube-embedding shapes; on an Intel Xeon (2 threads) MKL is the faster one: 190-215 GFLOP/s
against oneDNN's 110-205 (its weight-gradient products are the slow ones). So `cpu_gemm`
picks by CPU vendor: MKL (torch.mm) on Intel, oneDNN elsewhere. Precision
follows torch's float32 matmul setting exactly as torch.mm does: at the default ("highest")
it is plain fp32, its error against an fp64 product that of fp32 accumulation; with
torch.set_float32_matmul_precision("medium") both may use bf16 arithmetic on CPUs that have
it. The weight operand may have any strides; x is made contiguous by the op (a copy when it
is a transposed view). Other dtypes and devices (and builds without oneDNN) use torch.mm.
"""
from __future__ import annotations

import functools
import platform

import torch

# oneDNN's inner product runs fp32 and bf16 (fp32 accumulation); it rejects fp16 and fp64.
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op, checked once on a tiny product."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    w = torch.arange(12, dtype=torch.float32).view(4, 3)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except RuntimeError:
        return False
    return torch.equal(y, x @ w.t())


@functools.cache
def cpu_gemm() -> str:
    """"onednn" or "mm": the faster fp32 GEMM of this machine (module docstring)."""
    if not onednn_available():
        return "mm"
    return "mm" if _cpu_vendor() == "GenuineIntel" else "onednn"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        return "GenuineIntel" if "Intel" in platform.processor() else platform.processor()


def _uses_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and w.dtype == x.dtype
            and x.shape[0] > 0 and x.shape[1] > 0 and cpu_gemm() == "onednn")


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K).T (+ bias (N,)), a new (M, N) tensor in x's dtype; any strides."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x must be (M, K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0]):
        raise ValueError(f"linear: bias must be ({w.shape[0]},), got {tuple(bias.shape)}")
    if _uses_onednn(x, w) and (bias is None or bias.dtype == x.dtype):
        # oneDNN reads bias as a dense vector and wants real strides: materialise stride-0 (an
        # expanded gradient) and sliced operands' bias.
        x = x if 0 not in x.stride() else x.contiguous()
        w = w if 0 not in w.stride() else w.contiguous()
        bias = bias if bias is None else bias.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
