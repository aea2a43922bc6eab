"""Reading videos and images into normalised float tensors for TubeViT.

read_video(path) -> float32 (C, T, H, W); read_image(path) -> float32 (C, H, W).

Frame sampling: by default `num_frames` frames spread uniformly over the whole clip (the
centre of each of `num_frames` equal segments); with `stride`, `num_frames` consecutive
frames `stride` apart taken from the middle of the clip.

Resizing (`resize=`):
  "crop"    (default) scale so the shorter side equals the target, then centre-crop to the
            target size; keeps the aspect ratio.
  "stretch" resize straight to the target (H, W); distorts non-matching aspect ratios.
Resizing is bilinear with antialiasing: FFmpeg's scaler on a video's decoded frames (before they
leave uint8), torch's on an image converted to float.

Normalisation: x / 255, then (x - mean) / std per channel. The defaults are the ImageNet
statistics (what image-pretrained ViTs expect).

PyAV and Pillow (the `video` extra: pip install "tubevit_fast[video]") are imported only when a
video or an image is read; without them the call raises MissingDependency, saying what to install.
A file that exists but cannot be used (not a video or image, corrupt, too few frames) raises
MediaError, a ValueError naming the file.
"""
from __future__ import annotations

import fractions
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tubevit_fast.media_errors import VIDEO_EXTRA, MediaError, MissingDependency, first_line, require  # noqa: F401
from tubevit_fast.pixels import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_MEAN, DEFAULT_STD = IMAGENET_MEAN, IMAGENET_STD  # one home: tubevit_fast.pixels
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
RESIZE_MODES = ("crop", "stretch")


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_frames(frames: torch.Tensor, size: int | Sequence[int] | None, resize: str = "crop") -> torch.Tensor:
    """Resize float (T, C, H, W) frames to `size` ((H, W) or an int for a square); None keeps them."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if size is None:
        return frames
    th, tw = _size2(size)
    h, w = frames.shape[-2:]
    nh, nw = scaled_size(h, w, size, resize)
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return frames[..., top:top + th, left:left + tw]


def scaled_size(height: int, width: int, size: int | Sequence[int], resize: str = "crop") -> tuple[int, int]:
    """(H, W) a frame is scaled to before the crop: the target itself for "stretch"; for "crop" the
    frame scaled to cover the target, keeping its aspect ratio."""
    th, tw = _size2(size)
    if resize == "stretch":
        return th, tw
    scale = max(th / height, tw / width)
    return max(th, round(height * scale)), max(tw, round(width * scale))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], channel_dim: int) -> torch.Tensor:
    """(x - mean) / std along `channel_dim`, for x already in [0, 1]."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    mean_t = torch.as_tensor(mean, dtype=x.dtype).view(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype).view(shape)
    if mean_t.numel() != x.shape[channel_dim] or std_t.numel() != x.shape[channel_dim]:
        raise ValueError(f"mean/std need {x.shape[channel_dim]} values, got {len(mean)} and {len(std)}")
    return (x - mean_t) / std_t


def sample_indices(total: int, num_frames: int, stride: int | None = None, path: str = "video") -> list[int]:
    """Which of `total` frames to keep (see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if stride is None:
        if total < num_frames:
            raise MediaError(f"{path}: has {total} frames, fewer than the {num_frames} asked for")
        return [int((i + 0.5) * total / num_frames) for i in range(num_frames)]
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    span = (num_frames - 1) * stride + 1
    if total < span:
        raise MediaError(f"{path}: has {total} frames, fewer than the {span} needed for "
                         f"{num_frames} frames at stride {stride}")
    start = (total - span) // 2
    return [start + i * stride for i in range(num_frames)]


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video or image file: {path}")
    return path


def read_video(path, num_frames: int = 32, size: int | Sequence[int] | None = 224, stride: int | None = None,
               mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
               resize: str = "crop") -> torch.Tensor:
    """Decode `path` and return float32 (C, T, H, W), sampled, resized and normalised.

    Decoding is tubevit_fast.app.decode's: the file is probed once (the frame count by decoding,
    as headers can be wrong), then only the window holding the sampled frames is decoded and
    FFmpeg scales those frames to the resize target before they are converted to float.
    Raises FileNotFoundError for a missing file, ValueError for data that cannot be decoded
    and for a clip with fewer frames than asked for (the message gives both counts).
    """
    from tubevit_fast.app.decode import probe, read_frames  # the app's decoder, above this module

    path = _check_file(path)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    info = probe(path)
    indices = sample_indices(info.num_frames, num_frames, stride, path)
    scaled = None if size is None else scaled_size(info.height, info.width, size, resize)
    frames = read_frames(path, indices, info=info, size=scaled)            # (T, H, W, 3) uint8
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)                    # (T, 3, H, W)
    x = resize_frames(x, size, resize)                                     # the centre crop
    x = normalize(x, mean, std, channel_dim=1)
    return x.permute(1, 0, 2, 3).contiguous()                              # (3, T, H, W)


def read_image(path, size: int | Sequence[int] | None = 224, mean: Sequence[float] = DEFAULT_MEAN,
               std: Sequence[float] = DEFAULT_STD, resize: str = "crop") -> torch.Tensor:
    """Read a PNG/JPEG with Pillow and return float32 (C, H, W), resized and normalised like
    read_video's frames."""
    path = _check_file(path)
    pil = require("PIL.Image", "reading images")

    try:
        with pil.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except OSError as err:  # PIL's UnidentifiedImageError is an OSError
        raise MediaError(f"{path}: cannot be decoded as an image ({first_line(err)})") from err
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)[None]
    x = resize_frames(x, size, resize)
    return normalize(x, mean, std, channel_dim=1)[0].contiguous()


def read_any(path, num_frames: int = 32, size=224, stride: int | None = None, mean=DEFAULT_MEAN,
             std=DEFAULT_STD, resize: str = "crop") -> torch.Tensor:
    """read_image for image extensions, read_video for everything else."""
    if os.fspath(path).lower().endswith(IMAGE_EXTENSIONS):
        return read_image(path, size, mean, std, resize)
    return read_video(path, num_frames, size, stride, mean, std, resize)


def write_video(path, frames, fps: int = 10, codec: str | None = None, quality: int = 2, *,
                pix_fmt: str | None = None, gop: int | None = None, bframes: int | None = None,
                timestamps: Sequence[int] | None = None) -> str:
    """Write uint8 frames to a video file with PyAV: a (T, H, W, 3) array (numpy or torch) or an
    iterable of (H, W, 3) arrays (a long or large clip need not be held in memory at once).

    The codec defaults to libx264 (full-resolution chroma, yuv444p) when FFmpeg has it, else
    mpeg4 (yuv420p, so sharp colour edges blur). `quality` is libx264's crf or mpeg4's qscale:
    lower is better, 0 is lossless for libx264. Used by the synthetic folder export and tests.
    Test clips of a given structure: `pix_fmt` (e.g. yuv420p, what cameras write), `gop` (frames
    from one keyframe to the next, FFmpeg's -g), `bframes` (the most consecutive B-frames; libx264
    then uses its "superfast" preset, as "ultrafast" writes none), `timestamps` (each frame's time
    in milliseconds, increasing: a variable frame rate; `fps` is then only the nominal rate)."""
    av = require("av", "writing videos")

    if isinstance(frames, (np.ndarray, torch.Tensor)):
        frames = np.asarray(frames.numpy() if isinstance(frames, torch.Tensor) else frames)
        if frames.ndim != 4:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path = os.fspath(path)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        if codec == "libx264":
            options = {"crf": str(quality), "preset": "superfast" if bframes else "ultrafast"}
        else:
            options = {"qscale": str(quality)}
        if gop is not None:
            options["g"] = str(gop)
        if bframes is not None:
            options["bf"] = str(bframes)
        stream.options = options
        stream.pix_fmt = pix_fmt or ("yuv444p" if codec == "libx264" else "yuv420p")
        if codec != "libx264":
            stream.codec_context.qmax = quality
        if timestamps is not None:
            stream.time_base = stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, array in enumerate(frames):
            array = np.asarray(array)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(f"frames must be uint8 (T, H, W, 3), got a frame of "
                                 f"{array.dtype} {array.shape}")
            if i == 0:
                stream.width, stream.height = array.shape[1], array.shape[0]
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if timestamps is not None:
                frame.pts, frame.time_base = int(timestamps[i]), fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
