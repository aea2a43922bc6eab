"""Data benchmarks: clips/s of one loader worker (one thread) against the training step it feeds.

Clips, written once per session by this file (tubevit_fast.io.write_video: H.264 4:2:0, a coarse
random texture panning 1-2 pixels a frame): 10 s at 30 fps, 340x256 and 640x360, GOP 250 and GOP
12, libx264 "superfast" with 3 B-frames; and 2 s of 3840x2160, GOP 250, "ultrafast" (no B-frames).

Requests: 32 frames at stride 2 from a random window ("32x2"; a 2 s 4K clip has 60 frames: 16x2
there), and 8 frames spread uniformly over the clip ("8u"). Every frame is scaled so the short side
is 224 and centre-cropped to 224x224.

Decoders:
  before      a copy of tubevit_fast.io.read_video's read path before issue 21: the whole file
              decoded, the wanted frames converted to full-size RGB, then float32, torch's antialiased
              resize and the normalisation: float32 (3, T, 224, 224)
  pyav        tubevit_fast.app.decode.read_frames with the clip index: the window only, FFmpeg's
              scaler, uint8 (3, T, 224, 224)
  torchcodec  the same call with decoder="torchcodec" (the same resize, done by FFmpeg's filter)
All three run with one thread (threads=1, torch.set_num_threads(1)): a DataLoader worker's setting.

Floor (measured before optimising; 2-core Xeon shared with other jobs, one thread, +-30% between
runs). FFmpeg's decode of the whole clip without any conversion: 340x256 about 2500-3700 frames/s
(GOP 250) and 5900 (GOP 12); 640x360 about 1400-1500 (GOP 250) and 750-780 (GOP 12); 4K about 200.
The fewest frames a request must decode (keyframe at or before each run's first wanted frame
through its last, decode.window_runs; averaged over every window start):
  32x2, GOP 250 (keyframes 0 and 250): a start s in [0, 237] needs s + 63 frames: 181.5
  32x2, GOP 12: 68.5          8u, GOP 250: 276 (0-243, then 250-281)          8u, GOP 12: 52
  4K 16x2 (60 frames, one keyframe): 45.5
so the floor of a 32x2 request on 340x256 GOP 250 is about 60 ms, 12 ms on GOP 12. The floor row
of each case is that frame count / the clip's decode-only frames/s measured in the run. Skipping
the unwanted non-reference B-frames (about half of x264's frames) takes the decoder below it:
the /floor column can read below 1; above 1 it is mostly the RGB conversion of the wanted frames.

Reported (extra_info and the summary): medians of the three decoders timed interleaved (every
round a new random window, one from each slice of the possible starts, the same for each decoder),
clips/s, the peak RSS of one call above the
RSS before it (VmHWM after resetting it through /proc/self/clear_refs, freed heap returned first),
the bytes per clip handed to the model (uint8 against float32), the training-step clips/s of a
small TubeViT on the same device and how many such workers keep one step fed.

    pytest benchmarks/test_data.py --benchmark-only
"""
from __future__ import annotations

import ctypes
import gc
import itertools
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tubevit_fast.app.clip_index import build_clip_index
from tubevit_fast.app.decode import read_frames, window_runs
from tubevit_fast.geometry import PAPER_TUBES
from tubevit_fast.io import (DEFAULT_MEAN, DEFAULT_STD, MediaError, normalize, require, resize_frames,
                             scaled_size, write_video)
from tubevit_fast.model import TubeViT

SIZE = 224
CLIPS = {  # name: (height, width, frames, gop)
    "340x256-gop250": (256, 340, 300, 250),
    "340x256-gop12": (256, 340, 300, 12),
    "640x360-gop250": (360, 640, 300, 250),
    "640x360-gop12": (360, 640, 300, 12),
    "3840x2160-gop250": (2160, 3840, 60, 250),
}
REQUESTS = ("32x2", "8u")
DECODERS = ("before", "pyav", "torchcodec")
ROUNDS = 4  # interleaved rounds (each: one call of every decoder); the 4K clip gets 1
STEP_BATCH, STEP_ROUNDS = 2, 5


def _has_torchcodec() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # ImportError, or FFmpeg's shared libraries missing
        return False
    return True


def _panning_frames(num_frames: int, height: int, width: int, seed: int = 0):
    """A coarse random texture (8x8 blocks at 340x256, proportionally larger above) panning."""
    rng = np.random.default_rng(seed)
    block = max(8, min(height, width) // 32)
    rows, cols = (height + num_frames) // block + 2, (width + 2 * num_frames) // block + 2
    coarse = rng.integers(0, 256, (rows, cols, 3))
    texture = np.kron(coarse, np.ones((block, block, 1))).astype(np.uint8)
    for t in range(num_frames):
        yield texture[t:t + height, 2 * t:2 * t + width]


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data_bench")
    paths = {}
    for name, (height, width, frames, gop) in CLIPS.items():
        big = height > 1000  # 4K: libx264 "ultrafast" (no B-frames), 4x quicker to write
        paths[name] = write_video(folder / f"{name}.mp4", _panning_frames(frames, height, width), fps=30,
                                  quality=30 if big else 23, pix_fmt="yuv420p", gop=gop,
                                  bframes=None if big else 3)
    index = build_clip_index(paths.values(), progress=False)
    return {name: (path, index[os.path.abspath(path)]) for name, path in paths.items()}


@pytest.fixture(scope="module", autouse=True)
def step_threads():
    """Loaders run as a DataLoader worker does, with one torch thread; yields the session's thread
    count (BENCH_THREADS), which the training step uses."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield previous
    torch.set_num_threads(previous)


# ---- the three decoders -------------------------------------------------------------------------

def read_before(path: str, indices: list[int]) -> torch.Tensor:
    """io.read_video's read path before issue 21 (its _decode, with the sampled indices given):
    decode every frame, convert the wanted ones at full size, then float, resize, normalise."""
    av = require("av", "reading videos")

    def open_stream():
        try:
            container = av.open(path)
        except (av.FFmpegError, UnicodeDecodeError) as err:
            raise MediaError(f"{path}: cannot be decoded as a video ({err})") from err
        return container

    def run(wanted):
        kept, count = {}, 0
        container = open_stream()
        try:
            for frame in container.decode(video=0):
                if wanted is not None and count in wanted:
                    kept[count] = frame.to_ndarray(format="rgb24")
                count += 1
        finally:
            container.close()
        return kept, count

    container = open_stream()
    hint = container.streams.video[0].frames
    container.close()
    kept, count = run(set(indices) if hint else None)
    if count != hint:
        kept, _ = run(set(indices))
    frames = torch.from_numpy(np.stack([kept[i] for i in indices]))
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    x = resize_frames(x, SIZE, "crop")
    x = normalize(x, DEFAULT_MEAN, DEFAULT_STD, channel_dim=1)
    return x.permute(1, 0, 2, 3).contiguous()


def read_new(path: str, indices: list[int], info, decoder: str) -> torch.Tensor:
    """uint8 (3, T, 224, 224): decode.read_frames scaled by FFmpeg, then the centre crop."""
    height, width = scaled_size(info.height, info.width, SIZE)
    frames = read_frames(path, indices, info=info, size=(height, width), threads=1, decoder=decoder)
    top, left = (height - SIZE) // 2, (width - SIZE) // 2
    return frames[:, top:top + SIZE, left:left + SIZE].permute(3, 0, 1, 2).contiguous()


def _request_maker(request: str, num_frames: int, seed: int, windows: int = ROUNDS):
    """A function returning the next request's indices. 32x2: `windows` random windows, one from
    each of `windows` equal slices of the possible starts (their mean cost is the average
    window's, even with a handful of rounds), taken in turn."""
    if request == "8u":
        return lambda: [int((i + 0.5) * num_frames / 8) for i in range(8)]
    count = 32 if num_frames >= 63 else 16
    span = (count - 1) * 2 + 1
    slices = np.arange(windows) + np.random.default_rng(seed).random(windows)
    starts = slices * (num_frames - span + 1) / windows
    requests = itertools.cycle([list(range(int(start), int(start) + span, 2)) for start in starts])
    return lambda: next(requests)


def _floor_frames(request: str, info) -> float:
    """The fewest frames a request must decode, on average over its windows: from the keyframe at
    or before each run's first wanted frame through its last (decode.window_runs, which seeks past
    unwanted GOPs)."""
    window = _request_maker(request, info.num_frames, seed=0, windows=1)()
    windows = [window]
    if request == "32x2":  # every start the random window can take
        span = window[-1] - window[0]
        windows = [list(range(start, start + span + 1, 2)) for start in range(info.num_frames - span)]
    return float(np.mean([sum(run[-1] - start + 1 for start, run in window_runs(info.keyframes, w))
                          for w in windows]))


def _decode_only_seconds(path: str) -> float:
    """One full decode without any conversion, one thread: the decoder's own speed."""
    av = require("av", "reading videos")
    start = time.perf_counter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for _ in container.decode(stream):
            pass
    return time.perf_counter() - start


# ---- peak RSS of one call ------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def peak_rss_bytes(fn) -> tuple[int | None, object]:
    """Peak resident memory of one fn() above the resident memory before it (Linux: VmHWM reset
    through /proc/self/clear_refs; None elsewhere), and fn's result. Freed heap is handed back
    first, so memory an earlier call left in malloc's pools cannot hide this call's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS:")
    except OSError:
        return None, fn()
    result = fn()
    return (_rss_kib("VmHWM:") - before) * 1024, result


# ---- the benchmark ---------------------------------------------------------------------------------

@pytest.mark.parametrize("request_", REQUESTS)
@pytest.mark.parametrize("clip", list(CLIPS))
def test_read_clip(benchmark, bench, clips, clip, request_):
    if clip.startswith("3840") and request_ == "8u":
        pytest.skip("the 4K clip is measured on the window request only")
    path, info = clips[clip]
    decoders = [d for d in DECODERS if d != "torchcodec" or _has_torchcodec()]
    readers = {d: (lambda idx: read_before(path, idx)) if d == "before" else
               (lambda idx, d=d: read_new(path, idx, info, d)) for d in decoders}
    # One untimed call each on the same request: its peak RSS, and the check that the decoders
    # return the same frames (a broken decoder cannot look fast).
    check_request = _request_maker(request_, info.num_frames, seed=1, windows=1)()
    peaks, outputs = {}, {}
    for decoder, read in readers.items():
        peaks[decoder], outputs[decoder] = peak_rss_bytes(lambda read=read: read(check_request))
    ours, before = outputs["pyav"], outputs["before"]
    assert ours.dtype == torch.uint8 and ours.shape == (3, len(check_request), SIZE, SIZE)
    mean, std = torch.tensor(DEFAULT_MEAN).view(3, 1, 1, 1), torch.tensor(DEFAULT_STD).view(3, 1, 1, 1)
    # Two scalers: close, not equal (0.03 here; the neighbouring frame of the panning texture: 0.1).
    for decoder in decoders[1:]:
        assert (outputs[decoder].float() / 255 - (before * std + mean)).abs().mean() < 0.05, decoder

    # Timed: every round a new window, the same one for every decoder (the warmup call takes one
    # too: rounds + 1 windows, each used once in the rounds).
    rounds = 1 if clip.startswith("3840") else ROUNDS

    def timed(read):
        next_request = _request_maker(request_, info.num_frames, seed=0, windows=rounds + 1)
        return lambda: read(next_request())

    benchmark.group = f"data read {request_}"
    benchmark.extra_info.update(op="read_clip", clip=clip, request=request_, frames=len(check_request),
                                keyframes=list(info.keyframes), threads=1)
    benchmark.pedantic(timed(readers["pyav"]), rounds=2 * (rounds + 1), warmup_rounds=0, iterations=1)
    mixed = bench.interleaved({d: timed(read) for d, read in readers.items()}, torch.device("cpu"),
                              rounds=rounds)
    decode_fps = info.num_frames / _decode_only_seconds(path)
    floor_frames = _floor_frames(request_, info)
    clip_bytes = {"uint8": ours.nbytes, "float32": before.nbytes}
    benchmark.extra_info.update(
        interleaved_medians_s=mixed, clips_per_s={d: 1 / s for d, s in mixed.items()},
        speedup_vs_before_interleaved=mixed["before"] / mixed["pyav"], peak_rss_bytes=peaks,
        peak_rss_method="VmHWM after /proc/self/clear_refs, minus VmRSS before (malloc_trim first)",
        decode_only_frames_per_s=decode_fps, floor_frames=floor_frames, floor_s=floor_frames / decode_fps,
        bytes_per_clip=clip_bytes)
    notes = (f"{1 / mixed['pyav']:.1f} clips/s/worker (before {1 / mixed['before']:.2f}); "
             f"{clip_bytes['float32'] / clip_bytes['uint8']:.0f}x fewer bytes (uint8)")
    if "torchcodec" in mixed:
        benchmark.extra_info["speedup_vs_torchcodec_interleaved"] = mixed["torchcodec"] / mixed["pyav"]
        notes += (f"; torchcodec {1 / mixed['torchcodec']:.1f} clips/s "
                  f"({mixed['torchcodec'] / mixed['pyav']:.2f}x)")
    bench.add_row(f"read {clip} {request_} [pyav]", "cpu", "uint8", mixed["pyav"], mixed["before"],
                  "read_video before issue 21 (full decode, float resize)", floor=floor_frames / decode_fps,
                  notes=notes, peak=peaks["pyav"], baseline_peak=peaks["before"],
                  interleaved=mixed["before"] / mixed["pyav"])
    if "torchcodec" in mixed:
        bench.add_row(f"read {clip} {request_} [pyav]", "cpu", "uint8", mixed["pyav"], mixed["torchcodec"],
                      "torchcodec with the index's frame mapping, same resize", peak=peaks["pyav"],
                      baseline_peak=peaks["torchcodec"], interleaved=mixed["torchcodec"] / mixed["pyav"])
    _LOADER[(clip, request_)] = 1 / mixed["pyav"]


_LOADER: dict = {}  # (clip, request) -> the new decoder's clips/s per worker, for the step comparison


def test_training_step_against_the_loader(benchmark, bench, step_threads):
    """Clips/s of a small TubeViT's training step (paper tubes on 3x32x224x224, dim 64, depth 2,
    batch 2, AdamW), with every thread the benchmarks use: the rate the loader workers must feed."""
    torch.set_num_threads(step_threads)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gen = torch.Generator().manual_seed(0)
        model = TubeViT(num_classes=10, tubes=PAPER_TUBES, dim=64, depth=2, heads=2).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        video = torch.randn(STEP_BATCH, 3, 32, SIZE, SIZE, generator=gen).to(device)
        labels = torch.randint(0, 10, (STEP_BATCH,), generator=gen).to(device)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(video), labels).backward()
            optimizer.step()
            bench.synchronize(device)

        benchmark.group = "data training step"
        benchmark.pedantic(step, rounds=STEP_ROUNDS, warmup_rounds=2, iterations=1)
        median = bench.median_of(benchmark) or bench.median_seconds(step, device, rounds=STEP_ROUNDS)
    finally:
        torch.set_num_threads(1)
    step_rate = STEP_BATCH / median
    workers = {f"{clip} {req}": math.ceil(step_rate / rate) for (clip, req), rate in _LOADER.items()}
    benchmark.extra_info.update(op="train_step", device=device.type, batch=STEP_BATCH, threads=step_threads,
                                step_clips_per_s=step_rate, loader_clips_per_s_per_worker=dict(
                                    (f"{c} {r}", v) for (c, r), v in _LOADER.items()), workers_needed=workers)
    needed = ", ".join(f"{k}: {v}" for k, v in workers.items() if k.endswith("32x2"))
    bench.add_row(f"train step B={STEP_BATCH} small TubeViT", device.type, "float32", median, None, "-",
                  notes=f"{step_rate:.1f} clips/s; workers (one thread) to feed it, 32x2 requests: "
                        f"{needed or '-'}")

