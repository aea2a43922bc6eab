"""Gated image-to-video scaling: large timm image ViT + a small TubeViT's tube kernels."""
import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from tubevit_fast import TubeSpec, TubeViT  # noqa: E402
from tubevit_fast.convert import GatedTubeViT, ProjectedTubeEmbed, scale_image_to_video  # noqa: E402
from tubevit_fast.reference import model as reference  # noqa: E402
from tubevit_fast.reference.tube_embed import tube_embed_reference  # noqa: E402

TUBES = (
    TubeSpec((2, 8, 8), (2, 16, 16), (0, 4, 4)),
    TubeSpec((4, 12, 12), (3, 16, 16)),
    TubeSpec((1, 16, 16), (4, 16, 16)),
)
VIDEO = (2, 3, 8, 32, 32)


def large_vit(depth=3):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=depth, num_heads=2, mlp_ratio=2.0,
                            num_classes=7).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return vit


def small_tubevit(**kwargs):
    torch.manual_seed(1)
    return reference.TubeViT(num_classes=5, tubes=TUBES, dim=32, depth=1, heads=1, mlp_ratio=1.0, **kwargs)


def build(gate_layer=2, backend="torch", **small_kwargs):
    return scale_image_to_video(large_vit(), small_tubevit(**small_kwargs), gate_layer, num_classes=4,
                                backend=backend)


def ungated_logits(model, x):
    """The same weights through the plain TubeViT encoder (no gate)."""
    features = TubeViT.forward_features(model, model.tube_embed(x))
    return model.head(model.attn_pool(features))


@pytest.mark.parametrize("gate_layer", [1, 2, 3])
def test_gated_equals_ungated_at_init(gate_layer):
    model, _ = build(gate_layer)
    assert isinstance(model, GatedTubeViT) and model.gate.alpha.item() == 0.0
    video, image = torch.randn(*VIDEO), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for x in (video, image):
            assert torch.equal(model(x), ungated_logits(model, x))
        tokens, cu_seqlens, max_seqlen = model.pack([video[0], image[1]])  # packed (varlen) input
        assert torch.equal(model.forward_features(tokens, cu_seqlens, max_seqlen),
                           TubeViT.forward_features(model, tokens, cu_seqlens, max_seqlen))


def test_gate_changes_the_output_once_alpha_moves():
    model, _ = build()
    x = torch.randn(*VIDEO)
    with torch.no_grad():
        model.gate.alpha.fill_(0.5)
        assert not torch.allclose(model(x), ungated_logits(model, x))


def test_gradients_alpha_trainable_and_frozen():
    gate_layer = 2
    model, groups = build(gate_layer)
    x = torch.randn(*VIDEO)
    model(x).square().sum().backward()
    assert model.gate.alpha.grad is not None and model.gate.alpha.grad.abs() > 0
    trainable = {id(p) for g in groups for p in g["params"]}
    assert [g["name"] for g in groups] == ["tubes", "gate", "blocks", "head"]
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert not p.requires_grad and p.grad is None, name
    frozen = {name for name, p in model.named_parameters() if id(p) not in trainable}
    expected = {n for n, _ in model.named_parameters()
                if any(n.startswith(f"blocks.{i}.") for i in range(gate_layer))}
    expected |= {"tube_embed.weights.2", "tube_embed.biases.2"}  # the large ViT's 2D patch kernel
    assert frozen == expected
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # no duplicates


def test_optimizer_step_leaves_frozen_parameters():
    model, groups = build(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(groups, lr=0.1)
    model(torch.randn(*VIDEO)).sum().backward()
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert torch.equal(after["tube_embed.weights.2"], before["tube_embed.weights.2"])
    assert not torch.equal(after["gate.alpha"], before["gate.alpha"])
    assert not torch.equal(after["tube_embed.proj.weight"], before["tube_embed.proj.weight"])


def test_tubes_come_from_the_small_model_and_the_large_vit():
    vit, small = large_vit(), small_tubevit()
    model, _ = scale_image_to_video(vit, small, 2, backend="torch")
    embed = model.tube_embed
    assert isinstance(embed, ProjectedTubeEmbed) and embed.projected == (0, 1)
    assert torch.equal(embed.weights[0], small.tube_embed.weights[0])
    assert torch.equal(embed.biases[1], small.tube_embed.biases[1])
    assert torch.equal(embed.weights[2][:, :, 0], vit.patch_embed.proj.weight)
    P = embed.proj.weight
    x = torch.randn(*VIDEO)
    kernels = [(P @ small.tube_embed.weights[i].flatten(1)).view(64, 3, *TUBES[i].kernel) for i in (0, 1)]
    biases = [P @ small.tube_embed.biases[i] for i in (0, 1)]
    embed.pos_embed = False
    with torch.no_grad():
        expected = tube_embed_reference(x, kernels + [embed.weights[2]], biases + [embed.biases[2]], TUBES)
        torch.testing.assert_close(embed(x), expected, rtol=1e-4, atol=1e-5)
        # Images: exactly the large ViT's patch tokens.
        image = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(embed(image), vit.patch_embed(image), rtol=1e-5, atol=1e-5)
    # P is the least-squares map of the small 2D kernel+bias onto the large one: normal equations.
    a = torch.cat([small.tube_embed.weights[2].flatten(1), small.tube_embed.biases[2][:, None]], 1).double()
    b = torch.cat([vit.patch_embed.proj.weight.flatten(1), vit.patch_embed.proj.bias[:, None]], 1).double()
    residual_grad = (P.double() @ a - b) @ a.T
    assert residual_grad.abs().max() < 1e-4 * (b.abs().max() * a.abs().max() * a.shape[1])


def test_interpolated_small_model():
    model, _ = build(2, interpolated_from=(2, 8, 8))
    small = small_tubevit(interpolated_from=(2, 8, 8))
    assert torch.equal(model.tube_embed.weights[1], small.tube_embed.tube_kernels([1])[0])
    assert torch.isfinite(model(torch.randn(*VIDEO))).all()


def test_gated_tubevit_standalone():
    torch.manual_seed(0)
    model = GatedTubeViT(num_classes=3, tubes=TUBES, dim=64, depth=2, heads=2, gate_layer=1,
                         backend="reference")
    assert "gate.alpha" in model.state_dict()
    out = model([torch.randn(3, 8, 32, 32), torch.randn(3, 32, 32)])
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("gate_layer", [0, 4, -1, 1.5, True, None])
def test_gate_layer_out_of_range(gate_layer):
    with pytest.raises(ValueError, match="gate_layer"):
        scale_image_to_video(large_vit(), small_tubevit(), gate_layer)
    with pytest.raises(ValueError, match="gate_layer"):
        GatedTubeViT(num_classes=3, tubes=TUBES, dim=64, depth=3, heads=2, gate_layer=gate_layer)


def test_bad_inputs():
    with pytest.raises(TypeError, match="timm or torchvision VisionTransformer"):
        scale_image_to_video(nn.Linear(2, 2), small_tubevit(), 1)
    with pytest.raises(TypeError, match="TubeViT"):
        scale_image_to_video(large_vit(), nn.Linear(2, 2), 1)
    only_2d = reference.TubeViT(num_classes=2, tubes=TUBES[2:], dim=32, depth=1, heads=1)
    with pytest.raises(ValueError, match="no 3D tube"):
        scale_image_to_video(large_vit(), only_2d, 1)
    wrong_patch = (TUBES[0], TubeSpec((1, 8, 8), (1, 8, 8)))
    small = reference.TubeViT(num_classes=2, tubes=wrong_patch, dim=32, depth=1, heads=1)
    with pytest.raises(ValueError, match="patch size"):
        scale_image_to_video(large_vit(), small, 1)
