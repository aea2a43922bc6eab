"""Non-causal multi-head attention in Triton, FlashAttention-2 style, dense or packed varlen.

Maths, per (sequence b, head h), with s = softmax_scale (default 1/sqrt(D)):
    S = s Q K^T                    (Nq, Nk)
    lse_i = log sum_j exp(S_ij)    natural log, fp32
    P = exp(S - lse)               softmax rows
    O = P V                        (Nq, D)
Backward, given dO:
    delta_i = sum_d dO_id O_id     (= rowsum(P * dP), computed once by a preprocess kernel)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = s dS K,   dK = s dS^T Q

Forward: one program per (query tile, b, h) streams K/V tiles with an online softmax (running
max and sum in fp32, exp2 with log2(e) folded into the scale) and never materialises S.
Backward recomputes P tile by tile from the saved lse: a dK/dV kernel (one program per key
tile, looping over query tiles) and a dQ kernel (one program per query tile, looping over key
tiles). Every output element has exactly one writer, so there are no atomics: fp16/bf16 are
fine and results are deterministic.

Layouts (the CUDA extension uses the same convention):
    dense   q (B, Nq, H, D), k/v (B, Nk, H, D), any strides (the kernels read the head dim
            with unit stride; the launchers copy a tensor that lacks it); lse (B, H, Nq) fp32
    varlen  q (total_q, H, D), k/v (total_k, H, D) packed; int32 cu_seqlens_q/k of length
            batch + 1 (FlashAttention's convention); lse (H, total_q) fp32
Dense is the varlen code with uniform segments (segment start 0 inside each batch entry).
Ragged tails are masked; head dims 32/64/80/96/128 run in a power-of-two BLOCK_D (80 and 96
in a 128 block) with the real D masked. fp32 inputs use IEEE fp32 dot products so the fp32
path meets fp32 tolerances; fp16/bf16 multiply on tensor cores with fp32 accumulation.

Cost (non-causal, sums over sequences for varlen):
    FLOPs     forward 4 B H Nq Nk D (two matmuls); backward 2.5x that (five matmuls)
    min bytes forward (2 B Nq H D + 2 B Nk H D) e + 4 B H Nq   (read q, k, v; write o, lse)
              backward (4 B Nq H D + 4 B Nk H D) e + 4 B H Nq  (read q, k, v, o, dO, lse;
              write dq, dk, dv; the fp32 delta round trip excluded), e = bytes per element
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tubevit_fast.backends import interpreter_enabled
from tubevit_fast.attention_layout import lse_shape
from tubevit_fast.kernels.audit_spec import AuditTarget

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# The head dims the kernels take: powers of two run in a BLOCK_D of their size, 80 and 96 in a
# 128 block with the real D masked.
HEAD_DIMS = (32, 64, 80, 96, 128)


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Autotune sets kept small: each must compile spill-free for every head dim on sm_80 and sm_90
# (see audit_targets). fp16/bf16 (tensor cores): the fp32 accumulators of a 128-row tile
# (forward, dQ) or of dK and dV together need 8 warps at BLOCK_D 128; the 4-warp variants that
# reached ptxas' 255-register ceiling were dropped for headroom; a 3-stage 64x32 forward (sm_80,
# D 64) and a 2-stage 32x64 8-warp dK/dV (sm_80, D 32) were dropped for 8-16 byte stack spills.
# fp32 inputs take the exact ("ieee") dot, done with FMAs on operands held in registers, so
# their tiles are smaller (their own lists, chosen by _keep_precision). The interpreter (read at
# import, like Triton itself) runs one program at a time: a single small config.
if interpreter_enabled():
    _FWD_CONFIGS = _FWD_CONFIGS_FP32 = [_cfg(32, 16, 4, 1)]
    _DKDV_CONFIGS = _DKDV_CONFIGS_FP32 = [_cfg(16, 32, 4, 1)]
    _DQ_CONFIGS = _DQ_CONFIGS_FP32 = [_cfg(32, 16, 4, 1)]
else:
    _FWD_CONFIGS = [_cfg(64, 32, 4, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2)]
    _DKDV_CONFIGS = [_cfg(32, 32, 4, 2), _cfg(64, 64, 8, 2), _cfg(32, 64, 8, 3)]
    _DQ_CONFIGS = [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2), _cfg(64, 64, 8, 3)]
    # (ptxas' allocation for FMA dots is fragile: 64x32, 64x16 and 32x16 forwards, 2-stage 32x32
    # dK/dV and dQ and 16x16 dQ each spilled 8-232 bytes at some head dim and arch.)
    _FWD_CONFIGS_FP32 = [_cfg(32, 32, 8, 2)]
    _DKDV_CONFIGS_FP32 = [_cfg(32, 32, 8, 1), _cfg(32, 16, 4, 2)]
    _DQ_CONFIGS_FP32 = [_cfg(32, 32, 8, 1), _cfg(32, 16, 4, 2)]
_PREPROCESS_BLOCK_M = 64


def _keep_precision(fp32_configs):
    """early_config_prune: keep the configs made for the launch's dot precision."""
    fp32_ids = {id(c) for c in fp32_configs}

    def prune(configs, named_args, **kwargs):
        ieee = kwargs.get("DOT_PRECISION") == "ieee"
        return [c for c in configs if (id(c) in fp32_ids) == ieee] or configs
    return prune


def _tuned(configs, fp32_configs):
    """Autotune over both lists, pruned to the launch's precision. Retuned per head dim, layout,
    sequence lengths (a pooling head's single query wants other tiles than self-attention) and
    size class (next power of two of batch x heads: a tiny self-check input must not fix the
    tiles of a real batch); the dtype is part of Triton's key already. Varlen lengths are
    bucketed by the launchers (_seqlen_bucket) so that every batch does not retune."""
    both = configs + [c for c in fp32_configs if c not in configs]
    return triton.autotune(configs=both, key=["HEAD_DIM", "VARLEN", "max_seqlen_q", "max_seqlen_k", "size_class"],
                           prune_configs_by={"early_config_prune": _keep_precision(fp32_configs)})


# ---- shared helpers --------------------------------------------------------------------------

@triton.jit
def _segment(CU, pid_b, max_seqlen, VARLEN: tl.constexpr):
    """(first row, length) of sequence pid_b: read from cu_seqlens, or the dense uniform segment."""
    if VARLEN:
        start = tl.load(CU + pid_b)
        end = tl.load(CU + pid_b + 1)
        return start.to(tl.int64), end - start
    else:
        return tl.full([], 0, tl.int64), max_seqlen


@triton.jit
def _load_tile(base, rows, row_stride, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of a (n_rows, HEAD_DIM) matrix with unit column stride as a (len(rows), BLOCK_D)
    tile; rows past the segment and padded head-dim columns read 0."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _store_tile(base, value, rows, row_stride, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :])


# ---- forward ---------------------------------------------------------------------------------

@_tuned(_FWD_CONFIGS, _FWD_CONFIGS_FP32)
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    num_heads, max_seqlen_q, max_seqlen_k, size_class, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Flat grid: query tiles of one (b, h) are adjacent, so they share K/V in L2.
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(max_seqlen_q, BLOCK_M)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    pid_b = (pid_bh // num_heads).to(tl.int64)  # int64: offsets of large tensors overflow int32
    pid_h = (pid_bh % num_heads).to(tl.int64)
    q_start, seqlen_q = _segment(CU_Q, pid_b, max_seqlen_q, VARLEN)
    k_start, seqlen_k = _segment(CU_K, pid_b, max_seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return

    Q += pid_b * stride_qb + q_start * stride_qm + pid_h * stride_qh
    K += pid_b * stride_kb + k_start * stride_kn + pid_h * stride_kh
    V += pid_b * stride_vb + k_start * stride_vn + pid_h * stride_vh
    O += pid_b * stride_ob + q_start * stride_om + pid_h * stride_oh
    LSE += pid_b * stride_lb + pid_h * stride_lh + q_start

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = _load_tile(Q, offs_m, stride_qm, seqlen_q, HEAD_DIM, BLOCK_D)

    qk_scale = sm_scale * _LOG2E  # work in base 2: exp(x) = exp2(x log2 e); > 0 (the launcher)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of S (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running row sum of exp2(S - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K, cols, stride_kn, seqlen_k, HEAD_DIM, BLOCK_D)
        # The max is taken on the raw scores and scaled once per row (a positive scale keeps the
        # order), so each score costs one FFMA, s * qk_scale - m, before its exp2.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where((cols < seqlen_k)[None, :], s, float("-inf"))
        # Any key of the segment lies in its first tile, so m_new is finite from the first
        # iteration on and exp2(-inf - -inf) never occurs.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, cols, stride_vn, seqlen_k, HEAD_DIM, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # l_i = 0 (and m_i = -inf) only for a segment with queries but no keys: out 0 and lse -inf
    # there (FlashAttention's convention), not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    _store_tile(O, out.to(O.dtype.element_ty), offs_m, stride_om, seqlen_q, HEAD_DIM, BLOCK_D)
    # Natural-log lse: back from base 2.
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_safe)) * _LN2, mask=offs_m < seqlen_q)


# ---- backward --------------------------------------------------------------------------------

@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh,
    num_heads, max_seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, laid out like lse."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(max_seqlen_q, BLOCK_M)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    pid_b = (pid_bh // num_heads).to(tl.int64)
    pid_h = (pid_bh % num_heads).to(tl.int64)
    q_start, seqlen_q = _segment(CU_Q, pid_b, max_seqlen_q, VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    O += pid_b * stride_ob + q_start * stride_om + pid_h * stride_oh
    DO += pid_b * stride_dob + q_start * stride_dom + pid_h * stride_doh
    DELTA += pid_b * stride_lb + pid_h * stride_lh + q_start

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(O, offs_m, stride_om, seqlen_q, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO, offs_m, stride_dom, seqlen_q, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=offs_m < seqlen_q)


@_tuned(_DKDV_CONFIGS, _DKDV_CONFIGS_FP32)
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    num_heads, max_seqlen_q, max_seqlen_k, size_class, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key tile, b, h): dV = P^T dO and dK = s dS^T Q, looping over query tiles."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(max_seqlen_k, BLOCK_N)
    pid_n = pid % num_n_blocks
    pid_bh = pid // num_n_blocks
    pid_b = (pid_bh // num_heads).to(tl.int64)
    pid_h = (pid_bh % num_heads).to(tl.int64)
    q_start, seqlen_q = _segment(CU_Q, pid_b, max_seqlen_q, VARLEN)
    k_start, seqlen_k = _segment(CU_K, pid_b, max_seqlen_k, VARLEN)
    if pid_n * BLOCK_N >= seqlen_k:
        return

    Q += pid_b * stride_qb + q_start * stride_qm + pid_h * stride_qh
    K += pid_b * stride_kb + k_start * stride_kn + pid_h * stride_kh
    V += pid_b * stride_vb + k_start * stride_vn + pid_h * stride_vh
    DO += pid_b * stride_dob + q_start * stride_dom + pid_h * stride_doh
    DK += pid_b * stride_dkb + k_start * stride_dkn + pid_h * stride_dkh
    DV += pid_b * stride_dvb + k_start * stride_dvn + pid_h * stride_dvh
    LSE += pid_b * stride_lb + pid_h * stride_lh + q_start
    DELTA += pid_b * stride_lb + pid_h * stride_lh + q_start

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k = _load_tile(K, offs_n, stride_kn, seqlen_k, HEAD_DIM, BLOCK_D)
    v = _load_tile(V, offs_n, stride_vn, seqlen_k, HEAD_DIM, BLOCK_D)

    qk_scale = sm_scale * _LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, seqlen_q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        q = _load_tile(Q, rows, stride_qm, seqlen_q, HEAD_DIM, BLOCK_D)
        do = _load_tile(DO, rows, stride_dom, seqlen_q, HEAD_DIM, BLOCK_D)
        # Queries past the segment get lse +inf: their P is exactly 0 with no mask on the tile
        # (their q and dO rows read 0 as well, so they add nothing to dV or dK).
        lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * _LOG2E
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        # Transposed tiles (keys x queries) so both products accumulate into (BLOCK_N, D).
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    _store_tile(DK, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, stride_dkn, seqlen_k, HEAD_DIM, BLOCK_D)
    _store_tile(DV, dv.to(DV.dtype.element_ty), offs_n, stride_dvn, seqlen_k, HEAD_DIM, BLOCK_D)


@_tuned(_DQ_CONFIGS, _DQ_CONFIGS_FP32)
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    num_heads, max_seqlen_q, max_seqlen_k, size_class, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query tile, b, h): dQ = s dS K, looping over key tiles."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(max_seqlen_q, BLOCK_M)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    pid_b = (pid_bh // num_heads).to(tl.int64)
    pid_h = (pid_bh % num_heads).to(tl.int64)
    q_start, seqlen_q = _segment(CU_Q, pid_b, max_seqlen_q, VARLEN)
    k_start, seqlen_k = _segment(CU_K, pid_b, max_seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return

    Q += pid_b * stride_qb + q_start * stride_qm + pid_h * stride_qh
    K += pid_b * stride_kb + k_start * stride_kn + pid_h * stride_kh
    V += pid_b * stride_vb + k_start * stride_vn + pid_h * stride_vh
    DO += pid_b * stride_dob + q_start * stride_dom + pid_h * stride_doh
    DQ += pid_b * stride_dqb + q_start * stride_dqm + pid_h * stride_dqh
    LSE += pid_b * stride_lb + pid_h * stride_lh + q_start
    DELTA += pid_b * stride_lb + pid_h * stride_lh + q_start

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < seqlen_q
    q = _load_tile(Q, offs_m, stride_qm, seqlen_q, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO, offs_m, stride_dom, seqlen_q, HEAD_DIM, BLOCK_D)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)

    qk_scale = sm_scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K, cols, stride_kn, seqlen_k, HEAD_DIM, BLOCK_D)
        v = _load_tile(V, cols, stride_vn, seqlen_k, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where((cols < seqlen_k)[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    _store_tile(DQ, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, stride_dqm, seqlen_q, HEAD_DIM, BLOCK_D)


# ---- launchers -------------------------------------------------------------------------------

def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels address the head dim with unit stride (coalesced, vectorised loads)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides; packed varlen tensors have no batch axis."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of an lse-shaped fp32 tensor whose query axis is contiguous."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _kernel_flags(q: torch.Tensor, varlen: bool) -> dict:
    head_dim = q.shape[-1]
    return dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), VARLEN=varlen,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _batch_heads(q: torch.Tensor, cu_q: torch.Tensor | None) -> tuple[int, int]:
    return (cu_q.numel() - 1, q.shape[1]) if cu_q is not None else (q.shape[0], q.shape[2])


def _size_class(batch: int, heads: int) -> int:
    """Part of the autotune key: batch x heads to the next power of two (see _tuned)."""
    return triton.next_power_of_2(max(batch * heads, 1))


def _seqlen_bucket(max_seqlen: int, varlen: bool) -> int:
    """Varlen max lengths rounded up to a power of two: they only size the grid (surplus tiles
    exit at once), and bucketed they keep autotuning to a few runs. Dense lengths are exact
    because the kernels use them as the sequence length."""
    return triton.next_power_of_2(max_seqlen) if varlen and max_seqlen > 0 else max_seqlen


def attention_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """(out, lse): out like q (contiguous), lse fp32 (B, H, Nq) dense or (H, total_q) varlen.

    Inputs are validated by the caller (tubevit_fast.ops.attention).
    """
    varlen = cu_q is not None
    max_q, max_k = _seqlen_bucket(max_q, varlen), _seqlen_bucket(max_k, varlen)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    # The kernel wants a positive scale (it scales each row's max after taking it, and masks with
    # -inf, which a zero scale would turn into NaN). Exact rewrites: s q.k = (-s) (-q).k, and a
    # zero scale gives the scores of a zero q at scale 1. lse and out are unchanged, so the
    # backward runs with the caller's q and scale.
    if scale < 0:
        q, scale = -q, -scale
    elif scale == 0:
        q, scale = torch.zeros_like(q), 1.0
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    batch, heads = _batch_heads(q, cu_q)
    if out.numel() == 0 or max_q == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * heads,)

    _attention_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        *_row_strides(q, varlen), *_row_strides(k, varlen), *_row_strides(v, varlen),
        *_row_strides(out, varlen), *_lse_strides(lse, varlen),
        heads, max_q, max_k, _size_class(batch, heads), scale, **_kernel_flags(q, varlen),
    )
    return out, lse


def attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """(dq, dk, dv), contiguous, like q, k, v; lse as returned by attention_forward."""
    varlen = cu_q is not None
    max_q, max_k = _seqlen_bucket(max_q, varlen), _seqlen_bucket(max_k, varlen)
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    batch, heads = _batch_heads(q, cu_q)
    flags = _kernel_flags(q, varlen)
    lse_strides = _lse_strides(lse, varlen)

    delta = torch.empty_like(lse)
    if q.numel() and max_q:
        num_m_blocks = triton.cdiv(max_q, _PREPROCESS_BLOCK_M)
        _attention_bwd_preprocess_kernel[(num_m_blocks * batch * heads,)](
            out, do, delta, cu_q, *_row_strides(out, varlen), *_row_strides(do, varlen), *lse_strides,
            heads, max_q, HEAD_DIM=flags["HEAD_DIM"], BLOCK_D=flags["BLOCK_D"], VARLEN=varlen,
            BLOCK_M=_PREPROCESS_BLOCK_M,
        )
    if k.numel() and max_k:
        _attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]) * batch * heads,)](
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
            *_row_strides(q, varlen), *_row_strides(k, varlen), *_row_strides(v, varlen),
            *_row_strides(do, varlen), *_row_strides(dk, varlen), *_row_strides(dv, varlen), *lse_strides,
            heads, max_q, max_k, _size_class(batch, heads), scale, **flags,
        )
    if q.numel() and max_q:
        _attention_bwd_dq_kernel[lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * heads,)](
            q, k, v, do, lse, delta, dq, cu_q, cu_k,
            *_row_strides(q, varlen), *_row_strides(k, varlen), *_row_strides(v, varlen),
            *_row_strides(do, varlen), *_row_strides(dq, varlen), *lse_strides,
            heads, max_q, max_k, _size_class(batch, heads), scale, **flags,
        )
    return dq, dk, dv


# ---- ahead-of-time audit -----------------------------------------------------------------------

_POINTER_DTYPE = {"CU_Q": "*i32", "CU_K": "*i32", "LSE": "*fp32", "DELTA": "*fp32"}


def _audit_signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """ASTSource signature for a dense launch with typical alignment: 16-byte aligned pointers and
    q/k/v/o strides divisible by 16 (true for every supported head dim, and what Triton's JIT
    specialises on); lse strides (multiples of Nq) get no hint. Upper-case runtime arguments are
    pointers."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = _POINTER_DTYPE.get(name, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "sm_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and not name.startswith("stride_l"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def audit_targets(dtype: str) -> list[AuditTarget]:
    """One AuditTarget per kernel x kept autotune config x head dim in HEAD_DIMS (dense layout):
    register allocation differs per head dim (a D 32 config once spilled where 64/80/128 did not),
    and 80 and 96 exercise the masked, padded-to-128 head-dim path. "fp32" audits the fp32 configs,
    whose exact dots run on FMAs (matmul False: no MMA expected)."""
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"audit dtype must be 'fp16', 'bf16' or 'fp32', got {dtype!r}")
    single = dtype == "fp32"
    targets = []
    for head_dim in HEAD_DIMS:
        common = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), VARLEN=False)
        fn = _attention_bwd_preprocess_kernel
        constexprs = {**common, "BLOCK_M": _PREPROCESS_BLOCK_M}
        signature, attrs = _audit_signature(fn, dtype, constexprs)
        targets.append(AuditTarget(
            kernel=fn.__name__, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs, matmul=False,
            config=f"D{head_dim}-BM{_PREPROCESS_BLOCK_M}-w4-s1", num_warps=4, num_stages=1))
        for tuned, configs, fp32_configs in ((_attention_fwd_kernel, _FWD_CONFIGS, _FWD_CONFIGS_FP32),
                                             (_attention_bwd_dkdv_kernel, _DKDV_CONFIGS, _DKDV_CONFIGS_FP32),
                                             (_attention_bwd_dq_kernel, _DQ_CONFIGS, _DQ_CONFIGS_FP32)):
            fn = tuned.fn
            for cfg in (fp32_configs if single else configs):
                constexprs = {**common, "DOT_PRECISION": "ieee" if single else "tf32", **cfg.kwargs}
                signature, attrs = _audit_signature(fn, dtype, constexprs)
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                targets.append(AuditTarget(
                    kernel=fn.__name__, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
                    config=f"D{head_dim}-BM{bm}-BN{bn}-w{cfg.num_warps}-s{cfg.num_stages}",
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, matmul=not single))
    return targets
