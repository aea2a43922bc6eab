"""train --init / --scale-from: the weights users have (timm and torchvision ViT state_dicts, a
daniel-code/TubeViT checkpoint, a tubevit_fast checkpoint) land in the model's tensors; what starts
fresh is said. The tensors are compared with the sources' own, by hand, after a step at lr 1e-30
(AdamW moves nothing at that lr)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tqdm")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT  # noqa: E402

from tubevit_fast.app import checkpoint  # noqa: E402
from tubevit_fast import train  # noqa: E402
from tubevit_fast.convert import from_image_vit  # noqa: E402
from tubevit_fast.data import SMALL_TUBES  # noqa: E402

# One step that moves nothing: the model holds what --init loaded.
STILL = ["--steps", "1", "--lr", "1e-30", "--min-lr", "0", "--warmup", "0", "--batch-size", "2", "--train-items", "4",
         "--val-items", "0", "--no-progress", "--threads", "1"]


def _timm(dim=64, depth=1, heads=2, seed=0):
    torch.manual_seed(seed)
    vit = TimmViT(img_size=32, patch_size=8, embed_dim=dim, depth=depth, num_heads=heads, num_classes=5,
                  init_values=0.5)  # LayerScale: folded into proj / fc2
    with torch.no_grad():
        for p in vit.parameters():  # no parameter left at a constant initialisation
            p.add_(torch.randn_like(p) * 0.05)
    return vit


def _torchvision(seed=1):
    torch.manual_seed(seed)
    vit = TorchvisionViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=64, mlp_dim=128,
                         num_classes=5)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit


def _start_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(("init: ", "train: "))]


def test_init_from_a_timm_state_dict(tmp_path, capsys):
    vit = _timm()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    capsys.readouterr()
    model = train.main(["--init", str(tmp_path / "vit.pth"), "--heads", "2", "--out", str(tmp_path / "run"),
                        *STILL])["model"]
    init_line, start = _start_lines(capsys)
    assert "timm ViT state_dict" in init_line and init_line.endswith("fresh: attn_pool, head")
    assert "(dim 64, depth 1, heads 2, small tubes)" in start
    got, src = model.state_dict(), vit.state_dict()
    ls1, ls2 = src["blocks.0.ls1.gamma"], src["blocks.0.ls2.gamma"]
    assert torch.equal(got["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])
    assert torch.equal(got["blocks.0.norm2.bias"], src["blocks.0.norm2.bias"])
    assert torch.allclose(got["blocks.0.attn.proj.weight"], src["blocks.0.attn.proj.weight"] * ls1[:, None])
    assert torch.allclose(got["blocks.0.mlp.fc2.bias"], src["blocks.0.mlp.fc2.bias"] * ls2)
    assert torch.equal(got["norm.weight"], src["norm.weight"])
    patch = src["patch_embed.proj.weight"]  # (64, 3, 8, 8)
    # SMALL_TUBES: 0 is (4, 8, 8): the patch kernel repeated over 4 frames / 4; 2 is the (1, 8, 8) 2D tube.
    assert torch.equal(got["tube_embed.weights.2"], patch[:, :, None])
    assert torch.allclose(got["tube_embed.weights.0"], patch[:, :, None].expand(-1, -1, 4, -1, -1) / 4)
    # Tube 1 is (8, 4, 4): the patch kernel resized bilinearly to 4x4 (align_corners=False: 2x2 means).
    resized = patch.reshape(64, 3, 4, 2, 4, 2).mean((3, 5))
    assert torch.allclose(got["tube_embed.weights.1"], resized[:, :, None].expand(-1, -1, 8, -1, -1) / 8, atol=1e-7)
    assert all(torch.equal(got[f"tube_embed.biases.{i}"], src["patch_embed.proj.bias"]) for i in range(3))


def test_init_from_a_torchvision_state_dict(tmp_path, capsys):
    vit = _torchvision()
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")  # wrapped, as training scripts save it
    model = train.main(["--init", str(tmp_path / "vit.pth"), "--heads", "2", "--out", str(tmp_path / "run"),
                        *STILL])["model"]
    assert "torchvision ViT state_dict" in _start_lines(capsys)[0]
    got, src = model.state_dict(), vit.state_dict()
    layer = "encoder.layers.encoder_layer_0."
    assert torch.equal(got["blocks.0.attn.qkv.weight"], src[layer + "self_attention.in_proj_weight"])
    assert torch.equal(got["blocks.0.attn.proj.bias"], src[layer + "self_attention.out_proj.bias"])
    assert torch.equal(got["blocks.0.mlp.fc1.weight"], src[layer + "mlp.0.weight"])
    assert torch.equal(got["blocks.0.mlp.fc2.weight"], src[layer + "mlp.3.weight"])
    assert torch.equal(got["blocks.0.norm1.weight"], src[layer + "ln_1.weight"])
    assert torch.equal(got["norm.bias"], src["encoder.ln.bias"])
    assert torch.equal(got["tube_embed.weights.2"], src["conv_proj.weight"][:, :, None])


def test_init_from_a_port_checkpoint(tmp_path, capsys):
    # daniel-code/TubeViT's tree: a torchvision encoder, one base kernel and a bias row per tube.
    tv = _torchvision(seed=2).state_dict()
    torch.manual_seed(3)
    port = {k: v for k, v in tv.items() if k.startswith("encoder.") and "pos_embedding" not in k}
    port.update({"sparse_tubes_tokenizer.conv_proj_weight": torch.randn(64, 3, 8, 8, 8),
                 "sparse_tubes_tokenizer.conv_proj_bias": torch.randn(4, 64),
                 "class_token": torch.randn(1, 1, 64), "heads.head.weight": torch.randn(5, 64)})
    torch.save({"state_dict": {"model." + k: v for k, v in port.items()}}, tmp_path / "port.ckpt")  # Lightning
    model = train.main(["--init", str(tmp_path / "port.ckpt"), "--heads", "2", "--frames", "20", "--size", "64",
                        "--out", str(tmp_path / "run"), *STILL])["model"]
    init_line, start = _start_lines(capsys)
    assert "daniel-code/TubeViT checkpoint" in init_line and "paper tubes" in start
    got = model.state_dict()
    assert torch.equal(got["tube_embed.base_weight"], port["sparse_tubes_tokenizer.conv_proj_weight"])
    for i in range(4):
        assert torch.equal(got[f"tube_embed.biases.{i}"], port["sparse_tubes_tokenizer.conv_proj_bias"][i])
    layer = "encoder.layers.encoder_layer_0."
    assert torch.equal(got["blocks.0.attn.qkv.bias"], port[layer + "self_attention.in_proj_bias"])
    assert torch.equal(got["blocks.0.mlp.fc2.bias"], port[layer + "mlp.3.bias"])
    assert got["head.weight"].shape == (7, 64)  # the synthetic set's 7 classes, fresh


def test_fine_tuning_a_checkpoint_keeps_the_encoder_and_renews_the_head(tmp_path, capsys):
    first = train.main([*STILL, "--lr", "1e-3", "--dim", "64", "--depth", "1", "--out", str(tmp_path / "a")])
    capsys.readouterr()
    tuned = train.main(["--init", first["checkpoint"], "--num-classes", "9", "--out", str(tmp_path / "b"), *STILL])
    init_line = _start_lines(capsys)[0]
    assert "tubevit_fast checkpoint (7 classes -> 9: new classifier)" in init_line
    assert init_line.endswith("fresh: head")
    a, b = first["model"].state_dict(), tuned["model"].state_dict()
    assert b["head.weight"].shape == (9, 64)
    for key in a:
        if not key.startswith("head."):
            assert torch.equal(a[key], b[key]), key
    saved = torch.load(tuned["checkpoint"], weights_only=True)["model_config"]
    assert saved["num_classes"] == 9 and saved["classes"][-2:] == ["class_7", "class_8"]


def test_scale_from_builds_the_gated_model_and_freezes_its_first_blocks(tmp_path, capsys):
    small = train.main([*STILL, "--dim", "64", "--depth", "1", "--out", str(tmp_path / "small")])
    large = _timm(dim=128, depth=2, heads=2, seed=4)
    torch.save(large.state_dict(), tmp_path / "large.pth")
    capsys.readouterr()
    out = train.main(["--init", str(tmp_path / "large.pth"), "--scale-from", small["checkpoint"], "--gate-layer", "1",
                      "--heads", "2", "--out", str(tmp_path / "scaled"), *STILL, "--lr", "1e-2"])
    init_line = _start_lines(capsys)[0]
    assert "gate before block 1" in init_line and "frozen" in init_line
    got, src = out["model"].state_dict(), large.state_dict()
    assert torch.equal(got["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])  # frozen: unchanged at lr 1e-2
    assert not torch.equal(got["blocks.1.attn.qkv.weight"], src["blocks.1.attn.qkv.weight"])  # trained
    model, ckpt = checkpoint.load_checkpoint(out["checkpoint"])  # the scaled model rebuilds from its checkpoint
    assert type(model).__name__ == "GatedTubeViT" and "blocks.0.attn.qkv.weight" in ckpt["frozen"]
    assert checkpoint.state_hash(model) == checkpoint.state_hash(out["model"])


@pytest.mark.parametrize("make", [_timm, _torchvision])
def test_from_image_vit_takes_a_state_dict(make):
    vit = make()
    a = from_image_vit(vit, SMALL_TUBES, 4, backend="reference")
    b = from_image_vit(vit.state_dict(), SMALL_TUBES, 4, backend="reference", heads=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert b.blocks[0].attn.num_heads == 2 and sa.keys() == sb.keys()
    for key in sa:
        if not key.startswith(("head.", "attn_pool.")):  # fresh in both, from different draws
            assert torch.equal(sa[key], sb[key]), key
    x = torch.randn(2, 3, 8, 32, 32)
    b.load_state_dict(sa)
    assert torch.allclose(a(x), b(x), atol=1e-6)


def test_init_mistakes_are_one_line_before_any_output(tmp_path, capsys):
    from tubevit_fast import cli

    torch.save({"weights": torch.ones(2)}, tmp_path / "junk.pth")
    cases = [(["--init", str(tmp_path / "junk.pth")], "not an image ViT state_dict"),
             (["--init", str(tmp_path / "nope.pth")], "checkpoint not found"),
             (["--init", str(tmp_path / "junk.pth"), "--dim", "32"], "the model's shape comes from --init"),
             (["--scale-from", str(tmp_path / "junk.pth")], "--scale-from needs --init")]
    for argv, message in cases:
        capsys.readouterr()
        status = cli.run(train.main, [*argv, "--out", str(tmp_path / "out"), *STILL])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == cli.EXIT_ERROR and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists()
