"""Tiny Triton kernels that exist only to test the audit tool (tubevit_fast.audit).

`probe_dot_matmul` multiplies tiles with tl.dot, so its SASS must contain tensor-core
instructions. `probe_nodot_matmul` computes the same product with a broadcast multiply and a
reduction, i.e. without tl.dot: it is declared a matmul, so the audit must flag it (no
HMMA/HGMMA) as not ok. That proves the audit can fail. `probe_nested_dot` puts the K loop of
probe_dot_matmul inside a loop over column tiles: its main loop is the inner one.

Known loops: one pass of a K loop multiplies a (BLOCK_M, BLOCK_K) by a (BLOCK_K, BLOCK_N) tile,
BLOCK_M * BLOCK_N * BLOCK_K multiply-adds shared by num_warps warps, so the main loop the audit
finds must hold BLOCK_M * BLOCK_N * BLOCK_K / (2048 * num_warps) m16n8k16 units of MMA work
(`loop_mma_units`), on sm_80 (HMMA) and sm_90 (HGMMA) alike.

Not a test module itself (leading underscore); tests/test_audit.py runs the audit CLI on it
with `--module _audit_probe_kernel` and tests/ on PYTHONPATH.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tubevit_fast.kernels.audit_spec import AuditTarget


@triton.jit
def _dot_tile(a_ptr, b_ptr, c_ptr, rm, rn, M, N, K, stride_am, stride_bk, stride_cm,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C[rm, rn] = A[rm, :] @ B[:, rn], unit stride along the last axis of each matrix.
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :],
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def probe_dot_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C[M, N] = A[M, K] @ B[K, N], one tile per program.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    _dot_tile(a_ptr, b_ptr, c_ptr, rm, rn, M, N, K, stride_am, stride_bk, stride_cm, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def probe_nodot_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Same product, but as sum_k A[:, k, None] * B[None, k, :]: CUDA cores only, no MMA.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :],
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0).to(tl.float32)
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def probe_nested_dot(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One row tile, every column tile in turn (a loop around the K loop).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for n0 in range(0, N, BLOCK_N):
        _dot_tile(a_ptr, b_ptr, c_ptr, rm, n0 + tl.arange(0, BLOCK_N), M, N, K, stride_am, stride_bk, stride_cm,
                  BLOCK_M, BLOCK_N, BLOCK_K)


def loop_mma_units(target: AuditTarget) -> float:
    """The MMA work of one pass of the target's K loop, in m16n8k16 units per warp."""
    c = target.constexprs
    return c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] / (2048 * target.num_warps)


def audit_targets(dtype: str) -> list[AuditTarget]:
    ptr = "*" + dtype
    signature = {"a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, "M": "i32", "N": "i32", "K": "i32",
                 "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    # Divisibility hints, as an autotuned launch would specialise them (exercises attrs).
    attrs = {name: 16 for name in ("a_ptr", "b_ptr", "c_ptr", "stride_am", "stride_bk", "stride_cm")}
    return [
        AuditTarget(kernel="probe_dot_matmul", fn=probe_dot_matmul, signature=signature,
                    constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
                    config="BM64-BN64-BK32-w4-s3", num_warps=4, num_stages=3, matmul=True, attrs=attrs),
        # K and N divisible by 16: the masks are constant over 8-element runs, so the tiles load
        # as 128-bit vectors (without the hint, one 16-bit load per element).
        AuditTarget(kernel="probe_dot_matmul", fn=probe_dot_matmul, signature=signature,
                    constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
                    config="BM64-BN64-BK32-w4-s3-KN16", num_warps=4, num_stages=3, matmul=True,
                    attrs={**attrs, "K": 16, "N": 16}),
        AuditTarget(kernel="probe_nested_dot", fn=probe_nested_dot, signature=signature,
                    constexprs={"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32},
                    config="BM64-BN32-BK32-w4-s3", num_warps=4, num_stages=3, matmul=True, attrs=attrs),
        AuditTarget(kernel="probe_nodot_matmul", fn=probe_nodot_matmul, signature=signature,
                    constexprs={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 8},
                    config="BM32-BN32-BK8-w4-s1", num_warps=4, num_stages=1, matmul=True),
    ]
