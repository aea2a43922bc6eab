"""Reference sparse tube tokenizer: one Conv3d per tube on the offset slice.

This is the usual implementation the fused kernels replace: per tube a Conv3d launch,
flatten, transpose, then a concatenation and a position-embedding add over all tokens.
A space-to-depth tube (TubeSpec.space_to_depth) adds a reshape pass: its Conv3d output is cut
to whole groups and each group's tokens are moved into one token's channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tubevit_fast.geometry import TubeSpec


def tube_embed_reference(video: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                         tubes: Sequence[TubeSpec], pos: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, T, H, W) video -> (B, N, dim) tokens, tube by tube, row-major inside a tube. A uint8
    video is converted whole to the weights' dtype (no normalisation: see tubevit_fast.pixels)."""
    if video.dtype == torch.uint8:
        video = video.to(weights[0].dtype)
    tokens = []
    for tube, weight, bias in zip(tubes, weights, biases):
        ot, oh, ow = tube.offset
        y = F.conv3d(video[:, :, ot:, oh:, ow:], weight, bias, stride=tube.stride)
        if tube.space_to_depth is not None:
            y = _merge_groups(y, tube, tube.grid(video.shape[2:]))
        tokens.append(y.flatten(2).transpose(1, 2))
    out = torch.cat(tokens, dim=1)
    if pos is not None:
        out = out + pos.to(out.dtype)
    return out


def _merge_groups(y: torch.Tensor, tube: TubeSpec, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, d, nt, nh, nw) sampler tokens -> (B, f * d, nt', nh', nw') merged ones: channel
    j * d + c of a merged token is channel c of the group's j-th token along the axis."""
    axis, factor = tube.space_to_depth
    B, d = y.shape[:2]
    y = y[:, :, :grid[0] * tube.factors[0], :grid[1] * tube.factors[1], :grid[2] * tube.factors[2]]
    split = list(grid)
    split.insert(axis + 1, factor)  # (nt', [f], nh', [f], nw', [f]) with the f after the axis
    y = y.reshape(B, d, *split).movedim(3 + axis, 1)  # (B, f, d, nt', nh', nw')
    return y.reshape(B, factor * d, *grid)
