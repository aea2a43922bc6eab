"""The saved log-sum-exp every attention backend shares (reference, torch, Triton, the CUDA
extension): fp32 (fp64 for fp64 inputs), natural log of sum_j exp(softmax_scale * q_i . k_j),
shape (B, H, Nq) for dense q (B, Nq, H, D) and (H, total_q) for packed varlen q (total_q, H, D).

It sits below the op modules, the backends and the extension loader, which all import it and
none of which it imports.
"""
from __future__ import annotations

import torch


def lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """Shape of the saved log-sum-exp of queries q (dense, or packed when varlen)."""
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved log-sum-exp for inputs of `dtype`: fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
