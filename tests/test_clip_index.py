"""tubevit_fast.app.clip_index: the index agrees with a full decode, and its cache is used only
while a file is unchanged."""
from __future__ import annotations

import json
import os
import struct
import warnings

import numpy as np
import pytest

av = pytest.importorskip("av")

from _video_clips import write_clip  # noqa: E402
from tubevit_fast.app import clip_index  # noqa: E402
from tubevit_fast.app.clip_index import build_clip_index  # noqa: E402
from tubevit_fast.io import MediaError  # noqa: E402


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("index")
    vfr = np.cumsum(np.random.default_rng(3).integers(15, 70, 33))
    paths = [write_clip(folder / "a.mp4", 30, gop=8, bframes=3),
             write_clip(folder / "b.mkv", 25, gop=12, bframes=2),
             write_clip(folder / "vfr.mp4", 33, gop=10, bframes=2, timestamps=vfr)]
    avi = write_clip(folder / "lies.avi", 21, codec="mpeg4", gop=6)
    data = bytearray(open(avi, "rb").read())
    strh = data.find(b"strh")
    data[strh + 8 + 32:strh + 8 + 36] = struct.pack("<I", 500)  # the stream header's frame count
    open(avi, "wb").write(bytes(data))
    return paths + [avi]


def _full_decode_facts(path):
    """(frame count, every frame's pts, keyframe indices) from a plain decode of every frame."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        key_pts = {p.pts for p in container.demux(stream) if p.is_keyframe}
    with av.open(path) as container:
        pts = [f.pts for f in container.decode(video=0)]
    return len(pts), pts, [i for i, p in enumerate(pts) if p in key_pts]


def test_index_agrees_with_a_full_decode(videos):
    with av.open(videos[-1]) as container:
        assert container.streams.video[0].frames == 500  # the AVI header lies
    index = build_clip_index(videos, progress=False, workers=2)
    assert list(index) == [os.path.abspath(p) for p in videos]
    for path in videos:
        info = index[os.path.abspath(path)]
        count, pts, keyframes = _full_decode_facts(path)
        assert info.num_frames == count
        assert list(info.keyframes) == keyframes and keyframes[0] == 0
        assert info.timestamps() == pts
        assert (info.height, info.width) == (48, 64)
        assert info.fps > 0
    assert index[os.path.abspath(videos[2])].pts, "the VFR clip keeps every timestamp"
    assert not index[os.path.abspath(videos[0])].pts, "an evenly spaced clip keeps two numbers"


def _count_probes(monkeypatch) -> list[str]:
    probed = []
    original = clip_index._probe_one

    def counting(path):
        probed.append(os.path.basename(path))
        return original(path)

    monkeypatch.setattr(clip_index, "_probe_one", counting)
    return probed


def test_cache_hit_change_and_damage(videos, tmp_path, monkeypatch):
    probed = _count_probes(monkeypatch)
    cache = tmp_path / "index.json"
    paths = [str(tmp_path / "one.mp4"), str(tmp_path / "two.mp4")]
    write_clip(paths[0], 20, gop=5)
    write_clip(paths[1], 24, gop=5)
    first = build_clip_index(paths, cache_file=cache, progress=False, workers=0)
    assert sorted(probed) == ["one.mp4", "two.mp4"] and cache.exists()

    probed.clear()
    assert build_clip_index(paths, cache_file=cache, progress=False, workers=0) == first
    assert probed == []  # every file from the cache

    # a changed file (same name, other frames: another size and mtime) is probed again
    write_clip(paths[1], 31, gop=5, seed=9)
    again = build_clip_index(paths, cache_file=cache, progress=False, workers=0)
    assert probed == ["two.mp4"]
    assert again[paths[1]].num_frames == 31 and again[paths[0]] == first[paths[0]]
    # the same size but a new mtime is enough
    probed.clear()
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    build_clip_index(paths, cache_file=cache, progress=False, workers=0)
    assert probed == ["one.mp4"]

    for damage in (b"{not json", b'{"version": 1, "videos": {"x": {"stamp": 3}}}', b"\x00\xff" * 10):
        cache.write_bytes(damage)
        probed.clear()
        with pytest.warns(UserWarning, match="cannot be read.*rebuilding"):
            rebuilt = build_clip_index(paths, cache_file=cache, progress=False, workers=0)
        assert sorted(probed) == ["one.mp4", "two.mp4"]
        assert rebuilt[paths[1]].num_frames == 31
        assert json.loads(cache.read_text())["version"] == clip_index.CACHE_VERSION


def test_bad_files(videos, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(MediaError, match=r"1 of 3 videos cannot be decoded, e.g. .*junk.mp4"):
        build_clip_index([videos[0], junk, videos[1]], progress=False, workers=0)
    cache = tmp_path / "index.json"
    with pytest.warns(UserWarning, match=r"skipping 1 of 3 videos.*junk.mp4"):
        index = build_clip_index([videos[0], junk, videos[1]], cache_file=cache, progress=False, workers=2,
                                 bad_files="skip")
    assert list(index) == [os.path.abspath(videos[0]), os.path.abspath(videos[1])]
    assert os.path.abspath(junk) not in json.loads(cache.read_text())["videos"]
    with pytest.raises(FileNotFoundError, match=r"1 video files do not exist, e.g. .*nope.mp4"):
        build_clip_index([videos[0], tmp_path / "nope.mp4"], progress=False)
    with pytest.raises(ValueError, match="bad_files must be one of"):
        build_clip_index(videos, bad_files="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_clip_index([], progress=False) == {}
