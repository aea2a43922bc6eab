"""Synthetic moving shapes: training data that needs no download (the default of `train`).

Every item is generated from (seed, index) alone.
  videos: one shape (square, disk or triangle, random size and colours) moving across a noisy
          background; the class is its motion direction: right, left, down, up.
  images: a still shape; the class is the shape.
One label space holds both: labels 0-3 are the video classes and 4-6 the image classes
(`SyntheticShapes.classes` names them), so a single classifier head serves the joint image + video
training the paper uses. Item i is an image when i % image_every == image_every - 1 (image_every=4:
a quarter of the items; 0 disables images).

SyntheticShapes is a media set (see media.py): datasets.TrainClips and EvalViews sample, augment and
batch it exactly as they do files. `export` writes it as a folder dataset (python -m tubevit_fast.data).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from tubevit_fast.io import require, write_video

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


class SyntheticShapes:
    """Deterministic moving-shape videos and still-shape images (see the module docstring)."""

    classes = list(VIDEO_CLASSES + IMAGE_CLASSES)

    def __init__(self, length: int = 512, num_frames: int = 8, size: int = 32, seed: int = 0,
                 image_every: int = 4, speed: int = 2):
        if length < 1 or num_frames < 1 or size < 8:
            raise ValueError(f"need length >= 1, num_frames >= 1, size >= 8; got {length}, {num_frames}, {size}")
        if image_every < 0:
            raise ValueError(f"image_every must be >= 0, got {image_every}")
        self.length, self.frames, self.size, self.seed = length, num_frames, size, seed
        self.image_every, self.speed = image_every, speed

    def __len__(self) -> int:
        return self.length

    def is_image(self, index: int) -> bool:
        return self.image_every > 0 and index % self.image_every == self.image_every - 1

    def name(self, index: int) -> str:
        return f"synthetic item {index} (seed {self.seed})"

    def num_frames(self, index: int) -> int:
        return 1 if self.is_image(index) else self.frames

    def label(self, index: int) -> int:
        _, shape_id, direction = self._draw_class(index)  # the item's first draws: no pixels rendered
        return len(VIDEO_CLASSES) + shape_id if self.is_image(index) else direction  # as render() says

    def _draw_class(self, index: int) -> tuple[np.random.Generator, int, int]:
        """Item `index`'s generator after its first two draws: its shape and its direction."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, index])
        shape_id = int(rng.integers(len(_SHAPES)))
        return rng, shape_id, int(rng.integers(len(_DIRECTIONS)))

    def read(self, index: int, indices: Sequence[int], short_side: int | None = None) -> torch.Tensor:
        """uint8 (T, H, W, 3): the rendered frames at `indices` (an image: its one frame)."""
        frames = torch.from_numpy(self.render(index)[0])
        if not self.is_image(index):
            if min(indices) < 0 or max(indices) >= self.frames:
                raise IndexError(f"frame indices {list(indices)} out of 0..{self.frames - 1}")
            frames = frames[list(indices)]
        if short_side is not None and short_side != self.size:
            frames = TF.resize(frames.permute(0, 3, 1, 2), short_side, antialias=True).permute(0, 2, 3, 1)
        return frames.contiguous()

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """uint8 frames (T, H, W, 3) (T = 1 for an image) and the label of item `index`."""
        rng, shape_id, direction = self._draw_class(index)
        size, image = self.size, self.is_image(index)
        frames = 1 if image else self.frames
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

    def export(self, root, indices: Sequence[int] | None = None, codec: str | None = None) -> list[str]:
        """Write items as root/class_name/NNNNN.mp4 (videos) or .png (images), the folder format
        (sources.py). Returns the written paths."""
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
