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

import datetime
import os
import sys
from typing import Mapping, Sequence

import numpy as np
import torch

from tubevit_fast.app import decode
from tubevit_fast.app.clip_index import index_videos
from tubevit_fast.app.sources import Annotations
from tubevit_fast.io import IMAGE_EXTENSIONS, MediaError, first_line, require

# How long ranks other than 0 wait for rank 0 to index the videos (a first run on a large dataset).
INDEX_WAIT = datetime.timedelta(hours=24)


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
                height, width = decode.short_side_size(img.height, img.width, short_side)
                img = img.resize((width, height), pil.Resampling.BILINEAR)
            array = np.asarray(img)
    except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise MediaError(f"{path}: cannot be decoded as an image ({first_line(err)})") from err
    return torch.from_numpy(array.copy())[None]


class FileMedia:
    """Annotated video and image files, read with `decoder` ("pyav" or "torchcodec"). `infos` (path ->
    decode.VideoInfo: the clip index) gives frame counts and lets the decoder seek; a video not in it
    is probed when first read, and remembered (so is a probe's failure: a damaged file is decoded once
    per process, then fails at once). The command lines build the index first (FileMedia.indexed), so
    their DataLoader workers never probe."""

    def __init__(self, annotations: Annotations, infos: Mapping[str, decode.VideoInfo] | None = None,
                 decoder: str = "pyav"):
        if decoder not in decode.DECODERS:
            raise ValueError(f"decoder must be one of {decode.DECODERS}, got {decoder!r}")
        # absolute paths: the clip index is keyed by them (a relative or ./-path must not miss it)
        self.samples = [(os.path.abspath(path), label) for path, label in annotations.samples]
        self.classes = list(annotations.classes)
        self.infos = dict(infos or {})
        self.decoder = decoder
        self.undecodable: dict[str, MediaError] = {}
        self.unreadable: list[str] = []  # files indexed() left out (bad_files="skip")

    @classmethod
    def indexed(cls, annotations: Annotations, cache_file=None, progress: bool = True,
                workers: int | None = None, bad_files: str = "skip", decoder: str = "pyav") -> FileMedia:
        """FileMedia with the clip index of its videos built first, in this process (cached in
        `cache_file`; under torch.distributed rank 0 builds it while the others wait, then read it).
        Videos that cannot be decoded: bad_files "skip" leaves them out (one warning line naming each,
        then their count; their paths in `unreadable`), "error" raises one MediaError naming the first
        and how many."""
        if bad_files not in ("skip", "error"):
            raise ValueError(f"bad_files must be 'skip' or 'error', got {bad_files!r}")
        videos = [path for path, _ in annotations.samples if not is_image_file(path)]
        infos, failed = _index_once(videos, cache_file, progress, workers)
        if failed and bad_files == "error":
            path, err = next(iter(failed.items()))
            raise MediaError(f"{len(failed)} of {len(videos)} videos cannot be decoded, e.g. "
                             f"{path}: {first_line(err).replace(f'{path}: ', '')}")
        kept = [(p, label) for p, label in annotations.samples if os.path.abspath(p) not in failed]
        media = cls(Annotations(kept, list(annotations.classes)), infos, decoder)
        if failed:
            for path, err in failed.items():
                reason = first_line(err).replace(f"{path}: ", "")
                print(f"warning: skipped {path}: {reason}", file=sys.stderr)
            print(f"warning: skipped {len(failed)} of {len(videos)} videos that cannot be decoded",
                  file=sys.stderr, flush=True)
            media.unreadable = list(failed)
        return media

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
        return decode.read_frames(path, indices, short_side=short_side, info=self.infos.get(path),
                                  decoder=self.decoder)


def index_for_cli(annotations: Annotations, what: str, clip_index=None, bad_files: str = "skip",
                  decoder: str = "pyav", progress: bool = True, workers: int = 0) -> FileMedia:
    """FileMedia.indexed for a command line: the cache file `clip_index` (None: the user's cache,
    clip_index.default_cache_file()), and every failure one UsageError line naming `what` (the option)."""
    from tubevit_fast.app.clip_index import default_cache_file
    from tubevit_fast.cli import UsageError, one_line

    cache_file = os.path.abspath(clip_index or default_cache_file())
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        return FileMedia.indexed(annotations, cache_file, progress=progress, workers=workers,
                                 bad_files=bad_files, decoder=decoder)
    except (MediaError, OSError) as err:
        raise UsageError(f"{what}: {one_line(err)}") from None


def _index_once(videos: list[str], cache_file, progress: bool, workers: int | None):
    """index_videos(videos) built by one process: under torch.distributed rank 0 probes and writes the
    cache while the other ranks wait for its outcome (its failures, or its error), then read the cache."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return index_videos(videos, cache_file, progress, workers)
    # Indexing a large dataset the first time takes hours: the other ranks wait on a CPU group of
    # their own with a timeout to match, not on the default group's (NCCL's is 10 minutes).
    wait = dist.new_group(backend="gloo", timeout=INDEX_WAIT)
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            infos, failed = index_videos(videos, cache_file, progress, workers)
            outcome = [{path: first_line(err) for path, err in failed.items()}]
        except Exception as err:  # the other ranks raise it too, rather than wait forever
            outcome = [err]
            dist.broadcast_object_list(outcome, src=0, group=wait)
            raise
        dist.broadcast_object_list(outcome, src=0, group=wait)
        return infos, failed
    dist.broadcast_object_list(outcome, src=0, group=wait)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    failed = {path: MediaError(message) for path, message in outcome[0].items()}
    readable = [p for p in videos if os.path.abspath(p) not in failed]
    infos, _ = index_videos(readable, cache_file, False, workers)
    return infos, failed
