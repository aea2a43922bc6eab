"""Fused tube embedding: implicit-im2col gather + GEMM + bias + position embedding, all tubes at once.

Maths. Video x of shape (B, C, T, H, W), any strides. Tube i has kernel (kt, kh, kw), stride
(st, sh, sw), offset (ot, oh, ow), grid (nt, nh, nw) from `geometry.TubeSpec.sampler_grid`,
weight W_i (dim, C, kt, kh, kw) and bias b_i (dim,). With K_i = C*kt*kh*kw, token
n = (it*nh + ih)*nw + iw and patch column k = ((c*kt + dt)*kh + dh)*kw + dw,

    A_i[b, n, k]        = x[b, c, ot + it*st + dt, oh + ih*sh + dh, ow + iw*sw + dw]
    out[b, s_i + n, :]  = A_i[b, n, :] @ W_i.reshape(dim, K_i).T + b_i + pos[s_i + n]

where s_i is the tube's first token (`geometry.token_offsets`). This is Conv3d per tube on the
offset-cropped video, flattened, concatenated over tubes, plus the position embedding.
Space-to-depth (TubeSpec.space_to_depth, factor f) changes only where a row lands: W_i is
(dim/f, ...) (the "width" below), and sampler token (it, ih, iw) writes channels j*dim/f ... (j+1)*dim/f of output
token (it//ft, ih//fh, iw//fw), j its place in the group (`_token_slot`); the backward kernels
read dY through the same mapping. The backward pass is

    dW_i = sum_{b,n} dY[b, s_i + n, :]^T A_i[b, n, :]      db_i = sum_{b,n} dY[b, s_i + n, :]
    dx  += scatter(A_i's addresses, dY_i @ W_i)             (overlapping tubes/tokens add up)

Work. Forward FLOPs = 2 * B * sum_i N_i * K_i * dim (each backward GEMM is the same again).
Minimum forward bytes = the pixels some tube reads (`geometry.read_mask`, once per sample and
channel) + every tube's weights and bias + pos (N*dim fp32) + B*N*dim output tokens. This kernel
gathers sum_i B*N_i*K_i elements (more than the pixels where tokens overlap) once per dim tile;
the dim tiles of one M tile run next to each other, so the repeats, like the re-reads of the
packed weight and of pos by every M tile, are meant to hit in L2.

Kernels (one Triton program per output tile, fp32 accumulation everywhere):
  _tube_embed_fwd_kernel         grid: M tiles of all tubes x dim tiles (flat, dim tile
                                 fastest). A gathered straight from x (masks, no copies), W^T
                                 from the packed weight; bias and pos added in the epilogue,
                                 stored straight into `out`.
  _tube_embed_bwd_weight_kernel  grid: (K tiles of all tubes, dim tiles, SPLIT). Each program
                                 reduces every SPLIT-th M tile of its tube into an fp32 partial;
                                 the host sums the SPLIT partials (deterministic, no atomics).
  _tube_embed_bwd_input_kernel   grid: M tiles x K tiles (flat, K tile fastest). dY @ W, then
                                 scatter-add into an fp32 buffer: atomics (one launch), or in
                                 deterministic mode one launch per tube and phase with plain
                                 read-add-write.

Tubes reach the kernels as a small int32 table (one row per tube, columns `_COLUMNS`) built
from `geometry`. Each program finds its tube by scanning the table; tile counts are computed
there too, because they depend on the autotuned block sizes.
"""
from __future__ import annotations

import functools
import itertools
import math
import os

import torch
import triton
import triton.language as tl

from tubevit_fast.geometry import TubeSpec, token_offsets

from .audit_spec import AuditTarget

# The interpreter (CPU) decides at decoration time; autotuning there would only cost time.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Geometry table columns (int32, one row per tube); the kernels index them by position.
# ntok and (nt, nh, nw) count sampler tokens; (ft, fh, fw) are the space-to-depth factors and
# width = dim / (ft * fh * fw) the channels each sampler token is projected to.
_COLUMNS = ("start", "ntok", "nt", "nh", "nw", "kt", "kh", "kw", "st", "sh", "sw", "ot", "oh", "ow",
            "K", "kcol", "width", "ft", "fh", "fw")
GEO_COLS = len(_COLUMNS)  # 20, the row stride the kernels use


# ----------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------

@triton.jit
def _tube_row(geo_ptr, tube):
    row = geo_ptr + tube * 20
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9),
            tl.load(row + 10), tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), tl.load(row + 14),
            tl.multiple_of(tl.load(row + 15), 16))  # kcol: the host aligns it (_KCOL_ALIGN)


@triton.jit
def _tube_merge(geo_ptr, tube, DIM, SPACE_TO_DEPTH: tl.constexpr):
    """width, ft, fh, fw: from the table, or (DIM, 1, 1, 1) as constants when no tube merges, so
    that launch compiles to exactly the plain kernel (known width: vector loads, no slot maths)."""
    if SPACE_TO_DEPTH:
        row = geo_ptr + tube * 20
        width, ft, fh, fw = tl.load(row + 16), tl.load(row + 17), tl.load(row + 18), tl.load(row + 19)
    else:
        width, ft, fh, fw = DIM, 1, 1, 1
    return width, ft, fh, fw


@triton.jit
def _phase_len(n, p, P):
    # Grid indices i < n with i % P == p (launched phases have p < n).
    return (n - p + P - 1) // P


@triton.jit
def _locate(geo_ptr, pid, B, pt, ph, pw, PT, PH, PW,
            BLOCK: tl.constexpr, NUM_TUBES: tl.constexpr, BY_K: tl.constexpr):
    """Which tube a tile id belongs to, and that tube's first tile id.

    Tiles are numbered tube after tube; a tube owns cdiv(rows, BLOCK) tiles, rows being its
    patch length K (BY_K) or its B * (tokens in the phase) token rows."""
    tube = pid * 0
    first = pid * 0
    seen = pid * 0
    for i in tl.static_range(NUM_TUBES):
        row = geo_ptr + i * 20
        if BY_K:
            rows = tl.load(row + 14)
        else:
            rows = (B * _phase_len(tl.load(row + 2), pt, PT) * _phase_len(tl.load(row + 3), ph, PH)
                    * _phase_len(tl.load(row + 4), pw, PW))
        tiles = tl.cdiv(rows, BLOCK)
        hit = (pid >= seen) & (tiles > 0)
        tube = tl.where(hit, i, tube)
        first = tl.where(hit, seen, first)
        seen += tiles
    return tube, first


@triton.jit
def _token_rows(offs_m, B, nt, nh, nw, pt, ph, pw, PT, PH, PW):
    """Row m = (b, jt, jh, jw) flattened over the phase's sub-grid -> sample, sampler grid index,
    sampler token, mask.

    Outside deterministic dX the phase is (0, 0, 0) with period 1, i.e. the whole grid."""
    mt = _phase_len(nt, pt, PT)
    mh = _phase_len(nh, ph, PH)
    mw = _phase_len(nw, pw, PW)
    per_b = mt * mh * mw
    mask = offs_m < B * per_b
    b = offs_m // per_b
    j = offs_m % per_b
    iw = pw + (j % mw) * PW
    j = j // mw
    ih = ph + (j % mh) * PH
    it = pt + (j // mh) * PT
    return b, it, ih, iw, mask


@triton.jit
def _token_slot(it, ih, iw, nh, nw, width, ft, fh, fw, WIDTH_ALIGN: tl.constexpr):
    """Sampler token -> (output token within the tube, first channel): the epilogue's
    space-to-depth mapping. Group (it // ft, ih // fh, iw // fw) is one token; member
    j = ((it % ft) * fh + ih % fh) * fw + iw % fw fills channels j * width ... (j + 1) * width."""
    n = ((it // ft) * (nh // fh) + ih // fh) * (nw // fw) + iw // fw
    j = ((it % ft) * fh + ih % fh) * fw + iw % fw
    # The host guarantees every width is a multiple of WIDTH_ALIGN: with this hint a merged
    # token's channel block starts as aligned as its row, so stores stay vectorised.
    return n, tl.multiple_of(j * width, WIDTH_ALIGN)


@triton.jit
def _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw):
    # int64: B*C*T*H*W elements (or large strides) can exceed 2**31.
    return (b.to(tl.int64) * sxb + (ot + it * st).to(tl.int64) * sxt
            + (oh + ih * sh).to(tl.int64) * sxh + (ow + iw * sw).to(tl.int64) * sxw)


@triton.jit
def _patch_cols(offs_k, kt, kh, kw, sxc, sxt, sxh, sxw):
    # k = ((c*kt + dt)*kh + dh)*kw + dw, the Conv3d weight's flattening order.
    dw = offs_k % kw
    r = offs_k // kw
    dh = r % kh
    r = r // kh
    dt = r % kt
    c = r // kt
    return (c.to(tl.int64) * sxc + dt.to(tl.int64) * sxt + dh.to(tl.int64) * sxh
            + dw.to(tl.int64) * sxw)


# ----------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------

def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# One small config under the interpreter: several tiles per axis even on tiny test shapes.
_INTERPRET_CONFIGS = [_cfg(16, 16, 16, 4, 1)]

# fp16/bf16 (tensor cores). Every config here compiles for sm_80 and sm_90 without spills
# (STACK 0 in cuobjdump's resource usage, no STL/LDL), for contiguous, channels-last and
# odd-sized inputs, dims not multiples of 16 and stride-0 grads: gathered or scattered tiles
# cost one 64-bit address per element (and unaligned dims make the epilogue's accesses
# scalar), hence mostly 8 warps for the larger tiles.
_FWD_CONFIGS = [
    _cfg(64, 128, 32, 8, 3),
    _cfg(128, 64, 32, 8, 3),
    _cfg(64, 64, 64, 8, 2),
    _cfg(64, 64, 32, 4, 3),
]
# Weight gradient: M is the reduction axis, (BLOCK_N, BLOCK_K) the output tile.
_BWD_W_CONFIGS = [
    _cfg(64, 128, 64, 8, 3),
    _cfg(64, 128, 32, 8, 3),
    _cfg(64, 64, 64, 4, 2),
]
# Input gradient: BLOCK_N chunks the dim reduction, (BLOCK_M, BLOCK_K) the scattered tile.
_BWD_X_CONFIGS = [
    _cfg(64, 64, 64, 8, 3),
    _cfg(64, 128, 32, 8, 2),
    _cfg(64, 64, 32, 8, 3),
]
# fp32 inputs take the exact ("ieee") dot, done with FMAs in registers: the 16-bit tiles
# spill heavily there; these do not (same checks as above).
_FWD_CONFIGS_FP32 = [_cfg(64, 64, 16, 4, 2), _cfg(32, 64, 32, 4, 2)]
_BWD_W_CONFIGS_FP32 = [_cfg(64, 64, 16, 8, 2), _cfg(32, 32, 32, 4, 2)]
_BWD_X_CONFIGS_FP32 = [_cfg(64, 64, 16, 4, 2), _cfg(32, 64, 32, 4, 2)]


def _configs(half, single):
    return _INTERPRET_CONFIGS if _INTERPRET else half + single


def _by_precision(single):
    """early_config_prune: keep the configs meant for the launch's dot precision."""
    ids = {id(c) for c in single}

    def prune(configs, named_args, **kwargs):
        ieee = kwargs.get("DOT_PRECISION") == "ieee"
        return [c for c in configs if (id(c) in ids) == ieee] or configs
    return prune


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.autotune(configs=_configs(_FWD_CONFIGS, _FWD_CONFIGS_FP32), key=["DIM", "KTOT"],
                 prune_configs_by={"early_config_prune": _by_precision(_FWD_CONFIGS_FP32)})
@triton.jit
def _tube_embed_fwd_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr, geo_ptr,
    B, DIM, KTOT,
    sxb, sxc, sxt, sxh, sxw,
    swd, swk,
    sbt, sbd,
    spn, spd,
    sob, son, sod,
    NUM_TUBES: tl.constexpr, SPACE_TO_DEPTH: tl.constexpr, WIDTH_ALIGN: tl.constexpr, HAS_POS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Flat grid, dim tile fastest: the programs that share a gathered A tile run together and
    # hit it in L2 (and a 1D grid has no 65535 limit on the M tile count).
    n_tiles = tl.cdiv(DIM, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    tube, first = _locate(geo_ptr, pid_m, B, 0, 0, 0, 1, 1, 1, BLOCK_M, NUM_TUBES, False)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube)
    width, ft, fh, fw = _tube_merge(geo_ptr, tube, DIM, SPACE_TO_DEPTH)
    if SPACE_TO_DEPTH:
        # DIM is the widest tube's width: narrower (space-to-depth) tubes have nothing here.
        if pid_n * BLOCK_N >= width:
            return

    offs_m = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, it, ih, iw, mask_m = _token_rows(offs_m, B, nt, nh, nw, 0, 0, 0, 1, 1, 1)
    rows = _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw)
    # Where each row's tokens go (before the K loop: then only n and chan, not the three grid
    # indices, stay live through it). Space-to-depth is this mapping: a sampler token's channels
    # land at chan.. of its group's token.
    n, chan = _token_slot(it, ih, iw, nh, nw, width, ft, fh, fw, WIDTH_ALIGN)
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Weights and biases are packed DIM rows wide (zeros past a tube's width): their loads keep
    # the DIM mask (DIM is a launch argument, often 16-aligned: vector loads); only the token
    # stores stop at the tube's width.
    mask_w = offs_d < DIM

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        cols = _patch_cols(offs_k, kt, kh, kw, sxc, sxt, sxh, sxw)
        a = tl.load(x_ptr + rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # No K mask: columns past K_i are the tube's zero padding (_KCOL_ALIGN).
        wt = tl.load(w_ptr + (kcol + offs_k)[:, None] * swk + offs_d[None, :] * swd,
                     mask=mask_w[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)

    acc += tl.load(b_ptr + tube * sbt + offs_d * sbd, mask=mask_w, other=0.0).to(tl.float32)[None, :]
    tok = start + n
    mask = mask_m[:, None] & (offs_d < width)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + (tok * spn + chan * spd)[:, None] + offs_d[None, :] * spd, mask=mask, other=0.0)
        acc += pos.to(tl.float32)
    out_rows = b.to(tl.int64) * sob + tok.to(tl.int64) * son + chan.to(tl.int64) * sod
    out = out_ptr + out_rows[:, None] + offs_d[None, :] * sod
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(_BWD_W_CONFIGS, _BWD_W_CONFIGS_FP32), key=["DIM", "KTOT"],
                 prune_configs_by={"early_config_prune": _by_precision(_BWD_W_CONFIGS_FP32)})
@triton.jit
def _tube_embed_bwd_weight_kernel(
    x_ptr, dy_ptr, dw_ptr, db_ptr, geo_ptr,
    B, DIM, KTOT, SPLIT,
    sxb, sxc, sxt, sxh, sxw,
    syb, syn, syd,
    sws, swd, swk,
    sbs, sbt, sbd,
    NUM_TUBES: tl.constexpr, SPACE_TO_DEPTH: tl.constexpr, WIDTH_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    tube, first = _locate(geo_ptr, pid_k, B, 0, 0, 0, 1, 1, 1, BLOCK_K, NUM_TUBES, True)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube)
    width, ft, fh, fw = _tube_merge(geo_ptr, tube, DIM, SPACE_TO_DEPTH)
    if SPACE_TO_DEPTH:
        if pid_n * BLOCK_N >= width:  # past a narrower tube's rows: nothing to compute or store
            return

    offs_k = (pid_k - first) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    cols = _patch_cols(offs_k, kt, kh, kw, sxc, sxt, sxh, sxw)
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_d = offs_d < width

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Interleaved M tiles: split s takes tiles s, s + SPLIT, ... in a fixed order.
    for mt in range(pid_s, tl.cdiv(B * ntok, BLOCK_M), SPLIT):
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        b, it, ih, iw, mask_m = _token_rows(offs_m, B, nt, nh, nw, 0, 0, 0, 1, 1, 1)
        n, chan = _token_slot(it, ih, iw, nh, nw, width, ft, fh, fw, WIDTH_ALIGN)
        rows = _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw)
        a = tl.load(x_ptr + rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        dy_rows = b.to(tl.int64) * syb + (start + n).to(tl.int64) * syn + chan.to(tl.int64) * syd
        dy = tl.load(dy_ptr + dy_rows[:, None] + offs_d[None, :] * syd, mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=DOT_PRECISION)
        # Cheap next to the dot; only the tube's first K tile stores it.
        db += tl.sum(dy.to(tl.float32), axis=0)

    dw = dw_ptr + pid_s * sws + offs_d[:, None] * swd + (kcol + offs_k)[None, :] * swk
    tl.store(dw, acc, mask=mask_d[:, None] & mask_k[None, :])
    tl.store(db_ptr + pid_s * sbs + tube * sbt + offs_d * sbd, db, mask=mask_d & (pid_k == first))


# restore_value: benchmarking a config must not leave its scatter-adds in dx.
@triton.autotune(configs=_configs(_BWD_X_CONFIGS, _BWD_X_CONFIGS_FP32), key=["DIM", "KTOT"],
                 restore_value=["dx_ptr"],
                 prune_configs_by={"early_config_prune": _by_precision(_BWD_X_CONFIGS_FP32)})
@triton.jit
def _tube_embed_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr, geo_ptr,
    B, DIM, KTOT, KMAX,
    pt, ph, pw, PT, PH, PW,
    syb, syn, syd,
    swd, swk,
    sxb, sxc, sxt, sxh, sxw,
    NUM_TUBES: tl.constexpr, SPACE_TO_DEPTH: tl.constexpr, WIDTH_ALIGN: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Flat grid, K tile fastest: the programs that share a dY tile run together (L2 reuse).
    k_tiles = tl.cdiv(KMAX, BLOCK_K)
    pid_m = tl.program_id(0) // k_tiles
    pid_k = tl.program_id(0) % k_tiles
    tube, first = _locate(geo_ptr, pid_m, B, pt, ph, pw, PT, PH, PW, BLOCK_M, NUM_TUBES, False)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube)
    width, ft, fh, fw = _tube_merge(geo_ptr, tube, DIM, SPACE_TO_DEPTH)
    # The K axis of the grid covers the largest tube; smaller tubes have nothing here.
    if pid_k * BLOCK_K >= K:
        return

    offs_m = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, it, ih, iw, mask_m = _token_rows(offs_m, B, nt, nh, nw, pt, ph, pw, PT, PH, PW)
    n, chan = _token_slot(it, ih, iw, nh, nw, width, ft, fh, fw, WIDTH_ALIGN)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    dy_rows = dy_ptr + b.to(tl.int64) * syb + (start + n).to(tl.int64) * syn + chan.to(tl.int64) * syd

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, width, BLOCK_N):
        offs_d = d0 + tl.arange(0, BLOCK_N)
        mask_d = offs_d < width
        dy = tl.load(dy_rows[:, None] + offs_d[None, :] * syd, mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0)
        w = tl.load(w_ptr + offs_d[:, None] * swd + (kcol + offs_k)[None, :] * swk,
                    mask=mask_d[:, None], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)

    rows = _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw)
    cols = _patch_cols(offs_k, kt, kh, kw, sxc, sxt, sxh, sxw)
    dx = dx_ptr + rows[:, None] + cols[None, :]
    mask = mask_m[:, None] & mask_k[None, :]
    if ATOMIC:
        tl.atomic_add(dx, acc, mask=mask, sem="relaxed")
    else:
        # One phase of one tube: footprints are disjoint, so no other program touches dx here.
        tl.store(dx, tl.load(dx, mask=mask, other=0.0) + acc, mask=mask)


# ----------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------

# Each tube's block of columns in the packed weight (and dW buffer) is zero-padded to a
# multiple of this (a multiple of every BLOCK_K): W tiles then need no K mask and start
# 16-element aligned, so they load as 16-byte vectors.
_KCOL_ALIGN = 64


def _column_starts(tubes, channels: int) -> list[int]:
    """Start column of each tube in the packed (dim, Kpad) weight, plus Kpad at the end."""
    ks = [t.patch_size(channels) for t in tubes]
    return list(itertools.accumulate((triton.cdiv(k, _KCOL_ALIGN) * _KCOL_ALIGN for k in ks), initial=0))


@functools.lru_cache(maxsize=64)
def _geometry_table(tubes: tuple[TubeSpec, ...], size: tuple[int, int, int], channels: int, dim: int,
                    device: torch.device) -> torch.Tensor:
    starts = token_offsets(tubes, size)
    kcols = _column_starts(tubes, channels)
    rows = [[starts[i], math.prod(tube.sampler_grid(size)), *tube.sampler_grid(size), *tube.kernel,
             *tube.stride, *tube.offset, tube.patch_size(channels), kcols[i], tube.width(dim), *tube.factors]
            for i, tube in enumerate(tubes)]
    assert all(len(r) == GEO_COLS for r in rows)
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32 would miss the fp32 tolerance; for 16-bit inputs the setting is ignored.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pack_weights(weights) -> torch.Tensor:
    """(width, Kpad): tube i's W_i.reshape(width_i, K_i) from its start column, then zeros to the
    next; width is the widest tube's (narrower space-to-depth tubes are zero-padded, never read)."""
    width = max(w.shape[0] for w in weights)
    flat = [w.reshape(w.shape[0], -1) for w in weights]
    pads = [((-f.shape[1]) % _KCOL_ALIGN, width - f.shape[0]) for f in flat]
    return torch.cat([torch.nn.functional.pad(f, (0, p, 0, q)) if p or q else f for f, (p, q) in zip(flat, pads)],
                     dim=1)


def _pack_biases(biases, width: int) -> torch.Tensor:
    """(tubes, width) biases, zero-padded like the weights."""
    return torch.stack([torch.nn.functional.pad(b.reshape(-1), (0, width - b.numel())) for b in biases])


def _m_tiles(rows: int, block: int) -> int:
    return triton.cdiv(rows, block)


def _split_count(B: int, counts, dim: int, ktot: int, device: torch.device) -> int:
    """How many ways to split each tube's M reduction for dW: enough programs for the GPU."""
    max_tiles = max(_m_tiles(B * n, 64) for n in counts)
    if _INTERPRET or device.type != "cuda":
        return min(2, max_tiles)  # still exercises the split path, cheaply
    programs = triton.cdiv(ktot, 64) * triton.cdiv(dim, 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(8, max_tiles, triton.cdiv(2 * sms, programs)))


def _launch(kernel, grid, args, flags):
    """Autotuned launch; in deterministic mode the first config, fixed, because the rounding
    depends on the block sizes and a timing-based choice may differ from process to process."""
    if torch.are_deterministic_algorithms_enabled():
        configs = kernel.configs
        if kernel.early_config_prune is not None:
            configs = kernel.early_config_prune(configs, {}, **flags)
        cfg = configs[0]
        kernel.fn[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        kernel[grid](*args, **flags)


# Argument lists, shared by the launches and the AOT audit (which must compile what runs).

def _merge_flags(tubes, dim: int) -> dict:
    """SPACE_TO_DEPTH (does any tube merge tokens) and WIDTH_ALIGN (the largest power of two up
    to 16 dividing every tube's width) of a launch over `tubes`."""
    align = math.gcd(16, *(t.width(dim) for t in tubes))
    merges = any(t.merge > 1 for t in tubes)
    return dict(SPACE_TO_DEPTH=merges, WIDTH_ALIGN=align & -align if merges else 1)


def _fwd_args(video, w, bias, pos, out, geo, tubes):
    has_pos = pos is not None
    args = (video, w, bias, pos if has_pos else bias, out, geo,  # pos_ptr unread without HAS_POS
            video.shape[0], w.shape[0], w.shape[1],
            *video.stride(), *w.stride(), *bias.stride(),
            *(pos.stride() if has_pos else (0, 0)), *out.stride())
    flags = dict(NUM_TUBES=len(tubes), **_merge_flags(tubes, out.shape[-1]), HAS_POS=has_pos,
                 DOT_PRECISION=_dot_precision(video.dtype))
    return args, flags


def _bwd_weight_args(video, grad_out, dw_part, db_part, geo, tubes):
    args = (video, grad_out, dw_part, db_part, geo,
            video.shape[0], dw_part.shape[1], dw_part.shape[2], dw_part.shape[0],
            *video.stride(), *grad_out.stride(), *dw_part.stride(), *db_part.stride())
    return args, dict(NUM_TUBES=len(tubes), **_merge_flags(tubes, grad_out.shape[-1]),
                      DOT_PRECISION=_dot_precision(video.dtype))


def _bwd_input_args(grad_out, w, dx, geo, tubes, kmax, phase, period, atomic):
    args = (grad_out, w, dx, geo,
            dx.shape[0], w.shape[0], w.shape[1], kmax, *phase, *period,
            *grad_out.stride(), *w.stride(), *dx.stride())
    return args, dict(NUM_TUBES=len(tubes), **_merge_flags(tubes, grad_out.shape[-1]), ATOMIC=atomic,
                      DOT_PRECISION=_dot_precision(w.dtype))


def tube_embed_forward(video, weights, biases, pos, tubes):
    """(B, C, T, H, W) video -> (B, N, dim) tokens of all tubes, bias and pos added, one launch."""
    tubes = tuple(tubes)
    B, C, T, H, W = video.shape
    counts = [t.num_tokens((T, H, W)) for t in tubes]
    samplers = [math.prod(t.sampler_grid((T, H, W))) for t in tubes]
    dim = tubes[0].token_dim(weights[0].shape[0])
    geo = _geometry_table(tubes, (T, H, W), C, dim, video.device)
    w = _pack_weights(weights)
    bias = _pack_biases(biases, w.shape[0])
    out = torch.empty((B, sum(counts), dim), device=video.device, dtype=video.dtype)
    args, flags = _fwd_args(video, w, bias, pos, out, geo, tubes)

    def grid(meta):
        return (sum(_m_tiles(B * n, meta["BLOCK_M"]) for n in samplers) * triton.cdiv(w.shape[0], meta["BLOCK_N"]),)

    _launch(_tube_embed_fwd_kernel, grid, args, flags)
    return out


def tube_embed_backward(grad_out, video, weights, tubes, input_requires_grad):
    """Gradients of tube_embed_forward: (grad_video or None, grad_weights, grad_biases)."""
    tubes = tuple(tubes)
    B, C, T, H, W = video.shape
    samplers = [math.prod(t.sampler_grid((T, H, W))) for t in tubes]
    ks = [t.patch_size(C) for t in tubes]
    kcols = _column_starts(tubes, C)
    widths = [w.shape[0] for w in weights]
    dim = max(widths)  # the packed rows; narrower space-to-depth tubes use the first width_i
    if grad_out.dtype != video.dtype:
        grad_out = grad_out.to(video.dtype)
    geo = _geometry_table(tubes, (T, H, W), C, grad_out.shape[-1], video.device)

    split = _split_count(B, samplers, dim, kcols[-1], video.device)
    # Every entry read below is written (a split without M tiles stores zeros); the pad
    # columns between tubes, and rows past a tube's width, stay unwritten and unread.
    dw_part = torch.empty((split, dim, kcols[-1]), device=video.device, dtype=torch.float32)
    db_part = torch.empty((split, len(tubes), dim), device=video.device, dtype=torch.float32)
    args, flags = _bwd_weight_args(video, grad_out, dw_part, db_part, geo, tubes)

    def grid_w(meta):
        return (sum(triton.cdiv(k, meta["BLOCK_K"]) for k in ks), triton.cdiv(dim, meta["BLOCK_N"]), split)

    _launch(_tube_embed_bwd_weight_kernel, grid_w, args, flags)
    dw = dw_part.sum(0)
    db = db_part.sum(0)
    # copy=True: each gradient gets its own storage (a custom op's outputs may not alias).
    grad_weights = [dw[:widths[i], kcols[i]:kcols[i] + ks[i]].reshape(w.shape).to(w.dtype, copy=True)
                    for i, w in enumerate(weights)]
    grad_biases = [db[i, :widths[i]].to(w.dtype, copy=True) for i, w in enumerate(weights)]

    grad_video = None
    if input_requires_grad:
        grad_video = _input_grad(grad_out, video, weights, tubes, geo, samplers, ks)
    return grad_video, grad_weights, grad_biases


def _input_grad(grad_out, video, weights, tubes, geo, samplers, ks):
    B, C, T, H, W = video.shape
    w = _pack_weights(weights)
    dx = torch.zeros(video.shape, device=video.device, dtype=torch.float32)

    def launch(geo_rows, launched, rows_per_tube, kmax, phase, period, atomic):
        args, flags = _bwd_input_args(grad_out, w, dx, geo_rows, launched, kmax, phase, period, atomic)

        def grid(meta):
            m_tiles = sum(_m_tiles(r, meta["BLOCK_M"]) for r in rows_per_tube)
            return (m_tiles * triton.cdiv(kmax, meta["BLOCK_K"]),)

        _launch(_tube_embed_bwd_input_kernel, grid, args, flags)

    if not torch.are_deterministic_algorithms_enabled():
        launch(geo, tubes, [B * n for n in samplers], max(ks), (0, 0, 0), (1, 1, 1), True)
    else:
        # Colouring: tokens whose grid indices agree modulo P_a = ceil(k_a / s_a) on every axis
        # are at least k_a apart, so their footprints are disjoint. One launch per tube and phase,
        # in a fixed order, fixes every pixel's summation order: bitwise reproducible.
        for i, tube in enumerate(tubes):
            grid3 = tube.sampler_grid((T, H, W))
            for phase, period, tokens in _phases(tube, grid3):
                launch(geo[i:i + 1], tubes[i:i + 1], [B * tokens], ks[i], phase, period, False)
    return dx.to(video.dtype)


def _phases(tube: TubeSpec, grid3):
    """(phase, period, tokens in the phase) for every non-empty phase of a tube, in fixed order."""
    period = tuple(-(-k // s) for k, s in zip(tube.kernel, tube.stride))
    for phase in itertools.product(*(range(min(P, n)) for P, n in zip(period, grid3))):
        tokens = 1
        for n, p, P in zip(grid3, phase, period):
            tokens *= -(-(n - p) // P)
        yield phase, period, tokens


# ----------------------------------------------------------------------------------------
# Ahead-of-time audit
# ----------------------------------------------------------------------------------------

_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}


def _specialise(fn, args, constexprs):
    """ASTSource signature, constexprs and attrs for positional `args`, the way Triton's JIT
    specialises at launch: ints equal to 1 become constexprs, ints divisible by 16 and
    (fresh, aligned) tensors get a divisibility-16 hint."""
    sig, cx, attrs = {}, dict(constexprs), {}
    names = [n for n in fn.arg_names if n not in constexprs]
    assert len(names) == len(args), (fn.__name__, len(names), len(args))
    for name, value in zip(names, args):
        index = (fn.arg_names.index(name),)
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[index] = [["tt.divisibility", 16]]
        elif value == 1:
            sig[name], cx[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
    for name in constexprs:
        sig[name] = "constexpr"
    return {n: sig[n] for n in fn.arg_names}, cx, attrs


def _label(cfg) -> str:
    kw = cfg.kwargs
    return f"BM{kw['BLOCK_M']}-BN{kw['BLOCK_N']}-BK{kw['BLOCK_K']}-w{cfg.num_warps}-s{cfg.num_stages}"


def audit_targets(dtype: str) -> list[AuditTarget]:
    """Every kernel x kept autotune config, specialised as the launches specialise them for the
    paper's setting (PAPER_TUBES, B=32, 3x32x224x224, dim 768, contiguous tensors).

    "fp32" is accepted too: its configs use FMAs (exact dot), so there matmul is False."""
    from tubevit_fast.geometry import PAPER_TUBES

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"audit dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    dt = dtypes[dtype]
    single = dt == torch.float32
    meta = torch.device("meta")
    tubes, (B, C, T, H, W), dim = PAPER_TUBES, (32, 3, 32, 224, 224), 768
    counts = [t.num_tokens((T, H, W)) for t in tubes]
    kcols = _column_starts(tubes, C)
    ks = [t.patch_size(C) for t in tubes]
    geo = torch.empty((len(tubes), GEO_COLS), dtype=torch.int32, device=meta)
    video = torch.empty((B, C, T, H, W), dtype=dt, device=meta)
    w = torch.empty((dim, kcols[-1]), dtype=dt, device=meta)
    bias = torch.empty((len(tubes), dim), dtype=dt, device=meta)
    tokens = torch.empty((B, sum(counts), dim), dtype=dt, device=meta)
    pos = torch.empty((sum(counts), dim), dtype=torch.float32, device=meta)
    split = 2
    dw_part = torch.empty((split, dim, kcols[-1]), dtype=torch.float32, device=meta)
    db_part = torch.empty((split, len(tubes), dim), dtype=torch.float32, device=meta)
    dx = torch.empty(video.shape, dtype=torch.float32, device=meta)
    # Deterministic dX: one phase of the tube that overlaps itself in time (period (3, 1, 1)).
    phase, period, _ = list(_phases(tubes[1], tubes[1].sampler_grid((T, H, W))))[-1]

    fwd, bwd_w, bwd_x = ((_FWD_CONFIGS_FP32, _BWD_W_CONFIGS_FP32, _BWD_X_CONFIGS_FP32) if single
                         else (_FWD_CONFIGS, _BWD_W_CONFIGS, _BWD_X_CONFIGS))
    # The space-to-depth specialisation (SPACE_TO_DEPTH=True): the paper's 2D tube merged in pairs
    # along w; only the flag differs in what is compiled.
    s2d = (*tubes[:3], TubeSpec(tubes[3].kernel, tubes[3].stride, tubes[3].offset, ("w", 2)))
    launches = []
    for suffix, ts in (("", tubes), ("-s2d", s2d)):
        launches += [
            (suffix, _tube_embed_fwd_kernel, fwd, _fwd_args(video, w, bias, pos, tokens, geo, ts)),
            (suffix, _tube_embed_bwd_weight_kernel, bwd_w, _bwd_weight_args(video, tokens, dw_part, db_part, geo, ts)),
            ("-atomic" + suffix, _tube_embed_bwd_input_kernel, bwd_x,
             _bwd_input_args(tokens, w, dx, geo, ts, max(ks), (0, 0, 0), (1, 1, 1), True)),
        ]
    launches.append(("-deterministic", _tube_embed_bwd_input_kernel, bwd_x,
                     _bwd_input_args(tokens, w, dx, geo[1:2], tubes[1:2], ks[1], phase, period, False)))
    targets = []
    for suffix, autotuner, configs, (args, flags) in launches:
        fn = autotuner.fn
        for cfg in configs:
            signature, constexprs, attrs = _specialise(fn, args, {**flags, **cfg.kwargs})
            targets.append(AuditTarget(
                kernel=fn.__name__, fn=fn, signature=signature, constexprs=constexprs,
                config=_label(cfg) + suffix, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                matmul=not single, attrs=attrs,
            ))
    return targets
