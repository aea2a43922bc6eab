"""from_image_vit with torchvision's VisionTransformer (vit_b_16 and friends): small random models,
nothing downloaded. torchvision's own forward is the reference where the maths should match."""
import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer  # noqa: E402

from tubevit_fast import PAPER_TUBES, TubeSpec, from_image_vit  # noqa: E402
from tubevit_fast.reference import model as reference  # noqa: E402

TUBES = (
    TubeSpec((2, 8, 8), (2, 16, 16), (0, 4, 4)),
    TubeSpec((4, 12, 12), (3, 16, 16)),
    TubeSpec((1, 16, 16), (4, 16, 16)),
)


def tiny_vit(dtype=torch.float32, **kwargs):
    """A random torchvision ViT: width 64, 2 heads (head dim 32), every parameter randomised
    (torchvision zero-initialises the head and nearly zeroes the MLP biases)."""
    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=96, num_classes=7)
    vit = VisionTransformer(**{**args, **kwargs}).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if ".ln" in name and name.endswith("weight") else 0.0))
    return vit.to(dtype)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_2d_tube_gives_torchvision_patch_tokens(backend):
    vit = tiny_vit()
    model = from_image_vit(vit, TUBES, num_classes=5, backend=backend)
    assert model.head.out_features == 5 and model.blocks[0].attn.num_heads == 2
    model.tube_embed.pos_embed = False  # torchvision adds its learned table later, in its encoder
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.tube_embed(x), vit._process_input(x), rtol=1e-5, atol=1e-5)


def test_encoder_matches_torchvision_float64():
    # float64 through the eager reference model (the attention op takes no float64): the mapping
    # itself is judged, not float rounding.
    vit = tiny_vit(torch.float64)
    converted = from_image_vit(vit, TUBES, backend="reference")
    model = reference.TubeViT(num_classes=400, tubes=TUBES, dim=64, depth=2, heads=2, mlp_ratio=1.5).double()
    model.load_state_dict(converted.state_dict())
    tokens = torch.randn(2, 9, 64, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        # torchvision's encoder without its learned position embedding (TubeViT drops it).
        want = vit.encoder.ln(vit.encoder.layers(tokens))
        torch.testing.assert_close(model.forward_features(tokens), want, rtol=1e-10, atol=1e-10)
        model.tube_embed.pos_embed = False
        torch.testing.assert_close(model.tube_embed(x), vit._process_input(x), rtol=1e-12, atol=1e-12)


def test_encoder_matches_torchvision_fast_backend():
    vit = tiny_vit()
    model = from_image_vit(vit, TUBES, backend="torch")
    tokens = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(tokens), vit.encoder.ln(vit.encoder.layers(tokens)),
                                   rtol=1e-4, atol=1e-5)


def test_parameters_map_one_to_one():
    vit = tiny_vit()
    model = from_image_vit(vit, TUBES, backend="reference")
    for src, dst in zip(vit.encoder.layers, model.blocks):
        pairs = [(src.ln_1.weight, dst.norm1.weight), (src.self_attention.in_proj_weight, dst.attn.qkv.weight),
                 (src.self_attention.in_proj_bias, dst.attn.qkv.bias),
                 (src.self_attention.out_proj.weight, dst.attn.proj.weight), (src.ln_2.bias, dst.norm2.bias),
                 (src.mlp[0].weight, dst.mlp.fc1.weight), (src.mlp[3].bias, dst.mlp.fc2.bias)]
        for a, b in pairs:
            assert torch.equal(a, b)
        assert dst.norm1.eps == src.ln_1.eps == 1e-6
    assert torch.equal(model.norm.weight, vit.encoder.ln.weight)
    w2d = vit.conv_proj.weight.detach()
    for tube, w in zip(TUBES, model.tube_embed.weights):
        kt, kh, kw = tube.kernel
        expected = F.interpolate(w2d, size=(kh, kw), mode="bilinear", align_corners=False)
        torch.testing.assert_close(w.detach(), expected.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt, rtol=0, atol=1e-7)


def test_interpolated_from():
    vit = tiny_vit()
    model = from_image_vit(vit, PAPER_TUBES, num_classes=3, backend="reference", interpolated_from=(8, 8, 8))
    resized = F.interpolate(vit.conv_proj.weight.detach(), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.tube_embed.base_weight.detach(), resized.unsqueeze(2).repeat(1, 1, 8, 1, 1) / 8,
                               rtol=0, atol=1e-7)


def test_bad_inputs():
    stem = [ConvStemConfig(out_channels=16, kernel_size=3, stride=2)] * 4
    with pytest.raises(ValueError, match="conv_proj must be an nn.Conv2d"):
        from_image_vit(tiny_vit(conv_stem_configs=stem), TUBES)
    with pytest.raises(ValueError, match=r"patch size is \(16, 16\)"):
        from_image_vit(tiny_vit(), (TubeSpec((1, 8, 8), (1, 8, 8)),))
    with pytest.raises(TypeError, match="got the int 1000"):
        from_image_vit(tiny_vit(), 1000)
