"""Decoding the frames a request needs, as uint8.

    info = probe(path)                                   # VideoInfo: frame count, fps, size, keyframes
    frames = read_frames(path, [0, 2, 4], short_side=256)  # uint8 (T, H, W, 3), frames in request order

`read_frames` returns exactly the frames a full decode returns at those indices (indices count
decoded frames from 0, may repeat, in any order), scaled so the shorter side is `short_side`
(None keeps the decoded size). MediaError (a ValueError naming the file) for a file that cannot be
decoded or an index past its last frame; FileNotFoundError for a missing file.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import torch

from tubevit_fast.io import MediaError, _first_line, require


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What sampling needs to know about a video without decoding it again."""
    num_frames: int          # frames a full decode yields (counted, not the header's guess)
    fps: float
    height: int
    width: int
    keyframes: tuple[int, ...] = ()   # indices of the keyframes (decode can start there)


def _open(path: str):
    av = require("av", "reading videos")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video file: {path}")
    try:
        container = av.open(path)
    except (av.FFmpegError, UnicodeDecodeError) as err:
        raise MediaError(f"{path}: cannot be decoded as a video ({_first_line(err)})") from err
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: has no video stream")
    return av, container


def probe(path) -> VideoInfo:
    """Frame count (by decoding: headers can be wrong), frame rate, size and keyframe indices."""
    av, container = _open(path)
    count, keyframes, height, width = 0, [], 0, 0
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        for frame in container.decode(video=0):
            if frame.key_frame:
                keyframes.append(count)
            height, width = frame.height, frame.width
            count += 1
    except av.FFmpegError as err:
        raise MediaError(f"{path}: cannot be decoded as a video ({_first_line(err)})") from err
    finally:
        container.close()
    if count == 0:
        raise MediaError(f"{path}: no video frames could be decoded")
    return VideoInfo(count, fps, height, width, tuple(keyframes))


def _scaled_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    if short_side is None:
        return height, width
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def read_frames(path, indices: Sequence[int], short_side: int | None = None) -> torch.Tensor:
    """uint8 (len(indices), H, W, 3): the decoded frames at `indices` (see the module docstring)."""
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"indices must be a non-empty list of frame numbers >= 0, got {indices}")
    wanted, last = set(indices), max(indices)
    av, container = _open(path)
    kept, count = {}, 0
    try:
        for frame in container.decode(video=0):
            if count in wanted:
                h, w = _scaled_size(frame.height, frame.width, short_side)
                kept[count] = frame.to_ndarray(format="rgb24", width=w, height=h)
            count += 1
            if count > last:
                break
    except av.FFmpegError as err:
        raise MediaError(f"{path}: cannot be decoded as a video ({_first_line(err)})") from err
    finally:
        container.close()
    if last not in kept:
        raise MediaError(f"{path}: has {count} frames, frame {last} was asked for")
    return torch.from_numpy(np.stack([kept[i] for i in indices]))
