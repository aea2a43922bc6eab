"""Decoding the frames a request needs, as uint8.

    info = probe(path)                                   # VideoInfo: frame count, timestamps, keyframes
    frames = read_frames(path, [0, 2, 4], short_side=256, info=info)  # uint8 (T, H, W, 3), request order

`read_frames` returns exactly the frames a full decode returns at those indices (indices count
decoded frames from 0, may repeat, in any order), scaled so the shorter side is `short_side`
(None keeps the decoded size; `size=(H, W)` scales to exactly that). MediaError (a ValueError naming
the file) for a file that cannot be decoded or an index past its last frame; FileNotFoundError for a
missing file.

How a request is decoded (PyAV, the default):
- With `info` (from `probe` or the clip index, tubevit_fast.app.clip_index), the decoder seeks to
  the last keyframe at or before the first wanted frame, decodes forward and stops after the last
  wanted frame; where a later wanted frame has a keyframe of its own past the previous wanted
  frame, it seeks again (`window_runs`: sparse requests on short GOPs). Decoded frames are
  matched to indices by their timestamps (the index holds every frame's), so B-frame reordering,
  variable frame rates and leading pictures cannot shift them.
  Unwanted frames that no other frame references (non-reference B-frames) are skipped by the
  decoder (AVCodecContext.skip_frame, set per packet): they cannot change any other frame.
- Without `info`, the file is decoded from its start (still stopping after the last wanted frame).
- Only wanted frames are converted to RGB, by FFmpeg's scaler (swscale, bilinear, which widens its
  filter when shrinking) straight to the output size, so no full-size RGB or float frame exists.
  The scaler writes planar RGB (FFmpeg's gbrp), copied plane by plane into a (T, 3, H, W) buffer:
  for planar output swscale interpolates the chroma at full resolution (its packed rgb24 output
  repeats each chroma sample over two pixels), and it is the faster of the two. The result is that
  buffer seen as (T, H, W, 3), so `frames.permute(0, 3, 1, 2)`, the layout the datasets and the
  model use, is contiguous and costs no copy.

`threads`: FFmpeg threads for this call (None: `decoder_threads()`, which shares the CPU cores
between the DataLoader workers when called inside one). `decoder="torchcodec"` decodes with
torchcodec instead (the `torchcodec` extra), its frame mapping taken from `info` so it returns the
same frames; `device="cuda"` there decodes with NVDEC (pending: not yet run on a GPU).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import os
from typing import Sequence

import numpy as np
import torch

from tubevit_fast.media_errors import MediaError, first_line, require

DECODERS = ("pyav", "torchcodec")
INTERPOLATION = "BILINEAR"  # swscale's bilinear: antialiased when shrinking (its filter widens)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What sampling and seeking need to know about a video without decoding it again.

    Timestamps are in the video stream's time base. Evenly spaced frames keep only `pts_start` and
    `pts_step` (frame i at pts_start + i * pts_step); otherwise `pts` lists every frame's. A file
    without usable timestamps (missing or not increasing) has neither and is always decoded from
    its start.
    """
    num_frames: int          # frames a full decode yields (counted, not the header's guess)
    fps: float
    height: int
    width: int
    keyframes: tuple[int, ...] = ()   # frame indices where decoding can start
    pts_start: int = 0
    pts_step: int = 0
    pts: tuple[int, ...] = ()

    @property
    def has_timestamps(self) -> bool:
        """Whether frames can be found by timestamp (and so seeked to)."""
        return bool(self.pts) or self.pts_step > 0

    def timestamps(self) -> list[int] | None:
        """Every frame's presentation timestamp, or None when the file has no usable ones."""
        if not self.has_timestamps:
            return None
        return list(self.pts) if self.pts else [self.pts_of(i) for i in range(self.num_frames)]

    def pts_of(self, index: int) -> int:
        """Frame `index`'s timestamp (has_timestamps must hold)."""
        return self.pts[index] if self.pts else self.pts_start + index * self.pts_step

    def frame_at(self, pts: int | None) -> int | None:
        """The index of the frame whose timestamp is `pts`, None when no frame has it. Per decoded
        frame of a request: arithmetic for evenly spaced frames, a lookup table built once per
        VideoInfo otherwise (not a table of every frame per request: long videos have many)."""
        if pts is None or not self.has_timestamps:
            return None
        if self.pts:
            return self._frame_by_pts.get(pts)
        index, offset = divmod(pts - self.pts_start, self.pts_step)
        return index if offset == 0 and 0 <= index < self.num_frames else None

    @functools.cached_property
    def _frame_by_pts(self) -> dict[int, int]:
        return {p: i for i, p in enumerate(self.pts)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VideoInfo:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def decoder_threads(workers: int | None = None, cores: int | None = None) -> int:
    """FFmpeg threads per decoding process so that workers x threads fits the cores.

    workers None: the DataLoader's worker count when called inside a worker, else 1 (the main
    process decodes alone). cores None: the cores this process may run on."""
    if workers is None:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
    return max(1, (available_cores() if cores is None else cores) // max(1, workers))


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _decode_error(path, err: Exception) -> MediaError:
    return MediaError(f"{path}: cannot be decoded as a video ({first_line(err)})")


def _open(path, threads: int | None = None):
    av = require("av", "reading videos")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video file: {path}")
    try:
        container = av.open(path)
    except (av.FFmpegError, UnicodeDecodeError) as err:
        raise _decode_error(path, err) from err
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    context = stream.codec_context
    context.thread_count = decoder_threads() if threads is None else threads
    context.thread_type = "AUTO"  # frame and slice threads
    return av, container, stream


def probe(path, threads: int | None = None) -> VideoInfo:
    """Decode the whole file once, without converting a pixel: frame count (headers can be wrong),
    frame rate, size, every frame's timestamp and the keyframes a seek can land on."""
    path = os.fspath(path)
    av, container, stream = _open(path, threads)
    frame_pts, key_pts, height, width = [], set(), 0, 0
    try:
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        for packet in container.demux(stream):
            if packet.is_keyframe:
                key_pts.add(packet.pts)
            for frame in packet.decode():
                frame_pts.append(frame.pts)
                height, width = frame.height, frame.width
    except av.FFmpegError as err:
        raise _decode_error(path, err) from err
    finally:
        container.close()
    count = len(frame_pts)
    if count == 0:
        raise MediaError(f"{path}: no video frames could be decoded")
    usable = None not in frame_pts and all(a < b for a, b in zip(frame_pts, frame_pts[1:]))
    if not usable:
        return VideoInfo(count, fps, height, width)
    steps = {b - a for a, b in zip(frame_pts, frame_pts[1:])}
    keyframes = tuple(i for i, p in enumerate(frame_pts) if p in key_pts)
    if len(steps) > 1:
        return VideoInfo(count, fps, height, width, keyframes, pts=tuple(frame_pts))
    return VideoInfo(count, fps, height, width, keyframes, pts_start=frame_pts[0],
                     pts_step=steps.pop() if steps else 1)


def short_side_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(H, W) of a frame scaled, aspect kept, so that its shorter side is `short_side` (None: as
    it is); for images too (tubevit_fast.app.media.read_image)."""
    if short_side is None:
        return height, width
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def _output_size(height: int, width: int, short_side: int | None, size) -> tuple[int, int]:
    """(H, W) of read_frames' frames: `size`, else the decoded size scaled to `short_side`."""
    return tuple(size) if size is not None else short_side_size(height, width, short_side)


def _check_indices(indices: Sequence[int]) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"indices must be a non-empty list of frame numbers >= 0, got {indices}")
    return indices


def read_frames(path, indices: Sequence[int], short_side: int | None = None, *, info: VideoInfo | None = None,
                size: tuple[int, int] | None = None, threads: int | None = None, decoder: str = "pyav",
                device: str = "cpu") -> torch.Tensor:
    """uint8 (len(indices), H, W, 3): the decoded frames at `indices` (see the module docstring; the
    pyav decoder's result is a view of channel-planar memory: call .contiguous() for packed RGB).

    info: the file's VideoInfo (probe or the clip index): decode only from the keyframe before the
    first wanted frame. size: exact output (H, W) instead of `short_side`."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")
    indices = _check_indices(indices)
    path = os.fspath(path)
    if info is not None and max(indices) >= info.num_frames:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such video file: {path}")
        raise MediaError(f"{path}: has {info.num_frames} frames, frame {max(indices)} was asked for")
    if decoder == "torchcodec":
        return _read_torchcodec(path, indices, short_side, info, size, threads, device)
    if device != "cpu":
        raise ValueError(f"the pyav decoder runs on the CPU only, got device={device!r}")
    return _read_pyav(path, indices, short_side, info, size, threads)


def _read_pyav(path: str, indices: list[int], short_side, info, size, threads) -> torch.Tensor:
    av = require("av", "reading videos")
    wanted, last = set(indices), max(indices)
    positions: dict[int, list[int]] = {}  # frame -> where it goes in the output (repeats allowed)
    for position, index in enumerate(indices):
        positions.setdefault(index, []).append(position)
    out: np.ndarray | None = None         # (T, 3, H, W), allocated once the decoded size is known
    kept: set[int] = set()
    scaler_threads = decoder_threads() if threads is None else threads  # swscale's default: every core
    # One scaler for the request: frame.to_ndarray(width=...) would set up a new one for every frame.
    scaler = av.video.reformatter.VideoReformatter()

    def keep(index: int, frame) -> None:
        nonlocal out
        if out is None:
            height, width = _output_size(frame.height, frame.width, short_side, size)
            out = np.empty((len(indices), 3, height, width), dtype=np.uint8)
        first, *repeats = positions[index]
        planar = scaler.reformat(frame, format="gbrp", height=out.shape[2], width=out.shape[3],
                                 interpolation=INTERPOLATION, threads=scaler_threads)
        _copy_rgb_planes(planar, out[first])
        for position in repeats:
            out[position] = out[first]
        kept.add(index)

    try:
        complete = False
        if info is not None and info.has_timestamps:
            with _Opened(path, threads) as (container, stream):
                complete = _decode_window(container, stream, info, wanted, keep)
            complete = complete and kept == wanted  # an output row left unwritten would be garbage
        if not complete:  # no timestamps, or a seek landed past the frame it was for
            kept.clear()
            count = _decode_from_start(path, threads, wanted, keep)
            if last not in kept:
                raise MediaError(f"{path}: has {count} frames, frame {last} was asked for")
            if kept != wanted:
                raise MediaError(f"{path}: frames {sorted(wanted - kept)[:5]} could not be decoded")
    except av.FFmpegError as err:
        raise _decode_error(path, err) from err
    return torch.from_numpy(out).permute(0, 2, 3, 1)


GBRP_PLANES_RGB = (2, 0, 1)  # FFmpeg's planar RGB stores its planes G, B, R


def _copy_rgb_planes(frame, dest: np.ndarray) -> None:
    """Copy a gbrp frame's planes into dest, uint8 (3, H, W) in R, G, B order (numpy copies each
    plane's rows straight out of FFmpeg's buffer, skipping the row padding)."""
    height, width = dest.shape[1:]
    for channel, plane_index in enumerate(GBRP_PLANES_RGB):
        plane = frame.planes[plane_index]
        rows = np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)
        dest[channel] = rows[:height, :width]


def _decode_from_start(path: str, threads: int | None, wanted: set[int], keep) -> int:
    """Decode from the file's start, counting frames, through the last wanted one; returns the
    frames decoded."""
    count, last = 0, max(wanted)
    with _Opened(path, threads) as (container, stream):
        for frame in container.decode(stream):
            if count in wanted:
                keep(count, frame)
            count += 1
            if count > last:
                break
    return count


class _Opened:
    """with _Opened(path, threads) as (container, stream): the file open for decoding, then closed."""

    def __init__(self, path: str, threads: int | None):
        _, self.container, self.stream = _open(path, threads)

    def __enter__(self):
        return self.container, self.stream

    def __exit__(self, *exc):
        self.container.close()


# A seek must skip at least this many frames: it flushes the decoder and repositions the demuxer,
# which cost about as much as decoding a few small frames (measured on 340x256 H.264, GOP 12).
SEEK_GAP = 4


def window_runs(keyframes: Sequence[int], indices: Sequence[int]) -> list[tuple[int, list[int]]]:
    """How a request is decoded: [(start frame, wanted frames), ...], each run decoded from its start
    (a keyframe, or 0: the file's start) through its last wanted frame. A new run (a seek) begins
    where the keyframe before the next wanted frame lies at least SEEK_GAP frames past the previous
    wanted frame: decoding on would only decode frames nobody asked for (sparse requests on short
    GOPs)."""
    runs: list[tuple[int, list[int]]] = []
    for index in sorted(set(indices)):
        at = bisect.bisect_right(keyframes, index)
        start = keyframes[at - 1] if at else 0
        if runs and start - runs[-1][1][-1] - 1 < SEEK_GAP:
            runs[-1][1].append(index)
        else:
            runs.append((start, [index]))
    return runs


def _decode_window(container, stream, info: VideoInfo, wanted: set[int], keep) -> bool:
    """Decode each of window_runs' runs: seek to its keyframe, decode to its last wanted frame, keep
    the wanted frames by their timestamps. False when a seek landed after the run's first wanted
    frame (the caller then decodes from the file's start)."""
    wanted_pts = {info.pts_of(i) for i in wanted}
    context, skipping = stream.codec_context, False
    for number, (start, run) in enumerate(window_runs(info.keyframes, wanted)):
        if number > 0 or start > 0:
            # FFmpeg's MP4 and Matroska demuxers seek by presentation time: to the last keyframe at
            # or before it. One that compares decoding times instead may land a keyframe later
            # (found below: the run's first frame is not decoded) or earlier (only slower).
            container.seek(info.pts_of(start), backward=True, stream=stream)
        first, last, landed, done = run[0], run[-1], False, False
        for packet in container.demux(stream):
            # Unwanted frames are skipped when nothing references them; wanted ones always decode.
            skip = packet.pts is not None and packet.pts not in wanted_pts
            if skip != skipping:
                context.skip_frame = "NONREF" if skip else "DEFAULT"
                skipping = skip
            for frame in packet.decode():
                index = info.frame_at(frame.pts)
                if index is None:
                    continue
                if not landed:
                    if index > first:
                        return False
                    landed = True
                if index in wanted:
                    keep(index, frame)
                done = index >= last
            if done:
                break
        else:
            return False  # the file ended before the run's last frame
    return True


def _frame_mappings(info: VideoInfo) -> str:
    """torchcodec's custom_frame_mappings (ffprobe's JSON layout) from the index: exact frame
    numbers without torchcodec scanning the file."""
    pts = info.timestamps()
    durations = [b - a for a, b in zip(pts, pts[1:])]
    durations.append(durations[-1] if durations else 1)
    keys = set(info.keyframes)
    return json.dumps({"frames": [{"pts": p, "duration": d, "key_frame": int(i in keys)}
                                  for i, (p, d) in enumerate(zip(pts, durations))]})


def _read_torchcodec(path: str, indices: list[int], short_side, info, size, threads, device) -> torch.Tensor:
    decoders = require("torchcodec.decoders", "decoder='torchcodec'")
    transforms = require("torchcodec.transforms", "decoder='torchcodec'")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video file: {path}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} decodes with NVDEC and needs a CUDA GPU; none is visible")
    # With the index, torchcodec maps frame numbers exactly as the PyAV path does (variable frame
    # rates and wrong headers included); without it, it estimates them from the header.
    where = ({"custom_frame_mappings": _frame_mappings(info)} if info is not None and info.has_timestamps
             else {"seek_mode": "approximate"})
    threads = decoder_threads() if threads is None else threads

    def open_decoder(**options):
        return decoders.VideoDecoder(path, dimension_order="NHWC", device=device, num_ffmpeg_threads=threads,
                                     **where, **options)

    try:
        height, width = (info.height, info.width) if info is not None else _metadata_size(open_decoder())
        out_hw = _output_size(height, width, short_side, size)
        resize = [transforms.Resize(size=out_hw)] if out_hw != (height, width) else None
        decoder = open_decoder(transforms=resize)
        num_frames = decoder.metadata.num_frames
        if info is None and num_frames is not None and max(indices) >= num_frames:
            raise MediaError(f"{path}: has {num_frames} frames, frame {max(indices)} was asked for")
        return decoder.get_frames_at(indices).data
    except (RuntimeError, IndexError) as err:
        raise _decode_error(path, err) from err


def _metadata_size(decoder) -> tuple[int, int]:
    return decoder.metadata.height, decoder.metadata.width
