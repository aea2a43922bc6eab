"""Fused tube embedding: implicit-im2col gather + GEMM + bias + position embedding, all tubes at once.

Maths. Video x of shape (B, C, T, H, W), any strides. Tube i has kernel (kt, kh, kw), stride
(st, sh, sw), offset (ot, oh, ow), grid (nt, nh, nw) from `geometry.TubeSpec.grid`, weight
W_i (dim, C, kt, kh, kw) and bias b_i (dim,). With K_i = C*kt*kh*kw, token n = (it*nh + ih)*nw + iw
and patch column k = ((c*kt + dt)*kh + dh)*kw + dw,

    A_i[b, n, k]        = x[b, c, ot + it*st + dt, oh + ih*sh + dh, ow + iw*sw + dw]
    out[b, s_i + n, :]  = A_i[b, n, :] @ W_i.reshape(dim, K_i).T + b_i + pos[s_i + n]

where s_i is the tube's first token (`geometry.token_offsets`). This is Conv3d per tube on the
offset-cropped video, flattened, concatenated over tubes, plus the position embedding. The
backward pass is

    dW_i = sum_{b,n} dY[b, s_i + n, :]^T A_i[b, n, :]      db_i = sum_{b,n} dY[b, s_i + n, :]
    dx  += scatter(A_i's addresses, dY_i @ W_i)             (overlapping tubes/tokens add up)

Work. Forward FLOPs = 2 * B * sum_i N_i * K_i * dim (each backward GEMM is the same again).
Minimum forward bytes = the pixels some tube reads (`geometry.read_mask`, once per sample and
channel) + every tube's weights and bias + pos (N*dim fp32) + B*N*dim output tokens. The
forward kernel re-reads a pixel once per (token, dim tile) that covers it, so overlapping tubes
and dim > BLOCK_N cost extra reads, mostly absorbed by L2.

Kernels (one Triton program per output tile, fp32 accumulation everywhere):
  _tube_embed_fwd_kernel         grid (M tiles of all tubes, dim tiles); A gathered straight
                                 from x (masks, no padding or copies), W^T from the packed
                                 weight, epilogue adds bias and pos and stores into `out`.
  _tube_embed_bwd_weight_kernel  grid (K tiles of all tubes, dim tiles, SPLIT); each program
                                 reduces a strided share of the M tiles into an fp32 partial;
                                 the host sums the SPLIT partials (deterministic, no atomics).
  _tube_embed_bwd_input_kernel   grid (M tiles, K tiles); dY @ W then scatter-add into an fp32
                                 buffer, with atomics (one launch) or, in deterministic mode,
                                 one launch per tube and phase with plain read-add-write.

Tubes are described to the kernels by a small int32 table (one row per tube, columns below),
built from `geometry` on the host. Tile -> tube lookup is done in the kernel by scanning the
table, because the tile counts depend on the autotuned block sizes.
"""
from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from tubevit_fast.geometry import TubeSpec, token_offsets

from .audit_spec import AuditTarget

# The interpreter (CPU) decides at decoration time; autotuning there would only cost time.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Geometry table columns (int32, one row per tube).
GEO_COLS = 16
_COLUMNS = ("start", "ntok", "nt", "nh", "nw", "kt", "kh", "kw", "st", "sh", "sw", "ot", "oh", "ow", "K", "kcol")


# ----------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------

@triton.jit
def _tube_row(geo_ptr, tube):
    row = geo_ptr + tube * 16
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9),
            tl.load(row + 10), tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), tl.load(row + 14),
            tl.load(row + 15))


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
        row = geo_ptr + i * 16
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
    """Row m = (b, jt, jh, jw) flattened over the phase's sub-grid -> sample, grid index, token.

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
    n = (it * nh + ih) * nw + iw
    return b, it, ih, iw, n, mask


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

# Register budget: the gathered A tile needs one 64-bit address per element, so
# BLOCK_M * BLOCK_K / threads stays <= 32; accumulators stay <= 64 fp32 per thread.
_FWD_CONFIGS = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(64, 128, 32, 4, 3),
    _cfg(128, 64, 32, 4, 3),
    _cfg(64, 64, 64, 4, 2),
]
# Weight gradient: M is the reduction axis, (BLOCK_N, BLOCK_K) the output tile.
_BWD_W_CONFIGS = [
    _cfg(64, 128, 64, 8, 3),
    _cfg(64, 128, 32, 4, 3),
    _cfg(64, 64, 64, 4, 2),
]
# Input gradient: BLOCK_N chunks the dim reduction, (BLOCK_M, BLOCK_K) the scattered tile.
_BWD_X_CONFIGS = [
    _cfg(64, 64, 64, 4, 3),
    _cfg(128, 64, 32, 4, 3),
    _cfg(64, 128, 32, 4, 2),
]


def _configs(configs):
    return _INTERPRET_CONFIGS if _INTERPRET else configs


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.autotune(configs=_configs(_FWD_CONFIGS), key=["DIM", "KTOT"])
@triton.jit
def _tube_embed_fwd_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr, geo_ptr,
    B, DIM, KTOT,
    sxb, sxc, sxt, sxh, sxw,
    swd, swk,
    sbt, sbd,
    spn, spd,
    sob, son, sod,
    NUM_TUBES: tl.constexpr, HAS_POS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tube, first = _locate(geo_ptr, pid_m, B, 0, 0, 0, 1, 1, 1, BLOCK_M, NUM_TUBES, False)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube)

    offs_m = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, it, ih, iw, n, mask_m = _token_rows(offs_m, B, nt, nh, nw, 0, 0, 0, 1, 1, 1)
    rows = _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw)
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        cols = _patch_cols(offs_k, kt, kh, kw, sxc, sxt, sxh, sxw)
        a = tl.load(x_ptr + rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + (kcol + offs_k)[:, None] * swk + offs_d[None, :] * swd,
                     mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)

    acc += tl.load(b_ptr + tube * sbt + offs_d * sbd, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    tok = start + n
    mask = mask_m[:, None] & mask_d[None, :]
    if HAS_POS:
        acc += tl.load(pos_ptr + tok[:, None] * spn + offs_d[None, :] * spd, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + b.to(tl.int64)[:, None] * sob + tok.to(tl.int64)[:, None] * son + offs_d[None, :] * sod
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(_BWD_W_CONFIGS), key=["DIM", "KTOT"])
@triton.jit
def _tube_embed_bwd_weight_kernel(
    x_ptr, dy_ptr, dw_ptr, db_ptr, geo_ptr,
    B, DIM, KTOT, SPLIT,
    sxb, sxc, sxt, sxh, sxw,
    syb, syn, syd,
    sws, swd, swk,
    sbs, sbt, sbd,
    NUM_TUBES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    tube, first = _locate(geo_ptr, pid_k, B, 0, 0, 0, 1, 1, 1, BLOCK_K, NUM_TUBES, True)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube)

    offs_k = (pid_k - first) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    cols = _patch_cols(offs_k, kt, kh, kw, sxc, sxt, sxh, sxw)
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Interleaved M tiles: split s takes tiles s, s + SPLIT, ... in a fixed order.
    for mt in range(pid_s, tl.cdiv(B * ntok, BLOCK_M), SPLIT):
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        b, it, ih, iw, n, mask_m = _token_rows(offs_m, B, nt, nh, nw, 0, 0, 0, 1, 1, 1)
        rows = _pixel_rows(b, it, ih, iw, st, sh, sw, ot, oh, ow, sxb, sxt, sxh, sxw)
        a = tl.load(x_ptr + rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        dy = tl.load(dy_ptr + b.to(tl.int64)[:, None] * syb + (start + n).to(tl.int64)[:, None] * syn
                     + offs_d[None, :] * syd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=DOT_PRECISION)
        # Cheap next to the dot; only the tube's first K tile stores it.
        db += tl.sum(dy.to(tl.float32), axis=0)

    dw = dw_ptr + pid_s * sws + offs_d[:, None] * swd + (kcol + offs_k)[None, :] * swk
    tl.store(dw, acc, mask=mask_d[:, None] & mask_k[None, :])
    tl.store(db_ptr + pid_s * sbs + tube * sbt + offs_d * sbd, db, mask=mask_d & (pid_k == first))


@triton.autotune(configs=_configs(_BWD_X_CONFIGS), key=["DIM", "KTOT"], restore_value=["dx_ptr"])
@triton.jit
def _tube_embed_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr, geo_ptr,
    B, DIM, KTOT,
    pt, ph, pw, PT, PH, PW,
    syb, syn, syd,
    swd, swk,
    sxb, sxc, sxt, sxh, sxw,
    NUM_TUBES: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    tube, first = _locate(geo_ptr, pid_m, B, pt, ph, pw, PT, PH, PW, BLOCK_M, NUM_TUBES, False)
    start, ntok, nt, nh, nw, kt, kh, kw, st, sh, sw, ot, oh, ow, K, kcol = _tube_row(geo_ptr, tube)
    # The K axis of the grid covers the largest tube; smaller tubes have nothing here.
    if pid_k * BLOCK_K >= K:
        return

    offs_m = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, it, ih, iw, n, mask_m = _token_rows(offs_m, B, nt, nh, nw, pt, ph, pw, PT, PH, PW)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    dy_rows = dy_ptr + b.to(tl.int64) * syb + (start + n).to(tl.int64) * syn

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, DIM, BLOCK_N):
        offs_d = d0 + tl.arange(0, BLOCK_N)
        mask_d = offs_d < DIM
        dy = tl.load(dy_rows[:, None] + offs_d[None, :] * syd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_d[:, None] * swd + (kcol + offs_k)[None, :] * swk,
                    mask=mask_d[:, None] & mask_k[None, :], other=0.0)
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

@functools.lru_cache(maxsize=64)
def _geometry_table(tubes: tuple[TubeSpec, ...], size: tuple[int, int, int], channels: int,
                    device: torch.device) -> torch.Tensor:
    starts = token_offsets(tubes, size)
    rows, kcol = [], 0
    for i, tube in enumerate(tubes):
        k = tube.patch_size(channels)
        rows.append([starts[i], tube.num_tokens(size), *tube.grid(size), *tube.kernel, *tube.stride,
                     *tube.offset, k, kcol])
        kcol += k
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32 would miss the fp32 tolerance; for 16-bit inputs the setting is ignored.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pack_weights(weights) -> torch.Tensor:
    return torch.cat([w.reshape(w.shape[0], -1) for w in weights], dim=1).contiguous()


def _m_tiles(rows: int, block: int) -> int:
    return triton.cdiv(rows, block)


def tube_embed_forward(video, weights, biases, pos, tubes):
    """(B, C, T, H, W) video -> (B, N, dim) tokens of all tubes, bias and pos added, one launch."""
    tubes = tuple(tubes)
    B, C, T, H, W = video.shape
    size = (T, H, W)
    dim = weights[0].shape[0]
    geo = _geometry_table(tubes, size, C, video.device)
    counts = [t.num_tokens(size) for t in tubes]
    w = _pack_weights(weights)
    bias = torch.stack([b.reshape(-1) for b in biases])
    out = torch.empty((B, sum(counts), dim), device=video.device, dtype=video.dtype)
    has_pos = pos is not None
    pos_arg = pos if has_pos else bias  # never read when HAS_POS is False
    spn, spd = (pos.stride(0), pos.stride(1)) if has_pos else (0, 0)

    def grid(meta):
        return (sum(_m_tiles(B * n, meta["BLOCK_M"]) for n in counts), triton.cdiv(dim, meta["BLOCK_N"]))

    _tube_embed_fwd_kernel[grid](
        video, w, bias, pos_arg, out, geo,
        B, dim, w.shape[1],
        *video.stride(),
        *w.stride(),
        *bias.stride(),
        spn, spd,
        *out.stride(),
        NUM_TUBES=len(tubes), HAS_POS=has_pos, DOT_PRECISION=_dot_precision(video.dtype),
    )
    return out


def _split_count(B: int, counts, dim: int, ktot: int, device: torch.device) -> int:
    """How many ways to split each tube's M reduction for dW: enough programs for the GPU."""
    max_tiles = max(_m_tiles(B * n, 64) for n in counts)
    if _INTERPRET or device.type != "cuda":
        return min(2, max_tiles)  # still exercises the split path, cheaply
    programs = triton.cdiv(ktot, 64) * triton.cdiv(dim, 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(8, max_tiles, triton.cdiv(2 * sms, programs)))


def tube_embed_backward(grad_out, video, weights, tubes, input_requires_grad):
    """Gradients of tube_embed_forward: (grad_video or None, grad_weights, grad_biases)."""
    tubes = tuple(tubes)
    B, C, T, H, W = video.shape
    size = (T, H, W)
    dim = weights[0].shape[0]
    if grad_out.dtype != video.dtype:
        grad_out = grad_out.to(video.dtype)
    geo = _geometry_table(tubes, size, C, video.device)
    counts = [t.num_tokens(size) for t in tubes]
    ks = [t.patch_size(C) for t in tubes]
    ktot = sum(ks)
    precision = _dot_precision(video.dtype)

    split = _split_count(B, counts, dim, ktot, video.device)
    dw_part = torch.empty((split, dim, ktot), device=video.device, dtype=torch.float32)
    db_part = torch.empty((split, len(tubes), dim), device=video.device, dtype=torch.float32)

    def grid_w(meta):
        return (sum(triton.cdiv(k, meta["BLOCK_K"]) for k in ks), triton.cdiv(dim, meta["BLOCK_N"]), split)

    _tube_embed_bwd_weight_kernel[grid_w](
        video, grad_out, dw_part, db_part, geo,
        B, dim, ktot, split,
        *video.stride(),
        *grad_out.stride(),
        *dw_part.stride(),
        *db_part.stride(),
        NUM_TUBES=len(tubes), DOT_PRECISION=precision,
    )
    dw = dw_part.sum(0)
    db = db_part.sum(0)
    cuts = list(itertools.accumulate(ks, initial=0))
    grad_weights = [dw[:, cuts[i]:cuts[i + 1]].reshape(w.shape).to(w.dtype) for i, w in enumerate(weights)]
    grad_biases = [db[i].to(weights[i].dtype) for i in range(len(tubes))]

    grad_video = None
    if input_requires_grad:
        grad_video = _input_grad(grad_out, video, weights, tubes, geo, counts, ks, precision)
    return grad_video, grad_weights, grad_biases


def _input_grad(grad_out, video, weights, tubes, geo, counts, ks, precision):
    B, C, T, H, W = video.shape
    dim = weights[0].shape[0]
    w = _pack_weights(weights)
    dx = torch.zeros(video.shape, device=video.device, dtype=torch.float32)
    common = (grad_out.stride(), w.stride(), dx.stride())

    def launch(geo_rows, ntubes, rows_per_tube, kmax, phase, period, atomic):
        def grid(meta):
            return (sum(_m_tiles(r, meta["BLOCK_M"]) for r in rows_per_tube), triton.cdiv(kmax, meta["BLOCK_K"]))

        _tube_embed_bwd_input_kernel[grid](
            grad_out, w, dx, geo_rows,
            B, dim, w.shape[1],
            *phase, *period,
            *common[0], *common[1], *common[2],
            NUM_TUBES=ntubes, ATOMIC=atomic, DOT_PRECISION=precision,
        )

    if not torch.are_deterministic_algorithms_enabled():
        launch(geo, len(tubes), [B * n for n in counts], max(ks), (0, 0, 0), (1, 1, 1), True)
    else:
        # Colouring: tokens whose grid indices agree modulo P_a = ceil(k_a / s_a) on every axis
        # are at least k_a apart, so their footprints are disjoint. One launch per tube and phase,
        # in a fixed order, makes every pixel's sum order fixed: bitwise reproducible.
        size = (T, H, W)
        for i, tube in enumerate(tubes):
            grid3 = tube.grid(size)
            period = tuple(-(-k // s) for k, s in zip(tube.kernel, tube.stride))
            for phase in itertools.product(*(range(min(P, n)) for P, n in zip(period, grid3))):
                tokens = 1
                for n, p, P in zip(grid3, phase, period):
                    tokens *= -(-(n - p) // P)
                launch(geo[i:i + 1], 1, [B * tokens], ks[i], phase, period, False)
    return dx.to(video.dtype)


# ----------------------------------------------------------------------------------------
# Ahead-of-time audit
# ----------------------------------------------------------------------------------------

_AUDIT_TUBES = 4  # the paper's tube count


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "i32"
    return sig


def _label(cfg) -> str:
    kw = cfg.kwargs
    return f"BM{kw['BLOCK_M']}-BN{kw['BLOCK_N']}-BK{kw['BLOCK_K']}-w{cfg.num_warps}-s{cfg.num_stages}"


def audit_targets(dtype: str) -> list[AuditTarget]:
    """Every kernel x kept autotune config, for AOT compilation with ASTSource (dtype fp16/bf16)."""
    if dtype not in ("fp16", "bf16"):
        raise ValueError(f"audit dtype must be 'fp16' or 'bf16', got {dtype!r}")
    p = "*" + dtype
    kernels = [
        (_tube_embed_fwd_kernel, _FWD_CONFIGS,
         {"x_ptr": p, "w_ptr": p, "b_ptr": p, "pos_ptr": "*fp32", "out_ptr": p, "geo_ptr": "*i32"},
         [{"NUM_TUBES": _AUDIT_TUBES, "HAS_POS": True, "DOT_PRECISION": "tf32"}]),
        (_tube_embed_bwd_weight_kernel, _BWD_W_CONFIGS,
         {"x_ptr": p, "dy_ptr": p, "dw_ptr": "*fp32", "db_ptr": "*fp32", "geo_ptr": "*i32"},
         [{"NUM_TUBES": _AUDIT_TUBES, "DOT_PRECISION": "tf32"}]),
        (_tube_embed_bwd_input_kernel, _BWD_X_CONFIGS,
         {"dy_ptr": p, "w_ptr": p, "dx_ptr": "*fp32", "geo_ptr": "*i32"},
         # The atomic launch (all tubes) and the deterministic one (one tube, plain stores).
         [{"NUM_TUBES": _AUDIT_TUBES, "ATOMIC": True, "DOT_PRECISION": "tf32"},
          {"NUM_TUBES": 1, "ATOMIC": False, "DOT_PRECISION": "tf32"}]),
    ]
    targets = []
    for autotuner, configs, pointers, variants in kernels:
        fn = autotuner.fn
        for cfg in configs:
            for flags in variants:
                constexprs = {**flags, **cfg.kwargs}
                label = _label(cfg)
                if "ATOMIC" in flags:
                    label += "-atomic" if flags["ATOMIC"] else "-deterministic"
                targets.append(AuditTarget(
                    kernel=fn.__name__, fn=fn, signature=_signature(fn, pointers, constexprs),
                    constexprs=constexprs, config=label, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, matmul=True,
                ))
    return targets
