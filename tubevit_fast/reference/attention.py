"""Reference attention: explicit softmax(q k^T * scale) v, varlen by looping over segments."""
from __future__ import annotations

import math

import torch


def _dense(q, k, v, scale):
    # (B, N, H, D) -> scores (B, H, Nq, Nk)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def attention_reference(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is None:
        return _dense(q, k, v, scale)
    out = torch.empty_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bq) - 1):
        seg = slice(bq[i], bq[i + 1])
        out[seg] = _dense(q[None, seg], k[None, bk[i]:bk[i + 1]], v[None, bk[i]:bk[i + 1]], scale)[0]
    return out
