"""Data for training TubeViT: a synthetic dataset that needs no download, a folder dataset of
real files, the collate function for the model's packed list input, and the step-indexed
sharded batch sampler the trainer uses (deterministic, so resuming is exact).

Synthetic data (`SyntheticShapes`): every item is generated from (seed, index) alone.
  videos: one shape (square, disk or triangle, random size and colours) moving across a noisy
          background; the class is its motion direction: right, left, down, up.
  images: a still shape; the class is the shape.
  One label space holds both: labels 0-3 are the video classes and 4-6 the image classes
  (`SyntheticShapes.classes` names them), so a single classifier head serves the joint
  image + video training the paper uses. Item i is an image when i % image_every ==
  image_every - 1 (image_every=4: a quarter of the items; 0 disables images).

Folder data (`VideoFolder`): root/class_name/*.mp4|*.avi|*.mkv|*.mov|*.webm|*.png|*.jpg|*.jpeg;
the class is the sub-folder (sorted names -> 0, 1, ...); images and videos share the label
space.

    python -m tubevit_fast.data --out demo_clips [--items 8] [--seed 2]

writes synthetic items as such a folder (demo_clips/move_left/00000.mp4, ...; images as .png),
clips to try `predict` on, or a dataset for `train --data`; it prints the paths it wrote.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

import numpy as np
import torch

from tubevit_fast.geometry import TubeSpec
from tubevit_fast.io import (DEFAULT_MEAN, DEFAULT_STD, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, normalize, read_any,
                             require, write_video)

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

VIDEO_CLASSES = ("move_right", "move_left", "move_down", "move_up")
IMAGE_CLASSES = ("image_square", "image_disk", "image_triangle")
_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx) per video class
_SHAPES = ("square", "disk", "triangle")


def _shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean (s, s) mask of a shape filling an s x s box."""
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    if shape == "square":
        return np.ones((s, s), dtype=bool)
    if shape == "disk":
        return (yy - s / 2) ** 2 + (xx - s / 2) ** 2 <= (s / 2) ** 2
    if shape == "triangle":  # apex at the top, base at the bottom
        return np.abs(xx - s / 2) <= yy / 2
    raise ValueError(shape)


class SyntheticShapes(torch.utils.data.Dataset):
    """Deterministic moving-shape videos and still-shape images (see the module docstring).

    Items are (float32 tensor, int label): videos (3, T, H, W), images (3, H, W), normalised
    with `mean`/`std` exactly as tubevit_fast.io normalises decoded files.
    """

    classes = VIDEO_CLASSES + IMAGE_CLASSES

    def __init__(self, length: int = 512, num_frames: int = 8, size: int = 32, seed: int = 0,
                 image_every: int = 4, speed: int = 2, mean: Sequence[float] = DEFAULT_MEAN,
                 std: Sequence[float] = DEFAULT_STD):
        if length < 1 or num_frames < 1 or size < 8:
            raise ValueError(f"need length >= 1, num_frames >= 1, size >= 8; got {length}, {num_frames}, {size}")
        self.length, self.num_frames, self.size, self.seed = length, num_frames, size, seed
        self.image_every, self.speed = image_every, speed
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return self.length

    def is_image(self, index: int) -> bool:
        return self.image_every > 0 and index % self.image_every == self.image_every - 1

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """uint8 frames (T, H, W, 3) (T = 1 for an image) and the label of item `index`."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, index])
        size, image = self.size, self.is_image(index)
        frames = 1 if image else self.num_frames
        shape_id = int(rng.integers(len(_SHAPES)))
        direction = int(rng.integers(len(_DIRECTIONS)))
        side = int(rng.integers(size // 4, size // 3 + 1))
        travel = 0 if image else self.speed * (frames - 1)
        dy, dx = _DIRECTIONS[direction]
        # Start so the whole path stays inside the frame.
        lo_y, hi_y = (travel, size - side) if dy < 0 else (0, size - side - travel * abs(dy))
        lo_x, hi_x = (travel, size - side) if dx < 0 else (0, size - side - travel * abs(dx))
        y0 = int(rng.integers(lo_y, max(lo_y, hi_y) + 1))
        x0 = int(rng.integers(lo_x, max(lo_x, hi_x) + 1))
        background = rng.uniform(0.0, 0.35, size=3)
        colour = rng.uniform(0.6, 1.0, size=3)
        noise = rng.normal(0.0, 0.03, size=(frames, size, size, 3))
        mask = _shape_mask(_SHAPES[shape_id], side)
        video = np.broadcast_to(background, (frames, size, size, 3)).copy()
        for t in range(frames):
            y, x = y0 + dy * self.speed * t, x0 + dx * self.speed * t
            y, x = min(max(y, 0), size - side), min(max(x, 0), size - side)
            video[t, y:y + side, x:x + side][mask] = colour
        video = np.clip(video + noise, 0.0, 1.0)
        label = len(VIDEO_CLASSES) + shape_id if image else direction
        return np.round(video * 255).astype(np.uint8), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        frames, label = self.render(index)
        x = torch.from_numpy(frames).float().div_(255.0).permute(3, 0, 1, 2)  # (3, T, H, W)
        x = normalize(x, self.mean, self.std, channel_dim=0)
        return (x[:, 0] if self.is_image(index) else x).contiguous(), label

    def export(self, root, indices: Sequence[int] | None = None, codec: str | None = None) -> list[str]:
        """Write items as root/class_name/NNNNN.mp4 (videos) or .png (images), the layout
        VideoFolder reads. Returns the written paths."""
        pil = require("PIL.Image", "writing images")

        paths = []
        for i in range(self.length) if indices is None else indices:
            frames, label = self.render(i)
            folder = os.path.join(os.fspath(root), self.classes[label])
            os.makedirs(folder, exist_ok=True)
            if self.is_image(i):
                path = os.path.join(folder, f"{i:05d}.png")
                pil.fromarray(frames[0]).save(path)
            else:
                path = write_video(os.path.join(folder, f"{i:05d}.mp4"), frames, codec=codec)
            paths.append(path)
        return paths


class VideoFolder(torch.utils.data.Dataset):
    """root/class_name/<files>: videos through io.read_video, images through io.read_image."""

    extensions = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS

    def __init__(self, root, num_frames: int = 8, size: int = 32, stride: int | None = None,
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD, resize: str = "crop"):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        self.classes = tuple(sorted(d.name for d in os.scandir(self.root) if d.is_dir()))
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(self.root, name)
            for file in sorted(os.listdir(folder)):
                if file.lower().endswith(self.extensions):
                    self.samples.append((os.path.join(folder, file), label))
        if not self.samples:
            raise ValueError(f"{self.root}: no {'/'.join(self.extensions)} files in any class sub-folder")
        self.num_frames, self.size, self.stride = num_frames, size, stride
        self.mean, self.std, self.resize = tuple(mean), tuple(std), resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return read_any(path, self.num_frames, self.size, self.stride, self.mean, self.std, self.resize), label


def collate(batch):
    """A list of (sample, label) -> (list of samples for the model's packed input, labels)."""
    samples, labels = zip(*batch)
    return list(samples), torch.tensor(labels, dtype=torch.long)


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for training steps start..stop-1, each rank its own shard.

    Epoch e shuffles all indices with a generator seeded by (seed, e), pads the permutation by
    wrapping to a multiple of world_size (as DistributedSampler does) and gives rank r every
    world_size-th index from r. Batch `step` is the (step % batches_per_epoch)-th slice of
    epoch step // batches_per_epoch: a pure function of the step, so a resumed run sees
    exactly the batches an uninterrupted one would (drop_last within an epoch).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0, stop: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.start, self.stop = rank, world_size, start, stop
        self.per_rank = math.ceil(num_items / world_size)
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"{num_items} items over {world_size} rank(s) is less than one batch of {batch_size}")
        self._epoch, self._order = None, None

    def shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=g).tolist()
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.num_items))[:total]
        return order[self.rank::self.world_size]

    def batch(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.shard(epoch)
        return self._order[b * self.batch_size:(b + 1) * self.batch_size]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


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
    args = p.parse_args(argv)
    check_positive(items=args.items, frames=args.frames)
    if args.size < 8:
        raise UsageError(f"--size must be >= 8, got {args.size}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    data = SyntheticShapes(args.items, args.frames, args.size, args.seed, args.image_every)
    paths = data.export(args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    from tubevit_fast.cli import run

    sys.exit(run(main))
