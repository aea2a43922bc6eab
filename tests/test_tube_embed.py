"""TubeEmbed as users see it: the reference semantics, the image path, backend selection,
state_dict compatibility, torch.library/compile integration and bad input."""
import pytest
import torch

import tubevit_fast
from tubevit_fast import PAPER_TUBES, TubeEmbed, TubeSpec, tube_position_embedding
from tubevit_fast.geometry import token_offsets
from tubevit_fast.reference import model as reference

SMALL_TUBES = (
    TubeSpec((2, 3, 3), (2, 4, 4), (0, 0, 0)),
    TubeSpec((4, 2, 2), (1, 3, 3), (1, 1, 2)),   # overlaps itself in time
    TubeSpec((1, 4, 4), (3, 4, 4), (0, 2, 0)),   # the 2D tube
)
SMALL_SIZE = (6, 11, 13)


def random_embed(cls=reference.TubeEmbed, tubes=SMALL_TUBES, channels=3, dim=12, **kwargs):
    torch.manual_seed(0)
    return cls(tubes, channels, dim, **kwargs)


def test_reference_equals_explicit_patch_sums():
    """Each token is the dot product of its own patch with the tube's kernel, + bias + pos:
    computed here by slicing the patch out by hand, independent of Conv3d."""
    embed = random_embed().double()
    x = torch.randn(2, 3, *SMALL_SIZE, dtype=torch.float64)
    out = embed(x)
    pos = tube_position_embedding(SMALL_TUBES, SMALL_SIZE, 12).double()
    starts = token_offsets(SMALL_TUBES, SMALL_SIZE)
    assert out.shape == (2, starts[-1], 12)
    for i, tube in enumerate(SMALL_TUBES):
        nt, nh, nw = tube.grid(SMALL_SIZE)
        for n in range(nt * nh * nw):
            it, ih, iw = n // (nh * nw), (n // nw) % nh, n % nw
            t0, h0, w0 = (o + j * s for o, j, s in zip(tube.offset, (it, ih, iw), tube.stride))
            kt, kh, kw = tube.kernel
            patch = x[:, :, t0:t0 + kt, h0:h0 + kh, w0:w0 + kw]
            expected = torch.einsum("bcthw,dcthw->bd", patch, embed.weights[i]) + embed.biases[i] + pos[starts[i] + n]
            torch.testing.assert_close(out[:, starts[i] + n], expected, rtol=1e-12, atol=1e-12)


def test_reference_equals_conv3d_modules_on_slices():
    embed = random_embed(pos_embed=False)
    x = torch.randn(2, 3, *SMALL_SIZE)
    pieces = []
    for i, tube in enumerate(SMALL_TUBES):
        conv = torch.nn.Conv3d(3, 12, tube.kernel, tube.stride)
        conv.load_state_dict({"weight": embed.weights[i], "bias": embed.biases[i]})
        ot, oh, ow = tube.offset
        pieces.append(conv(x[:, :, ot:, oh:, ow:]).flatten(2).transpose(1, 2))
    torch.testing.assert_close(embed(x), torch.cat(pieces, 1))


def test_image_path_equals_video_path_on_one_frame():
    embed = random_embed(dim=18)
    image = torch.randn(2, 3, 11, 13)
    out_image = embed(image)
    only_2d = reference.TubeEmbed([SMALL_TUBES[2].as_image_tube()], 3, 18)
    only_2d.load_state_dict({"weights.0": embed.weights[2], "biases.0": embed.biases[2]})
    torch.testing.assert_close(out_image, only_2d(image.unsqueeze(2)))
    assert out_image.shape == (2, embed.num_tokens((11, 13)), 18)
    assert embed.num_tokens((11, 13)) == SMALL_TUBES[2].num_tokens((1, 11, 13))


def test_paper_config_shapes():
    embed = TubeEmbed(PAPER_TUBES, 3, 12, backend="reference")
    assert embed.num_tokens((32, 224, 224)) == 539 and embed.num_tokens((224, 224)) == 196
    assert [tuple(w.shape) for w in embed.weights] == [(12, 3, *t.kernel) for t in PAPER_TUBES]
    assert embed(torch.randn(1, 3, 224, 224)).shape == (1, 196, 12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fast_layer_loads_reference_state_dict(backend):
    ref = random_embed()
    fast = random_embed(TubeEmbed, backend=backend)
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, *SMALL_SIZE)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


# ---- backend selection --------------------------------------------------------------------

def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        TubeEmbed(SMALL_TUBES, 3, 12, backend="fastest")


def test_cuda_backend_is_refused_at_construction():
    # "cuda" is the attention-only extension: no tube-embedding kernel to fall back on.
    with pytest.raises(ValueError, match="'cuda' does not implement tube_embed"):
        TubeEmbed(SMALL_TUBES, 3, 12, backend="cuda")
    with pytest.raises(ValueError, match="'cuda' does not implement tube_embed"):
        tubevit_fast.TubeViT(num_classes=2, tubes=SMALL_TUBES, dim=64, depth=1, heads=2, backend="cuda")


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    embed = random_embed(TubeEmbed, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        embed(torch.randn(1, 3, *SMALL_SIZE))


def test_env_override_changes_what_auto_picks(monkeypatch):
    calls = []
    import tubevit_fast.reference.tube_embed as ref_mod
    original = ref_mod.tube_embed_reference
    monkeypatch.setattr("tubevit_fast.ops.tube_embed.tube_embed_reference",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    embed = random_embed(TubeEmbed)
    x = torch.randn(1, 3, *SMALL_SIZE)
    embed(x)
    assert calls == []            # auto on CPU: the torch backend
    monkeypatch.setenv("TUBEVIT_FAST_BACKEND", "reference")
    embed(x)
    assert calls == [1]
    monkeypatch.setenv("TUBEVIT_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="TUBEVIT_FAST_BACKEND='nonsense'"):
        embed(x)


def test_selfcheck_falls_back_or_raises(monkeypatch):
    """The first-use check (run on real GPUs) demotes a wrong fast backend under "auto" and
    refuses it when named explicitly. Forced on here with a deliberately broken backend."""
    from tubevit_fast import backends
    import tubevit_fast.torch_backend.tube_embed as torch_impl

    monkeypatch.setenv(backends.ENV_SELFCHECK, "always")
    backends.reset_selfchecks()
    monkeypatch.setattr(torch_impl, "tube_embed_forward", lambda video, w, b, pos, tubes: original(video, w, b, tubes, pos) + 1)
    from tubevit_fast.reference.tube_embed import tube_embed_reference as original
    embed = random_embed(TubeEmbed)
    x = torch.randn(1, 3, *SMALL_SIZE)
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        out = embed(x)
    torch.testing.assert_close(out, random_embed(reference.TubeEmbed)(x))  # fell back to the reference
    embed.backend = "torch"
    with pytest.raises(RuntimeError, match="disagrees with the reference"):
        embed(x)


# ---- torch.library / torch.compile --------------------------------------------------------

def test_opcheck_torch_backend():
    from tubevit_fast.geometry import pack_tubes
    from tubevit_fast.ops.tube_embed import _tube_embed_op

    torch.manual_seed(0)
    x = torch.randn(2, 3, *SMALL_SIZE, requires_grad=True)
    ws = [torch.randn(5, 3, *t.kernel, requires_grad=True) for t in SMALL_TUBES]
    bs = [torch.randn(5, requires_grad=True) for _ in SMALL_TUBES]
    pos = tube_position_embedding(SMALL_TUBES, SMALL_SIZE, 6)[:, :5].contiguous()
    torch.library.opcheck(_tube_embed_op, (x, ws, bs, pos, pack_tubes(SMALL_TUBES), "torch"))
    torch.library.opcheck(_tube_embed_op, (x.detach(), ws, bs, None, pack_tubes(SMALL_TUBES), "torch"))


@pytest.mark.interpreter
def test_opcheck_triton_backend():
    """Runs the fused kernels (interpreter on CPU): also catches outputs that alias each other."""
    from conftest import TRITON_DEVICE
    from tubevit_fast.geometry import pack_tubes
    from tubevit_fast.ops.tube_embed import _tube_embed_op

    torch.manual_seed(0)
    size = (4, 9, 9)
    x = torch.randn(1, 2, *size, device=TRITON_DEVICE, requires_grad=True)
    tubes = SMALL_TUBES[:2]
    ws = [torch.randn(8, 2, *t.kernel, device=TRITON_DEVICE, requires_grad=True) for t in tubes]
    bs = [torch.randn(8, device=TRITON_DEVICE, requires_grad=True) for _ in tubes]
    torch.library.opcheck(_tube_embed_op, (x, ws, bs, None, pack_tubes(tubes), "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out = _tube_embed_op(x, ws, bs, None, pack_tubes(tubes), "triton")
    out.sum().backward()
    assert all(w.grad is not None for w in ws) and x.grad is not None


def test_torch_compile_fullgraph_has_no_graph_break():
    embed = random_embed(TubeEmbed, backend="torch")
    x = torch.randn(2, 3, *SMALL_SIZE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    expected = random_embed(reference.TubeEmbed)
    ref_x = x.detach().clone().requires_grad_()
    ref_out = expected(ref_x)
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(embed.weights, expected.weights):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("make_input, error, match", [
    (lambda: torch.randn(*SMALL_SIZE), ValueError, r"got a tensor of shape \(6, 11, 13\)"),
    (lambda: torch.randn(1, 1, 3, *SMALL_SIZE), ValueError, "got a tensor of shape"),
    (lambda: torch.randn(1, 4, *SMALL_SIZE), ValueError, "input has 4 channels"),
    (lambda: torch.randn(3, *SMALL_SIZE), ValueError, r"missing batch dimension\? .*\(C, T, H, W\) video"),
    (lambda: torch.randn(3, *SMALL_SIZE[1:]), ValueError, r"missing batch dimension\? .*\(C, H, W\) image"),
    (lambda: torch.randint(0, 255, (1, 3, *SMALL_SIZE), dtype=torch.int16), TypeError, "uint8 .* got torch.int16"),
    (lambda: torch.randn(1, 3, 3, 11, 13), ValueError, r"\(3, 11, 13\) is too small for tube 1"),
    (lambda: torch.randn(1, 3, 6, 3, 13), ValueError, r"\(6, 3, 13\) is too small for tube 2"),
    (lambda: torch.randn(1, 3, 3, 13), ValueError, r"\(1, 3, 13\) is too small for tube 0"),
    (lambda: torch.randn(1, 3, *SMALL_SIZE, dtype=torch.float64), TypeError, "does not match the layer's parameter dtype"),
    (lambda: torch.randn(1, 3, *SMALL_SIZE, device="meta"), ValueError, "input is on meta"),
    (lambda: torch.randn(0, 3, *SMALL_SIZE), ValueError, "batch is empty"),
    (lambda: [[1.0]], TypeError, "got list"),
])
def test_bad_input_gets_a_clear_error(backend, make_input, error, match):
    embed = random_embed(TubeEmbed, backend=backend)
    with pytest.raises(error, match=match):
        embed(make_input())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dim=5), ValueError, "dim must be an int >= 6"),
    (dict(tubes=[]), ValueError, "tube list is empty"),
    (dict(in_channels=0), ValueError, "in_channels must be an int >= 1"),
    (dict(tubes=[(8, 8, 8)]), TypeError, "must be a TubeSpec"),
])
def test_bad_layer_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TubeEmbed(**{**dict(tubes=SMALL_TUBES, in_channels=3, dim=12), **kwargs})


def test_public_names_exist():
    for name in ["TubeSpec", "PAPER_TUBES", "TubeEmbed", "TubeViT", "tube_position_embedding", "patch"]:
        assert hasattr(tubevit_fast, name)
