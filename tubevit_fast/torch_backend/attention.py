"""Attention in plain PyTorch: the fast path on CPU.

On CPU tensors (fp32/fp16/bf16) it calls the fused CPU flash-attention kernels that
F.scaled_dot_product_attention itself dispatches to (aten::_scaled_dot_product_flash_attention_for_cpu
and its backward), which also return the log-sum-exp: forward and backward cost what SDPA
costs, with nothing recomputed. Packed varlen runs them per segment on views of the packed
tensors, so nothing is padded.

Elsewhere (CUDA tensors, float64) SDPA runs the forward, the log-sum-exp costs one more
Q K^T, and the backward writes the gradient formulas out, recomputing the softmax in fp32
(P materialised: O(Nq Nk) memory per batch and head):
    P = softmax(s Q K^T),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),
    dQ = s dS K,  dK = s dS^T Q
Inputs are validated by tubevit_fast.ops.attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """(query slice, key slice) per segment of a packed batch."""
    bounds_q, bounds_k = torch.stack([cu_q, cu_k]).tolist()
    return [(slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1]))
            for i in range(len(bounds_q) - 1)]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Nq, H, D) x (B, Nk, H, D) -> (B, Nq, H, D), a strided view of SDPA's output."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


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


def saves_lse(q: torch.Tensor) -> bool:
    """Whether the fused CPU kernels run for q (their backward reuses out and lse)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _flash_cpu(q, k, v, scale: float):
    """(B, N, H, D) inputs -> out (B, Nq, H, D) view and lse (B, H, Nq) fp32."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2), lse


def _flash_cpu_grads(do, q, k, v, out, lse, scale: float):
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse, 0.0, False, scale=scale)
    return tuple(g.transpose(1, 2) for g in grads)


def _dense_forward(q, k, v, scale: float):
    """(B, N, H, D) inputs -> out (B, Nq, H, D) and lse (B, H, Nq) fp32."""
    if saves_lse(q):
        return _flash_cpu(q, k, v, scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale, dim=-1)
    return _sdpa(q, k, v, scale), lse.float()


def attention_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """(out, lse): out contiguous like q; lse fp32, (B, H, Nq) dense or (H, total_q) varlen."""
    if cu_q is None:
        out, lse = _dense_forward(q, k, v, scale)
        return out.contiguous(), lse.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for qs, ks in _segments(cu_q, cu_k):
        if qs.start == qs.stop:
            continue
        if ks.start == ks.stop:  # queries without keys: output 0, lse -inf (FlashAttention's convention)
            out[qs], lse[:, qs] = 0, float("-inf")
        else:
            seg_out, seg_lse = _dense_forward(q[None, qs], k[None, ks], v[None, ks], scale)
            out[qs], lse[:, qs] = seg_out[0], seg_lse[0]
    return out, lse


def attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """(dq, dk, dv), contiguous; the fused CPU path uses `out` and `lse`, the other recomputes."""
    fused = saves_lse(q)
    if cu_q is None:
        grads = _flash_cpu_grads(do, q, k, v, out, lse, scale) if fused else _sdpa_grads(do, q, k, v, scale)
        return tuple(g.contiguous() for g in grads)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    # Every row lies in exactly one segment (checked), so every row is written; a segment
    # without queries writes zero key gradients, one without keys zero query gradients.
    for qs, ks in _segments(cu_q, cu_k):
        if qs.start == qs.stop or ks.start == ks.stop:
            dq[qs], dk[ks], dv[ks] = 0, 0, 0
            continue
        if fused:
            grads = _flash_cpu_grads(do[None, qs], q[None, qs], k[None, ks], v[None, ks], out[None, qs],
                                     lse[None, :, qs], scale)
        else:
            grads = _sdpa_grads(do[None, qs], q[None, qs], k[None, ks], v[None, ks], scale)
        dq[qs], dk[ks], dv[ks] = (g[0] for g in grads)
    return dq, dk, dv
