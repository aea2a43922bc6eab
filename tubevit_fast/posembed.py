"""Fixed sine/cosine position embedding of tube tokens (paper section 3.3).

For a token centred at (c_t, c_h, c_w) input pixels, with m = dim // 6 and
w_j = 10000 ** (-j / m), channels 6j..6j+5 hold
sin(c_t w_j), cos(c_t w_j), sin(c_h w_j), cos(c_h w_j), sin(c_w w_j), cos(c_w w_j);
the dim - 6m remaining channels are zero. Maths in float64, result float32.
Images go through `geometry.image_tubes`, whose single frame has c_t = 0.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from tubevit_fast.geometry import TubeSpec, as_tubes, check_fits, token_centres

TAU = 10000.0


def _position_embedding_table(centres: np.ndarray, dim: int) -> np.ndarray:
    m = dim // 6
    freqs = TAU ** (-np.arange(m, dtype=np.float64) / m)  # (m,)
    angles = centres[:, :, None] * freqs[None, None, :]  # (N, 3, m)
    table = np.zeros((centres.shape[0], dim), dtype=np.float64)
    # Channel 6j + 2a is sin of axis a at frequency j, 6j + 2a + 1 its cos.
    interleaved = np.stack([np.sin(angles), np.cos(angles)], axis=2)  # (N, 3, 2, m)
    table[:, : 6 * m] = interleaved.transpose(0, 3, 1, 2).reshape(centres.shape[0], 6 * m)
    return table


def _build(tubes: tuple[TubeSpec, ...], size: tuple[int, int, int], dim: int, device: torch.device):
    table = _position_embedding_table(token_centres(tubes, size), dim)
    return torch.from_numpy(table).to(device=device, dtype=torch.float32)


_cached = functools.lru_cache(maxsize=64)(_build)


def tube_position_embedding(
    tubes: Sequence[TubeSpec], size: Sequence[int], dim: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(N, dim) float32 fixed position embedding of every token, in sequence order.

    Cached per (tubes, size, dim, device); the returned tensor is shared, do not modify it.
    """
    tubes = as_tubes(tubes)
    if not isinstance(dim, int) or dim < 6:
        raise ValueError(f"position embedding needs dim >= 6 (6 channels per frequency), got dim={dim!r}")
    size = tuple(int(v) for v in size)
    check_fits(tubes, size)
    device = torch.device(device if device is not None else "cpu")
    if torch.compiler.is_compiling():
        # Dynamo traces through an lru_cache (warning that it does); every argument here is a
        # constant of the trace, so build the table directly: it becomes a constant of the graph.
        return _build(tubes, size, dim, device)
    return _cached(tubes, size, dim, device)
