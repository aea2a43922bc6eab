"""Reading videos and images into normalised float tensors for TubeViT.

read_video(path) -> float32 (C, T, H, W); read_image(path) -> float32 (C, H, W).

Frame sampling: by default `num_frames` frames spread uniformly over the whole clip (the
centre of each of `num_frames` equal segments); with `stride`, `num_frames` consecutive
frames `stride` apart taken from the middle of the clip.

Resizing (`resize=`):
  "crop"    (default) scale so the shorter side equals the target, then centre-crop to the
            target size; keeps the aspect ratio.
  "stretch" resize straight to the target (H, W); distorts non-matching aspect ratios.
Resizing is bilinear with antialiasing, on the decoded uint8 frames converted to float.

Normalisation: x / 255, then (x - mean) / std per channel. The defaults are the ImageNet
statistics (what image-pretrained ViTs expect).

PyAV and Pillow (the `video` extra: pip install "tubevit_fast[video]") are imported only when a
video or an image is read; without them the call raises MissingDependency, saying what to install.
A file that exists but cannot be used (not a video or image, corrupt, too few frames) raises
MediaError, a ValueError naming the file.
"""
from __future__ import annotations

import importlib
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
RESIZE_MODES = ("crop", "stretch")
VIDEO_EXTRA = 'pip install "tubevit_fast[video]"'


class MediaError(ValueError):
    """A video or image file that cannot be used: not media, corrupt, or too short."""


class MissingDependency(ImportError):
    """An optional package (PyAV, Pillow, Matplotlib: the `video` extra) is not installed."""


def require(module: str, purpose: str):
    """import_module(module), or MissingDependency telling the user how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"av": "av (PyAV)", "PIL": "pillow", "matplotlib": "matplotlib"}.get(module.split(".")[0], module)
        raise MissingDependency(f"{purpose} needs the {package} package, which is not installed: "
                                f"{VIDEO_EXTRA}") from err


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
    if (h, w) == (th, tw):
        return frames
    if resize == "stretch":
        return F.interpolate(frames, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return frames[..., top:top + th, left:left + tw]


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


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _decode(path: str, num_frames: int, stride: int | None):
    """Decode the wanted frames as (T, H, W, 3) uint8, decoding the file once when its header's
    frame count is right and twice when it is missing or wrong."""
    av = require("av", "reading videos")

    def open_stream():
        try:
            container = av.open(path)
        except (av.FFmpegError, UnicodeDecodeError) as err:
            raise MediaError(f"{path}: cannot be decoded as a video ({_first_line(err)})") from err
        if not container.streams.video:
            container.close()
            raise MediaError(f"{path}: has no video stream")
        return container

    def run(wanted: set[int] | None):
        kept, count = {}, 0
        container = open_stream()
        try:
            for frame in container.decode(video=0):
                if wanted is not None and count in wanted:
                    kept[count] = frame.to_ndarray(format="rgb24")
                count += 1
        except av.FFmpegError as err:
            raise MediaError(f"{path}: cannot be decoded as a video ({_first_line(err)})") from err
        finally:
            container.close()
        return kept, count

    container = open_stream()
    hint = container.streams.video[0].frames
    container.close()
    wanted = None
    if hint and hint > 0:
        try:
            wanted = sample_indices(hint, num_frames, stride, path)
        except ValueError:
            wanted = None  # the header may under-count: decode and count for real
    kept, count = run(set(wanted) if wanted else None)
    if count == 0:
        raise MediaError(f"{path}: no video frames could be decoded")
    if wanted is None or count != hint:
        wanted = sample_indices(count, num_frames, stride, path)
        if not all(i in kept for i in wanted):
            kept, _ = run(set(wanted))
    return np.stack([kept[i] for i in wanted])


def read_video(path, num_frames: int = 32, size: int | Sequence[int] | None = 224, stride: int | None = None,
               mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
               resize: str = "crop") -> torch.Tensor:
    """Decode `path` with PyAV and return float32 (C, T, H, W), sampled, resized and normalised.

    Raises FileNotFoundError for a missing file, ValueError for data that cannot be decoded
    and for a clip with fewer frames than asked for (the message gives both counts).
    """
    path = _check_file(path)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    frames = torch.from_numpy(_decode(path, num_frames, stride))          # (T, H, W, 3) uint8
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)                    # (T, 3, H, W)
    x = resize_frames(x, size, resize)
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
        raise MediaError(f"{path}: cannot be decoded as an image ({_first_line(err)})") from err
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)[None]
    x = resize_frames(x, size, resize)
    return normalize(x, mean, std, channel_dim=1)[0].contiguous()


def read_any(path, num_frames: int = 32, size=224, stride: int | None = None, mean=DEFAULT_MEAN,
             std=DEFAULT_STD, resize: str = "crop") -> torch.Tensor:
    """read_image for image extensions, read_video for everything else."""
    if os.fspath(path).lower().endswith(IMAGE_EXTENSIONS):
        return read_image(path, size, mean, std, resize)
    return read_video(path, num_frames, size, stride, mean, std, resize)


def write_video(path, frames, fps: int = 10, codec: str | None = None, quality: int = 2) -> str:
    """Write uint8 (T, H, W, 3) frames (numpy or torch) to a video file with PyAV.

    The codec defaults to libx264 (full-resolution chroma, yuv444p) when FFmpeg has it, else
    mpeg4 (yuv420p, so sharp colour edges blur). `quality` is libx264's crf or mpeg4's qscale:
    lower is better, 0 is lossless for libx264. Used by the synthetic folder export and tests."""
    av = require("av", "writing videos")

    frames = np.asarray(frames.numpy() if isinstance(frames, torch.Tensor) else frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path = os.fspath(path)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        if codec == "libx264":
            stream.pix_fmt = "yuv444p"
            stream.options = {"crf": str(quality), "preset": "ultrafast"}
        else:
            stream.pix_fmt = "yuv420p"
            stream.options = {"qscale": str(quality)}
            stream.codec_context.qmax = quality
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
