import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tubevit_fast.geometry import (PAPER_TUBES, TubeSpec, as_tubes, check_fits, image_tubes, num_tokens,
                                   pack_tubes, pixel_fraction, read_mask, spread_to_pixels, token_centres,
                                   token_offsets, unpack_tubes)

triples = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6))
offsets = st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4))
sizes = st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20))


@settings(max_examples=60, deadline=None)
@given(kernel=triples, stride=triples, offset=offsets, size=sizes)
def test_grid_matches_conv3d_output_shape(kernel, stride, offset, size):
    tube = TubeSpec(kernel, stride, offset)
    ot, oh, ow = offset
    x = torch.empty(1, 1, *size, device="meta")[:, :, ot:, oh:, ow:]
    w = torch.empty(1, 1, *kernel, device="meta")
    if not tube.fits(size):
        assert tube.num_tokens(size) == 0
        with pytest.raises(ValueError, match="too small for tube 0"):
            check_fits([tube], size)
        return
    assert tuple(F.conv3d(x, w, stride=stride).shape[2:]) == tube.grid(size)


def test_paper_token_counts():
    assert [t.num_tokens((32, 224, 224)) for t in PAPER_TUBES] == [98, 147, 98, 196]
    assert num_tokens(PAPER_TUBES, (32, 224, 224)) == 539
    assert num_tokens(PAPER_TUBES, (64, 224, 224)) == 1176
    assert num_tokens(image_tubes(PAPER_TUBES), (1, 224, 224)) == 196
    assert token_offsets(PAPER_TUBES, (32, 224, 224)) == [0, 98, 245, 343, 539]


def test_paper_tubes_are_the_papers():
    assert [t.kernel for t in PAPER_TUBES] == [(8, 8, 8), (16, 4, 4), (4, 12, 12), (1, 16, 16)]
    assert [t.stride for t in PAPER_TUBES] == [(16, 32, 32), (6, 32, 32), (16, 32, 32), (32, 16, 16)]
    assert [t.offset for t in PAPER_TUBES] == [(0, 0, 0), (4, 8, 8), (0, 16, 16), (0, 0, 0)]
    assert [t.overlaps_itself() for t in PAPER_TUBES] == [False, True, False, False]


@settings(max_examples=40, deadline=None)
@given(tubes=st.lists(st.tuples(triples, triples, offsets), min_size=1, max_size=4), size=sizes)
def test_read_mask_matches_conv3d_input_gradient(tubes, size):
    """The pixels a tube reads are exactly those with a non-zero Conv3d input gradient."""
    tubes = [TubeSpec(*t) for t in tubes]
    x = torch.zeros(1, 1, *size, dtype=torch.float64, requires_grad=True)
    total = x.sum() * 0
    for tube in tubes:
        if tube.fits(size):
            ot, oh, ow = tube.offset
            total = total + F.conv3d(x[:, :, ot:, oh:, ow:], torch.ones(1, 1, *tube.kernel, dtype=torch.float64),
                                     stride=tube.stride).sum()
    (grad,) = torch.autograd.grad(total, x, allow_unused=True)
    expected = (grad[0, 0] != 0).numpy() if grad is not None else torch.zeros(size, dtype=torch.bool).numpy()
    assert (read_mask(tubes, size) == expected).all()
    for tube in tubes:
        frames, rows, cols = tube.footprint(size)
        mask = read_mask([tube], size)
        assert sorted(frames.tolist()) == sorted(set(mask.nonzero()[0].tolist()))
        assert sorted(rows.tolist()) == sorted(set(mask.nonzero()[1].tolist()))
        assert sorted(cols.tolist()) == sorted(set(mask.nonzero()[2].tolist()))


def test_paper_config_reads_a_small_fraction_of_pixels():
    fraction = pixel_fraction(PAPER_TUBES, (32, 224, 224))
    assert 0.05 < fraction < 0.15, fraction  # the sparsity the fused gather exploits


def test_token_centres_follow_offset_stride_kernel():
    centres = token_centres(PAPER_TUBES, (32, 224, 224))
    assert centres.shape == (539, 3)
    assert centres[0].tolist() == [3.5, 3.5, 3.5]
    # tube 2, grid index (1, 2, 3): o + i * s + (k - 1) / 2 per axis
    nt, nh, nw = PAPER_TUBES[1].grid((32, 224, 224))
    assert centres[98 + (1 * nh + 2) * nw + 3].tolist() == [4 + 6 + 7.5, 8 + 64 + 1.5, 8 + 96 + 1.5]


def test_image_tubes_drop_temporal_offset():
    tubes = image_tubes([TubeSpec((2, 2, 2), (2, 2, 2)), TubeSpec((1, 4, 4), (3, 4, 4), (5, 1, 2))])
    assert tubes == (TubeSpec((1, 4, 4), (3, 4, 4), (0, 1, 2)),)
    with pytest.raises(ValueError, match="temporal kernel of 1"):
        image_tubes([TubeSpec((2, 2, 2), (2, 2, 2))])


def test_pack_roundtrip():
    assert unpack_tubes(pack_tubes(PAPER_TUBES)) == PAPER_TUBES


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel=(0, 2, 2), stride=(1, 1, 1)), ValueError, "kernel entries must be >= 1"),
    (dict(kernel=(2, -1, 2), stride=(1, 1, 1)), ValueError, "kernel"),
    (dict(kernel=(2, 2, 2), stride=(1, 0, 1)), ValueError, "stride entries must be >= 1"),
    (dict(kernel=(2, 2, 2), stride=(1, 1, 1), offset=(0, -1, 0)), ValueError, "offset"),
    (dict(kernel=(2, 2), stride=(1, 1, 1)), TypeError, r"kernel must be three ints"),
    (dict(kernel=(2, 2, 2.5), stride=(1, 1, 1)), TypeError, r"2\.5"),
    (dict(kernel=8, stride=(1, 1, 1)), TypeError, "kernel must be three ints"),
])
def test_tubespec_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        TubeSpec(**kwargs)


def test_empty_or_foreign_tube_list():
    with pytest.raises(ValueError, match="empty"):
        as_tubes([])
    with pytest.raises(TypeError, match="tube 1 must be a TubeSpec"):
        as_tubes([PAPER_TUBES[0], (8, 8, 8)])


# ---- space-to-depth ---------------------------------------------------------------------------

@st.composite
def _merged_tubes(draw):
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(3))
    stride = tuple(draw(st.integers(1, 4)) for _ in range(3))
    offset = tuple(draw(st.integers(0, 3)) for _ in range(3))
    merge = (draw(st.sampled_from([0, 1, 2, "t", "h", "w"])), draw(st.integers(2, 4)))
    size = tuple(draw(st.integers(1, 24)) for _ in range(3))
    return TubeSpec(kernel, stride, offset, merge), size


@settings(max_examples=200, deadline=None)
@given(_merged_tubes())
def test_space_to_depth_geometry(case):
    """Merged grid, centres, footprint and min_size against the plain sampler they come from."""
    tube, size = case
    plain = TubeSpec(tube.kernel, tube.stride, tube.offset)
    f = tube.factors
    assert tube.merge == max(f) and sorted(f)[:2] == [1, 1]
    full = plain.grid(size)
    assert tube.sampler_grid(size) == tuple(n // k * k for n, k in zip(full, f))
    assert tube.grid(size) == tuple(n // k for n, k in zip(full, f))
    assert tube.fits(size) == all(n >= k for n, k in zip(full, f))
    assert TubeSpec(tube.kernel, tube.stride, tube.offset, tube.space_to_depth).fits(tube.min_size())
    axis = tube.space_to_depth[0]
    smaller = list(tube.min_size())
    smaller[axis] -= 1
    assert not tube.fits(smaller)
    if not tube.fits(size):
        return
    # A merged token's centre is the mean of its group's sampler-token centres.
    for a, (merged, sampler) in enumerate(zip(tube.centres(size), plain.centres(size))):
        groups = sampler[:len(merged) * f[a]].reshape(len(merged), f[a]).mean(1)
        np.testing.assert_allclose(merged, groups, rtol=0, atol=1e-12)
    # The footprint leaves out the pixels only a dropped partial group would read.
    cut = TubeSpec(tube.kernel, tube.stride, tube.offset)
    kept = [o + (n - 1) * s + k for o, n, s, k in zip(tube.offset, tube.sampler_grid(size), tube.stride, tube.kernel)]
    for a, read in enumerate(tube.footprint(size)):
        assert read.max() == kept[a] - 1 and set(read) <= set(cut.footprint(size)[a])
    assert unpack_tubes(pack_tubes([tube, plain])) == (tube, plain)


def test_space_to_depth_bad_values():
    with pytest.raises(ValueError, match="axis"):
        TubeSpec((1, 2, 2), (1, 2, 2), space_to_depth=("x", 2))
    with pytest.raises(ValueError, match="factor"):
        TubeSpec((1, 2, 2), (1, 2, 2), space_to_depth=(1, 1))
    with pytest.raises(TypeError, match=r"\(axis, factor\)"):
        TubeSpec((1, 2, 2), (1, 2, 2), space_to_depth=2)
    with pytest.raises(ValueError, match="more than one axis"):
        unpack_tubes([1, 2, 2, 1, 2, 2, 0, 0, 0, 2, 2, 1])
    with pytest.raises(ValueError, match="not divisible"):
        TubeSpec((1, 2, 2), (1, 2, 2), space_to_depth=("w", 3)).width(32)
    assert not TubeSpec((1, 2, 2), (1, 2, 2), space_to_depth=("t", 2)).is_2d
    assert TubeSpec((1, 2, 2), (1, 2, 2), space_to_depth=("h", 2)).as_image_tube().space_to_depth == (1, 2)


@pytest.mark.parametrize("tubes, size", [
    ((TubeSpec((3, 4, 2), (2, 3, 5), (1, 0, 2)),), (9, 11, 13)),  # overlaps itself in t and h
    ((TubeSpec((2, 3, 3), (2, 2, 4), (0, 1, 0), space_to_depth=(2, 2)), TubeSpec((1, 4, 4), (3, 4, 4))),
     (7, 12, 20)),
    ((TubeSpec((1, 2, 2), (1, 3, 3), space_to_depth=(0, 3)), TubeSpec((9, 9, 9), (1, 1, 1))),
     (8, 7, 7)),  # the second tube does not fit: no tokens
], ids=["overlapping", "space-to-depth-w+2d", "space-to-depth-t+empty"])
def test_spread_to_pixels_sums_each_tokens_value_over_its_patch(tubes, size):
    values = np.random.default_rng(len(tubes)).standard_normal(num_tokens(tubes, size))
    golden, start = np.zeros(size), 0
    for tube in tubes:  # every sampler token, its merged output token by explicit index maths
        (kt, kh, kw), (st_, sh, sw) = tube.kernel, tube.stride
        (ot, oh, ow), (ft, fh, fw) = tube.offset, tube.factors
        n = [((L - o - k) // s + 1) // f * f if L >= o + k else 0
             for L, k, s, o, f in zip(size, tube.kernel, tube.stride, tube.offset, tube.factors)]
        for it in range(n[0]):
            for ih in range(n[1]):
                for iw in range(n[2]):
                    token = ((it // ft) * (n[1] // fh) + ih // fh) * (n[2] // fw) + iw // fw
                    golden[ot + it * st_:ot + it * st_ + kt, oh + ih * sh:oh + ih * sh + kh,
                           ow + iw * sw:ow + iw * sw + kw] += values[start + token]
        start += tube.num_tokens(size)
    np.testing.assert_allclose(spread_to_pixels(tubes, size, values), golden, rtol=0, atol=1e-12)
    assert ((spread_to_pixels(tubes, size, np.ones(len(values))) > 0) == read_mask(tubes, size)).all()
    with pytest.raises(ValueError, match="one value per token"):
        spread_to_pixels(tubes, size, values[1:])
