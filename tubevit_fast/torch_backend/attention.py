"""Attention in plain PyTorch: F.scaled_dot_product_attention, the fast path on CPU.

Forward: SDPA on (B, H, N, D) transposed views; packed varlen runs SDPA per segment on views of
the packed tensors, so nothing is padded. SDPA does not return the log-sum-exp, so this backend
saves none (the op returns an empty placeholder).

Backward: the gradient formulas written out, recomputing the softmax in fp32 per dense batch or
per segment (P is materialised: O(Nq Nk) memory per batch and head). Autograd through SDPA is
not an option here: the op's backward runs below the autograd dispatch key, where a recomputed
forward records no graph.
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


def attention_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """(out, lse placeholder): out contiguous like q; the lse is an empty fp32 tensor."""
    placeholder = q.new_empty(0, dtype=torch.float32)
    if cu_q is None:
        return _sdpa(q, k, v, scale).contiguous(), placeholder
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for qs, ks in _segments(cu_q, cu_k):
        if qs.start != qs.stop:
            out[qs] = _sdpa(q[None, qs], k[None, ks], v[None, ks], scale)[0]
    return out, placeholder


def attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """(dq, dk, dv), contiguous; `out` and `lse` are not needed (the softmax is recomputed)."""
    if cu_q is None:
        return tuple(g.contiguous() for g in _sdpa_grads(do, q, k, v, scale))
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    # Every row lies in exactly one segment (checked), so every row is written; a segment
    # without queries writes zero key gradients.
    for qs, ks in _segments(cu_q, cu_k):
        grads = _sdpa_grads(do[None, qs], q[None, qs], k[None, ks], v[None, ks], scale)
        dq[qs], dk[ks], dv[ks] = (g[0] for g in grads)
    return dq, dk, dv
