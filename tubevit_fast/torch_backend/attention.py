"""Attention in plain PyTorch: PyTorch's own fused kernels, the "torch" backend.

Every route returns the log-sum-exp with the output, so the backward reuses both and recomputes
nothing; the (Nq x Nk) probabilities are only ever materialised by the "math" route.

  route       where                                                  dense / packed varlen
  cpu_flash   CPU tensors, any dtype and head dim                    aten::_scaled_dot_product_flash_attention_for_cpu,
                                                                     per segment for varlen (views, no padding)
  flash       CUDA, fp16/bf16, head dim a multiple of 8 up to 256,    aten::_scaled_dot_product_flash_attention /
              compute capability 8.0+ (FlashAttention-2)             aten::_flash_attention_forward with cu_seqlens
  efficient   CUDA, fp32/fp16/bf16, head dim a multiple of 16 bytes  aten::_scaled_dot_product_efficient_attention,
              up to 256 (memory-efficient attention)                 per segment for varlen
  math        anything else (float64, odd head dims on CUDA)         SDPA + logsumexp, explicit backward, per segment
Per segment means one dense call on each segment's views (nothing padded) after one device sync
to read the segment bounds.

flash and efficient are the kernels F.scaled_dot_product_attention itself dispatches to, in its
order, so this backend costs what SDPA costs (and packed batches need no padding). They are
private ATen ops: their signatures are checked on meta tensors by the tests, and a route that
fails to run falls back to the next one (`_run_first`).

Layouts as in tubevit_fast.ops.attention: dense (B, N, H, D), lse (B, H, Nq); packed (total, H, D),
lse (H, total_q); lse fp32 (fp64 for fp64 inputs). The math route's backward writes the
gradient formulas out in fp32 (fp64 for fp64):
    P = softmax(s Q K^T),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),
    dQ = s dS K,  dK = s dS^T Q
Inputs are validated by tubevit_fast.ops.attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tubevit_fast.attention_layout import lse_dtype

ROUTES = ("cpu_flash", "flash", "efficient", "math")
_EFFICIENT_LSE_ROWS = 32  # memory-efficient attention pads each lse row to a multiple of this


def routes(q: torch.Tensor, device_type: str | None = None) -> list[str]:
    """The routes that take q, preferred first (device_type overrides q's, for tests on meta tensors)."""
    device_type = device_type or q.device.type
    if device_type == "cpu":
        return ["cpu_flash"]
    head_dim, dtype, out = q.shape[-1], q.dtype, []
    if (dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and torch.backends.cuda.flash_sdp_enabled() and _capability(q) >= (8, 0)):
        out.append("flash")
    if (dtype in (torch.float32, torch.float16, torch.bfloat16) and head_dim * q.element_size() % 16 == 0
            and head_dim <= 256 and torch.backends.cuda.mem_efficient_sdp_enabled()):
        out.append("efficient")
    return out + ["math"]


def _capability(q: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else (9, 0)


def _run_first(names: list[str], table: dict, *args):
    """Run the first route of `names` that works: a private kernel may refuse an input its guard
    did not foresee (RuntimeError), and the next route takes it. Out of memory is not a refusal;
    the last route's error propagates."""
    for name in names[:-1]:
        try:
            return table[name](*args)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            continue
    return table[names[-1]](*args)


def _bhnd(*tensors):
    """(B, N, H, D) -> (B, H, N, D) views, the layout the SDPA kernels take."""
    return tuple(t.transpose(1, 2) for t in tensors)


# ---- dense routes: (B, N, H, D) in, out (B, Nq, H, D) (any strides) and lse (B, H, Nq) ----------

def _cpu_flash_fwd(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_bhnd(q, k, v), scale=scale)
    return out.transpose(1, 2), lse


def _cpu_flash_bwd(do, q, k, v, out, lse, scale):
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_bhnd(do, q, k, v, out), lse, 0.0, False, scale=scale)
    return tuple(g.transpose(1, 2) for g in grads)


def _no_rng(q):
    # Dropout is off: the kernels never read their RNG state (FlashAttention's mha_bwd reads it
    # only when p_dropout > 0), so placeholders of the forward's own kind stand in for it.
    return torch.empty(2, dtype=torch.uint64, device=q.device), torch.empty((), dtype=torch.uint64, device=q.device)


def _flash_fwd(q, k, v, scale):
    result = torch.ops.aten._scaled_dot_product_flash_attention(*_bhnd(q, k, v), 0.0, False, False, scale=scale)
    return result[0].transpose(1, 2), result[1]


def _flash_bwd(do, q, k, v, out, lse, scale):
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        *_bhnd(do, q, k, v, out), lse, None, None, q.shape[1], k.shape[1], 0.0, False, *_no_rng(q), scale=scale)
    return tuple(g.transpose(1, 2) for g in grads)


def _efficient_fwd(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(*_bhnd(q, k, v), None, True, scale=scale)[:2]
    return out.transpose(1, 2), lse[..., :q.shape[1]]


def _efficient_bwd(do, q, k, v, out, lse, scale):
    padded = _pad_rows(lse, _EFFICIENT_LSE_ROWS)
    seed, offset = (torch.empty((), dtype=torch.int64, device=q.device) for _ in range(2))
    grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        *_bhnd(do, q, k, v), None, out.transpose(1, 2), padded, seed, offset, 0.0, [True, True, True, False],
        False, scale=scale)
    return tuple(g.transpose(1, 2) for g in grads[:3])


def _pad_rows(lse: torch.Tensor, multiple: int) -> torch.Tensor:
    """(..., N) -> (..., N rounded up to `multiple`), the extra rows zero."""
    pad = -lse.shape[-1] % multiple
    return F.pad(lse, (0, pad)) if pad else lse.contiguous()


def _math_fwd(q, k, v, scale):
    acc = torch.promote_types(q.dtype, torch.float32)
    lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale, dim=-1)
    out = F.scaled_dot_product_attention(*_bhnd(q, k, v), scale=scale).transpose(1, 2)
    return out, lse


def _sdpa_grads(do, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one dense (B, N, H, D) batch, computed in fp32 (fp64 stays fp64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh, doh = (t.transpose(1, 2).to(acc) for t in (q, k, v, do))  # (B, H, N, D)
    p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
    dv = torch.matmul(p.transpose(-1, -2), doh)
    dp = torch.matmul(doh, vh.transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kh) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qh) * scale
    return tuple(g.transpose(1, 2).to(q.dtype) for g in (dq, dk, dv))


def _math_bwd(do, q, k, v, out, lse, scale):
    return _sdpa_grads(do, q, k, v, scale)


DENSE_FORWARD = {"cpu_flash": _cpu_flash_fwd, "flash": _flash_fwd, "efficient": _efficient_fwd, "math": _math_fwd}
DENSE_BACKWARD = {"cpu_flash": _cpu_flash_bwd, "flash": _flash_bwd, "efficient": _efficient_bwd, "math": _math_bwd}


# ---- packed varlen: (total, H, D) in, lse (H, total_q) -----------------------------------------

def _no_keys(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int) -> torch.Tensor:
    """(total_q,) bool: the packed query rows whose segment has no keys, found on the device (no sync)."""
    rows = torch.arange(total_q, device=cu_q.device, dtype=torch.int64)
    segment = torch.searchsorted(cu_q[1:].to(torch.int64), rows, right=True)
    return (cu_k[1:] - cu_k[:-1])[segment] == 0


def _flash_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    out, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                       scale=scale)[:2]
    # Queries without keys: output 0 and lse -inf (this library's convention, whatever the kernel wrote).
    no_keys = _no_keys(cu_q, cu_k, q.shape[0])
    return out.masked_fill(no_keys[:, None, None], 0), lse.masked_fill(no_keys, float("-inf"))


def _flash_varlen_bwd(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    # lse +inf makes those rows' probabilities exp(s - lse) exactly 0 inside the kernel.
    no_keys = _no_keys(cu_q, cu_k, q.shape[0])
    grads = torch.ops.aten._flash_attention_backward(do, q, k, v, out, lse.masked_fill(no_keys, float("inf")),
                                                     cu_q, cu_k, max_q, max_k, 0.0, False, *_no_rng(q), scale=scale)
    dq, dk, dv = grads
    return dq.masked_fill(no_keys[:, None, None], 0), dk, dv


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """(query slice, key slice) per segment of a packed batch (one device sync)."""
    bounds_q, bounds_k = torch.stack([cu_q, cu_k]).tolist()
    return [(slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1]))
            for i in range(len(bounds_q) - 1)]


def _per_segment_fwd(route: str):
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=lse_dtype(q.dtype), device=q.device)
        for qs, ks in _segments(cu_q, cu_k):
            if qs.start == qs.stop:
                continue
            if ks.start == ks.stop:  # queries without keys: output 0, lse -inf (FlashAttention's convention)
                out[qs], lse[:, qs] = 0, float("-inf")
            else:
                seg_out, seg_lse = DENSE_FORWARD[route](q[None, qs], k[None, ks], v[None, ks], scale)
                out[qs], lse[:, qs] = seg_out[0], seg_lse[0]
        return out, lse
    return forward


def _per_segment_bwd(route: str):
    def backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        # Every row lies in exactly one segment (checked), so every row is written; a segment
        # without queries writes zero key gradients, one without keys zero query gradients.
        for qs, ks in _segments(cu_q, cu_k):
            if qs.start == qs.stop or ks.start == ks.stop:
                dq[qs], dk[ks], dv[ks] = 0, 0, 0
                continue
            grads = DENSE_BACKWARD[route](do[None, qs], q[None, qs], k[None, ks], v[None, ks], out[None, qs],
                                          lse[None, :, qs], scale)
            dq[qs], dk[ks], dv[ks] = (g[0] for g in grads)
        return dq, dk, dv
    return backward


VARLEN_FORWARD = {"flash": _flash_varlen_fwd, **{r: _per_segment_fwd(r) for r in ("cpu_flash", "efficient", "math")}}
VARLEN_BACKWARD = {"flash": _flash_varlen_bwd, **{r: _per_segment_bwd(r) for r in ("cpu_flash", "efficient", "math")}}


# ---- the backend's entry points (tubevit_fast.ops.attention's custom ops call these) --------------

def attention_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """(out, lse): out contiguous like q; lse (B, H, Nq) dense or (H, total_q) varlen."""
    if cu_q is None:
        out, lse = _run_first(routes(q), DENSE_FORWARD, q, k, v, scale)
    else:
        out, lse = _run_first(routes(q), VARLEN_FORWARD, q, k, v, cu_q, cu_k, max_q, max_k, scale)
    return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


def attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """(dq, dk, dv), contiguous, from the output and lse of attention_forward (any route's: all
    routes save the same lse)."""
    do = do.contiguous()  # a gradient made by .sum() can have stride 0
    if cu_q is None:
        grads = _run_first(routes(q), DENSE_BACKWARD, do, q, k, v, out, lse, scale)
    else:
        grads = _run_first(routes(q), VARLEN_BACKWARD, do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)
    return tuple(g.contiguous() for g in grads)
