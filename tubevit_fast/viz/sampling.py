"""sampling.png: which pixels each tube reads, on a clip. One column per frame that some tube
reads (every such frame, none other), one row per tube and a last row for all tubes together;
read pixels are tinted with the tube's colour, skipped ones darkened."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tubevit_fast.geometry import TubeSpec, read_mask
from tubevit_fast.viz.draw import fit, save_png, sheet

TINTS = np.array([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.3, 0.5, 1.0], [1.0, 0.85, 0.2], [1.0, 0.3, 1.0],
                  [0.2, 1.0, 1.0]])
FRAME_SIDE = 128  # target side of a frame tile in pixels


def frames_read(tubes: Sequence[TubeSpec], size) -> np.ndarray:
    """Indices of the frames at least one tube reads."""
    return np.flatnonzero(read_mask(tubes, size).any(axis=(1, 2)))


def frame_tile(image: np.ndarray) -> np.ndarray:
    """A (H, W, 3) frame in [0, 1] as a uint8 tile about FRAME_SIDE pixels on its longer side."""
    return fit(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8), FRAME_SIDE)


def draw_sampling(clip: np.ndarray, tubes: Sequence[TubeSpec], path: str) -> str:
    """clip (T, H, W, 3) in [0, 1]: write the picture to `path`."""
    size = clip.shape[:3]
    frames = frames_read(tubes, size)
    rows, labels = [], []
    for i, tube in enumerate(list(tubes) + [None]):
        mask = read_mask(tubes if tube is None else [tube], size)
        if tube is None:  # all tubes: the clip itself where any tube reads
            shown = np.where(mask[..., None], clip, clip * 0.25)
            labels.append(f"all tubes\n{mask.mean():.1%} read")
        else:
            tint = TINTS[i % len(TINTS)]
            shown = np.where(mask[..., None], 0.45 * clip + 0.55 * tint, clip * 0.25)
            labels.append(f"tube {i}\nk={tube.kernel}\ns={tube.stride}\no={tube.offset}\n"
                          f"{mask.mean():.1%} read")
        rows.append([frame_tile(shown[t]) for t in frames])
    title = (f"pixels each tube reads (tinted) and skips (dark), on the {len(frames)} of {size[0]} frames "
             f"some tube reads; k, s, o = kernel, stride, offset (t, h, w)")
    return save_png(sheet(rows, title, labels, [f"frame {t}" for t in frames]), path)
