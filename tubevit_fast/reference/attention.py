"""Reference attention: softmax(q k^T * scale) v written out in plain tensor maths.

Eager and obviously right, in the input dtype (call it on float64 copies for a golden result).
Layouts follow tubevit_fast.attention: dense q (B, Nq, H, D), k/v (B, Nk, H, D); packed varlen
q (total_q, H, D), k/v (total_k, H, D) with int32 cu_seqlens_q/k of length batch + 1.
No input validation here: tubevit_fast.ops.attention validates.
"""
from __future__ import annotations

import math

import torch


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, D), lse (B, H, Nq) natural log) for one dense batch."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, torch.logsumexp(scores, dim=-1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                        softmax_scale: float | None = None, return_lse: bool = False):
    """Non-causal attention; with return_lse also the fp32 log-sum-exp of the scaled scores,
    (B, H, Nq) dense or (H, total_q) varlen, the layout the fast backends save for backward."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if cu_seqlens_q is None:
        out, lse = _dense(q, k, v, scale)
    else:
        outs, lses = [], []
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(bounds_q) - 1):
            qs, ks = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
            out_i, lse_i = _dense(q[None, qs], k[None, ks], v[None, ks], scale)
            outs.append(out_i[0])
            lses.append(lse_i[0])
        out = torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
        lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0))
    return (out, lse.float()) if return_lse else out
