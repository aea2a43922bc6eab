"""`python -m tubevit_fast.data --out DIR`: the synthetic moving shapes (app/synthetic.py) written as
a folder dataset, and the names older code imports from here.

    python -m tubevit_fast.data --out demo_clips [--items 8] [--seed 2] [--list train.txt]

writes synthetic items as a folder dataset (demo_clips/move_left/00000.mp4, ...; images as .png),
clips to try `predict` on, or a dataset for `train --data`; it prints the paths it wrote. With
--list it also writes a list file (`path class_name` lines, paths relative to --out) naming them.

Also here: SMALL_TUBES (the tubes of the small model), and SyntheticShapes as float normalised items
for viz (the datasets of tubevit_fast.app.datasets give uint8).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch

from tubevit_fast.app import synthetic
from tubevit_fast.geometry import TubeSpec
from tubevit_fast.io import normalize
from tubevit_fast.pixels import IMAGENET_MEAN, IMAGENET_STD

# Tubes for small 8x32x32 clips (32x32 images), the same roles as the paper's four:
#   a 4x8x8 tube tiling space-time (2x4x4 = 32 tokens),
#   a long thin 8x4x4 tube, offset (0, 4, 4) (1x4x4 = 16 tokens),
#   the 2D 1x8x8 patch tube images use (1x4x4 = 16 tokens; 4x4 = 16 on a 32x32 image).
# 64 tokens per clip, 16 per image.
SMALL_TUBES: tuple[TubeSpec, ...] = (
    TubeSpec(kernel=(4, 8, 8), stride=(4, 8, 8), offset=(0, 0, 0)),
    TubeSpec(kernel=(8, 4, 4), stride=(8, 8, 8), offset=(0, 4, 4)),
    TubeSpec(kernel=(1, 8, 8), stride=(8, 8, 8), offset=(0, 0, 0)),
)


class SyntheticShapes(synthetic.SyntheticShapes):
    """The synthetic set as float items, for code that has not moved to app.datasets yet: key i or
    (i, epoch) -> (float32 (3, T, H, W) video or (3, H, W) image normalised with mean/std, label)."""

    def __init__(self, length: int = 512, num_frames: int = 8, size: int = 32, seed: int = 0,
                 image_every: int = 4, speed: int = 2, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__(length, num_frames, size, seed, image_every, speed)
        self.mean, self.std = tuple(mean), tuple(std)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index = key[0] if isinstance(key, tuple) else key
        frames, label = self.render(index)
        x = torch.from_numpy(frames).float().div_(255.0).permute(3, 0, 1, 2)  # (3, T, H, W)
        x = normalize(x, self.mean, self.std, channel_dim=0)
        return (x[:, 0] if self.is_image(index) else x).contiguous(), label


def main(argv=None) -> list[str]:
    from tubevit_fast.cli import UsageError, check_positive

    p = argparse.ArgumentParser(prog="python -m tubevit_fast.data",
                                description="Write synthetic moving-shape clips and still images as a dataset "
                                            "folder (out/class_name/NNNNN.mp4|.png).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--items", type=int, default=8, help="how many items")
    p.add_argument("--frames", type=int, default=8, help="frames per clip")
    p.add_argument("--size", type=int, default=32, help="frame / image side")
    p.add_argument("--seed", type=int, default=2, help="train uses 0 (training set) and 1 (validation)")
    p.add_argument("--image-every", type=int, default=0, help="every n-th item is an image (0: clips only)")
    p.add_argument("--list", default=None, help="also write this list file (relative to --out) of the items")
    args = p.parse_args(argv)
    check_positive(items=args.items, frames=args.frames)
    if args.size < 8:
        raise UsageError(f"--size must be >= 8, got {args.size}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    data = synthetic.SyntheticShapes(args.items, args.frames, args.size, args.seed, args.image_every)
    paths = data.export(args.out)
    for path in paths:
        print(path)
    if args.list:
        list_file = os.path.join(args.out, args.list)
        with open(list_file, "w") as f:
            for path in paths:
                f.write(f"{os.path.relpath(path, args.out)} {os.path.basename(os.path.dirname(path))}\n")
        print(list_file)
    return paths


if __name__ == "__main__":
    from tubevit_fast.cli import run

    sys.exit(run(main))
