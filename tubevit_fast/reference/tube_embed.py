"""Reference sparse tube tokenizer: one Conv3d per tube on the offset slice.

This is the usual implementation the fused kernels replace: per tube a Conv3d launch,
flatten, transpose, then a concatenation and a position-embedding add over all tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tubevit_fast.geometry import TubeSpec


def tube_embed_reference(video: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                         tubes: Sequence[TubeSpec], pos: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, T, H, W) video -> (B, N, dim) tokens, tube by tube, row-major inside a tube."""
    tokens = []
    for tube, weight, bias in zip(tubes, weights, biases):
        ot, oh, ow = tube.offset
        y = F.conv3d(video[:, :, ot:, oh:, ow:], weight, bias, stride=tube.stride)
        tokens.append(y.flatten(2).transpose(1, 2))
    out = torch.cat(tokens, dim=1)
    if pos is not None:
        out = out + pos.to(out.dtype)
    return out
