"""The "torch" backend of tube_embed (tubevit_fast.torch_backend.tube_embed), called directly.

Every result is judged against a float64 golden computed here with one F.conv3d per tube on
the offset slice (independent of the reference module), with conftest's rule: error at most
2x that of the same conv3d computation in the test dtype, plus a small atol. Both gather routes
run here on CPU: "unfold" (the CPU default) and "index" (the CUDA default: one index_select per
tube over the batch).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_golden, dtype_atol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tubevit_fast.geometry import PAPER_TUBES, TubeSpec, token_offsets
from tubevit_fast.posembed import tube_position_embedding
from tubevit_fast.reference.tube_embed import tube_embed_reference
from tubevit_fast.torch_backend import tube_embed as te

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUTES = list(te.ROUTES)

SMALL_TUBES = (
    TubeSpec((2, 3, 3), (2, 4, 4), (0, 0, 0)),
    TubeSpec((4, 2, 2), (1, 3, 3), (1, 1, 2)),   # overlaps itself in time
    TubeSpec((1, 4, 4), (3, 4, 4), (0, 2, 0)),   # the 2D tube
    TubeSpec((3, 5, 3), (2, 2, 1), (2, 1, 3)),   # overlaps itself on every axis
)
SMALL_SIZE = (7, 11, 13)


# ---- golden and helpers -------------------------------------------------------------------

def conv_tokens(video, weights, biases, tubes, pos):
    """Conv3d per tube on the offset slice, flatten, transpose, cat, + pos (in the inputs' dtype)."""
    pieces = []
    for tube, w, b in zip(tubes, weights, biases):
        ot, oh, ow = tube.offset
        y = F.conv3d(video[:, :, ot:, oh:, ow:], w, b, stride=tube.stride)
        pieces.append(y.flatten(2).transpose(1, 2))
    out = torch.cat(pieces, 1)
    return out if pos is None else out + pos.to(out.dtype)


def conv_grads(video, weights, biases, tubes, pos, grad_out):
    """(out, dx, dWs, dbs) of conv_tokens through autograd, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (video, *weights, *biases)]
    n = len(weights)
    out = conv_tokens(leaves[0], leaves[1:1 + n], leaves[1 + n:], tubes, pos)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), grads[0], list(grads[1:1 + n]), list(grads[1 + n:])


def make_inputs(tubes, size, batch=2, channels=3, dim=12, dtype=torch.float32, seed=0, with_pos=True):
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, channels, *size, generator=gen)
    weights = [torch.randn(dim, channels, *t.kernel, generator=gen) / math.sqrt(t.patch_size(channels))
               for t in tubes]
    biases = [torch.randn(dim, generator=gen) for _ in tubes]
    pos = tube_position_embedding(tubes, size, dim) if with_pos and dim >= 6 else None
    cast = lambda t: t.to(dtype)
    return cast(video), [cast(w) for w in weights], [cast(b) for b in biases], pos


def check_all(video, weights, biases, tubes, pos, grad_out, dtype, need_dx=True, route=None):
    """Forward and every gradient of the torch backend (gather `route`) against the float64 golden."""
    golden = conv_grads(video.double(), [w.double() for w in weights], [b.double() for b in biases],
                        tubes, None if pos is None else pos.double(), grad_out.double())
    same = conv_grads(video, weights, biases, tubes, pos, grad_out)

    out = te.tube_embed_forward(video, weights, biases, pos, tubes, route)
    assert out.dtype == dtype and out.is_contiguous()
    dx, dws, dbs = te.tube_embed_backward(grad_out, video, weights, tubes, need_dx, route)
    if need_dx:
        assert dx.dtype == dtype
    else:
        assert dx is None

    def check(name, fast, gold, ref):
        scale = max(1.0, gold.abs().max().item()) if gold.numel() else 1.0
        assert_close_to_golden(fast, gold, ref, atol=dtype_atol(dtype, scale), name=name)

    check("output", out, golden[0], same[0])
    if need_dx:
        check("dx", dx, golden[1], same[1])
    for i in range(len(tubes)):
        assert dws[i].shape == weights[i].shape and dws[i].dtype == dtype
        assert dbs[i].shape == biases[i].shape and dbs[i].dtype == dtype
        check(f"dW[{i}]", dws[i], golden[2][i], same[2][i])
        check(f"db[{i}]", dbs[i], golden[3][i], same[3][i])


# ---- fixed cases --------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_forward_and_grads_small(dtype, with_pos, route):
    video, weights, biases, pos = make_inputs(SMALL_TUBES, SMALL_SIZE, dtype=dtype, with_pos=with_pos)
    n = token_offsets(SMALL_TUBES, SMALL_SIZE)[-1]
    grad_out = torch.randn(2, n, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_all(video, weights, biases, SMALL_TUBES, pos, grad_out, dtype, route=route)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paper_tubes_small_video(dtype, route):
    """The paper's four tubes (one overlapping itself in time) on the smallest video they fit."""
    size = (32, 40, 40)
    video, weights, biases, pos = make_inputs(PAPER_TUBES, size, batch=1, dim=8, dtype=dtype)
    n = token_offsets(PAPER_TUBES, size)[-1]
    grad_out = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    check_all(video, weights, biases, PAPER_TUBES, pos, grad_out, dtype, route=route)


@pytest.mark.parametrize("route", ROUTES)
def test_space_to_depth_tubes(route):
    """Merged tokens (each group's sampler tokens gathered side by side), forward and gradients,
    against the reference module's merge in float64 (conftest's rule, fp32)."""
    tubes = (TubeSpec((2, 3, 3), (2, 4, 4), (0, 0, 0), ("w", 2)), TubeSpec((4, 2, 2), (1, 3, 3), (1, 1, 2), ("t", 2)),
             TubeSpec((1, 4, 4), (3, 4, 4), (0, 2, 0), ("w", 3)))
    assert all(t.fits(SMALL_SIZE) for t in tubes)
    dim, gen = 6, torch.Generator().manual_seed(4)
    video = torch.randn(2, 3, *SMALL_SIZE, generator=gen)
    weights = [torch.randn(t.width(dim), 3, *t.kernel, generator=gen) / math.sqrt(t.patch_size(3)) for t in tubes]
    biases = [torch.randn(t.width(dim), generator=gen) for t in tubes]
    grad_out = torch.randn(2, token_offsets(tubes, SMALL_SIZE)[-1], dim, generator=gen)

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (video, *weights, *biases)]
        out = tube_embed_reference(leaves[0], leaves[1:4], leaves[4:], tubes)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dtype))]

    golden, same = reference(torch.float64), reference(torch.float32)
    out = te.tube_embed_forward(video, weights, biases, None, tubes, route)
    dx, dws, dbs = te.tube_embed_backward(grad_out, video, weights, tubes, True, route)
    for name, fast, g, r in zip(["out", "dx", "dW0", "dW1", "dW2", "db0", "db1", "db2"],
                                [out, dx, *dws, *dbs], golden, same):
        assert_close_to_golden(fast, g, r, atol=dtype_atol(torch.float32, max(1.0, g.abs().max().item())), name=name)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout", ["channels_last_3d", "sliced", "transposed_hw"])
def test_non_contiguous_video(layout, route):
    video, weights, biases, pos = make_inputs(SMALL_TUBES, SMALL_SIZE)
    if layout == "channels_last_3d":
        video = video.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        big = torch.randn(3, 5, SMALL_SIZE[0] + 1, SMALL_SIZE[1] + 2, 2 * SMALL_SIZE[2] + 1)
        video = big[1:, 1:4, 1:, 2:, 1::2]
    else:
        video = torch.randn(2, 3, SMALL_SIZE[0], SMALL_SIZE[2], SMALL_SIZE[1]).transpose(3, 4)
    assert not video.is_contiguous() and video.shape[2:] == SMALL_SIZE
    n = token_offsets(SMALL_TUBES, SMALL_SIZE)[-1]
    grad_out = torch.randn(video.shape[0], n, 12)
    check_all(video, weights, biases, SMALL_TUBES, pos, grad_out, torch.float32, route=route)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stride_zero_grad_out(dtype, route):
    """grad_out as autograd hands it over for out.sum() or out.mean(1): expanded, stride 0."""
    video, weights, biases, pos = make_inputs(SMALL_TUBES, SMALL_SIZE, dtype=dtype)
    n = token_offsets(SMALL_TUBES, SMALL_SIZE)[-1]
    for grad_out in (torch.ones((), dtype=dtype).expand(2, n, 12),
                     torch.randn(2, 1, 12).to(dtype).expand(2, n, 12)):
        assert 0 in grad_out.stride()
        check_all(video, weights, biases, SMALL_TUBES, pos, grad_out, dtype, route=route)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dx_with_overlapping_tubes(dtype):
    """Tubes that overlap each other and themselves (stride 1 and 2 < kernel) on every axis:
    dx sums the contributions of every window that read a pixel."""
    tubes = (TubeSpec((3, 3, 3), (1, 1, 1), (0, 0, 0)),
             TubeSpec((4, 5, 3), (2, 2, 1), (1, 0, 2)),
             TubeSpec((2, 2, 2), (1, 2, 1), (0, 1, 1)))
    size = (6, 8, 7)
    video, weights, biases, pos = make_inputs(tubes, size, dtype=dtype, dim=7)
    n = token_offsets(tubes, size)[-1]
    grad_out = torch.randn(2, n, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    check_all(video, weights, biases, tubes, pos, grad_out, dtype)
    # The same dx by hand in float64: every token's patch gradient added onto its pixels.
    dx, _, _ = te.tube_embed_backward(grad_out.double(), video.double(), [w.double() for w in weights],
                                      tubes, True)
    expected = torch.zeros(video.shape, dtype=torch.float64)
    starts = token_offsets(tubes, size)
    for i, tube in enumerate(tubes):
        nt, nh, nw = tube.grid(size)
        (kt, kh, kw), (st_, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
        for tok in range(nt * nh * nw):
            it, ih, iw = tok // (nh * nw), (tok // nw) % nh, tok % nw
            t0, h0, w0 = ot + it * st_, oh + ih * sh, ow + iw * sw
            g = torch.einsum("bd,dcthw->bcthw", grad_out[:, starts[i] + tok].double(), weights[i].double())
            expected[:, :, t0:t0 + kt, h0:h0 + kh, w0:w0 + kw] += g
    torch.testing.assert_close(dx, expected, rtol=1e-12, atol=1e-12)


def test_dx_is_deterministic():
    tubes = (TubeSpec((3, 3, 3), (1, 1, 1)), TubeSpec((2, 4, 4), (1, 2, 2), (1, 1, 1)))
    video, weights, _, _ = make_inputs(tubes, (6, 9, 9))
    grad_out = torch.randn(2, token_offsets(tubes, (6, 9, 9))[-1], 12)
    first = te.tube_embed_backward(grad_out, video, weights, tubes, True)
    for _ in range(3):
        again = te.tube_embed_backward(grad_out, video, weights, tubes, True)
        assert torch.equal(first[0], again[0])
        assert all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


def test_single_frame_video_with_2d_tubes():
    tubes = (TubeSpec((1, 4, 4), (1, 4, 4)), TubeSpec((1, 3, 5), (1, 2, 3), (0, 1, 1)))
    video, weights, biases, pos = make_inputs(tubes, (1, 12, 13))
    grad_out = torch.randn(2, token_offsets(tubes, (1, 12, 13))[-1], 12)
    check_all(video, weights, biases, tubes, pos, grad_out, torch.float32)


def test_output_fully_written(monkeypatch):
    """torch.empty returns NaN-poisoned memory: every output element must be overwritten."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    video, weights, biases, pos = make_inputs(SMALL_TUBES, SMALL_SIZE)
    for p in (pos, None):
        out = te.tube_embed_forward(video, weights, biases, p, SMALL_TUBES)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tube,size,offset", [
    (TubeSpec((2, 4, 8), (3, 5, 8), (1, 2, 8)), (7, 12, 40), 0),   # 16-byte (or wider) rows
    (TubeSpec((2, 3, 4), (3, 5, 4), (0, 1, 4)), (5, 9, 20), 0),    # 8 or 16 bytes per row
    (TubeSpec((2, 3, 4), (3, 5, 4), (0, 1, 4)), (5, 9, 20), 1),    # misaligned storage: no wide view
    (TubeSpec((1, 2, 3), (1, 2, 3), (0, 0, 1)), (2, 6, 10), 0),    # odd rows: no wide view
])
def test_patches_bit_exact(dtype, tube, size, offset, route):
    """The wide-element gather moves bits: equal to a plain indexing gather, NaN and -0 included."""
    raw = torch.randn(2 * 3 * math.prod(size) + offset).to(dtype)
    raw[::7] = float("nan")
    raw[1::11] = -0.0
    video = raw[offset:].view(2, 3, *size)
    got = te.patches(video, tube, route)
    nt, nh, nw = tube.grid(size)
    (kt, kh, kw), (st_, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
    rows = []
    for it in range(nt):
        for ih in range(nh):
            for iw in range(nw):
                t0, h0, w0 = ot + it * st_, oh + ih * sh, ow + iw * sw
                rows.append(video[:, :, t0:t0 + kt, h0:h0 + kh, w0:w0 + kw].reshape(2, -1))
    expected = torch.stack(rows, 1)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_paper_tubes_use_the_wide_gather():
    """The paper's tubes are 16-byte aligned on a contiguous fp32 video: all four take the fast path."""
    video = torch.zeros(1, 3, 32, 64, 64)
    assert [te._wide_view(video, tube)[1] for tube in PAPER_TUBES] == [4, 4, 4, 4]


def test_batch_of_one_and_batch_of_three():
    for batch in (1, 3):
        video, weights, biases, pos = make_inputs(SMALL_TUBES, SMALL_SIZE, batch=batch)
        grad_out = torch.randn(batch, token_offsets(SMALL_TUBES, SMALL_SIZE)[-1], 12)
        check_all(video, weights, biases, SMALL_TUBES, pos, grad_out, torch.float32)


# ---- random geometries --------------------------------------------------------------------

@st.composite
def geometries(draw):
    """(tubes, size): 1..5 random tubes that fit, sometimes a single frame with 2D tubes only."""
    single_frame = draw(st.booleans()) and draw(st.booleans())
    ntubes = draw(st.integers(1, 5))
    tubes = []
    for _ in range(ntubes):
        kt = 1 if single_frame else draw(st.integers(1, 4))
        kernel = [kt, draw(st.integers(1, 5)), draw(st.integers(1, 5))]
        stride = [draw(st.integers(1, 4)) for _ in range(3)]
        ot = 0 if single_frame else draw(st.integers(0, 3))
        offset = [ot, draw(st.integers(0, 3)), draw(st.integers(0, 3))]
        tubes.append(TubeSpec(tuple(kernel), tuple(stride), tuple(offset)))
    need = [max(t.offset[a] + t.kernel[a] for t in tubes) for a in range(3)]
    size = (1 if single_frame else need[0] + draw(st.integers(0, 4)),
            need[1] + draw(st.integers(0, 6)), need[2] + draw(st.integers(0, 6)))
    return tuple(tubes), size


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=geometries(), channels=st.integers(1, 4), dim=st.integers(1, 9), batch=st.integers(1, 2),
       dtype=st.sampled_from(DTYPES), with_pos=st.booleans(), seed=st.integers(0, 2**16),
       route=st.sampled_from(ROUTES))
def test_random_geometries(geometry, channels, dim, batch, dtype, with_pos, seed, route):
    tubes, size = geometry
    video, weights, biases, pos = make_inputs(tubes, size, batch=batch, channels=channels, dim=dim,
                                              dtype=dtype, seed=seed, with_pos=with_pos)
    n = token_offsets(tubes, size)[-1]
    grad_out = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    check_all(video, weights, biases, tubes, pos, grad_out, dtype, need_dx=seed % 4 != 0, route=route)


def test_route_by_device_and_bad_route():
    """CUDA gathers with the index route, CPU keeps the unfold copies (its measured fast path);
    an unknown route is a clear error."""
    assert te.default_route(torch.device("cuda")) == "index"
    assert te.default_route(torch.device("cpu")) == "unfold"
    video, weights, biases, pos = make_inputs(SMALL_TUBES, SMALL_SIZE)
    with pytest.raises(ValueError, match="gather route"):
        te.tube_embed_forward(video, weights, biases, pos, SMALL_TUBES, "gather")


def test_index_route_gathers_once_per_tube(monkeypatch):
    """The index route is one index_select per tube over the whole batch, from a cached index."""
    calls = []
    real = torch.Tensor.index_select

    def counting(self, dim, index):
        calls.append((tuple(self.shape), dim, index.numel()))
        return real(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", counting)
    video, weights, biases, pos = make_inputs(PAPER_TUBES, (32, 40, 40), batch=2, dim=8)
    te.tube_embed_forward(video, weights, biases, pos, PAPER_TUBES, "index")
    assert len(calls) == len(PAPER_TUBES) and all(shape[0] == 2 and dim == 1 for shape, dim, _ in calls)
    # 16-byte rows on a contiguous fp32 video: 4 pixels per gathered element.
    assert [n for _, _, n in calls] == [t.num_tokens((32, 40, 40)) * t.patch_size(3) // 4 for t in PAPER_TUBES]
