"""Fused Triton tube-embedding kernels (kernels/tube_embed.py) against a float64 golden result.

Without a GPU these run the kernels through the Triton interpreter on CPU tensors (conftest
sets TRITON_INTERPRET=1), so shapes stay tiny. bf16 is not tested here: the interpreter's
bf16 tl.dot is wrong; the AOT audit compiles the bf16 kernels instead.
"""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TRITON_DEVICE, assert_close_to_golden, dtype_atol
from tubevit_fast.geometry import PAPER_TUBES, TubeSpec, num_tokens
from tubevit_fast.kernels import tube_embed as te
from tubevit_fast.reference.tube_embed import tube_embed_reference

pytestmark = pytest.mark.interpreter

# Overlapping tokens (tube 0, every axis), offsets, a kt == 1 tube, odd sizes; 36 + 12 + 12 tokens
# on (4, 9, 10).
MIXED_TUBES = (
    TubeSpec(kernel=(2, 3, 3), stride=(1, 2, 2), offset=(0, 1, 0)),
    TubeSpec(kernel=(1, 4, 3), stride=(2, 3, 4), offset=(1, 0, 2)),
    TubeSpec(kernel=(3, 2, 4), stride=(2, 4, 3), offset=(0, 2, 1)),
)


def _make_inputs(tubes, B, C, size, dim, with_pos=True, seed=0):
    """float64 video, weights, biases and float32 pos; weights scaled so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, C, *size, generator=g, dtype=torch.float64)
    weights = [torch.randn(t.width(dim), C, *t.kernel, generator=g, dtype=torch.float64)
               / math.sqrt(t.patch_size(C)) for t in tubes]
    biases = [torch.randn(t.width(dim), generator=g, dtype=torch.float64) for t in tubes]
    pos = torch.randn(num_tokens(tubes, size), dim, generator=g, dtype=torch.float32) if with_pos else None
    return video, weights, biases, pos


def _reference(video, weights, biases, pos, tubes, grad_out, dtype, input_grad=True):
    """PyTorch's own result (forward and grads) with every input cast to `dtype`."""
    x = video.detach().to("cpu", dtype, copy=True).requires_grad_(input_grad)
    ws = [w.detach().to(dtype, copy=True).requires_grad_() for w in weights]
    bs = [b.detach().to(dtype, copy=True).requires_grad_() for b in biases]
    out = tube_embed_reference(x, ws, bs, tubes, None if pos is None else pos.to(dtype))
    out.backward(grad_out.to("cpu", dtype))
    return out.detach(), (x.grad if input_grad else None), [w.grad for w in ws], [b.grad for b in bs]


def _fast(video, weights, biases, pos, tubes, grad_out, dtype, input_grad=True):
    # .to() is a no-op for tensors already on the device in `dtype`: strided views stay views.
    dev = TRITON_DEVICE
    x = video.to(device=dev, dtype=dtype)
    ws = [w.to(device=dev, dtype=dtype) for w in weights]
    bs = [b.to(device=dev, dtype=dtype) for b in biases]
    p = None if pos is None else pos.to(dev)
    out = te.tube_embed_forward(x, ws, bs, p, tubes)
    gx, gw, gb = te.tube_embed_backward(grad_out.to(device=dev, dtype=dtype), x, ws, tubes, input_grad)
    return out, gx, gw, gb


def _check(tubes, B, C, size, dim, dtype, *, video=None, grad_out=None, with_pos=True, input_grad=True,
           seed=0):
    """Forward and every gradient within 2x PyTorch's own error (same dtype) of float64."""
    base, weights, biases, pos = _make_inputs(tubes, B, C, size, dim, with_pos, seed)
    video = base if video is None else video
    n = num_tokens(tubes, size)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed + 1)
        grad_out = torch.randn(B, n, dim, generator=g, dtype=torch.float64)
    golden = _reference(video, weights, biases, pos, tubes, grad_out, torch.float64, input_grad)
    same = _reference(video, weights, biases, pos, tubes, grad_out, dtype, input_grad)
    fast = _fast(video, weights, biases, pos, tubes, grad_out, dtype, input_grad)

    def close(f, g, s, name):
        assert f.dtype == dtype and f.device.type == TRITON_DEVICE.type, name
        atol = dtype_atol(dtype, max(1.0, g.abs().max().item()))
        assert_close_to_golden(f.cpu(), g, s, atol=atol, name=name)

    close(fast[0], golden[0], same[0], "out")
    if input_grad:
        close(fast[1], golden[1], same[1], "grad_video")
    else:
        assert fast[1] is None
    for i in range(len(tubes)):
        assert fast[2][i].shape == weights[i].shape
        close(fast[2][i], golden[2][i], same[2][i], f"grad_weight[{i}]")
        close(fast[3][i], golden[3][i], same[3][i], f"grad_bias[{i}]")
    return fast


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors: any element the kernels leave unwritten shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_tubes_forward_and_grads(dtype, poisoned_empty):
    # dim 20: two dim tiles, the second partly masked; K = 54, 36, 72: several K tiles.
    _check(MIXED_TUBES, 2, 3, (4, 9, 10), 20, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_space_to_depth_tubes(dtype, poisoned_empty):
    # Widths 10, 10, 20: the narrow tubes skip the second dim tile; merges along w and t.
    m0, m1, m2 = MIXED_TUBES
    tubes = (TubeSpec(m0.kernel, m0.stride, m0.offset, ("w", 2)), TubeSpec(m1.kernel, m1.stride, m1.offset, ("t", 2)),
             m2)
    _check(tubes, 2, 3, (4, 9, 10), 20, dtype)


def test_eight_tubes():
    # The largest tube count the op takes: the tile -> tube scan runs over all eight rows.
    tubes = tuple(TubeSpec((1 + i % 2, 2 + i % 3, 3 - i % 2), (2, 2 + i % 2, 3), (i % 2, i % 3, 0))
                  for i in range(8))
    _check(tubes, 1, 2, (4, 8, 8), 16, torch.float32, seed=17)


def test_tube_without_tokens(poisoned_empty):
    """A tube too large for this video gives no tokens; the others are unaffected, its weight and
    bias gradients are zeros, and no kernel divides by its token count (the interpreter's numpy
    would warn; a GPU would read outside the row tables)."""
    size = (4, 9, 10)
    tubes = (MIXED_TUBES[0], TubeSpec((5, 2, 2), (1, 2, 2)), MIXED_TUBES[1])
    assert [t.num_tokens(size) for t in tubes][1] == 0
    video, weights, biases, pos = _make_inputs(tubes, 2, 3, size, 16, seed=29)
    x = video.float().to(TRITON_DEVICE)
    ws = [w.float().to(TRITON_DEVICE) for w in weights]
    bs = [b.float().to(TRITON_DEVICE) for b in biases]
    grad = torch.randn(2, num_tokens(tubes, size), 16, device=TRITON_DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = te.tube_embed_forward(x, ws, bs, pos.to(TRITON_DEVICE), tubes)
        gx, gw, gb = te.tube_embed_backward(grad, x, ws, tubes, True)
    fitting = (tubes[0], tubes[2])
    ref = te.tube_embed_forward(x, [ws[0], ws[2]], [bs[0], bs[2]], pos.to(TRITON_DEVICE), fitting)
    rgx, rgw, rgb = te.tube_embed_backward(grad, x, [ws[0], ws[2]], fitting, True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rgx)
    for got, want in zip(gw[::2] + gb[::2], rgw + rgb):
        torch.testing.assert_close(got, want)
    assert not gw[1].any() and not gb[1].any()


def test_no_pos_no_input_grad():
    _check(MIXED_TUBES[:2], 1, 2, (4, 8, 9), 16, torch.float32, with_pos=False, input_grad=False, seed=3)


def _tube_strategy(size, dim):
    """A random tube that fits in `size` (kt == 1 when T == 1), sometimes with space-to-depth
    (a factor dividing dim, along an axis with room for a whole group)."""
    @st.composite
    def tube(draw):
        kernel, stride, offset = [], [], []
        for axis, length in enumerate(size):
            k = 1 if length == 1 else draw(st.integers(1, min(4, length)))
            o = draw(st.integers(0, length - k))
            s = draw(st.integers(1, 4))
            kernel.append(k)
            stride.append(s)
            offset.append(o)
        plain = TubeSpec(tuple(kernel), tuple(stride), tuple(offset))
        merges = [(axis, f) for axis in range(3) for f in (2, 3) if dim % f == 0
                  and TubeSpec(plain.kernel, plain.stride, plain.offset, (axis, f)).fits(size)]
        merge = draw(st.sampled_from([None, *merges]))
        return TubeSpec(plain.kernel, plain.stride, plain.offset, merge)
    return tube()


@st.composite
def _problem(draw):
    T = draw(st.sampled_from([1, 3, 5]))
    size = (T, draw(st.integers(4, 9)), draw(st.integers(4, 9)))
    dim = draw(st.sampled_from([8, 17, 24]))
    tubes = tuple(draw(st.lists(_tube_strategy(size, dim), min_size=1, max_size=5)))
    return dict(tubes=tubes, B=draw(st.integers(1, 2)), C=draw(st.integers(1, 4)), size=size, dim=dim,
                dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problem())
def test_random_geometries(problem):
    _check(problem["tubes"], problem["B"], problem["C"], problem["size"], problem["dim"], problem["dtype"],
           seed=problem["seed"])


def test_image_tubes_on_single_frame():
    tubes = (TubeSpec((1, 4, 4), (1, 4, 4)), TubeSpec((1, 3, 5), (1, 2, 3), (0, 1, 1)))
    _check(tubes, 2, 3, (1, 9, 11), 24, torch.float16, seed=5)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous_video(layout):
    size = (4, 9, 10)
    # Made in the kernel's dtype on its device, so the kernel gets this very view.
    kw = dict(dtype=torch.float32, device=TRITON_DEVICE)
    if layout == "channels_last":
        video = torch.randn(2, *size, 3, **kw).permute(0, 4, 1, 2, 3)
    else:
        video = torch.randn(2, 5, size[0] + 1, size[1], size[2] + 3, **kw)[:, 1:4, 1:, :, 2:-1]
    assert not video.is_contiguous()
    _check(MIXED_TUBES, 2, 3, size, 20, torch.float32, video=video, seed=7)


def test_grad_out_with_zero_strides():
    size = (4, 9, 10)
    shape = (2, num_tokens(MIXED_TUBES, size), 20)
    # What out.sum().backward() sends, already in the kernel's dtype and device so it arrives as is.
    grad_out = torch.ones(1, dtype=torch.float32, device=TRITON_DEVICE).expand(shape)
    assert grad_out.stride() == (0, 0, 0)
    _check(MIXED_TUBES, 2, 3, size, 20, torch.float32, grad_out=grad_out, seed=11)


def test_deterministic_input_grad_is_bitwise_reproducible():
    # Periods (2, 2, 2), (1, 2, 1) and (3, 1, 2): several phases per tube, tokens overlapping on
    # every axis, and the paper's kind of time overlap (kernel 16, stride 6: kt > st, kt not a
    # multiple of st) as kernel 5, stride 2.
    tubes = (TubeSpec((2, 3, 3), (1, 2, 2)), TubeSpec((1, 4, 2), (2, 3, 2), (1, 0, 1)),
             TubeSpec((5, 2, 3), (2, 3, 2), (0, 1, 0)))
    size, dim = (9, 8, 9), 20
    video, weights, biases, pos = _make_inputs(tubes, 2, 2, size, dim, seed=13)
    grad_out = torch.randn(2, num_tokens(tubes, size), dim, dtype=torch.float64)
    x = video.float().to(TRITON_DEVICE)
    ws = [w.float().to(TRITON_DEVICE) for w in weights]
    g = grad_out.float().to(TRITON_DEVICE)
    was_enabled = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = te.tube_embed_backward(g, x, ws, tubes, True)
        second = te.tube_embed_backward(g, x, ws, tubes, True)
    finally:
        torch.use_deterministic_algorithms(was_enabled)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1] + first[2], second[1] + second[2]):
        assert torch.equal(a, b)
    golden = _reference(video, weights, biases, pos, tubes, grad_out, torch.float64)
    same = _reference(video, weights, biases, pos, tubes, grad_out, torch.float32)
    assert_close_to_golden(first[0].cpu(), golden[1], same[1], atol=dtype_atol(torch.float32, 4.0),
                           name="grad_video")


def _footprints_overlap(a, b, tube: TubeSpec) -> bool:
    """Do sampler tokens a and b (grid indices) read a common pixel?"""
    return all(abs(i - j) * s < k for i, j, k, s in zip(a, b, tube.kernel, tube.stride))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 5), st.integers(1, 7)), min_size=3, max_size=3))
def test_deterministic_phases_never_hold_overlapping_footprints(axes):
    """The deterministic dX launches one phase at a time with plain read-add-write stores, which
    is only race-free if no two tokens of a phase read a common pixel. On GPUs a violation is a
    race; the interpreter runs programs one by one and would never show it, so the phases are
    checked here directly, on random tubes (kernel > stride with kernel not a multiple of stride
    included on every axis): every token in exactly one phase, no overlapping pair in one."""
    kernel, stride, grid = (tuple(a[i] for a in axes) for i in range(3))
    tube = TubeSpec(kernel, stride)
    seen = {}
    for phase, period, count in te._phases(tube, grid):
        members = [idx for idx in itertools.product(*(range(n) for n in grid))
                   if all(i % P == p for i, p, P in zip(idx, phase, period))]
        assert len(members) == count, (phase, period)
        for a, b in itertools.combinations(members, 2):
            assert not _footprints_overlap(a, b, tube), f"{tube}: tokens {a} and {b} share phase {phase}"
        for idx in members:
            assert idx not in seen, f"token {idx} in phases {seen[idx]} and {phase}"
            seen[idx] = phase
    assert len(seen) == math.prod(grid)


def test_fp32_launches_ask_for_ieee_dots(monkeypatch):
    """The interpreter ignores DOT_PRECISION: assert what every launch requests. fp32 takes exact
    ("ieee") dots (tf32 would miss fp32 tolerances on a GPU); 16-bit inputs take tensor cores."""
    requested = []
    real_launch = te._launch

    def spy(kernel, grid, args, flags):
        requested.append((kernel.fn.__name__, flags["DOT_PRECISION"]))
        return real_launch(kernel, grid, args, flags)

    monkeypatch.setattr(te, "_launch", spy)
    for dtype, expected in ((torch.float32, "ieee"), (torch.float16, "tf32")):
        requested.clear()
        video, weights, biases, pos = _make_inputs(MIXED_TUBES, 1, 2, (4, 9, 10), 8)
        grad_out = torch.randn(1, num_tokens(MIXED_TUBES, (4, 9, 10)), 8, dtype=torch.float64)
        _fast(video, weights, biases, pos, MIXED_TUBES, grad_out, dtype)
        kernels = {name for name, _ in requested}
        assert kernels == {"_tube_embed_fwd_kernel", "_tube_embed_bwd_weight_kernel", "_tube_embed_bwd_input_kernel"}
        assert {precision for _, precision in requested} == {expected}, (dtype, requested)


# kw 4 and 8, ow 4 and 0, sw 4 and 8 on W = 16: every patch row is a run of 4 aligned pixels
# (VEC = 4: 16 bytes in fp32, 8 in fp16), with overlapping tokens along t.
VECTOR_TUBES = (TubeSpec((2, 4, 4), (1, 4, 4), (0, 0, 4)), TubeSpec((1, 3, 8), (2, 3, 8), (1, 1, 0)))


@pytest.mark.parametrize("layout", ["contiguous", "shifted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_vector_gather(dtype, layout, poisoned_empty):
    """Tubes whose patch rows load as 4-element vectors; shifted by one element in memory the same
    video allows none (VEC 1). Both give the golden result."""
    size = (4, 9, 16)
    kw = dict(dtype=dtype, device=TRITON_DEVICE)
    if layout == "contiguous":
        video = torch.randn(2, 3, *size, **kw)
    else:
        video = torch.randn(2 * 3 * math.prod(size) + 1, **kw)[1:].view(2, 3, *size)
    assert te._gather_vector(video, VECTOR_TUBES) == (4 if layout == "contiguous" else 1)
    _check(VECTOR_TUBES, 2, 3, size, 24, dtype, video=video, seed=19)


@pytest.mark.parametrize("tubes, shape, dtype, offset, fmt, expected", [
    (PAPER_TUBES, (1, 3, 32, 224, 224), torch.float16, 0, None, 4),         # tube 1's kw = 4 limits it
    (PAPER_TUBES, (1, 3, 32, 224, 224), torch.float32, 0, None, 4),
    (PAPER_TUBES[:1], (1, 3, 8, 224, 224), torch.bfloat16, 0, None, 8),     # kw 8, ow 0, sw 32: 16 bytes
    (PAPER_TUBES, (1, 3, 32, 225, 224), torch.float16, 0, None, 4),         # odd H: rows still aligned
    (PAPER_TUBES, (1, 3, 32, 224, 225), torch.float16, 0, None, 1),         # odd W: rows misaligned
    (PAPER_TUBES, (1, 3, 32, 224, 224), torch.float16, 0, torch.channels_last_3d, 1),  # w stride 3
    (PAPER_TUBES, (1, 3, 32, 224, 224), torch.float16, 2, None, 2),         # a crop 4 bytes off
    (PAPER_TUBES, (1, 3, 32, 224, 224), torch.float16, 1, None, 1),         # 2 bytes off
    ((TubeSpec((1, 3, 3), (1, 3, 3)),), (1, 3, 4, 12, 12), torch.float32, 0, None, 1),  # odd kw
], ids=["paper-fp16", "paper-fp32", "kw8-bf16", "odd-H", "odd-W", "channels-last", "offset-4B", "offset-2B",
        "kw3"])
def test_gather_vector_rule(tubes, shape, dtype, offset, fmt, expected):
    base = torch.empty(math.prod(shape) + offset, dtype=dtype)[offset:].view(shape)
    video = base if fmt is None else base.contiguous(memory_format=fmt)
    assert te._gather_vector(video, tubes) == expected


def test_autotune_key_has_a_size_class():
    """The token rows, rounded up to a power of two, are part of every kernel's autotune key: the
    first-use self-check's tiny input cannot fix the config a real batch runs with."""
    for kernel in (te._tube_embed_fwd_kernel, te._tube_embed_bwd_weight_kernel, te._tube_embed_bwd_input_kernel):
        assert kernel.keys == ["DIM", "KTOT", "ROWS_CLASS"]
    paper = [math.prod(t.sampler_grid((32, 224, 224))) for t in PAPER_TUBES]
    assert te._rows_class(32, paper) == 32768 and te._rows_class(2, paper) == 2048
    assert te._rows_class(2, [6, 3]) == 32


def test_autotuning_leaves_dx_zeroed_for_the_real_launch(monkeypatch):
    """The atomic dX kernel adds into a freshly zeroed buffer. Benchmarking several configs runs it
    many times; with reset_to_zero Triton zeroes dx before each run and again after tuning, so the
    launch that counts adds exactly once (restore_value would keep a copy of the whole buffer)."""
    kernel = te._tube_embed_bwd_input_kernel
    assert kernel.reset_to_zero == ["dx_ptr"] and not kernel.restore_value
    runs = []

    def bench(call, quantiles):
        for _ in range(3):
            call()
        runs.append(3)
        return [float(len(runs))] * len(quantiles)

    tuned = triton.autotune(configs=[te._cfg(16, 16, 16, 4, 1), te._cfg(32, 16, 16, 4, 1)], key=te._KEY,
                            reset_to_zero=["dx_ptr"], do_bench=bench)(kernel.fn)
    video, weights, _, _ = _make_inputs(MIXED_TUBES[:2], 2, 3, (4, 9, 10), 16, seed=23)
    x = video.float().to(TRITON_DEVICE)
    ws = [w.float().to(TRITON_DEVICE) for w in weights]
    grad = torch.randn(2, num_tokens(MIXED_TUBES[:2], (4, 9, 10)), 16, device=TRITON_DEVICE)
    plain = te.tube_embed_backward(grad, x, ws, MIXED_TUBES[:2], True)[0]
    monkeypatch.setattr(te, "_tube_embed_bwd_input_kernel", tuned)
    after_tuning = te.tube_embed_backward(grad, x, ws, MIXED_TUBES[:2], True)[0]
    assert runs == [3, 3]
    torch.testing.assert_close(after_tuning, plain, rtol=1e-5, atol=1e-5)


def test_audit_targets_cover_every_kernel_and_config():
    for dtype in ("fp16", "bf16", "fp32"):
        targets = te.audit_targets(dtype)
        single = dtype == "fp32"
        per_kernel = {}
        for t in targets:
            per_kernel.setdefault(t.kernel, []).append(t)
            assert set(t.signature) == set(t.fn.arg_names)
            assert all(t.signature[k] == "constexpr" for k in t.constexprs)
            pixels = t.config.endswith("-u8")  # a uint8 video, the rest in `dtype`
            assert t.signature["x_ptr" if "x_ptr" in t.signature else "dy_ptr"] == ("*u8" if pixels else "*" + dtype)
            if pixels:
                assert t.signature["w_ptr" if "w_ptr" in t.signature else "dy_ptr"] == "*" + dtype
            assert t.matmul is not single and {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(t.constexprs)
            # The paper tubes at W=224: kw 8/4/12/16, ow 0/8/16/0 and sw 32/32/32/16 allow 4-element
            # vectors (8 bytes in 16-bit, 16 in fp32); token rows of 768 channels 16-byte vectors.
            # The "-scalar" targets: a channels-last video and odd token rows, no vectors at all.
            scalar = t.config.endswith("-scalar")
            if "VEC" in t.constexprs:
                assert t.constexprs["VEC"] == (1 if scalar else 4)
            if "DY_VEC" in t.constexprs:
                assert t.constexprs["DY_VEC"] == (1 if scalar else 16 // {"fp16": 2, "bf16": 2, "fp32": 4}[dtype])
            # The static targets: forward and dW loops of the 16-bit kernels (issue 13).
            budget = t.loop_budget
            if single or scalar or t.kernel == "_tube_embed_bwd_input_kernel":
                assert budget is None
            else:  # on uint8 pixels too (issue 21)
                assert budget.max_non_mma_per_mma == 4 and budget.min_load_bits == 32
                assert budget.hgmma_archs == ("sm_90",)
        fwd, bwd_w, bwd_x = ((te._FWD_CONFIGS_FP32, te._BWD_W_CONFIGS_FP32, te._BWD_X_CONFIGS_FP32) if single
                             else (te._FWD_CONFIGS, te._BWD_W_CONFIGS, te._BWD_X_CONFIGS))
        # Each kernel plain, specialised for space-to-depth and (forward, dW) for scalar gathers
        # and a uint8 video, with the configs the launch keeps there; dX also in deterministic mode.
        narrow = bwd_w if single else te._BWD_W_CONFIGS_NARROW
        pixel_w = bwd_w if single else te._BWD_W_CONFIGS_PIXELS
        pixel_fwd = fwd if single else te._FWD_CONFIGS_PIXELS
        # The uint8 forward twice, as each arch's launches specialise it (te._stage_pixels); every
        # other target is the same on both archs.
        assert len(per_kernel["_tube_embed_fwd_kernel"]) == 3 * len(fwd) + 2 * len(pixel_fwd)
        for t in targets:
            if t.kernel == "_tube_embed_fwd_kernel" and t.config.endswith("-u8"):
                assert t.archs in (("sm_80",), ("sm_90",)) and t.constexprs["STAGE_PIXELS"] == (t.archs == ("sm_80",))
            else:
                assert t.archs is None
                assert t.constexprs.get("STAGE_PIXELS", False) == t.config.endswith("-u8"), t.config
        assert len(per_kernel["_tube_embed_bwd_weight_kernel"]) == 2 * len(bwd_w) + len(narrow) + len(pixel_w)
        assert len(per_kernel["_tube_embed_bwd_input_kernel"]) == 3 * len(bwd_x)
        s2d = [t for t in targets if t.config.endswith("-s2d")]
        assert s2d and all(t.constexprs["SPACE_TO_DEPTH"] for t in s2d)
        assert all(t.constexprs["WIDTH_ALIGN"] == 16 for t in s2d if "WIDTH_ALIGN" in t.constexprs)
    assert te._ROW_TABLE_PAD >= max(c.kwargs["BLOCK_M"] for c in te._BWD_W_CONFIGS + te._BWD_W_CONFIGS_FP32)


def test_config_pruning_by_precision_vectors_and_shape():
    """The dW launch keeps the exact-fp32 configs for fp32, the narrow ones for scalar gathers, the
    wide ones otherwise, and drops tiles far larger than the problem unless nothing is left."""
    configs = te._BWD_W_CONFIGS + te._BWD_W_CONFIGS_NARROW + te._BWD_W_CONFIGS_FP32
    prune = te._prune_for(te._BWD_W_CONFIGS_FP32, te._BWD_W_CONFIGS_NARROW, te._BWD_W_CONFIGS_PIXELS)
    paper = {"DIM": 768, "ROWS_CLASS": 32768}
    assert prune(configs, paper, DOT_PRECISION="tf32", VEC=4, DY_VEC=8) == te._BWD_W_CONFIGS
    # A uint8 video keeps the tiles that meet the loop budget with its conversions.
    pixels = {**paper, "x_ptr": torch.empty(1, dtype=torch.uint8)}
    assert prune(configs, pixels, DOT_PRECISION="tf32", VEC=4, DY_VEC=8) == te._BWD_W_CONFIGS_PIXELS
    prune_fwd = te._prune_for(te._FWD_CONFIGS_FP32, pixels=te._FWD_CONFIGS_PIXELS)
    fwd = te._FWD_CONFIGS + te._FWD_CONFIGS_FP32
    assert prune_fwd(fwd, pixels, DOT_PRECISION="tf32") == te._FWD_CONFIGS_PIXELS
    assert prune_fwd(fwd, paper, DOT_PRECISION="tf32") == te._FWD_CONFIGS
    assert prune(configs, pixels, DOT_PRECISION="ieee", VEC=4, DY_VEC=4) == te._BWD_W_CONFIGS_FP32
    assert prune(configs, paper, DOT_PRECISION="tf32", VEC=1, DY_VEC=8) == te._BWD_W_CONFIGS_NARROW
    assert prune(configs, paper, DOT_PRECISION="tf32", VEC=4, DY_VEC=2) == te._BWD_W_CONFIGS_NARROW
    assert prune(configs, paper, DOT_PRECISION="ieee", VEC=1, DY_VEC=1) == te._BWD_W_CONFIGS_FP32
    assert prune(configs, {"DIM": 96, "ROWS_CLASS": 32768}, DOT_PRECISION="tf32", VEC=4, DY_VEC=8) == [
        c for c in te._BWD_W_CONFIGS if c.kwargs["BLOCK_N"] <= 128]
    # A tiny problem keeps what its precision allows rather than nothing.
    assert prune(configs, {"DIM": 8, "ROWS_CLASS": 16}, DOT_PRECISION="tf32", VEC=4, DY_VEC=8) == te._BWD_W_CONFIGS
    fwd_prune = te._prune_for(te._FWD_CONFIGS_FP32)
    assert fwd_prune(te._FWD_CONFIGS + te._FWD_CONFIGS_FP32, paper, DOT_PRECISION="tf32", VEC=1) == te._FWD_CONFIGS
