"""Test clips whose frames all differ: a smooth random texture panning across the frame (what a
codec predicts well, so P- and B-frames carry real motion), and a corner patch whose colour
encodes the frame number."""
from __future__ import annotations

import numpy as np

from tubevit_fast.io import write_video


def moving_frames(num_frames: int, height: int, width: int, seed: int = 0):
    """Yields uint8 (H, W, 3) frames, one at a time (a 4K clip need not fit in memory)."""
    rng = np.random.default_rng(seed)
    block = max(8, min(height, width) // 32)  # texture detail relative to the frame: 4K stays cheap to encode
    coarse = rng.integers(0, 256, ((height + num_frames) // block + 2, (width + 2 * num_frames) // block + 2, 3))
    texture = np.kron(coarse, np.ones((block, block, 1))).astype(np.uint8)
    for t in range(num_frames):
        frame = np.ascontiguousarray(texture[t:t + height, 2 * t:2 * t + width])
        frame[:8, :8] = (t * 37 % 256, t * 91 % 256, 255 - t * 53 % 256)
        yield frame


def write_clip(path, num_frames: int = 40, height: int = 48, width: int = 64, seed: int = 0, **options) -> str:
    """A moving-texture clip (options: tubevit_fast.io.write_video's; H.264 4:2:0 by default)."""
    options.setdefault("pix_fmt", "yuv420p")
    options.setdefault("fps", 30)
    options.setdefault("quality", 18)
    return write_video(path, moving_frames(num_frames, height, width, seed), **options)
