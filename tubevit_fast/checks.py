"""Input checks shared by the reference and the fast layers: a clear error, never a crash."""
from __future__ import annotations

from typing import Sequence

import torch

from tubevit_fast import amp


def check_tube_input(x, in_channels: int, params: Sequence[torch.Tensor]) -> bool:
    """Validate a video (B, C, T, H, W) or image (B, C, H, W) batch, floating-point or uint8; return
    True for an image."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor video (B, C, T, H, W) or image (B, C, H, W), got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"expected a video (B, C, T, H, W) or an image (B, C, H, W), got a tensor of shape "
                         f"{tuple(x.shape)}{_batch_hint(x, in_channels)}")
    pixels = x.dtype == torch.uint8
    if not (x.is_floating_point() or pixels):
        raise TypeError(f"input must be uint8 pixels (0..255, normalised inside the layer) or an already "
                        f"normalised floating-point tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if x.shape[1] != in_channels:
        hint = _batch_hint(x, in_channels)
        if hint:  # a lone (C, T, H, W) video reads as a batch of C images: say so first
            raise ValueError(f"got a tensor of shape {tuple(x.shape)}{hint}")
        raise ValueError(f"input has {x.shape[1]} channels (shape {tuple(x.shape)}) but the layer expects "
                         f"{in_channels}")
    if x.shape[0] == 0:
        raise ValueError(f"input batch is empty (shape {tuple(x.shape)})")
    for p in params:
        if p.device != x.device:
            raise ValueError(f"input is on {x.device} but the layer's parameters are on {p.device}")
        # Under autocast both are cast to the autocast dtype (tubevit_fast.amp), as Conv3d's are.
        # uint8 pixels are computed on in the parameters' dtype.
        if not pixels and amp.compute_dtype(x.device.type, p.dtype) != amp.compute_dtype(x.device.type, x.dtype):
            raise TypeError(f"input dtype {x.dtype} does not match the layer's parameter dtype {p.dtype}; "
                            f"cast one of them (e.g. layer.to({x.dtype}))")
    return x.dim() == 4


def _batch_hint(x: torch.Tensor, in_channels: int) -> str:
    """A hint for a single (C, H, W) image or (C, T, H, W) video given without its batch axis."""
    if x.dim() in (3, 4) and x.shape[0] == in_channels:
        kind = "(C, H, W) image" if x.dim() == 3 else "(C, T, H, W) video"
        return (f": missing batch dimension? This looks like one {kind}; pass x.unsqueeze(0), "
                f"or a list of samples to TubeViT")
    return ""


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
