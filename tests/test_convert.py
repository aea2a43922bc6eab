"""from_image_vit: a timm image ViT -> TubeViT (random timm weights; nothing is downloaded)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from tubevit_fast import PAPER_TUBES, TubeSpec, TubeViT, from_image_vit, tube_position_embedding  # noqa: E402
from tubevit_fast.convert import inflate_kernel  # noqa: E402
from tubevit_fast.reference import model as reference  # noqa: E402

TUBES = (
    TubeSpec((2, 8, 8), (2, 16, 16), (0, 4, 4)),
    TubeSpec((4, 12, 12), (3, 16, 16)),
    TubeSpec((1, 16, 16), (4, 16, 16)),
)
BLOCK_PARAMS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias"]


def tiny_vit(patch=16, img=32, dim=64, depth=2, heads=2, **kwargs):
    """A small random timm ViT (head dim 32: the attention op's smallest)."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                            mlp_ratio=2.0, num_classes=7, **kwargs).eval()
    with torch.no_grad():  # timm zero-initialises biases and sets norms to 1: randomise everything
        for name, p in vit.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return vit


def image_tokens(model, x):
    """The 2D tube's tokens of an image, without the position embedding."""
    embed = model.tube_embed
    embed.pos_embed = False
    try:
        return embed(x)
    finally:
        embed.pos_embed = True


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_2d_tube_reproduces_patch_embed(backend):
    vit = tiny_vit()
    model = from_image_vit(vit, tubes=TUBES, num_classes=5, backend=backend)
    assert isinstance(model, TubeViT) and model.head.out_features == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = vit.patch_embed(x)
        got = image_tokens(model, x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with_pos = model.tube_embed(x)
    pos = tube_position_embedding((TUBES[2],), (1, 32, 32), 64)
    torch.testing.assert_close(with_pos, expected + pos, rtol=1e-5, atol=1e-5)


def test_2d_tube_reproduces_patch_embed_float64():
    vit = tiny_vit().double()
    model = from_image_vit(vit, tubes=TUBES, backend="reference")
    assert model.tube_embed.weights[0].dtype == torch.float64
    x = torch.randn(2, 3, 48, 32, dtype=torch.float64)
    vit.patch_embed.strict_img_size = False
    with torch.no_grad():
        torch.testing.assert_close(image_tokens(model, x), vit.patch_embed(x), rtol=1e-12, atol=1e-12)


def test_block_weights_match_and_encoder_agrees():
    vit = tiny_vit(depth=3)
    model = from_image_vit(vit, tubes=TUBES, backend="reference")
    assert len(model.blocks) == 3 and model.blocks[0].attn.num_heads == 2
    assert model.blocks[0].mlp.fc1.out_features == vit.blocks[0].mlp.fc1.out_features
    for src, dst in zip(vit.blocks, model.blocks):
        ours = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            assert torch.equal(ours[name], p), name
        assert set(ours) == set(BLOCK_PARAMS)
    for name in ["weight", "bias"]:
        assert torch.equal(getattr(model.norm, name), getattr(vit.norm, name))
    # Same tokens in -> same features out (timm's blocks + final norm vs ours). float32: the
    # attention op takes no float64; the two differ only in the attention's summation order.
    tokens = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(tokens), vit.norm(vit.blocks(tokens)),
                                   rtol=1e-4, atol=1e-5)


def test_layer_scale_is_folded_exactly():
    vit = tiny_vit(init_values=0.5)
    with torch.no_grad():
        for block in vit.blocks:
            block.ls1.gamma.uniform_(0.1, 2.0)
            block.ls2.gamma.uniform_(0.1, 2.0)
    model = from_image_vit(vit, tubes=TUBES, backend="reference")
    tokens = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(tokens), vit.norm(vit.blocks(tokens)),
                                   rtol=1e-4, atol=1e-5)
    assert set(dict(model.blocks[0].named_parameters())) == set(BLOCK_PARAMS)


def test_inflation_of_3d_tubes():
    vit = tiny_vit()
    model = from_image_vit(vit, tubes=PAPER_TUBES, backend="reference")
    w2d, b2d = vit.patch_embed.proj.weight.detach(), vit.patch_embed.proj.bias.detach()
    embed = model.tube_embed
    for tube, w, b in zip(PAPER_TUBES, embed.weights, embed.biases):
        kt, kh, kw = tube.kernel
        resized = F.interpolate(w2d, size=(kh, kw), mode="bilinear", align_corners=False)
        expected = resized.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=0 if kh == 16 else 1e-7)
        assert torch.equal(b, b2d)
    assert torch.equal(embed.weights[3][:, :, 0], w2d)  # the 2D tube: the patch kernel itself


def test_inflated_tube_on_a_static_video_gives_the_2d_response():
    vit = tiny_vit().double()
    tubes = (TubeSpec((4, 16, 16), (4, 16, 16)), TubeSpec((1, 16, 16), (1, 16, 16)))
    model = from_image_vit(vit, tubes=tubes, backend="reference")
    frame = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    video = frame.unsqueeze(2).expand(-1, -1, 4, -1, -1)
    model.tube_embed.pos_embed = False
    with torch.no_grad():
        tokens = model.tube_embed(video)
        torch.testing.assert_close(tokens[:, :4], vit.patch_embed(frame), rtol=1e-12, atol=1e-12)


def test_inflate_kernel_identity_and_shape():
    w = torch.randn(6, 3, 16, 16)
    assert torch.equal(inflate_kernel(w, (1, 16, 16)), w.unsqueeze(2))
    assert inflate_kernel(w, (8, 8, 8)).shape == (6, 3, 8, 8, 8)
    assert inflate_kernel(w.half(), (2, 4, 4)).dtype == torch.float16
    with pytest.raises(ValueError, match="2D patch kernel"):
        inflate_kernel(torch.randn(6, 3, 1, 16, 16), (1, 16, 16))


def test_patch14_vit():
    vit = tiny_vit(patch=14, img=28)
    tubes = (TubeSpec((4, 7, 7), (4, 14, 14)), TubeSpec((1, 14, 14), (2, 14, 14)))
    model = from_image_vit(vit, tubes=tubes, num_classes=3, backend="torch")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(image_tokens(model, x), vit.patch_embed(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"patch size is \(14, 14\).*\(1, 14, 14\)"):
        from_image_vit(vit, tubes=PAPER_TUBES)


def test_converted_model_trains_on_video_and_image():
    model = from_image_vit(tiny_vit(), tubes=TUBES, num_classes=4, backend="torch")
    assert isinstance(model.tube_embed, __import__("tubevit_fast").TubeEmbed)
    video, image = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 32, 32)
    loss = model(video).square().sum() + model(image).square().sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_fresh_head_and_no_position_parameters():
    vit = tiny_vit()
    model = from_image_vit(vit, tubes=TUBES, num_classes=9)
    names = set(dict(model.named_parameters()))
    assert not any("pos_embed" in n or "cls_token" in n for n in names)
    assert model.head.weight.shape == (9, 64)
    fresh = reference.TubeViT(num_classes=9, tubes=TUBES, dim=64, depth=2, heads=2, mlp_ratio=2.0)
    assert set(dict(fresh.named_parameters())) == names


def test_bad_inputs():
    vit = tiny_vit()
    with pytest.raises(TypeError, match="timm or torchvision VisionTransformer"):
        from_image_vit(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="timm or torchvision VisionTransformer"):
        from_image_vit(reference.TubeViT(num_classes=2, tubes=TUBES, dim=64, depth=1, heads=2))
    with pytest.raises(ValueError, match="no 2D tube"):
        from_image_vit(vit, tubes=TUBES[:2])
    with pytest.raises(ValueError, match=r"patch size is \(16, 16\)"):
        from_image_vit(vit, tubes=(TubeSpec((1, 8, 8), (1, 8, 8)),))
    with pytest.raises(TypeError, match="TubeSpec"):
        from_image_vit(vit, tubes=[(1, 16, 16)])
    with pytest.raises(ValueError, match="below 6"):
        from_image_vit(tiny_vit(dim=4, heads=2), tubes=TUBES)
    with pytest.raises(ValueError, match="q_norm"):
        from_image_vit(tiny_vit(qk_norm=True), tubes=TUBES)
    with pytest.raises(ValueError, match="norm_pre"):
        from_image_vit(tiny_vit(pre_norm=True), tubes=TUBES)
    with pytest.raises(ValueError, match="SwiGLU"):
        from_image_vit(tiny_vit(mlp_layer=timm.layers.SwiGLU, act_layer=nn.SiLU), tubes=TUBES)
    with pytest.raises(ValueError, match="GELU"):
        from_image_vit(tiny_vit(act_layer=nn.ReLU), tubes=TUBES)
    with pytest.raises(ValueError, match="unknown backend"):
        from_image_vit(vit, tubes=TUBES, backend="nope")
    with pytest.raises(TypeError, match=r"`tubes` is the tube list .* got the int 1000.* num_classes=1000"):
        from_image_vit(vit, 1000)


def test_interpolated_from_inflates_the_base_kernel():
    vit = tiny_vit()
    model = from_image_vit(vit, tubes=PAPER_TUBES, num_classes=3, backend="reference", interpolated_from=(8, 8, 8))
    embed = model.tube_embed
    assert embed.interpolated_from == (8, 8, 8) and not hasattr(embed, "weights")
    w2d = vit.patch_embed.proj.weight.detach()
    resized = F.interpolate(w2d, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(embed.base_weight.detach(), resized.unsqueeze(2).repeat(1, 1, 8, 1, 1) / 8,
                               rtol=0, atol=1e-7)
    for b in embed.biases:
        assert torch.equal(b, vit.patch_embed.proj.bias)
    # Every tube derives its kernel from the base: the 2D tube need not match the patch size.
    tubes = (TubeSpec((4, 8, 8), (4, 8, 8)), TubeSpec((1, 8, 8), (1, 8, 8)))
    small = from_image_vit(vit, tubes=tubes, backend="torch", interpolated_from=(4, 8, 8))
    assert small(torch.randn(1, 3, 4, 16, 16)).shape == (1, 400)
