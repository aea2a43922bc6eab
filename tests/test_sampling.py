"""Clip sampling (tubevit_fast/app/sampling.py) against the formulas written out with exact fractions."""
from fractions import Fraction
from math import floor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tubevit_fast.app.sampling import ClipSampling, item_rng

videos = st.integers(1, 80)          # frames in the video, including clips shorter than the window
clip_frames = st.integers(1, 12)
strides = st.integers(1, 5)
seeds = st.integers(0, 2 ** 32)


@settings(max_examples=200, deadline=None)
@given(n=videos, f=clip_frames, stride=strides, seed=seeds)
def test_window_train_is_a_clamped_window_with_a_start_in_range(n, f, stride, seed):
    idx = ClipSampling(f, stride).train_indices(n, np.random.default_rng(seed))
    span = (f - 1) * stride + 1
    start = idx[0]
    assert 0 <= start <= max(n - span, 0)
    assert idx == [min(start + i * stride, n - 1) for i in range(f)]


def test_window_train_start_covers_every_position():
    n, f, stride = 12, 3, 2                                   # starts 0..7
    starts = {ClipSampling(f, stride).train_indices(n, np.random.default_rng(s))[0] for s in range(400)}
    assert starts == set(range(8))


@settings(max_examples=200, deadline=None)
@given(n=videos, f=clip_frames, seed=seeds)
def test_segments_train_takes_one_frame_in_each_segment(n, f, seed):
    idx = ClipSampling(f, mode="segments").train_indices(n, np.random.default_rng(seed))
    assert len(idx) == f
    for i, frame in enumerate(idx):
        lo, hi = floor(Fraction(i * n, f)), floor(Fraction((i + 1) * n, f))
        if hi > lo:
            assert lo <= frame < hi
        else:                                                  # an empty segment (n < f)
            assert frame == min(lo, n - 1)


def test_segments_train_draws_every_frame_of_a_segment():
    seen = {ClipSampling(2, mode="segments").train_indices(10, np.random.default_rng(s))[1] for s in range(300)}
    assert seen == {5, 6, 7, 8, 9}


@settings(max_examples=200, deadline=None)
@given(n=videos, f=clip_frames, stride=strides, clips=st.integers(1, 6))
def test_window_eval_clips_are_evenly_spaced(n, f, stride, clips):
    span = (f - 1) * stride + 1
    starts = max(n - span, 0) + 1                              # possible start positions
    expected = [[min(floor((k + Fraction(1, 2)) * starts / clips) + i * stride, n - 1) for i in range(f)]
                for k in range(clips)]
    assert ClipSampling(f, stride).eval_indices(n, clips) == expected


@settings(max_examples=200, deadline=None)
@given(n=videos, f=clip_frames, clips=st.integers(1, 6))
def test_segments_eval_takes_evenly_spaced_points_of_each_segment(n, f, clips):
    expected = [[min(floor((i + (k + Fraction(1, 2)) / clips) * n / f), n - 1) for i in range(f)]
                for k in range(clips)]
    assert ClipSampling(f, mode="segments").eval_indices(n, clips) == expected


def test_hand_computed_cases():
    assert ClipSampling(4, mode="segments").eval_indices(10) == [[1, 3, 6, 8]]      # segment centres
    assert ClipSampling(4, stride=2).eval_indices(5) == [[0, 2, 4, 4]]              # short: last frame repeats
    assert ClipSampling(2, stride=3).eval_indices(10, clips=2) == [[1, 4], [5, 8]]  # starts 0..6: 7/4, 21/4
    assert ClipSampling(3).train_indices(1, np.random.default_rng(0)) == [0, 0, 0]


def test_item_rng_is_a_function_of_seed_epoch_index():
    draw = [item_rng(3, 1, 7).integers(1 << 30, size=4).tolist() for _ in range(2)]
    assert draw[0] == draw[1]
    others = {tuple(item_rng(*key).integers(1 << 30, size=4)) for key in [(3, 1, 7), (3, 2, 7), (3, 1, 8), (4, 1, 7)]}
    assert len(others) == 4


def test_round_trip_and_bad_values():
    s = ClipSampling(16, stride=4, mode="window")
    assert ClipSampling.from_dict(s.to_dict()) == s and s.to_dict() == {"frames": 16, "stride": 4, "mode": "window"}
    for kwargs, message in [(dict(frames=0), "frames"), (dict(frames=4, stride=0), "stride"),
                            (dict(frames=4, mode="dense"), "mode"), (dict(frames=4, stride=2, mode="segments"),
                                                                     "segments sampling takes no stride")]:
        with pytest.raises(ValueError, match=message):
            ClipSampling(**kwargs)
    with pytest.raises(ValueError, match="unknown clip sampling fields"):
        ClipSampling.from_dict({"frames": 4, "fps": 2})
    with pytest.raises(ValueError, match="at least 1 frame"):
        s.train_indices(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="clips"):
        s.eval_indices(30, clips=0)
