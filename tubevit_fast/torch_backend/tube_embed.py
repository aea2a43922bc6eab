"""Tube embedding in plain PyTorch: the fast CPU path, and on CUDA the fallback without Triton.

Per tube, the patches are gathered into A_i (B, N_i, K_i), K_i in the (c, dt, dh, dw) order of
W_i.reshape(dim, -1), by one of two routes (`patches`):
  "unfold"  (CPU) `Tensor.unfold` views of the offset crop and reshape copies; the copies read
            the pixels in the video's memory order, which the CPU's prefetchers follow.
  "index"   (CUDA) one index_select over the batch with a precomputed per-sample index (cached
            per tube, size and strides: token offset + column offset for every element of A_i),
            i.e. a single gather kernel per tube instead of a strided copy of an 8-d view.
Where alignment allows, both move several neighbouring pixels of a row as one 8- or 16-byte
element (bit-exact), which makes the gather 2-4x cheaper.

Forward, per tube: one GEMM A_i W_i^T + b_i over all B * N_i tokens (torch_backend.gemm:
oneDNN on CPU), then the position embedding added on the way into the tokens' slot of the
output (no concatenation, no transpose, no separate pass for the position embedding).
Per-sample GEMMs writing straight into the slots were measured slower: each call re-packs
W_i, and W_i (up to 4.7 MB in the paper config) is larger than the extra pass over the tokens.

Backward recomputes A_i (a cheap gather) instead of saving it:
  dW_i = dY_i^T A_i  (one GEMM over all B * N_i tokens)
  db_i = column sums of the same dY_i matrix (fp32 accumulation)
  dX   = fold of dY_i W_i back onto the video, only when the video needs a gradient. The fold
         splits every axis with stride < kernel into ceil(kernel / stride) kernel slices whose
         windows do not overlap, and adds each slice into a strided view of the gradient:
         exact, deterministic, and without full-size intermediates.

uint8 pixels: the gather moves the uint8 pixels (a quarter of fp32's bytes; 4 to 16 pixels per
wide element where alignment allows), and only the gathered patches are converted to the
weights' dtype, never the whole video. The video takes no gradient then.

Inputs are validated by tubevit_fast.ops.tube_embed; `pos` is a (N, dim) float32 constant.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from tubevit_fast.geometry import TubeSpec, token_offsets
from tubevit_fast.pixels import compute_dtype
from tubevit_fast.torch_backend.gemm import linear

# Wide element types by size in bytes, widest first: moving several neighbouring pixels of a
# row as one element makes the gather's inner loop 2-8x shorter. Only ever copied, never
# computed on, so the bits move unchanged (NaN payloads and -0 included).
_WIDE_DTYPES = ((16, torch.complex128), (8, torch.int64), (4, torch.int32))


def _wide_view(video: torch.Tensor, tube: TubeSpec) -> tuple[torch.Tensor, int]:
    """`video` viewed with r pixels along w per element, and r (1 when alignment forbids it).

    Valid when every patch row (kw pixels starting at ow + j * sw) starts and ends on an
    r-pixel boundary. Only used for copying (complex128 copies are bit-exact moves).
    """
    es = video.element_size()
    kw, sw, ow = tube.kernel[2], tube.stride[2], tube.offset[2]
    if video.dim() != 5 or video.stride(-1) != 1 or video.numel() == 0:
        return video, 1
    for nbytes, dtype in _WIDE_DTYPES:
        r = nbytes // es
        if r <= 1:
            break
        aligned = (kw, sw, ow, video.shape[-1], video.storage_offset(), *video.stride()[:-1])
        if all(v % r == 0 for v in aligned) and video.data_ptr() % nbytes == 0:
            return video.view(dtype), r
    return video, 1


def _grouped_tokens(t: torch.Tensor, tube: TubeSpec, first: int) -> torch.Tensor:
    """`t` with its sampler-grid axes (nt, nh, nw) at first..first+2 split into (n', f) per axis
    and ordered (nt', nh', nw', ft, fh, fw): the sampler tokens of one space-to-depth group side by
    side, so that their projections, one after the other, are the merged token's channels. A view;
    with no space-to-depth the order is unchanged."""
    ft, fh, fw = tube.factors
    t = t.unflatten(first, (-1, ft)).unflatten(first + 2, (-1, fh)).unflatten(first + 4, (-1, fw))
    order = list(range(t.dim()))
    order[first:first + 6] = [first + a for a in (0, 2, 4, 1, 3, 5)]
    return t.permute(order)


ROUTES = ("unfold", "index")


def default_route(device: torch.device) -> str:
    """The gather route for tensors on `device`: "index" on CUDA, "unfold" elsewhere."""
    return "index" if device.type == "cuda" else "unfold"


def _check_route(route: str | None, device: torch.device) -> str:
    route = default_route(device) if route is None else route
    if route not in ROUTES:
        raise ValueError(f"unknown gather route {route!r}; choose from {ROUTES}")
    return route


def _wide_tube(tube: TubeSpec, r: int) -> TubeSpec:
    """The tube in units of r pixels along w (kw, sw, ow divisible by r): same sampler grid on W / r."""
    (kt, kh, kw), (st, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
    return TubeSpec((kt, kh, kw // r), (st, sh, sw // r), (ot, oh, ow // r), tube.space_to_depth)


@functools.lru_cache(maxsize=64)
def _patch_index(tube: TubeSpec, size: tuple[int, int, int], channels: int, strides: tuple[int, ...],
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """(index, span): for every element of one sample's A_i (sampler tokens in `_grouped_tokens`'
    order, then K) its offset from the sample's first element in a video with element strides
    `strides` (c, t, h, w); span = the largest offset + 1."""
    token, member = tube.sampler_slots(size)
    order = np.argsort(token * tube.merge + member, kind="stable")
    offsets = (tube.sampler_offsets(size, strides[1:])[order][:, None]
               + tube.patch_offsets(channels, strides)[None, :]).ravel()
    return torch.from_numpy(offsets).to(device), int(offsets.max()) + 1 if offsets.size else 0


def patches(video: torch.Tensor, tube: TubeSpec, route: str | None = None) -> torch.Tensor:
    """(B, N_s, C * kt * kh * kw) patches of one tube's N_s sampler tokens, K in (c, dt, dh, dw)
    order, tokens row-major (grouped for space-to-depth: `_grouped_tokens`). `route`: "unfold"
    or "index" (see the module docstring); None picks `default_route` for the video's device."""
    route = _check_route(route, video.device)
    B, C, T, H, W = video.shape
    (kt, kh, kw), (st, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
    nt, nh, nw = tube.sampler_grid((T, H, W))
    src, r = _wide_view(video, tube)
    if route == "index":
        index, span = _patch_index(_wide_tube(tube, r), tuple(src.shape[2:]), C, tuple(src.stride()[1:]),
                                   video.device)
        # Each sample as one flat run of storage from its first element: A_i is one gather of it.
        a = src.as_strided((B, span), (src.stride(0), 1)).index_select(1, index)
        a = a.view(B, nt * nh * nw, C * kt * kh * (kw // r))
        return a.view(video.dtype) if r > 1 else a
    crop = src[:, :, ot:ot + (nt - 1) * st + kt, oh:oh + (nh - 1) * sh + kh,
               ow // r:(ow + (nw - 1) * sw + kw) // r]
    windows = crop.unfold(2, kt, st).unfold(3, kh, sh).unfold(4, kw // r, sw // r)  # B C nt nh nw kt kh kw/r
    if video.device.type == "cpu" and video.is_contiguous():
        # Two copies beat one on CPU: the first reads the pixels in the video's memory order
        # (b, c, t, h, w), runs of neighbouring cache lines the hardware prefetchers follow; the
        # second permutes that compact, cache-resident copy into token-major order.
        windows = windows.permute(0, 1, 2, 5, 3, 6, 4, 7).contiguous().permute(0, 2, 4, 6, 1, 3, 5, 7)
    else:
        windows = windows.permute(0, 2, 3, 4, 1, 5, 6, 7)
    windows = _grouped_tokens(windows, tube, 1)
    a = windows.reshape(B, nt * nh * nw, C * kt * kh * (kw // r))  # B tokens C kt kh kw/r, flattened
    # (reshape copies except in degenerate cases, where it may return a strided view)
    return a.contiguous().view(video.dtype) if r > 1 else a


def _bias_plus_pos(bias: torch.Tensor, merge: int, pos: torch.Tensor | None, start: int, end: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """bias repeated `merge` times (dim,), or that + pos[start:end] (N_i, dim) summed in fp32 (or
    wider), as `dtype`."""
    bias = bias.repeat(merge)
    if pos is None:
        return bias.to(dtype)
    wide = torch.promote_types(torch.promote_types(pos.dtype, bias.dtype), torch.float32)
    return torch.add(pos[start:end].to(wide), bias.to(wide)).to(dtype)


def tube_embed_forward(video: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                       pos: torch.Tensor | None, tubes: Sequence[TubeSpec], route: str | None = None) -> torch.Tensor:
    """(B, C, T, H, W) video -> (B, N, dim) tokens (+ bias + pos), dtype of the video (of the
    weights for uint8 pixels). `route`: the gather (`patches`), by default the device's."""
    route = _check_route(route, video.device)
    B = video.shape[0]
    dim = tubes[0].token_dim(weights[0].shape[0])
    dtype = compute_dtype(video, weights[0])
    wide = torch.promote_types(dtype, torch.float32)
    starts = token_offsets(tubes, video.shape[2:])
    out = torch.empty(B, starts[-1], dim, dtype=dtype, device=video.device)
    for i, tube in enumerate(tubes):
        start, end = starts[i], starts[i + 1]
        a = patches(video, tube, route).to(dtype)
        # One GEMM over all B * N_s sampler tokens; the bias rides in it except for fp16/bf16,
        # which add bias + pos in fp32 below (the tokens are rounded once more, as in the
        # reference: conv, then + pos). Space-to-depth: the projections of a group's tokens are
        # consecutive rows, so the (B * N_s, dim / f) result viewed as (B, N_i, dim) is merged.
        fused_bias = biases[i] if dtype == wide else None
        w = weights[i].reshape(weights[i].shape[0], -1)
        y = linear(a.reshape(-1, a.shape[-1]), w, fused_bias).view(B, end - start, dim)
        slot = out[:, start:end]
        if fused_bias is None:
            torch.add(y, _bias_plus_pos(biases[i], tube.merge, pos, start, end, wide), out=slot)
        elif pos is None:
            slot.copy_(y)
        else:
            torch.add(y, pos[start:end], out=slot)
    return out


def _kernel_slices(kernel: int, stride: int) -> list[tuple[int, int]]:
    """(first, length) slices of a kernel axis such that, inside one slice, windows never overlap."""
    if stride >= kernel:
        return [(0, kernel)]
    return [(j, min(stride, kernel - j)) for j in range(0, kernel, stride)]


def _fold_add_(grad_video: torch.Tensor, grad_patches: torch.Tensor, tube: TubeSpec) -> None:
    """grad_video += the transpose of `patches` applied to grad_patches (B, N_i, K_i)."""
    B, C, T, H, W = grad_video.shape
    (kt, kh, kw), (st, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
    (ft, fh, fw), (nt, nh, nw) = tube.factors, tube.sampler_grid((T, H, W))
    # Both sides indexed B C nt' ft nh' fh nw' fw kt kh kw (tokens in `patches`' order).
    g = grad_patches.view(B, *tube.grid((T, H, W)), *tube.factors, C, kt, kh, kw)
    g = g.permute(0, 7, 1, 4, 2, 5, 3, 6, 8, 9, 10)
    for jt, lt in _kernel_slices(kt, st):
        for jh, lh in _kernel_slices(kh, sh):
            for jw, lw in _kernel_slices(kw, sw):
                region = grad_video[:, :,
                                    ot + jt:ot + jt + (nt - 1) * st + lt,
                                    oh + jh:oh + jh + (nh - 1) * sh + lh,
                                    ow + jw:ow + jw + (nw - 1) * sw + lw]
                # Window length <= step along every axis: a view without self-overlap.
                dst = region.unfold(2, lt, st).unfold(3, lh, sh).unfold(4, lw, sw)
                dst = dst.unflatten(2, (-1, ft)).unflatten(4, (-1, fh)).unflatten(6, (-1, fw))
                dst.add_(g[..., jt:jt + lt, jh:jh + lh, jw:jw + lw])


def tube_embed_backward(grad_out: torch.Tensor, video: torch.Tensor, weights: Sequence[torch.Tensor],
                        tubes: Sequence[TubeSpec], input_requires_grad: bool, route: str | None = None
                        ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(grad_video or None, grad_weights, grad_biases) for grad_out (B, N, dim), any strides.
    `route`: the gather of the recomputed patches (`patches`), by default the device's."""
    route = _check_route(route, video.device)
    dtype = compute_dtype(video, weights[0])
    starts = token_offsets(tubes, video.shape[2:])
    acc_dtype = torch.promote_types(dtype, torch.float32)
    grad_video = None
    if input_requires_grad:
        # fp16/bf16 accumulate overlapping tubes in fp32 and round once at the end.
        grad_video = torch.zeros(video.shape, dtype=acc_dtype, device=video.device)
    grad_weights, grad_biases = [], []
    for i, tube in enumerate(tubes):
        start, end = starts[i], starts[i + 1]
        a = patches(video, tube, route).to(dtype)
        a = a.reshape(-1, a.shape[-1])
        width = weights[i].shape[0]
        # dY_i as one (B * N_s, dim / f) matrix, a row per sampler token (space-to-depth: the
        # merged token's channel blocks): a copy unless B == 1 (or grad_out has stride 0).
        dy = grad_out[:, start:end].reshape(-1, width)
        # One GEMM reducing over all B * N_s tokens (fp32 accumulation inside for fp16/bf16).
        dw = linear(dy.t(), a.t())
        grad_weights.append(dw.view(weights[i].shape))
        grad_biases.append(dy.sum(0, dtype=acc_dtype).to(dtype))
        if grad_video is not None:
            grad_a = linear(dy, weights[i].reshape(width, -1).t())  # (B * N_s, K_i)
            _fold_add_(grad_video, grad_a, tube)
    if grad_video is not None and grad_video.dtype != dtype:
        grad_video = grad_video.to(dtype)
    return grad_video, grad_weights, grad_biases
