"""Space-to-depth tubes (TubeEmbed(..., space_to_depth=[...])): a tube projects to dim/f channels
and f neighbouring tokens along an axis are concatenated along channels; the position embedding
sits at the merged token's centre. Checked against an independent computation (Conv3d per
tube, explicit merge, the DESIGN.md sin/cos formula written out here)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_golden, dtype_atol
from tubevit_fast import TubeEmbed, TubeSpec, TubeViT
from tubevit_fast.reference import model as reference

TUBES = (
    TubeSpec((2, 3, 3), (2, 4, 4), (0, 0, 0)),   # gaps in h/w
    TubeSpec((4, 2, 2), (1, 3, 3), (1, 1, 2)),   # overlaps itself in time
    TubeSpec((1, 4, 4), (3, 2, 4), (0, 2, 0)),   # 2D tube, overlapping in h
)
SIZE = (7, 13, 14)
DIM = 24


def design_pos(centres: np.ndarray, dim: int) -> torch.Tensor:
    """shared/DESIGN.md: channels 6j..6j+5 = sin/cos of c_t, c_h, c_w times 10000 ** (-j / m)."""
    m = dim // 6
    table = np.zeros((len(centres), dim))
    for j in range(m):
        w = 10000.0 ** (-j / m)
        for a in range(3):
            table[:, 6 * j + 2 * a] = np.sin(centres[:, a] * w)
            table[:, 6 * j + 2 * a + 1] = np.cos(centres[:, a] * w)
    return torch.from_numpy(table)


def explicit(x, weights, biases, tubes, s2d, dim):
    """Sub-tokens by Conv3d, merge f neighbours along the axis (nearest the origin first), pos at
    the mean centre of the merged sub-tokens."""
    tokens, centres = [], []
    for tube, w, b, m in zip(tubes, weights, biases, s2d):
        ot, oh, ow = tube.offset
        y = F.conv3d(x[:, :, ot:, oh:, ow:], w, b, stride=tube.stride)  # (B, d, nt, nh, nw)
        axis_c = [o + np.arange(n) * s + (k - 1) / 2 for o, n, s, k in
                  zip(tube.offset, y.shape[2:], tube.stride, tube.kernel)]
        if m is not None:
            axis, f = m
            n = y.shape[2 + axis] // f
            y = y.narrow(2 + axis, 0, n * f)
            shape = list(y.shape)
            shape[2 + axis:3 + axis] = [n, f]
            y = y.reshape(shape).movedim(3 + axis, 1)  # (B, f, d, ...)
            y = y.reshape(y.shape[0], -1, *y.shape[3:])  # channel = j * d + c
            axis_c[axis] = axis_c[axis][: n * f].reshape(n, f).mean(1)
        tokens.append(y.flatten(2).transpose(1, 2))
        grid = np.stack(np.meshgrid(*axis_c, indexing="ij"), -1).reshape(-1, 3)
        centres.append(grid)
    out = torch.cat(tokens, 1)
    # DESIGN.md: computed in float64, stored float32.
    return out + design_pos(np.concatenate(centres), dim).float().to(out.dtype)


def make(s2d, cls=TubeEmbed, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return cls(TUBES, 3, DIM, space_to_depth=s2d, **kwargs).to(dtype)


CASES = {
    "t2": [("t", 2), None, None],
    "h2_w4": [(1, 2), (2, 4), None],
    "all": [(0, 3), (1, 2), ("h", 2)],
}


BACKENDS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def device_for(backend):
    if backend != "triton":
        return torch.device("cpu")
    pytest.importorskip("triton")
    from conftest import TRITON_DEVICE
    return TRITON_DEVICE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_explicit_merge(case, backend):
    s2d = CASES[case]
    embed = make(s2d, backend=backend).double() if backend == "reference" else make(s2d, backend=backend)
    embed = embed.to(device_for(backend))
    dtype = embed.weights[0].dtype
    x = torch.randn(2, 3, *SIZE, dtype=dtype).to(device_for(backend))
    normalised = [None if m is None else ({"t": 0, "h": 1, "w": 2}.get(m[0], m[0]), m[1]) for m in s2d]
    with torch.no_grad():
        expected = explicit(x.cpu(), [w.cpu() for w in embed.weights], [b.cpu() for b in embed.biases], TUBES,
                            normalised, DIM)
        got = embed(x).cpu()
    assert got.shape == expected.shape == (2, embed.num_tokens(SIZE), DIM)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected.to(dtype), rtol=tol, atol=tol)


def test_parameters_are_narrow():
    embed = make(CASES["h2_w4"])
    assert embed.weights[0].shape == (DIM // 2, 3, 2, 3, 3) and embed.biases[0].shape == (DIM // 2,)
    assert embed.weights[1].shape == (DIM // 4, 3, 4, 2, 2)
    assert embed.weights[2].shape == (DIM, 3, 1, 4, 4)
    assert embed.op_tubes[0] == TubeSpec((2, 3, 3), (2, 4, 4), (0, 0, 0), space_to_depth=(1, 2))
    assert embed.op_tubes[2] == TUBES[2]
    assert "space_to_depth" in repr(embed)


def test_no_work_on_zeros():
    """The torch path multiplies by the tube's own (dim/f, C*kt*kh*kw) kernel: its patch matrix
    is the plain sampler's, one row per sampler token, rows reordered so a group's tokens are
    adjacent (no block-structured kernel, no zero columns)."""
    from tubevit_fast.torch_backend.tube_embed import patches

    tube = make(CASES["all"]).op_tubes[0]  # factor 3 along t
    sampler = TubeSpec(tube.kernel, tube.stride, tube.offset)
    x = torch.randn(2, 3, *SIZE)
    nt, nh, nw = sampler.grid(SIZE)
    K = tube.patch_size(3)
    plain = patches(x, sampler).view(2, nt, nh, nw, K)[:, :nt // 3 * 3]
    grouped = plain.reshape(2, nt // 3, 3, nh, nw, K).permute(0, 1, 3, 4, 2, 5).reshape(2, -1, K)
    assert torch.equal(patches(x, tube), grouped)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_image_path(backend):
    s2d = [("t", 2), None, ("w", 2)]  # the 2D tube merged along w stays 2D
    embed = make(s2d, backend=backend)
    image = torch.randn(2, 3, 13, 14)
    tube = TUBES[2].as_image_tube()
    with torch.no_grad():
        expected = explicit(image.unsqueeze(2), [embed.weights[2]], [embed.biases[2]], [tube], [(2, 2)], DIM)
        torch.testing.assert_close(embed(image), expected.float(), rtol=1e-5, atol=1e-5)
    assert embed.num_tokens((13, 14)) == expected.shape[1]


def test_time_merged_2d_tube_becomes_3d():
    embed = make([None, None, ("t", 2)])
    assert not embed.op_tubes[2].is_2d
    with pytest.raises(ValueError, match="temporal kernel of 1"):
        embed(torch.randn(1, 3, 13, 14))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend):
    """Every gradient (video, narrow kernels, narrow biases) against the explicit merge."""
    device = device_for(backend)
    s2d = CASES["all"]
    embed = make(s2d, backend=backend).to(device)
    x = torch.randn(2, 3, *SIZE, device=device, requires_grad=True)
    normalised = [(0, 3), (1, 2), (1, 2)]
    params = [x, *embed.weights, *embed.biases]
    g = torch.randn(2, embed.num_tokens(SIZE), DIM, device=device)
    got = torch.autograd.grad(embed(x), params, g)
    cpu = [p.detach().cpu().requires_grad_() for p in params]
    want = torch.autograd.grad(explicit(cpu[0], cpu[1:4], cpu[4:], TUBES, normalised, DIM), cpu, g.cpu())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    tubes = (TubeSpec((2, 2, 2), (1, 2, 3)), TubeSpec((1, 2, 2), (2, 1, 2)))
    torch.manual_seed(0)
    embed = reference.TubeEmbed(tubes, 2, 12, space_to_depth=[(0, 2), (1, 3)]).double()
    x = torch.randn(1, 2, 4, 5, 5, dtype=torch.float64)

    def fn(w0, w1, b0, b1):
        params = {"weights.0": w0, "weights.1": w1, "biases.0": b0, "biases.1": b1}
        return torch.func.functional_call(embed, params, (x,))

    inputs = [p.detach().clone().requires_grad_() for p in (*embed.weights, *embed.biases)]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.interpreter
def test_triton_fp16_and_deterministic_input_grad():
    """fp16 through the Triton kernels' space-to-depth epilogue, and deterministic mode's dX
    (one launch per tube and phase) bitwise reproducible with merged tubes."""
    device = device_for("triton")
    embed = make(CASES["h2_w4"], backend="triton").to(device, torch.float16)
    x = torch.randn(1, 3, *SIZE)
    out = embed(x.to(device, torch.float16))
    golden = make(CASES["h2_w4"], cls=reference.TubeEmbed, dtype=torch.float64)(x.double())
    same_dtype = make(CASES["h2_w4"], cls=reference.TubeEmbed, dtype=torch.float16)(x.half())
    assert_close_to_golden(out.cpu(), golden, same_dtype, atol=dtype_atol(torch.float16),
                           reduction=max(t.patch_size(3) for t in TUBES))

    xd = x.to(device).requires_grad_()
    embed32 = make(CASES["all"], backend="triton").to(device)
    g = torch.randn(1, embed32.num_tokens(SIZE), DIM, device=device)
    torch.use_deterministic_algorithms(True)
    try:
        first, again = (torch.autograd.grad(embed32(xd), xd, g)[0] for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, again)
    ref32 = make(CASES["all"], cls=reference.TubeEmbed)
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(first.cpu(), torch.autograd.grad(ref32(xr), xr, g.cpu())[0], rtol=1e-4, atol=1e-5)


def test_tubevit_passthrough():
    torch.manual_seed(0)
    model = TubeViT(num_classes=3, tubes=TUBES, dim=64, depth=1, heads=2,
                    space_to_depth=[("t", 2), None, None], backend="torch")
    assert model.tube_embed.weights[0].shape[0] == 32
    out = model([torch.randn(3, *SIZE), torch.randn(3, 13, 14)])
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("bad, match", [
    ([("t", 2)], "one entry per tube"),
    ([("x", 2), None, None], "axis"),
    ([(3, 2), None, None], "axis"),
    ([("t", 5), None, None], "factor"),
    ([("t", 1), None, None], "factor"),
    ([("t",), None, None], r"\(axis, factor\)"),
])
def test_bad_space_to_depth(bad, match):
    with pytest.raises(ValueError, match=match):
        TubeEmbed(TUBES, 3, DIM, space_to_depth=bad)


def test_not_with_interpolated_kernels():
    with pytest.raises(ValueError, match="cannot be combined"):
        TubeEmbed(TUBES, 3, DIM, space_to_depth=[("t", 2), None, None], interpolated_from=(2, 2, 2))


def test_torch_compile_fullgraph():
    embed = make(CASES["all"], backend="torch")
    x = torch.randn(2, 3, *SIZE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    ref = make(CASES["all"], cls=reference.TubeEmbed)
    ref_out = ref(x.detach())
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for a, b in zip(embed.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_opcheck(backend):
    """The custom op with merged tubes: schema, fake shapes (width x factor channels), autograd."""
    from tubevit_fast.geometry import pack_tubes
    from tubevit_fast.ops.tube_embed import _tube_embed_op

    device = device_for(backend)
    tubes = make(CASES["all"]).op_tubes
    torch.manual_seed(0)
    x = torch.randn(1, 3, *SIZE, device=device, requires_grad=True)
    ws = [torch.randn(t.width(DIM), 3, *t.kernel, device=device, requires_grad=True) for t in tubes]
    bs = [torch.randn(t.width(DIM), device=device, requires_grad=True) for t in tubes]
    args = (x, ws, bs, None, pack_tubes(tubes), backend)
    torch.library.opcheck(_tube_embed_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_merges_given_in_the_tube_specs():
    """TubeSpec.space_to_depth works like the list; giving both, or combining with interpolated
    kernels, is refused."""
    carried = tuple(TubeSpec(t.kernel, t.stride, t.offset, m) for t, m in zip(TUBES, [("t", 2), None, None]))
    torch.manual_seed(0)
    by_spec = TubeEmbed(carried, 3, DIM, backend="torch")
    by_list = make([("t", 2), None, None], backend="torch")
    assert by_spec.op_tubes == by_list.op_tubes and by_spec.space_to_depth == by_list.space_to_depth == ((0, 2), None, None)
    assert "space_to_depth" in repr(by_spec)
    by_list.load_state_dict(by_spec.state_dict())
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(by_spec(x), by_list(x))
    with pytest.raises(ValueError, match="not both"):
        TubeEmbed(carried, 3, DIM, space_to_depth=[None, ("w", 2), None])
    with pytest.raises(ValueError, match="cannot be combined"):
        TubeEmbed(carried, 3, DIM, interpolated_from=(2, 2, 2))
