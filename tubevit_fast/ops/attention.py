"""attention: non-causal multi-head attention, dense or packed varlen, with backend dispatch.

Backends: "reference" (tubevit_fast.reference.attention, plain autograd), "torch"
(tubevit_fast.torch_backend.attention: PyTorch's fused attention kernels), "triton"
(tubevit_fast.kernels.attention), "cuda" (the csrc/ extension, tubevit_fast.extension). The
reference and torch backends take every input the maths allows (head dims 1 to 256, float64);
the fast kernels have their own lists (`_unsupported`), which "auto" respects. The fast ones run
behind two torch.library custom ops with fake kernels and registered autograd, so torch.compile
traces them without a graph break (not triton_op: its fake path runs the kernels on meta tensors):

    tubevit_fast::attention_fwd(q, k, v, cu_seqlens_q?, cu_seqlens_k?, max_seqlen_q, max_seqlen_k,
                                softmax_scale, backend) -> (out, lse)
    tubevit_fast::attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q?, cu_seqlens_k?, max_seqlen_q,
                                max_seqlen_k, softmax_scale, backend) -> (dq, dk, dv)

Under torch.autocast, q, k and v are cast to the autocast dtype (tubevit_fast.amp), as SDPA does.
Saved log-sum-exp: the convention of tubevit_fast.attention_layout (fp32, fp64 for fp64 inputs;
(B, H, Nq) dense, (H, total_q) packed), from every backend.
All outputs are contiguous.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch

from tubevit_fast import amp, backends, numerics
from tubevit_fast.attention_layout import lse_dtype, lse_shape
from tubevit_fast.packing import cu_seqlens_from_lengths, known_bounds
from tubevit_fast.reference.attention import attention_reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256

_IMPL_MODULES = {"torch": "tubevit_fast.torch_backend.attention", "triton": "tubevit_fast.kernels.attention",
                 "cuda": "tubevit_fast.extension"}


def _impl(backend: str):
    return importlib.import_module(_IMPL_MODULES[backend])


def _unsupported(backend: str, dtype: torch.dtype, head_dim: int, layout: str, details: tuple) -> str | None:
    """What `backend` cannot do with such inputs (None if it can): backends.register_op's hook."""
    if backend == "triton":
        head_dims = _impl("triton").HEAD_DIMS
        if dtype == torch.float64:
            return f"runs float32/float16/bfloat16 only, got {dtype}"
        if head_dim not in head_dims:
            return f"supports head dims {head_dims}, got {head_dim}"
    if backend == "cuda":
        from tubevit_fast import extension

        if dtype not in (torch.float16, torch.bfloat16):
            return f"runs float16/bfloat16 only (tensor-core kernels), got {dtype}"
        if head_dim not in extension.supported_head_dims():
            return f"was built for head dims {extension.supported_head_dims()}, got {head_dim}"
    return None


# ---- custom ops ------------------------------------------------------------------------------

@torch.library.custom_op("tubevit_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                      cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                      softmax_scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            softmax_scale)


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, backend):
    lse = q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=lse_dtype(q.dtype))
    return q.new_empty(q.shape), lse


@torch.library.custom_op("tubevit_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                      cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                      softmax_scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, softmax_scale)


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
amp.register_autocast(_attention_fwd_op, "tubevit_fast::attention_fwd", cast_args=(0, 1, 2))


# ---- input checks ----------------------------------------------------------------------------

def _check_cu_seqlens(cu_q: torch.Tensor, cu_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                      ) -> tuple[int, int] | None:
    """Check cu_seqlens_q/k; return the longest query and key segment, or None while tracing
    under torch.compile (the values are then unknown and not checked). Bounds recorded by
    tubevit_fast.packing (a packed batch built on the host) are used as they are; any other
    cu_seqlens is read back once (one device sync for both)."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (FlashAttention's varlen convention), got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
        if not cu.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels read it as a plain array); "
                             f"pass {name}.contiguous()")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel()} entries but cu_seqlens_k has {cu_k.numel()}: "
                         f"both must be batch + 1 long")
    if torch.compiler.is_compiling():
        return None
    bounds_q, bounds_k = known_bounds(cu_q), known_bounds(cu_k)
    if bounds_q is None or bounds_k is None:
        bounds_q, bounds_k = torch.stack([cu_q, cu_k]).tolist()
    for name, bounds, total in (("cu_seqlens_q", bounds_q, q.shape[0]),
                                ("cu_seqlens_k", bounds_k, k.shape[0])):
        if bounds[0] != 0:
            raise ValueError(f"{name} must start at 0, got {bounds[0]}")
        if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"{name} must be non-decreasing, got {list(bounds)}")
        if bounds[-1] != total:
            raise ValueError(f"{name} ends at {bounds[-1]} but the packed tensor has {total} rows")
    return tuple(max(b - a for a, b in zip(bounds[:-1], bounds[1:])) for bounds in (bounds_q, bounds_k))


def _check_max_seqlen(name: str, given, actual: int | None) -> int:
    if given is None:
        if actual is None:
            raise ValueError(f"{name} must be given for varlen inputs under torch.compile")
        return actual
    if not isinstance(given, int) or isinstance(given, bool):
        raise TypeError(f"{name} must be an int, got {type(given).__name__}")
    if actual is not None and given < actual:
        raise ValueError(f"{name}={given} is smaller than the longest segment ({actual})")
    return given


def check_attention_inputs(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                           max_seqlen_k=None, softmax_scale=None) -> tuple[int, int, float]:
    """Validate attention's arguments (see `attention`); return (max_seqlen_q, max_seqlen_k, scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: float32, float16, bfloat16, float64")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k (packed varlen) or neither (dense)")
    varlen = cu_seqlens_q is not None
    layout = "(total, H, Dh) with cu_seqlens" if varlen else "(B, N, H, Dh)"
    rank = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            hint = (" (varlen inputs are packed 3-D tensors)" if varlen else
                    " (packed 3-D inputs need cu_seqlens_q/k)" if t.dim() == 3 else "")
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}{hint}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"q has {q.shape[-2]} heads but k/v have {k.shape[-2]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q has head dim {q.shape[-1]} but k/v have {k.shape[-1]}")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is not supported: head dims run from 1 to {MAX_HEAD_DIM}")
    if varlen:
        longest = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q, k)
        longest_q, longest_k = (None, None) if longest is None else longest
    else:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q has batch {q.shape[0]} but k/v have batch {k.shape[0]}")
        longest_q, longest_k = q.shape[1], k.shape[1]
        # Dense kernels take the length from max_seqlen: anything but the shape's would read or
        # write past the sequences.
        for name, given, actual in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
            if given is not None and given != actual:
                raise ValueError(f"{name}={given} for dense inputs of length {actual}: leave it None "
                                 f"(it is for packed inputs)")
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q)
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k)
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool):
        scale = float(softmax_scale)
    else:
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return max_q, max_k, scale


# ---- self-check ----------------------------------------------------------------------------------

SELFCHECK_SCALE = 0.3  # not 1/sqrt(Dh): a backend that ignores softmax_scale fails the check


def _make_selfcheck(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, layout: str,
                    details: tuple = ()):
    """A check that runs `backend` forward and backward on a small input against the float64
    reference, by tubevit_fast.numerics' rule (backends.register_op's hook)."""
    def check():
        gen = torch.Generator(device="cpu").manual_seed(0)
        if layout == "varlen":
            cu = cu_seqlens_from_lengths([1, 19, 37], device)
            shapes, extra = [(57, 2, head_dim)] * 3, (cu, cu)
        else:
            shapes, extra = [(2, 37, 2, head_dim), (2, 45, 2, head_dim), (2, 45, 2, head_dim)], (None, None)
        # Made on the CPU whatever torch.set_default_device says, then moved.
        golden_inputs = [torch.randn(s, generator=gen, dtype=torch.float64, device="cpu").to(device) for s in shapes]
        dout = torch.randn(shapes[0], generator=gen, dtype=torch.float64, device="cpu").to(device)
        # The longest segment is given: at trace time (torch.compile) cu_seqlens are not read.
        longest = 37 if layout == "varlen" else None
        max_q, max_k, scale = check_attention_inputs(*(t.to(dtype) for t in golden_inputs), *extra,
                                                     max_seqlen_q=longest, max_seqlen_k=longest,
                                                     softmax_scale=SELFCHECK_SCALE)

        def run(fn, precision):
            inputs = [t.to(precision).requires_grad_() for t in golden_inputs]
            out = fn(inputs)
            return [out, *torch.autograd.grad(out, inputs, dout.to(precision))]

        fast = run(lambda x: _attention_fwd_op(*x, *extra, max_q, max_k, scale, backend)[0], dtype)
        same_dtype = run(lambda x: attention_reference(*x, *extra, scale), dtype)
        golden = run(lambda x: attention_reference(*x, *extra, scale), torch.float64)
        reduction = max(max_k, head_dim)
        for name, a, r, g in zip(("out", "dq", "dk", "dv"), fast, same_dtype, golden):
            verdict = numerics.judge(a, g, r, dtype, reduction)
            assert verdict.ok, verdict.describe(name)
    return check


backends.register_op("attention", _unsupported, _make_selfcheck)


# ---- public entry point ------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
              cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
              max_seqlen_k: int | None = None, softmax_scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Non-causal softmax(q k^T * softmax_scale) v per head; returns a tensor shaped like q.

    Dense: q (B, Nq, H, Dh), k/v (B, Nk, H, Dh); Nq may differ from Nk.
    Packed varlen: q (total_q, H, Dh), k/v (total_k, H, Dh), int32 cu_seqlens_q/k of length
    batch + 1 on q's device (start 0, non-decreasing, end at total), FlashAttention's convention;
    max_seqlen_q/k default to the longest segment (pass them under torch.compile).
    Head dims 1 to 256, float32/float16/bfloat16/float64, fp32 accumulation (fp64 for fp64);
    softmax_scale defaults to 1/sqrt(Dh). Under torch.autocast the inputs are cast to the
    autocast dtype first. Varlen inputs are checked on the host: one device sync, none when
    cu_seqlens came from tubevit_fast.packing.cu_seqlens_from_lengths (as in TubeViT's packed
    batches). A query with no keys (an empty key segment) gets output 0, lse -inf and zero
    gradient, as in FlashAttention.
    backend: "auto", "reference", "torch", "triton" or "cuda" (see tubevit_fast.backends); a
    fast backend that cannot take the inputs (dtype, head dim) is skipped by "auto" and refused
    with a ValueError when named.
    """
    if isinstance(q, torch.Tensor):
        q, k, v = amp.autocast_inputs(q.device.type, q, k, v)
    max_q, max_k, scale = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k, softmax_scale)
    layout = "dense" if cu_seqlens_q is None else "varlen"
    chosen = backends.pick("attention", backend, q.device, q.dtype, q.shape[-1], layout)
    if chosen == "reference":
        return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
    return _attention_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, chosen)[0]
