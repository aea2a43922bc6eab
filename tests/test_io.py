"""tubevit_fast.io and the datasets: real MP4s written with PyAV and read back."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from tubevit_fast.app.datasets import StepBatchSampler, TrainClips, collate_train  # noqa: E402
from tubevit_fast.app.media import FileMedia  # noqa: E402
from tubevit_fast.app.sampling import ClipSampling  # noqa: E402
from tubevit_fast.app.sources import load_annotations  # noqa: E402
from tubevit_fast.data import SMALL_TUBES, SyntheticShapes  # noqa: E402
from tubevit_fast.geometry import num_tokens  # noqa: E402
from tubevit_fast.io import (MediaError, MissingDependency, read_image, read_video, resize_frames,  # noqa: E402
                             sample_indices, write_video)

HAS_X264 = "libx264" in av.codecs_available
RAW = dict(size=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _frames(T=40, H=64, W=64) -> np.ndarray:
    """Smooth synthetic frames whose green channel encodes the frame index."""
    t = np.arange(T)[:, None, None]
    y = np.arange(H)[None, :, None]
    x = np.arange(W)[None, None, :]
    frames = np.zeros((T, H, W, 3), dtype=np.uint8)
    frames[..., 0] = np.broadcast_to(x * 255 // (W - 1), (T, H, W))
    frames[..., 1] = np.broadcast_to(t * 6, (T, H, W))
    frames[..., 2] = np.broadcast_to(y * 255 // (H - 1), (T, H, W))
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = _frames()
    path = tmp_path_factory.mktemp("io") / "clip.mp4"
    write_video(path, frames, codec="libx264" if HAS_X264 else "mpeg4", quality=0 if HAS_X264 else 2)
    return str(path), frames


def test_read_back_all_frames(clip):
    path, frames = clip
    x = read_video(path, num_frames=40, **RAW)
    assert x.dtype == torch.float32 and x.shape == (3, 40, 64, 64)
    ref = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255
    err = (x - ref).abs()
    # Codec tolerance: libx264 yuv444 crf 0 is near lossless (only the RGB<->YUV rounding);
    # mpeg4's 4:2:0 chroma is coarser.
    assert err.mean() < (0.01 if HAS_X264 else 0.03), err.mean()
    assert err.max() < (0.05 if HAS_X264 else 0.6), err.max()


def test_uniform_and_strided_sampling(clip):
    path, _ = clip
    x = read_video(path, num_frames=8, **RAW)
    # Green encodes the frame index: t * 6 / 255.
    got = (x[1].mean(dim=(1, 2)) * 255 / 6).round().long().tolist()
    assert got == sample_indices(40, 8) == [2, 7, 12, 17, 22, 27, 32, 37]
    x = read_video(path, num_frames=4, stride=3, **RAW)
    got = (x[1].mean(dim=(1, 2)) * 255 / 6).round().long().tolist()
    assert got == [15, 18, 21, 24]


def test_resize_and_normalise(clip):
    path, _ = clip
    x = read_video(path, num_frames=4, size=32)
    assert x.shape == (3, 4, 32, 32)
    raw = read_video(path, num_frames=4, size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x, (raw - mean.view(3, 1, 1, 1)) / std.view(3, 1, 1, 1))
    assert read_video(path, num_frames=2, size=(16, 24), resize="stretch").shape == (3, 2, 16, 24)
    # crop mode keeps the aspect ratio: a 20x40 frame -> 10x20 -> centre 10x10. The frame is a ramp
    # along w (column c holds c), which halving averages pairwise: column j becomes 2j + 0.5, and the
    # centre crop keeps j = 5..14 in every row.
    wide = torch.arange(40.0).repeat(1, 1, 20, 1)
    out = resize_frames(wide, 10)
    assert out.shape == (1, 1, 10, 10)
    torch.testing.assert_close(out[0, 0], (torch.arange(5, 15) * 2 + 0.5).expand(10, 10), rtol=0, atol=1e-5)


def test_errors_name_the_file(clip, tmp_path):
    path, _ = clip
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(missing)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 50)
    with pytest.raises(MediaError, match="junk.mp4: cannot be decoded as a video"):
        read_video(junk, num_frames=2)
    with pytest.raises(MediaError, match="junk.png: cannot be decoded as an image"):
        read_image(junk.rename(tmp_path / "junk.png"))
    with pytest.raises(MediaError, match=r"clip.mp4.*40 frames.*41"):
        read_video(path, num_frames=41)
    with pytest.raises(MediaError, match=r"40 frames.*43 needed"):
        read_video(path, num_frames=8, stride=6)


def test_missing_video_extra_says_what_to_install(monkeypatch, clip):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(MissingDependency, match=r'reading videos needs the av \(PyAV\) package.*'
                                                r'pip install "tubevit_fast\[video\]"'):
        read_video(clip[0], num_frames=2)


def test_synthetic_is_deterministic_and_shaped():
    a, b = SyntheticShapes(8, seed=3), SyntheticShapes(8, seed=3)
    for i in range(8):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert torch.equal(xa, xb) and ya == yb
        if a.is_image(i):
            assert xa.shape == (3, 32, 32) and ya >= 4
        else:
            assert xa.shape == (3, 8, 32, 32) and 0 <= ya < 4
    assert not torch.equal(SyntheticShapes(8, seed=4)[0][0], a[0][0])
    assert num_tokens(SMALL_TUBES, (8, 32, 32)) == 64


def test_folder_dataset_reads_exported_synthetic(tmp_path):
    from tubevit_fast.app import synthetic

    data = synthetic.SyntheticShapes(8, 8, 32, seed=1)
    data.export(tmp_path)
    ann = load_annotations(tmp_path)
    folder = TrainClips(FileMedia(ann), ClipSampling(8))
    assert len(folder) == 8
    by_name = {p.rsplit("/", 1)[-1]: (i, y) for i, (p, y) in enumerate(ann.samples)}
    for i in range(8):
        frames, y_ref = data.render(i)
        expected = torch.from_numpy(frames).permute(3, 0, 1, 2)  # uint8 (3, T, H, W)
        index, y = by_name[f"{i:05d}.png" if data.is_image(i) else f"{i:05d}.mp4"]
        x, label = folder[(index, 0)]
        assert label == y and ann.classes[y] == data.classes[y_ref]
        expected = expected[:, 0] if data.is_image(i) else expected
        assert x.dtype == torch.uint8 and x.shape == expected.shape
        assert (x.float() - expected.float()).abs().mean() < 8  # the same pixels up to the codec
    img = read_image(tmp_path / ann.samples[by_name["00003.png"][0]][0], size=16)
    assert img.shape == (3, 16, 16)
    samples, labels, skipped = collate_train([folder[(0, 0)], folder[(3, 0)]])
    assert isinstance(samples, list) and labels.shape == (2,) and skipped == 0


def test_step_sampler_shards_and_resumes():
    full = list(StepBatchSampler(10, 2, seed=5, rank=0, world_size=2, start=0, stop=6))
    assert list(StepBatchSampler(10, 2, seed=5, rank=0, world_size=2, start=3, stop=6)) == full[3:]
    other = list(StepBatchSampler(10, 2, seed=5, rank=1, world_size=2, start=0, stop=2))
    # within one epoch the ranks' shards are disjoint and cover everything
    epoch0 = sum(full[:2], []) + sum(other, [])
    assert len(set(sum(full[:2], [])) & set(sum(other, []))) == 0
    assert len(epoch0) == 8
