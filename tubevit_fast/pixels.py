"""uint8 pixels into the tube embedding: the normalisation and its fold into the projection.

A uint8 video x (0..255) means the normalised video (x / 255 - mean_c) / std_c, channel c.
Every tube is linear in its pixels, so instead of a pass over the video the normalisation is
folded into each tube's kernel W (width, C, kt, kh, kw) and bias b once per forward:

    W'[:, c] = W[:, c] / (255 std_c)
    b'       = b - sum_{c, dt, dh, dw} W[:, c, dt, dh, dw] mean_c / std_c

so that W' * x + b' = W * ((x / 255 - mean) / std) + b exactly in real arithmetic. The fold is
ordinary autograd maths: gradients reach W and b through it.
"""
from __future__ import annotations

from typing import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# For channel counts other than 3: [0, 1] maps to [-1, 1].
GENERIC_MEAN, GENERIC_STD = 0.5, 0.5


def default_pixel_stats(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: ImageNet's for 3 channels, 0.5 and 0.5 otherwise."""
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (GENERIC_MEAN,) * in_channels, (GENERIC_STD,) * in_channels


def check_pixel_stats(name: str, values, in_channels: int, positive: bool) -> torch.Tensor:
    """`values` (one float per channel) as a float32 (C,) tensor on the default device, or ValueError."""
    try:  # checked on the CPU whatever the default device (it may be meta)
        t = torch.as_tensor(values, dtype=torch.float64, device="cpu").reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be {in_channels} numbers (one per channel), got {values!r}") from None
    if t.numel() != in_channels:
        raise ValueError(f"{name} must have one value per channel ({in_channels}), got {t.numel()}: {values!r}")
    if not torch.isfinite(t).all() or (positive and not (t > 0).all()):
        kind = "positive finite" if positive else "finite"
        raise ValueError(f"{name} must be {kind} numbers, got {values!r}")
    return torch.tensor(t.tolist(), dtype=torch.float32)


def normalize_pixels(video: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(x / 255 - mean) / std in `dtype` for a uint8 (B, C, ...) tensor: the naive ground truth
    (a pass over the whole video), used by the reference layer only."""
    shape = (1, -1) + (1,) * (video.dim() - 2)
    return (video.to(dtype) / 255 - mean.to(dtype).view(shape)) / std.to(dtype).view(shape)


def fold_normalization(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], mean: torch.Tensor,
                       std: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each tube's (W', b') of the module docstring, returned in the weights' dtype but computed in
    float32 (float64 for float64 weights) with autocast off. Why: W's gradient through the fold is
    dW'/(255 std) - db' mean/std, two terms of the size of the un-centred pixels that cancel down
    to the size of the centred ones; taken in fp16 or bf16 that difference keeps few correct bits
    (up to 10x PyTorch's error on the normalised input, seen in fp16). The caller casts the result
    to the autocast dtype afterwards."""
    folded_w, folded_b = [], []
    with torch.autocast(mean.device.type, enabled=False):
        for w, b in zip(weights, biases):
            acc = torch.promote_types(w.dtype, torch.float32)
            w_acc, m, s = w.to(acc), mean.to(acc), std.to(acc)
            shape = (1, -1) + (1,) * (w.dim() - 2)
            folded_w.append((w_acc * (1 / (255 * s)).view(shape)).to(w.dtype))
            # sum over the kernel first, then over channels: one small (width, C) product
            per_channel = w_acc.flatten(2).sum(-1)
            folded_b.append((b.to(acc) - per_channel @ (m / s)).to(b.dtype))
    return folded_w, folded_b


def compute_dtype(video: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a tube embedding computes and returns in: the video's, or for uint8 pixels the
    (folded) weights'."""
    return weight.dtype if video.dtype == torch.uint8 else video.dtype
