"""Fused tube embedding: implicit-GEMM gather + GEMM + bias + position embedding, all tubes at once.

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

Implicit GEMM (as CUTLASS/cuDNN gather convolutions). A's address splits into a row part and a
column part: x + row(b, n) + col(k), row = b*sxb + (ot+it*st)*sxt + (oh+ih*sh)*sxh + (ow+iw*sw)*sxw,
col = c*sxc + dt*sxt + dh*sxh + dw*sxw. The column offsets of every tube are a small int table
built on the host (`_column_table`, cached per tubes, channels and strides); the row offsets are
computed once per M tile (forward, dX) or read from a per-tube row table (dW, whose loop runs over
M: `_row_tables`). Inside the main loop an A element's address is then one add. Along w the kw
pixels of a patch row are contiguous when x's w stride is 1: the host picks the widest vector VEC
(up to 16 bytes) that every tube's kw, ow, sw, the other strides and x's alignment allow
(`_gather_vector`; 1 for odd widths, channels-last or misaligned views) and the kernels hint it
(tl.multiple_of / tl.max_contiguous on values the kernel body itself loads or computes: a hint on
a helper's return value is lost), so A's runs load as 64/128-bit cp.async copies.

uint8 pixels. x may be a uint8 video (tubevit_fast.pixels: TubeEmbed folds the normalisation into
W and b): forward and dW load A as uint8 and convert it to the weights' dtype in registers, which
is also the dtype of the tokens, of dY and of the dots. The same VEC rule packs 4 pixels (the
paper tubes' kw = 4 allows no more) into each 32-bit access: a quarter of fp32's bytes. Where
the conversion runs decides the loop's cost (_stage_pixels): a step's pixels are loaded one step
ahead into registers and converted once per program before the compiler stages the tile in
shared memory as 16-bit (dW; the forward on sm_80), or the uint8 tile is copied asynchronously
and each warp converts the fragments it reads (the forward on sm_90, whose warpgroup MMAs share
none). Either way the loops keep the float ones' budget (audit_targets). The dX kernel never
runs for such a video (it takes no gradient).

Kernels (one Triton program per output tile, fp32 accumulation everywhere):
  _tube_embed_fwd_kernel         grid: M tiles of all tubes x dim tiles (flat, dim tile
                                 fastest). A gathered straight from x, W^T from the packed weight;
                                 bias and pos added in the epilogue, stored straight into `out`.
  _tube_embed_bwd_weight_kernel  grid: (K tiles of all tubes, dim tiles, SPLIT). Each program
                                 reduces every SPLIT-th M tile of its tube into an fp32 partial (db
                                 with one more small MMA against ones); the host sums the SPLIT
                                 partials (deterministic, no atomics).
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

import numpy as np
import torch
import triton
import triton.language as tl

from tubevit_fast.backends import interpreter_enabled
from tubevit_fast.geometry import TubeSpec, token_offsets
from tubevit_fast.pixels import compute_dtype

from .audit_spec import AuditTarget, LoopBudget

# Geometry table columns (int32, one row per tube); the kernels index them by position.
# ntok and (nt, nh, nw) count sampler tokens; (ft, fh, fw) are the space-to-depth factors and
# width = dim / (ft * fh * fw) the channels each sampler token is projected to; kcol is the
# tube's first column in the packed weight and the column table, rtab its first entry in the
# row tables.
_COLUMNS = ("start", "ntok", "nt", "nh", "nw", "kt", "kh", "kw", "st", "sh", "sw", "ot", "oh", "ow",
            "K", "kcol", "width", "ft", "fh", "fw", "rtab")
GEO_COLS = len(_COLUMNS)  # 21, the row stride the kernels use


# ----------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------

@triton.jit
def _tube_row(geo_ptr, tube, VEC: tl.constexpr):
    row = geo_ptr + tube * 21
    # Hints on the loads themselves (they survive inlining): K is a multiple of kw, hence of VEC
    # (_gather_vector); the host aligns kcol (_KCOL_ALIGN).
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9),
            tl.load(row + 10), tl.load(row + 11), tl.load(row + 12), tl.load(row + 13),
            tl.multiple_of(tl.load(row + 14), VEC), tl.multiple_of(tl.load(row + 15), 16))


@triton.jit
def _tube_merge(geo_ptr, tube, DIM, SPACE_TO_DEPTH: tl.constexpr, WIDTH_ALIGN: tl.constexpr):
    """width, ft, fh, fw: from the table, or (DIM, 1, 1, 1) as constants when no tube merges, so
    that launch compiles to exactly the plain kernel (known width: vector loads, no slot maths).
    Every width is a multiple of WIDTH_ALIGN (the host checks): masks at the width stay vector-wide."""
    if SPACE_TO_DEPTH:
        row = geo_ptr + tube * 21
        width = tl.multiple_of(tl.load(row + 16), WIDTH_ALIGN)
        ft, fh, fw = tl.load(row + 17), tl.load(row + 18), tl.load(row + 19)
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
        row = geo_ptr + i * 21
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
    space-to-depth mapping (geometry.TubeSpec.sampler_slots). Group (it // ft, ih // fh, iw // fw)
    is one token; member j = ((it % ft) * fh + ih % fh) * fw + iw % fw fills channels
    j * width ... (j + 1) * width."""
    n = ((it // ft) * (nh // fh) + ih // fh) * (nw // fw) + iw // fw
    j = ((it % ft) * fh + ih % fh) * fw + iw % fw
    # The host guarantees every width is a multiple of WIDTH_ALIGN: with this hint a merged
    # token's channel block starts as aligned as its row, so stores stay vectorised.
    return n, tl.multiple_of(j * width, WIDTH_ALIGN)


@triton.jit
def _row_entries(xrow_ptr, dyrow_ptr, rtab, x0, VEC: tl.constexpr, DY_VEC: tl.constexpr, BLOCK_M: tl.constexpr):
    """dW's rows of a tile that starts at token x0 of its first sample: their row-table entries
    (pixel and token-slot offsets relative to that sample; see _row_tables), hinted as the host
    guarantees (multiples of VEC and DY_VEC)."""
    x = rtab + x0 + tl.arange(0, BLOCK_M)
    xrow = tl.multiple_of(tl.load(xrow_ptr + x), VEC)
    dyrow = tl.multiple_of(tl.load(dyrow_ptr + x), DY_VEC)
    return xrow, dyrow


@triton.jit
def _next_tile(b0, x0, b_step, x_step, per_sample):
    """(sample, token) where dW's next tile starts, SPLIT tiles on: the step split as b_step
    samples plus x_step < per_sample tokens once, so the loop divides nothing."""
    x0 += x_step
    carry = x0 >= per_sample
    return b0 + b_step + carry.to(tl.int32), tl.where(carry, x0 - per_sample, x0)


@triton.jit
def _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw):
    # int64: B*C*T*H*W elements (or large strides) can exceed 2**31.
    return (b.to(tl.int64) * sxb + (ot + it * st).to(tl.int64) * sxt
            + (oh + ih * sh).to(tl.int64) * sxh + (ow + iw * sw).to(tl.int64) * sxw)


# ----------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------

def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# One small config under the interpreter: several tiles per axis even on tiny test shapes.
_INTERPRET_CONFIGS = [_cfg(16, 16, 16, 4, 1)]

# fp16/bf16 (tensor cores): tiles large enough that the main loop's fixed costs (barriers,
# address adds, the column-table load) spread over many MMAs. Every config compiles for sm_80
# and sm_90 without spills and meets the loop budget below (audit_targets), for contiguous,
# channels-last and odd-sized inputs, dims not multiples of 16 and stride-0 grads.
_FWD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 32, 8, 4),
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 128, 64, 8, 3),
]
# Weight gradient: M is the reduction axis, (BLOCK_N, BLOCK_K) the output tile. Each row of a
# step costs its table entries and addresses whatever the tile, so the output tiles are wide.
_BWD_W_CONFIGS = [
    _cfg(128, 128, 128, 8, 3),
    _cfg(64, 256, 64, 8, 3),
    _cfg(64, 128, 64, 4, 3),
]
# ... and for launches whose gathers are (nearly) scalar: a channels-last or misaligned video
# (VEC 1) or token rows without 8-byte runs (DY_VEC <= 2: odd dims, strided or stride-0 grads).
# One address per element: the wide tiles above spill there.
_BWD_W_CONFIGS_NARROW = [_cfg(64, 64, 64, 8, 3)]
# ... and for a uint8 video: the widest output tile, over which the pixel tile's conversions
# (once per pixel of the 64x64 step, _stage_pixels) spread to keep the loop budget (the
# 128x128x128 tile spills with them; 64x128x64 misses the budget).
_BWD_W_CONFIGS_PIXELS = [c for c in _BWD_W_CONFIGS if c.kwargs["BLOCK_N"] == 256]
# The forward on a uint8 video: only the 128x128 tiles, whose conversions (once per pixel of the
# 128x64 step, _stage_pixels) spread over enough MMAs to keep the loop budget.
_FWD_CONFIGS_PIXELS = [c for c in _FWD_CONFIGS if c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 128]
# Input gradient: BLOCK_N chunks the dim reduction, (BLOCK_M, BLOCK_K) the scattered tile.
_BWD_X_CONFIGS = [
    _cfg(64, 64, 64, 8, 3),
    _cfg(64, 128, 32, 8, 2),
    _cfg(64, 64, 32, 8, 3),
]
# fp32 inputs take the exact ("ieee") dot, done with FMAs in registers: the 16-bit tiles
# spill heavily there; these do not (same checks as above).
_FWD_CONFIGS_FP32 = [_cfg(64, 64, 16, 4, 2), _cfg(32, 64, 16, 4, 2)]
_BWD_W_CONFIGS_FP32 = [_cfg(32, 64, 32, 8, 2), _cfg(32, 32, 32, 4, 2)]
_BWD_X_CONFIGS_FP32 = [_cfg(64, 64, 16, 4, 2), _cfg(32, 64, 32, 4, 2)]

# The static targets of the 16-bit forward and dW main loops (issue 13), checked by the audit on
# the paper's setting: at most 4 non-MMA instructions per m16n8k16 MMA, no 8/16-bit global loads
# (A's pixel runs load as vectors), and wgmma on Hopper.
_FWD_BUDGET = _BWD_W_BUDGET = LoopBudget(max_non_mma_per_mma=4, min_load_bits=32, hgmma_archs=("sm_90",))
# A uint8 video's loops keep the same budget with the _PIXELS configs (_stage_pixels).


def _configs(half, single):
    return _INTERPRET_CONFIGS if interpreter_enabled() else half + single


def _narrow(flags) -> bool:
    """Whether a launch's gathers are (nearly) scalar: see _BWD_W_CONFIGS_NARROW."""
    return flags.get("VEC", 4) == 1 or flags.get("DY_VEC", 4) <= 2


def _prune_for(single, narrow=(), pixels=None):
    """early_config_prune: the configs meant for the launch's dot precision (and, with `narrow`
    configs, its vector widths; with `pixels` configs, a uint8 video's 16-bit launch), without
    tiles far larger than the problem (BLOCK_N beyond the dim, BLOCK_M beyond the token rows)."""
    families = {**{id(c): "single" for c in single}, **{id(c): "narrow" for c in narrow}}

    def prune(configs, named_args, **kwargs):
        want = ("single" if kwargs.get("DOT_PRECISION") == "ieee"
                else "narrow" if narrow and _narrow(kwargs) else "half")
        kept = [c for c in configs if families.get(id(c), "half") == want] or configs
        video = named_args.get("x_ptr")
        if pixels is not None and want == "half" and getattr(video, "dtype", None) == torch.uint8:
            kept = [c for c in kept if any(c is p for p in pixels)] or kept
        dim, rows = named_args.get("DIM"), named_args.get("ROWS_CLASS")
        fits = [c for c in kept
                if (dim is None or c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(dim)))
                and (rows is None or c.kwargs["BLOCK_M"] <= max(64, rows))]
        return fits or kept
    return prune


# Autotune keys: the problem's shape class. ROWS_CLASS (the token rows rounded up to a power of
# two) keeps the first-use self-check's tiny input from fixing the config of a real batch.
_KEY = ["DIM", "KTOT", "ROWS_CLASS"]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.autotune(configs=_configs(_FWD_CONFIGS, _FWD_CONFIGS_FP32), key=_KEY,
                 prune_configs_by={"early_config_prune": _prune_for(_FWD_CONFIGS_FP32, pixels=_FWD_CONFIGS_PIXELS)})
@triton.jit
def _tube_embed_fwd_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr, geo_ptr, col_ptr,
    B, DIM, KTOT, ROWS_CLASS,
    sxb, sxt, sxh, sxw,
    swd, swk,
    sbt, sbd,
    spn, spd,
    sob, son, sod,
    NUM_TUBES: tl.constexpr, SPACE_TO_DEPTH: tl.constexpr, WIDTH_ALIGN: tl.constexpr, HAS_POS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, VEC: tl.constexpr, STAGE_PIXELS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Flat grid, dim tile fastest: the programs that share a gathered A tile run together and
    # hit it in L2 (and a 1D grid has no 65535 limit on the M tile count).
    n_tiles = tl.cdiv(DIM, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    tube, first = _locate(geo_ptr, pid_m, B, 0, 0, 0, 1, 1, 1, BLOCK_M, NUM_TUBES, False)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube, VEC)
    width, ft, fh, fw = _tube_merge(geo_ptr, tube, DIM, SPACE_TO_DEPTH, WIDTH_ALIGN)
    if SPACE_TO_DEPTH:
        # DIM is the widest tube's width: narrower (space-to-depth) tubes have nothing here.
        if pid_n * BLOCK_N >= width:
            return

    offs_m = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, it, ih, iw, mask_m = _token_rows(offs_m, B, nt, nh, nw, 0, 0, 0, 1, 1, 1)
    # Rows past the tube's last token gather its first token's pixels (in bounds) and are never
    # stored: the loop's A loads then need no row mask, only the K mask.
    rows = tl.where(mask_m, _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw), 0)
    a_rows = x_ptr + tl.multiple_of(rows, VEC)
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
    # Column offsets one K step ahead, in registers: A's addresses then do not wait on a load of
    # the same step, and the pipeliner buffers A and W like a plain GEMM's. (The table is padded
    # past every tube's columns, so the read ahead of the last step stays in bounds.)
    cols = tl.max_contiguous(tl.multiple_of(tl.load(col_ptr + kcol + tl.arange(0, BLOCK_K)), VEC), VEC)
    if STAGE_PIXELS:  # see _stage_pixels: the first step's pixels, into registers
        a_next = tl.load(a_rows[:, None] + cols[None, :], mask=(tl.arange(0, BLOCK_K) < K)[None, :], other=0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        cols_next = tl.max_contiguous(tl.multiple_of(tl.load(col_ptr + kcol + BLOCK_K + offs_k), VEC), VEC)
        if STAGE_PIXELS:  # this step's pixels were loaded one step ago; load the next step's
            a = a_next
            a_next = tl.load(a_rows[:, None] + cols_next[None, :], mask=(offs_k + BLOCK_K < K)[None, :], other=0)
        else:
            a = tl.load(a_rows[:, None] + cols[None, :], mask=(offs_k < K)[None, :], other=0.0)
        # uint8 pixels are converted here, in registers (a no-op for a floating-point video).
        a = a.to(w_ptr.dtype.element_ty)
        # No K mask: columns past K_i are the tube's zero padding (_KCOL_ALIGN).
        wt = tl.load(w_ptr + (kcol + offs_k)[:, None] * swk + offs_d[None, :] * swd,
                     mask=mask_w[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)
        cols = cols_next

    acc += tl.load(b_ptr + tube * sbt + offs_d * sbd, mask=mask_w, other=0.0).to(tl.float32)[None, :]
    tok = start + n
    mask = mask_m[:, None] & (offs_d < width)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + (tok * spn + chan * spd)[:, None] + offs_d[None, :] * spd, mask=mask, other=0.0)
        acc += pos.to(tl.float32)
    out_rows = b.to(tl.int64) * sob + tok.to(tl.int64) * son + chan.to(tl.int64) * sod
    out = out_ptr + out_rows[:, None] + offs_d[None, :] * sod
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(_BWD_W_CONFIGS + _BWD_W_CONFIGS_NARROW, _BWD_W_CONFIGS_FP32), key=_KEY,
                 prune_configs_by={"early_config_prune": _prune_for(_BWD_W_CONFIGS_FP32, _BWD_W_CONFIGS_NARROW,
                                                                    _BWD_W_CONFIGS_PIXELS)})
@triton.jit
def _tube_embed_bwd_weight_kernel(
    x_ptr, dy_ptr, dw_ptr, db_ptr, geo_ptr, col_ptr, xrow_ptr, dyrow_ptr,
    B, DIM, KTOT, ROWS_CLASS, SPLIT,
    sxb, syb, syd,
    sws, swd, swk,
    sbs, sbt, sbd,
    NUM_TUBES: tl.constexpr, SPACE_TO_DEPTH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VEC: tl.constexpr, DY_VEC: tl.constexpr, STAGE_PIXELS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    tube, first = _locate(geo_ptr, pid_k, B, 0, 0, 0, 1, 1, 1, BLOCK_K, NUM_TUBES, True)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube, VEC)
    width, ft, fh, fw = _tube_merge(geo_ptr, tube, DIM, SPACE_TO_DEPTH, DY_VEC)
    rtab = tl.load(geo_ptr + tube * 21 + 20)
    if SPACE_TO_DEPTH:
        if pid_n * BLOCK_N >= width:  # past a narrower tube's rows: nothing to compute or store
            return

    offs_k = (pid_k - first) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    cols = tl.load(col_ptr + kcol + offs_k, mask=mask_k, other=0)
    cols = tl.max_contiguous(tl.multiple_of(cols, VEC), VEC)
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_d = offs_d < width
    # db as one more small MMA: dY^T against a column of ones (all 16 columns equal; the
    # epilogue keeps the first), so the loop needs no separate reduction of the dY tile.
    ones = tl.full((BLOCK_M, 16), 1.0, dy_ptr.dtype.element_ty)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    rows_total = B * ntok
    # Interleaved M tiles: split s takes tiles s, s + SPLIT, ... in a fixed order. Tile mt's rows
    # m0 .. m0 + BLOCK_M start in sample b0 at token x0 < ntok; entry x0 + i of the tube's row
    # tables holds row i's offsets relative to sample b0 (they wrap into the next samples), so no
    # row is decoded here. The next tile's entries are read one step ahead, into registers (A's
    # addresses then do not wait on a load of the same step; for a tile past the end they are
    # still inside the table, and unused).
    # A tube without tokens in this video has no rows to reduce but is still read ahead: its
    # entries 0 .. BLOCK_M (zeros), never a division by 0.
    per_sample = tl.maximum(ntok, 1)
    b0 = pid_s * BLOCK_M // per_sample
    x0 = pid_s * BLOCK_M - b0 * per_sample
    b_step = SPLIT * BLOCK_M // per_sample
    x_step = SPLIT * BLOCK_M - b_step * per_sample
    xrow, dyrow = _row_entries(xrow_ptr, dyrow_ptr, rtab, x0, VEC, DY_VEC, BLOCK_M)
    if STAGE_PIXELS:  # see _stage_pixels: the first M tile's pixels, into registers
        a_next = tl.load((x_ptr + b0.to(tl.int64) * sxb) + (xrow[:, None] + cols[None, :]),
                         mask=(pid_s * BLOCK_M + tl.arange(0, BLOCK_M) < rows_total)[:, None] & mask_k[None, :],
                         other=0)
    for mt in range(pid_s, tl.cdiv(rows_total, BLOCK_M), SPLIT):
        m0 = mt * BLOCK_M
        if STAGE_PIXELS:  # no division in the uint8 loop (its budget needs the instructions)
            b0_next, x0 = _next_tile(b0, x0, b_step, x_step, per_sample)
        else:  # nor the two registers the stepping keeps live (the float 64x128 tile spills)
            b0_next = (m0 + SPLIT * BLOCK_M) // per_sample
            x0 = m0 + SPLIT * BLOCK_M - b0_next * per_sample
        xrow_next, dyrow_next = _row_entries(xrow_ptr, dyrow_ptr, rtab, x0, VEC, DY_VEC, BLOCK_M)
        mask_m = m0 + tl.arange(0, BLOCK_M) < rows_total
        # Offsets relative to sample b0's pointers: 32-bit sums when the host's tables are 32-bit.
        if STAGE_PIXELS:  # this tile's pixels were loaded one tile ago; load the next tile's
            a = a_next
            a_next = tl.load((x_ptr + b0_next.to(tl.int64) * sxb) + (xrow_next[:, None] + cols[None, :]),
                             mask=(m0 + SPLIT * BLOCK_M + tl.arange(0, BLOCK_M) < rows_total)[:, None]
                             & mask_k[None, :], other=0)
        else:
            a = tl.load((x_ptr + b0.to(tl.int64) * sxb) + (xrow[:, None] + cols[None, :]),
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = a.to(dy_ptr.dtype.element_ty)
        # dY^T loaded as such (channels down, rows across): a dot operand straight from memory.
        dyt = tl.load((dy_ptr + b0.to(tl.int64) * syb) + (dyrow[None, :] + offs_d[:, None] * syd),
                      mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        acc = tl.dot(dyt, a, acc, input_precision=DOT_PRECISION)
        db_acc = tl.dot(dyt, ones, db_acc, input_precision=DOT_PRECISION)
        b0, xrow, dyrow = b0_next, xrow_next, dyrow_next

    dw = dw_ptr + pid_s * sws + offs_d[:, None] * swd + (kcol + offs_k)[None, :] * swk
    tl.store(dw, acc, mask=mask_d[:, None] & mask_k[None, :])
    db = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, db_acc, 0.0), axis=1)
    tl.store(db_ptr + pid_s * sbs + tube * sbt + offs_d * sbd, db, mask=mask_d & (pid_k == first))


# reset_to_zero: benchmarking a config must not leave its scatter-adds in dx (dx starts as
# zeros; Triton 3.6 and 3.8 zero it again after tuning, before the real launch).
@triton.autotune(configs=_configs(_BWD_X_CONFIGS, _BWD_X_CONFIGS_FP32), key=_KEY,
                 reset_to_zero=["dx_ptr"],
                 prune_configs_by={"early_config_prune": _prune_for(_BWD_X_CONFIGS_FP32)})
@triton.jit
def _tube_embed_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr, geo_ptr, col_ptr,
    B, DIM, KTOT, ROWS_CLASS, KMAX,
    pt, ph, pw, PT, PH, PW,
    syb, syn, syd,
    swd, swk,
    sxb, sxt, sxh, sxw,
    NUM_TUBES: tl.constexpr, SPACE_TO_DEPTH: tl.constexpr, WIDTH_ALIGN: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Flat grid, K tile fastest: the programs that share a dY tile run together (L2 reuse).
    k_tiles = tl.cdiv(KMAX, BLOCK_K)
    pid_m = tl.program_id(0) // k_tiles
    pid_k = tl.program_id(0) % k_tiles
    tube, first = _locate(geo_ptr, pid_m, B, pt, ph, pw, PT, PH, PW, BLOCK_M, NUM_TUBES, False)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube, 1)
    width, ft, fh, fw = _tube_merge(geo_ptr, tube, DIM, SPACE_TO_DEPTH, WIDTH_ALIGN)
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

    # dx's own column table (dx is a contiguous fp32 buffer, not the video's layout).
    rows = _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw)
    cols = tl.load(col_ptr + kcol + offs_k, mask=mask_k, other=0)
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

# Each tube's block of columns in the packed weight, the column table and the dW buffer is
# zero-padded to a multiple of this (a multiple of every forward BLOCK_K): W tiles then need no K
# mask and start 16-element aligned, so they load as 16-byte vectors.
_KCOL_ALIGN = 64
# Entries past a tube's ntok in its row tables: a dW tile's rows start at a token < ntok and run
# BLOCK_M rows on (wrapping into the next samples).
_ROW_TABLE_PAD = max(c.kwargs["BLOCK_M"] for c in
                     _BWD_W_CONFIGS + _BWD_W_CONFIGS_NARROW + _BWD_W_CONFIGS_FP32 + _INTERPRET_CONFIGS)


def _column_starts(tubes, channels: int) -> list[int]:
    """Start column of each tube in the packed (dim, Kpad) weight, plus Kpad at the end."""
    ks = [t.patch_size(channels) for t in tubes]
    return list(itertools.accumulate((triton.cdiv(k, _KCOL_ALIGN) * _KCOL_ALIGN for k in ks), initial=0))


def _row_table_starts(tubes, size) -> list[int]:
    """Start of each tube in the row tables (ntok + _ROW_TABLE_PAD entries each), plus the total."""
    return list(itertools.accumulate((math.prod(t.sampler_grid(size)) + _ROW_TABLE_PAD for t in tubes), initial=0))


@functools.lru_cache(maxsize=64)
def _geometry_table(tubes: tuple[TubeSpec, ...], size: tuple[int, int, int], channels: int, dim: int,
                    device: torch.device) -> torch.Tensor:
    starts = token_offsets(tubes, size)
    kcols = _column_starts(tubes, channels)
    rtabs = _row_table_starts(tubes, size)
    rows = [[starts[i], math.prod(tube.sampler_grid(size)), *tube.sampler_grid(size), *tube.kernel,
             *tube.stride, *tube.offset, tube.patch_size(channels), kcols[i], tube.width(dim), *tube.factors,
             rtabs[i]]
            for i, tube in enumerate(tubes)]
    assert all(len(r) == GEO_COLS for r in rows)
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _offsets_tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """int32 when every offset fits (half the bytes to read), else int64."""
    small = values.size == 0 or (values.min() >= -2**31 and values.max() < 2**31)
    return torch.from_numpy(values.astype(np.int32 if small else np.int64)).to(device)


@functools.lru_cache(maxsize=64)
def _column_table(tubes: tuple[TubeSpec, ...], channels: int, strides: tuple[int, int, int, int],
                  device: torch.device) -> torch.Tensor:
    """(Kpad + _KCOL_ALIGN,) column offsets: tube i's patch_offsets (for (c, t, h, w) element
    strides) from its start column, zeros in the padding and in one more block at the end (the
    forward reads one K step ahead)."""
    kcols = _column_starts(tubes, channels)
    table = np.zeros(kcols[-1] + _KCOL_ALIGN, dtype=np.int64)
    for i, tube in enumerate(tubes):
        cols = tube.patch_offsets(channels, strides)
        table[kcols[i]:kcols[i] + cols.size] = cols
    return _offsets_tensor(table, device)


@functools.lru_cache(maxsize=64)
def _row_tables(tubes: tuple[TubeSpec, ...], size: tuple[int, int, int], dim: int,
                x_strides: tuple[int, int, int, int], y_strides: tuple[int, int, int],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The dW kernel's row tables. Entry x of tube i (x < ntok + _ROW_TABLE_PAD) is row x counted
    from a sample's first token, i.e. sample x // ntok, sampler token n = x % ntok: its first
    pixel in the video, (x // ntok) * sxb + sampler_offsets[n], and its slot in the tokens
    tensor, (x // ntok) * syb + (s_i + token) * syn + member * width * syd (sampler_slots)."""
    sxb, sxt, sxh, sxw = x_strides
    syb, syn, syd = y_strides
    starts = token_offsets(tubes, size)
    xrow, dyrow = [], []
    for i, tube in enumerate(tubes):
        pixels = tube.sampler_offsets(size, (sxt, sxh, sxw))
        token, member = tube.sampler_slots(size)
        slots = (starts[i] + token) * syn + member * tube.width(dim) * syd
        x = np.arange(pixels.size + _ROW_TABLE_PAD)
        if pixels.size == 0:  # a tube without tokens here: no M tile reads its rows
            xrow.append(0 * x)
            dyrow.append(0 * x)
            continue
        sample, n = x // pixels.size, x % pixels.size
        xrow.append(sample * sxb + pixels[n])
        dyrow.append(sample * syb + slots[n])
    return _offsets_tensor(np.concatenate(xrow), device), _offsets_tensor(np.concatenate(dyrow), device)


def _vector_width(tensor: torch.Tensor, divisors) -> int:
    """The widest vector (a power of two, at most 16 bytes) whose element count divides every one
    of `divisors` and whose bytes divide the tensor's address; 1 if none."""
    es = tensor.element_size()
    vec = 16 // es
    while vec > 1 and (tensor.data_ptr() % (vec * es) or any(d % vec for d in divisors)):
        vec //= 2
    return max(vec, 1)


def _gather_vector(video: torch.Tensor, tubes) -> int:
    """VEC of a launch: every tube's patch rows (kw pixels from ow + iw * sw along w) are runs of
    VEC contiguous elements starting VEC-aligned, in every sample, channel, frame and row. Needs a
    unit w stride; one VEC for all tubes of the launch (the largest their kw, ow, sw allow)."""
    sxb, sxc, sxt, sxh, sxw = video.stride()
    if sxw != 1:
        return 1
    return _vector_width(video, [sxb, sxc, sxt, sxh, *(v for t in tubes for v in (t.kernel[2], t.offset[2], t.stride[2]))])


def _token_vector(tokens: torch.Tensor, tubes) -> int:
    """How many channels of a token row load as one vector: runs of channels are contiguous
    (unit channel stride) and every row start and merged channel block is aligned."""
    syb, syn, syd = tokens.stride()
    if syd != 1:
        return 1
    return _vector_width(tokens, [syb, syn, *(t.width(tokens.shape[-1]) for t in tubes)])


def _stage_pixels(video: torch.Tensor, forward: bool) -> bool:
    """STAGE_PIXELS of a launch: whether a uint8 video's pixels are loaded one step ahead into
    registers and converted there, so that the tile goes to shared memory as 16-bit and every
    warp reads its MMA operand with ldmatrix (each pixel converted once per program). Otherwise
    the uint8 tile is copied to shared memory asynchronously (cp.async) and every warp converts
    the fragments it reads: 4 (dW: 8) times the conversions on sm_80, with byte-wise shared reads.
    On sm_90 the forward's warpgroup MMA reads a converted register operand that no other warp
    shares, so there the cp.async path is the leaner one (see audit_targets)."""
    if video.dtype != torch.uint8:
        return False
    return not forward or not (video.is_cuda and torch.cuda.get_device_capability(video.device)[0] >= 9)


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


def _rows_class(B: int, samplers) -> int:
    """The autotune key's size class: the launch's token rows, rounded up to a power of two."""
    return triton.next_power_of_2(max(1, B * sum(samplers)))


def _split_count(B: int, counts, dim: int, ktot: int, device: torch.device) -> int:
    """How many ways to split each tube's M reduction for dW: enough programs for the GPU."""
    max_tiles = max(triton.cdiv(B * n, 64) for n in counts)
    if interpreter_enabled() or device.type != "cuda":
        return min(2, max_tiles)  # still exercises the split path, cheaply
    programs = triton.cdiv(ktot, 128) * triton.cdiv(dim, 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(8, max_tiles, triton.cdiv(2 * sms, programs)))


def _launch(kernel, grid, args, flags):
    """Autotuned launch; in deterministic mode the first kept config, fixed, because the rounding
    depends on the block sizes and a timing-based choice may differ from process to process."""
    if torch.are_deterministic_algorithms_enabled():
        configs = kernel.configs
        if kernel.early_config_prune is not None:
            configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **flags)
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


def _fwd_args(video, w, bias, pos, out, geo, cols, tubes, rows_class):
    has_pos = pos is not None
    sxb, _, sxt, sxh, sxw = video.stride()
    args = (video, w, bias, pos if has_pos else bias, out, geo, cols,  # pos_ptr unread without HAS_POS
            video.shape[0], w.shape[0], w.shape[1], rows_class,
            sxb, sxt, sxh, sxw, *w.stride(), *bias.stride(),
            *(pos.stride() if has_pos else (0, 0)), *out.stride())
    flags = dict(NUM_TUBES=len(tubes), **_merge_flags(tubes, out.shape[-1]), HAS_POS=has_pos,
                 DOT_PRECISION=_dot_precision(out.dtype), VEC=_gather_vector(video, tubes),
                 STAGE_PIXELS=_stage_pixels(video, forward=True))
    return args, flags


def _bwd_weight_args(video, grad_out, dw_part, db_part, geo, cols, xrow, dyrow, tubes, rows_class):
    syb, _, syd = grad_out.stride()
    args = (video, grad_out, dw_part, db_part, geo, cols, xrow, dyrow,
            video.shape[0], dw_part.shape[1], dw_part.shape[2], rows_class, dw_part.shape[0],
            video.stride(0), syb, syd, *dw_part.stride(), *db_part.stride())
    return args, dict(NUM_TUBES=len(tubes), SPACE_TO_DEPTH=_merge_flags(tubes, grad_out.shape[-1])["SPACE_TO_DEPTH"],
                      DOT_PRECISION=_dot_precision(grad_out.dtype), VEC=_gather_vector(video, tubes),
                      DY_VEC=_token_vector(grad_out, tubes), STAGE_PIXELS=_stage_pixels(video, forward=False))


def _bwd_input_args(grad_out, w, dx, geo, cols, tubes, kmax, phase, period, atomic, rows_class):
    sxb, _, sxt, sxh, sxw = dx.stride()
    args = (grad_out, w, dx, geo, cols,
            dx.shape[0], w.shape[0], w.shape[1], rows_class, kmax, *phase, *period,
            *grad_out.stride(), *w.stride(), sxb, sxt, sxh, sxw)
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
    cols = _column_table(tubes, C, video.stride()[1:], video.device)
    w = _pack_weights(weights)
    bias = _pack_biases(biases, w.shape[0])
    out = torch.empty((B, sum(counts), dim), device=video.device, dtype=compute_dtype(video, weights[0]))
    args, flags = _fwd_args(video, w, bias, pos, out, geo, cols, tubes, _rows_class(B, samplers))

    def grid(meta):
        return (sum(triton.cdiv(B * n, meta["BLOCK_M"]) for n in samplers) * triton.cdiv(w.shape[0], meta["BLOCK_N"]),)

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
    dtype = compute_dtype(video, weights[0])
    if input_requires_grad and dtype != video.dtype:
        raise ValueError(f"a {video.dtype} video takes no gradient (only floating-point videos do)")
    if grad_out.dtype != dtype:
        grad_out = grad_out.to(dtype)
    size, device = (T, H, W), video.device
    geo = _geometry_table(tubes, size, C, grad_out.shape[-1], device)
    rows_class = _rows_class(B, samplers)

    split = _split_count(B, samplers, dim, kcols[-1], device)
    # Every entry read below is written (a split without M tiles stores zeros); the pad
    # columns between tubes, and rows past a tube's width, stay unwritten and unread.
    dw_part = torch.empty((split, dim, kcols[-1]), device=device, dtype=torch.float32)
    db_part = torch.empty((split, len(tubes), dim), device=device, dtype=torch.float32)
    xs = video.stride()
    xrow, dyrow = _row_tables(tubes, size, grad_out.shape[-1], (xs[0], *xs[2:]), grad_out.stride(), device)
    args, flags = _bwd_weight_args(video, grad_out, dw_part, db_part, geo, _column_table(tubes, C, xs[1:], device),
                                   xrow, dyrow, tubes, rows_class)

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
        grad_video = _input_grad(grad_out, video, weights, tubes, geo, samplers, ks, rows_class)
    return grad_video, grad_weights, grad_biases


def _input_grad(grad_out, video, weights, tubes, geo, samplers, ks, rows_class):
    B, C, T, H, W = video.shape
    w = _pack_weights(weights)
    dx = torch.zeros(video.shape, device=video.device, dtype=torch.float32)
    cols = _column_table(tubes, C, dx.stride()[1:], dx.device)

    def launch(geo_rows, launched, rows_per_tube, kmax, phase, period, atomic):
        args, flags = _bwd_input_args(grad_out, w, dx, geo_rows, cols, launched, kmax, phase, period, atomic,
                                      rows_class)

        def grid(meta):
            m_tiles = sum(triton.cdiv(r, meta["BLOCK_M"]) for r in rows_per_tube)
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

_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                    torch.int64: "i64", torch.uint8: "u8"}


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
    paper's setting (PAPER_TUBES, B=32, 3x32x224x224, dim 768, contiguous tensors); forward and dW
    also for a uint8 video ("-u8": `dtype` is then that of the weights, tokens and gradients).

    The 16-bit forward and dW carry their main loops' budgets (_FWD_BUDGET, _BWD_W_BUDGET; on
    uint8 pixels too). "fp32"
    audits the exact-dot configs, which use FMAs: there matmul is False and no budget applies."""
    from tubevit_fast.geometry import PAPER_TUBES

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"audit dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    dt = dtypes[dtype]
    single = dt == torch.float32
    meta = torch.device("meta")
    tubes, (B, C, T, H, W), dim = PAPER_TUBES, (32, 3, 32, 224, 224), 768
    counts = [t.num_tokens((T, H, W)) for t in tubes]
    samplers = [math.prod(t.sampler_grid((T, H, W))) for t in tubes]
    rows_class = _rows_class(B, samplers)
    kcols = _column_starts(tubes, C)
    ks = [t.patch_size(C) for t in tubes]
    geo = torch.empty((len(tubes), GEO_COLS), dtype=torch.int32, device=meta)
    video = torch.empty((B, C, T, H, W), dtype=dt, device=meta)
    cols = torch.empty(kcols[-1], dtype=torch.int32, device=meta)
    rtab = torch.empty(_row_table_starts(tubes, (T, H, W))[-1], dtype=torch.int32, device=meta)
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
    fwd_budget, bwd_w_budget = (None, None) if single else (_FWD_BUDGET, _BWD_W_BUDGET)
    # The space-to-depth specialisation (SPACE_TO_DEPTH=True): the paper's 2D tube merged in pairs
    # along w; only the flag differs in what is compiled.
    s2d = (*tubes[:3], TubeSpec(tubes[3].kernel, tubes[3].stride, tubes[3].offset, ("w", 2)))
    launches = []
    for suffix, ts in (("", tubes), ("-s2d", s2d)):
        launches += [
            (suffix, _tube_embed_fwd_kernel, fwd, fwd_budget,
             _fwd_args(video, w, bias, pos, tokens, geo, cols, ts, rows_class)),
            (suffix, _tube_embed_bwd_weight_kernel, bwd_w, bwd_w_budget,
             _bwd_weight_args(video, tokens, dw_part, db_part, geo, cols, rtab, rtab, ts, rows_class)),
            ("-atomic" + suffix, _tube_embed_bwd_input_kernel, bwd_x, None,
             _bwd_input_args(tokens, w, dx, geo, cols, ts, max(ks), (0, 0, 0), (1, 1, 1), True, rows_class)),
        ]
    launches.append(("-deterministic", _tube_embed_bwd_input_kernel, bwd_x, None,
                     _bwd_input_args(tokens, w, dx, geo[1:2], cols, tubes[1:2], ks[1], phase, period, False,
                                     rows_class)))
    # Scalar gathers (VEC 1, DY_VEC 1): a channels-last video and token rows 769 elements apart
    # (no loop budget: one 16-bit load per element is what such layouts allow).
    channels_last = video.contiguous(memory_format=torch.channels_last_3d)
    odd_tokens = torch.empty((B, sum(counts), dim + 1), dtype=dt, device=meta)[:, :, :dim]
    fwd_args = _fwd_args(channels_last, w, bias, pos, tokens, geo, cols, tubes, rows_class)
    bwd_w_args = _bwd_weight_args(channels_last, odd_tokens, dw_part, db_part, geo, cols, rtab, rtab, tubes, rows_class)
    assert fwd_args[1]["VEC"] == 1 and _narrow(bwd_w_args[1])
    launches += [("-scalar", _tube_embed_fwd_kernel, fwd, None, fwd_args),
                 ("-scalar", _tube_embed_bwd_weight_kernel, bwd_w if single else _BWD_W_CONFIGS_NARROW, None,
                  bwd_w_args)]
    # uint8 pixels (weights, tokens and gradients in `dtype`): forward and dW load 4 pixels per
    # 32-bit access (VEC 4) and convert them in registers; the forward stages them converted on
    # sm_80 and copies them as uint8 on sm_90 (_stage_pixels), each launch compiled for its arch.
    pixels = torch.empty(video.shape, dtype=torch.uint8, device=meta)
    fwd_u8 = _fwd_args(pixels, w, bias, pos, tokens, geo, cols, tubes, rows_class)
    assert fwd_u8[1]["STAGE_PIXELS"]   # a meta video: as on a pre-Hopper GPU
    launches += [("-u8", _tube_embed_fwd_kernel, fwd if single else _FWD_CONFIGS_PIXELS, fwd_budget, fwd_u8,
                  ("sm_80",)),
                 ("-u8", _tube_embed_fwd_kernel, fwd if single else _FWD_CONFIGS_PIXELS, fwd_budget,
                  (fwd_u8[0], {**fwd_u8[1], "STAGE_PIXELS": False}), ("sm_90",)),
                 ("-u8", _tube_embed_bwd_weight_kernel, bwd_w if single else _BWD_W_CONFIGS_PIXELS,
                  bwd_w_budget,
                  _bwd_weight_args(pixels, tokens, dw_part, db_part, geo, cols, rtab, rtab, tubes, rows_class))]
    targets = []
    for suffix, autotuner, configs, budget, (args, flags), *archs in launches:
        fn = autotuner.fn
        for cfg in configs:
            signature, constexprs, attrs = _specialise(fn, args, {**flags, **cfg.kwargs})
            targets.append(AuditTarget(
                kernel=fn.__name__, fn=fn, signature=signature, constexprs=constexprs,
                config=_label(cfg) + suffix, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                matmul=not single, attrs=attrs, loop_budget=budget, archs=archs[0] if archs else None,
            ))
    return targets
