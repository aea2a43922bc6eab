"""Tube embedding in plain PyTorch: the fast CPU path (it also runs on CUDA tensors).

Per tube, the patches are gathered with `Tensor.unfold` views of the offset crop and one
reshape copy into A_i (B, N_i, K_i), K_i in the (c, dt, dh, dw) order of
W_i.reshape(dim, -1). Where alignment allows, the copy moves several neighbouring pixels of
a row as one 8- or 16-byte element (bit-exact), which makes the gather 2-4x cheaper.

Forward, per tube: one GEMM A_i W_i^T over all B * N_i tokens, then bias + position added
on the way into the tokens' slot of the output (no concatenation, no transpose, no separate
pass for the position embedding). With B == 1 the slot is one contiguous block and
`torch.addmm` writes it directly, bias + pos fused as the GEMM's beta term. For B > 1,
per-sample addmm calls into the slots were measured slower than this: each call re-packs
W_i, and W_i (up to 4.7 MB in the paper config) is larger than the extra pass over the tokens.

Backward recomputes A_i (a cheap gather) instead of saving it:
  dW_i = dY_i^T A_i  (one GEMM over all B * N_i tokens)
  db_i = column sums of the same dY_i matrix (fp32 accumulation)
  dX   = fold of dY_i W_i back onto the video, only when the video needs a gradient. The fold
         splits every axis with stride < kernel into ceil(kernel / stride) kernel slices whose
         windows do not overlap, and adds each slice into a strided view of the gradient:
         exact, deterministic, and without full-size intermediates.

Inputs are validated by tubevit_fast.ops.tube_embed; `pos` is a (N, dim) float32 constant.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tubevit_fast.geometry import TubeSpec, token_offsets

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


def patches(video: torch.Tensor, tube: TubeSpec) -> torch.Tensor:
    """(B, N_i, C * kt * kh * kw) patches of one tube, token-major, K in (c, dt, dh, dw) order."""
    B, C, T, H, W = video.shape
    (kt, kh, kw), (st, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
    nt, nh, nw = tube.grid((T, H, W))
    src, r = _wide_view(video, tube)
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
    a = windows.reshape(B, nt * nh * nw, C * kt * kh * (kw // r))  # B nt nh nw C kt kh kw/r, flattened
    # (reshape copies except in degenerate cases, where it may return a strided view)
    return a.contiguous().view(video.dtype) if r > 1 else a


def _bias_plus_pos(bias: torch.Tensor, pos: torch.Tensor | None, start: int, end: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """bias (dim,), or bias + pos[start:end] (N_i, dim) summed in fp32 (or wider), as `dtype`."""
    if pos is None:
        return bias.to(dtype)
    wide = torch.promote_types(torch.promote_types(pos.dtype, bias.dtype), torch.float32)
    return torch.add(pos[start:end].to(wide), bias.to(wide)).to(dtype)


def tube_embed_forward(video: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                       pos: torch.Tensor | None, tubes: Sequence[TubeSpec]) -> torch.Tensor:
    """(B, C, T, H, W) video -> (B, N, dim) tokens (+ bias + pos), dtype of the video."""
    B = video.shape[0]
    dim = weights[0].shape[0]
    dtype = video.dtype
    wide = torch.promote_types(dtype, torch.float32)
    starts = token_offsets(tubes, video.shape[2:])
    out = torch.empty(B, starts[-1], dim, dtype=dtype, device=video.device)
    for i, tube in enumerate(tubes):
        start, end = starts[i], starts[i + 1]
        a = patches(video, tube)
        w_t = weights[i].reshape(dim, -1).t()
        if B == 1:
            # out[0, start:end] is one contiguous (N_i, dim) block: the GEMM writes it in place,
            # bias + pos fused as its beta term.
            torch.addmm(_bias_plus_pos(biases[i], pos, start, end, dtype), a[0], w_t, out=out[0, start:end])
        else:
            # One GEMM over all B * N_i tokens (per-sample GEMMs would re-pack W_i B times, which
            # costs more than this one extra pass), then bias + pos added on the way into the slot,
            # in fp32 for fp16/bf16.
            y = torch.mm(a.reshape(B * (end - start), a.shape[-1]), w_t).view(B, end - start, dim)
            slot = out[:, start:end]
            if pos is None:
                torch.add(y, biases[i], out=slot)
            elif dtype == wide:
                # fp32/fp64: bias into the GEMM result while it is hot in cache, then one pass
                # adding pos into the slot (no (N_i, dim) bias + pos temporary).
                torch.add(y.add_(biases[i]), pos[start:end], out=slot)
            else:
                # fp16/bf16: bias + pos summed in fp32 and added to the GEMM result in fp32, so
                # the tokens are rounded once more, as in the reference (conv, then + pos).
                torch.add(y, _bias_plus_pos(biases[i], pos, start, end, wide), out=slot)
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
    nt, nh, nw = tube.grid((T, H, W))
    # B C nt nh nw kt kh kw
    g = grad_patches.view(B, nt, nh, nw, C, kt, kh, kw).permute(0, 4, 1, 2, 3, 5, 6, 7)
    for jt, lt in _kernel_slices(kt, st):
        for jh, lh in _kernel_slices(kh, sh):
            for jw, lw in _kernel_slices(kw, sw):
                region = grad_video[:, :,
                                    ot + jt:ot + jt + (nt - 1) * st + lt,
                                    oh + jh:oh + jh + (nh - 1) * sh + lh,
                                    ow + jw:ow + jw + (nw - 1) * sw + lw]
                # Window length <= step along every axis: a view without self-overlap.
                dst = region.unfold(2, lt, st).unfold(3, lh, sh).unfold(4, lw, sw)
                dst.add_(g[..., jt:jt + lt, jh:jh + lh, jw:jw + lw])


def tube_embed_backward(grad_out: torch.Tensor, video: torch.Tensor, weights: Sequence[torch.Tensor],
                        tubes: Sequence[TubeSpec], input_requires_grad: bool
                        ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """(grad_video or None, grad_weights, grad_biases) for grad_out (B, N, dim), any strides."""
    B = video.shape[0]
    dim = weights[0].shape[0]
    dtype = video.dtype
    starts = token_offsets(tubes, video.shape[2:])
    acc_dtype = torch.promote_types(dtype, torch.float32)
    grad_video = None
    if input_requires_grad:
        # fp16/bf16 accumulate overlapping tubes in fp32 and round once at the end.
        grad_video = torch.zeros(video.shape, dtype=acc_dtype, device=video.device)
    grad_weights, grad_biases = [], []
    for i, tube in enumerate(tubes):
        start, end = starts[i], starts[i + 1]
        n = end - start
        a = patches(video, tube)
        # dY_i as one (B * N_i, dim) matrix: a copy unless B == 1 (or grad_out has stride 0).
        dy = grad_out[:, start:end].reshape(B * n, dim)
        # One GEMM reducing over all B * N_i tokens (fp32 accumulation inside for fp16/bf16).
        dw = torch.mm(dy.t(), a.reshape(B * n, a.shape[-1]))
        grad_weights.append(dw.view(weights[i].shape))
        grad_biases.append(dy.sum(0, dtype=acc_dtype).to(dtype))
        if grad_video is not None:
            grad_a = torch.mm(dy, weights[i].reshape(dim, -1))  # (B * N_i, K_i)
            _fold_add_(grad_video, grad_a, tube)
    if grad_video is not None and grad_video.dtype != dtype:
        grad_video = grad_video.to(dtype)
    return grad_video, grad_weights, grad_biases
