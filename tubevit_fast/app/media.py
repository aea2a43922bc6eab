"""What a dataset reads, item by item: the uint8 frames of a video or an image, and its label.

A media set is anything with these methods (FileMedia over annotated files; synthetic.SyntheticShapes
renders its items instead):
    len(media); media.classes
    media.label(i) -> int;  media.is_image(i) -> bool;  media.name(i) -> str (for messages)
    media.num_frames(i) -> int                     (1 for an image)
    media.read(i, indices, short_side) -> uint8 (T, H, W, 3)   (an image: T = 1, indices ignored)
`short_side` scales at decode time so the shorter side is that many pixels (None: as stored).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch

from tubevit_fast.app import decode
from tubevit_fast.app.clip_index import build_clip_index
from tubevit_fast.app.sources import Annotations
from tubevit_fast.io import IMAGE_EXTENSIONS, MediaError, _first_line, require


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def read_image(path: str, short_side: int | None = None) -> torch.Tensor:
    """uint8 (1, H, W, 3) of an image file, scaled (bilinear, antialiased) so its shorter side is
    `short_side`."""
    pil = require("PIL.Image", "reading images")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with pil.open(path) as img:
            img = img.convert("RGB")
            if short_side is not None and min(img.size) != short_side:
                w, h = img.size
                scale = short_side / min(w, h)
                size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
                img = img.resize(size, pil.Resampling.BILINEAR)
            array = np.asarray(img)
    except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise MediaError(f"{path}: cannot be decoded as an image ({_first_line(err)})") from err
    return torch.from_numpy(array.copy())[None]


class FileMedia:
    """Annotated video and image files. `infos` (path -> decode.VideoInfo: the clip index) gives frame
    counts and lets the decoder seek; a video not in it is probed when first read, and remembered (so is
    a probe's failure: a damaged file is decoded once per process, then fails at once)."""

    def __init__(self, annotations: Annotations, infos: Mapping[str, decode.VideoInfo] | None = None):
        self.samples = list(annotations.samples)
        self.classes = list(annotations.classes)
        self.infos = dict(infos or {})
        self.undecodable: dict[str, MediaError] = {}

    @classmethod
    def indexed(cls, annotations: Annotations, cache_file=None, progress: bool = True,
                workers: int | None = None) -> FileMedia:
        """FileMedia with the clip index of its videos built first (cached in `cache_file`). A video
        that cannot be decoded is left out of the index (one warning) and fails again when read,
        where the dataset's bad_files decides."""
        videos = [path for path, _ in annotations.samples if not is_image_file(path)]
        infos = build_clip_index(videos, cache_file, progress=progress, workers=workers, bad_files="skip")
        return cls(annotations, infos)

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def is_image(self, index: int) -> bool:
        return is_image_file(self.samples[index][0])

    def num_frames(self, index: int) -> int:
        path = self.samples[index][0]
        if is_image_file(path):
            return 1
        if path in self.undecodable:  # probed before, in this process: fail without decoding again
            raise self.undecodable[path]
        if path not in self.infos:
            try:
                self.infos[path] = decode.probe(path)
            except MediaError as err:
                self.undecodable[path] = err
                raise
        return self.infos[path].num_frames

    def read(self, index: int, indices: Sequence[int], short_side: int | None = None) -> torch.Tensor:
        path = self.samples[index][0]
        if is_image_file(path):
            return read_image(path, short_side)
        return decode.read_frames(path, indices, short_side=short_side, info=self.infos.get(path))
