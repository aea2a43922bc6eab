"""Interpolated kernels (TubeEmbed(..., interpolated_from=base)): one learned base kernel, each
tube's kernel derived by trilinear interpolation (align_corners=False) in every forward."""
import pytest
import torch
import torch.nn.functional as F

import tubevit_fast
from tubevit_fast import PAPER_TUBES, TubeEmbed, TubeSpec, TubeViT, tube_position_embedding
from tubevit_fast.reference import model as reference
from tubevit_fast.reference.tube_embed import tube_embed_reference

TUBES = (
    TubeSpec((2, 3, 3), (2, 4, 4), (0, 0, 0)),
    TubeSpec((4, 2, 2), (1, 3, 3), (1, 1, 2)),   # overlaps itself in time
    TubeSpec((3, 3, 3), (3, 3, 3), (0, 1, 1)),   # the base size: uses the base itself
    TubeSpec((1, 4, 4), (3, 4, 4), (0, 2, 0)),   # the 2D tube
)
BASE = (3, 3, 3)
SIZE = (6, 11, 13)
DIM = 12


def make(cls=TubeEmbed, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return cls(TUBES, 3, DIM, interpolated_from=BASE, **kwargs).to(dtype)


def explicit(embed, x, tubes=TUBES, index=None):
    """The tokens computed by hand: interpolate the base kernel, run the reference tokenizer."""
    index = range(len(tubes)) if index is None else index
    kernels = [F.interpolate(embed.base_weight, size=TUBES[i].kernel, mode="trilinear", align_corners=False)
               for i in index]
    size = tuple(x.shape[2:])
    pos = tube_position_embedding(tubes, size, DIM).to(x.dtype)
    return tube_embed_reference(x, kernels, [embed.biases[i] for i in index], tubes, pos)


def test_parameters_and_state_dict():
    embed = make(backend="torch")
    assert embed.base_weight.shape == (DIM, 3, *BASE)
    assert not hasattr(embed, "weights")
    assert set(embed.state_dict()) == ({"base_weight", "pixel_mean", "pixel_std"}
                                       | {f"biases.{i}" for i in range(len(TUBES))})
    assert sum(p.numel() for p in embed.parameters()) == DIM * 3 * 27 + len(TUBES) * DIM
    kernels = embed.tube_kernels()
    assert [tuple(k.shape[2:]) for k in kernels] == [t.kernel for t in TUBES]
    assert kernels[2] is embed.base_weight
    assert "interpolated_from=(3, 3, 3)" in repr(embed)


def test_paper_base_kernel_shape():
    with torch.device("meta"):
        embed = TubeEmbed(PAPER_TUBES, 3, 768, interpolated_from=(8, 8, 8))
    assert embed.base_weight.shape == (768, 3, 8, 8, 8)
    assert [b.shape for b in embed.biases] == [(768,)] * 4


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_equals_explicitly_interpolated_weights(backend):
    embed = make(backend=backend)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(embed(x), explicit(embed, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_image_path(backend):
    embed = make(backend=backend)
    image = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        expected = explicit(embed, image.unsqueeze(2), tubes=(TUBES[3].as_image_tube(),), index=[3])
        torch.testing.assert_close(embed(image), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradients_reach_the_base_kernel(backend):
    embed = make(backend=backend)
    x = torch.randn(2, 3, *SIZE, requires_grad=True)
    grad_out = torch.randn(2, embed.num_tokens(SIZE), DIM)
    params = [x, embed.base_weight, *embed.biases]
    got = torch.autograd.grad(embed(x), params, grad_out)
    want = torch.autograd.grad(explicit(embed, x), params, grad_out)
    assert got[1].abs().sum() > 0
    for name, a, b in zip(["video", "base_weight"] + [f"bias{i}" for i in range(len(TUBES))], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_gradcheck_reference_float64():
    tubes = (TubeSpec((2, 3, 2), (2, 2, 3)), TubeSpec((1, 2, 2), (2, 2, 2), (1, 1, 0)))
    torch.manual_seed(0)
    embed = reference.TubeEmbed(tubes, 2, 6, interpolated_from=(2, 2, 2)).double()
    x = torch.randn(1, 2, 4, 5, 5, dtype=torch.float64)

    def fn(base, b0, b1):
        return torch.func.functional_call(embed, {"base_weight": base, "biases.0": b0, "biases.1": b1}, (x,))

    inputs = [p.detach().clone().requires_grad_() for p in (embed.base_weight, *embed.biases)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_torch_backend_float64():
    tubes = (TubeSpec((2, 3, 2), (2, 2, 3)), TubeSpec((1, 2, 2), (2, 2, 2), (1, 1, 0)))
    torch.manual_seed(0)
    embed = TubeEmbed(tubes, 2, 6, interpolated_from=(2, 2, 2), backend="torch").double()
    x = torch.randn(1, 2, 4, 5, 5, dtype=torch.float64)

    def fn(base):
        return torch.func.functional_call(embed, {"base_weight": base}, (x,), strict=False)

    assert torch.autograd.gradcheck(fn, [embed.base_weight.detach().clone().requires_grad_()])


def test_fast_and_reference_share_state_dict():
    ref = make(reference.TubeEmbed)
    fast = TubeEmbed(TUBES, 3, DIM, interpolated_from=BASE, backend="torch")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):  # a per-tube-kernel state_dict does not load silently
        fast.load_state_dict(reference.TubeEmbed(TUBES, 3, DIM).state_dict())


def test_tubevit_passthrough_and_patch():
    tiny = dict(num_classes=3, tubes=TUBES, dim=64, depth=1, heads=2, mlp_ratio=1.0, interpolated_from=BASE)
    torch.manual_seed(0)
    ref = reference.TubeViT(**tiny)
    assert ref.tube_embed.interpolated_from == BASE and "tube_embed.base_weight" in ref.state_dict()
    fast = TubeViT(**tiny, backend="torch")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)
    tubevit_fast.patch(ref, backend="torch")
    assert isinstance(ref.tube_embed, TubeEmbed) and ref.tube_embed.interpolated_from == BASE
    ref(x).sum().backward()
    assert ref.tube_embed.base_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [(8, 8), (8, 0, 8), (8.0, 8, 8), 8, "888", (True, 8, 8)])
def test_bad_base_size(bad):
    with pytest.raises(ValueError, match="interpolated_from"):
        TubeEmbed(TUBES, 3, DIM, interpolated_from=bad)


@pytest.mark.interpreter
def test_triton_backend_forward():
    pytest.importorskip("triton")
    from conftest import TRITON_DEVICE

    embed = make(backend="triton").to(TRITON_DEVICE)
    x = torch.randn(1, 3, *SIZE, device=TRITON_DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(embed(x), explicit(embed, x), rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_triton_backend_backward():
    pytest.importorskip("triton")
    from conftest import TRITON_DEVICE

    embed = make(backend="triton").to(TRITON_DEVICE)
    x = torch.randn(1, 3, *SIZE, device=TRITON_DEVICE)
    embed(x).sum().backward()
    base_grad = torch.autograd.grad(explicit(embed, x).sum(), embed.base_weight)[0]
    torch.testing.assert_close(embed.base_weight.grad, base_grad, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph():
    embed = make(backend="torch")
    x = torch.randn(2, 3, *SIZE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    ref = make(reference.TubeEmbed)
    ref_out = ref(x.detach())
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(embed.base_weight.grad, ref.base_weight.grad, rtol=1e-4, atol=1e-4)
