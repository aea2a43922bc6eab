"""from_tubevit_port: daniel-code/TubeViT checkpoints -> TubeViT, nothing downloaded.

The reference here is the port's published maths, written out in this file (no dependency on the
port): its tokenizer learns one base kernel (dim, 3, 8, 8, 8) and one bias row per tube; tube i
convolves the video cropped at its offset with F.interpolate(base, size=kernel_i,
mode="trilinear") (tube 0 with the base itself), and the tubes' tokens are concatenated in tube
order. Its encoder is torchvision's EncoderBlock stack (ln_1, nn.MultiheadAttention, ln_2, an MLP
Sequential(Linear, GELU, Dropout, Linear, Dropout)) and a final LayerNorm, eps 1e-6. The module
tree below reproduces the port's parameter names, so its state_dict has the port's keys.
"""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close_to_golden
from tubevit_fast import TubeViT
from tubevit_fast.convert import PORT_TUBES, PORT_UCF101_TUBES, from_tubevit_port

DIM, DEPTH, HEADS, MLP, CLASSES = 128, 2, 2, 160, 7
# The port's tube configurations as its TubeViT.__init__ writes them: (kernel_sizes, strides,
# offsets), main branch and exp/ucf101 branch.
PORT_MAIN = (((8, 8, 8), (16, 4, 4), (4, 12, 12), (1, 16, 16)),
             ((16, 32, 32), (6, 32, 32), (16, 32, 32), (32, 16, 16)),
             ((0, 0, 0), (4, 8, 8), (0, 16, 16), (0, 0, 0)))
PORT_UCF101 = (((8, 8, 8), (12, 4, 4), (4, 12, 12), (1, 16, 16)),
               ((16, 32, 32), (6, 32, 32), (16, 32, 32), (16, 16, 16)),
               ((0, 0, 0), (4, 8, 8), (0, 16, 16), (0, 0, 0)))
VIDEO = (2, 3, 20, 64, 64)  # the smallest clip all four of the port's tubes fit: 28 tokens
NOT_LOADED = {"class_token", "pos_embedding", "attention_pooling.W.weight", "attention_pooling.W.bias",
              "heads.head.weight", "heads.head.bias"}


class PortEncoderBlock(nn.Module):
    """torchvision's EncoderBlock, which the port's encoder stacks."""

    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(DIM, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.ln_2 = nn.LayerNorm(DIM, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(DIM, MLP), nn.GELU(), nn.Dropout(0.0), nn.Linear(MLP, DIM), nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def torchvision_block():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    return tv.EncoderBlock(HEADS, DIM, MLP, 0.0, 0.0)


class Port(nn.Module):
    """The port's TubeViT parameter tree (tubevit/model.py) with its tokenizer and encoder maths."""

    def __init__(self, config=PORT_MAIN, block=PortEncoderBlock):
        super().__init__()
        self.kernel_sizes, self.strides, self.offsets = config
        self.sparse_tubes_tokenizer = nn.Module()
        self.sparse_tubes_tokenizer.conv_proj_weight = nn.Parameter(torch.randn(DIM, 3, *self.kernel_sizes[0]))
        self.sparse_tubes_tokenizer.conv_proj_bias = nn.Parameter(torch.randn(len(self.kernel_sizes), DIM))
        self.pos_embedding = nn.Parameter(torch.randn(1 + 28, DIM), requires_grad=False)
        self.class_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.encoder = nn.Module()
        self.encoder.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", block()) for i in range(DEPTH)))
        self.encoder.ln = nn.LayerNorm(DIM, eps=1e-6)
        self.attention_pooling = nn.Module()
        self.attention_pooling.W = nn.Linear(DIM, 1)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(DIM, CLASSES)))
        with torch.no_grad():  # LayerNorms away from (1, 0), every bias non-zero
            for name, p in self.named_parameters():
                if "ln" in name or p.dim() == 1:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
                elif "sparse" not in name:
                    p.mul_(0.5)

    def tokens(self, x):
        base = self.sparse_tubes_tokenizer.conv_proj_weight
        bias = self.sparse_tubes_tokenizer.conv_proj_bias
        out = []
        for i, (kernel, stride, (ot, oh, ow)) in enumerate(zip(self.kernel_sizes, self.strides, self.offsets)):
            weight = base if i == 0 else F.interpolate(base, kernel, mode="trilinear")
            y = F.conv3d(x[:, :, ot:, oh:, ow:], weight, bias=bias[i], stride=stride)
            out.append(y.reshape(x.shape[0], DIM, -1))
        return torch.cat(out, dim=-1).permute(0, 2, 1)

    def encode(self, tokens):
        return self.encoder.ln(self.encoder.layers(tokens))


def port(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Port(**kwargs).eval()


def load(state, **kwargs):
    with pytest.warns(UserWarning, match="6 port weights have no counterpart"):
        return from_tubevit_port(state, **kwargs)


@pytest.mark.parametrize("config, tubes", [(PORT_MAIN, PORT_TUBES), (PORT_UCF101, PORT_UCF101_TUBES)],
                         ids=["main", "exp-ucf101"])
def test_tokens_are_the_ports_exactly(config, tubes):
    p = port(config=config)
    model, _ = load(p.state_dict(), backend="reference", pos_embed=False, tubes=tubes)
    assert model.tube_embed.interpolated_from == (8, 8, 8)
    x = torch.randn(VIDEO)
    with torch.no_grad():
        want, got = p.tokens(x), model.tube_embed(x)
    assert got.shape == (2, model.tube_embed.num_tokens(VIDEO[2:]), DIM)
    assert torch.equal(got, want)  # same tokens, same order, same arithmetic


def test_tokens_on_the_fast_backend():
    p = port()
    model, _ = load(p.state_dict(), backend="torch", pos_embed=False)
    x = torch.randn(VIDEO)
    with torch.no_grad():
        golden = port().double().tokens(x.double())
        assert_close_to_golden(model.tube_embed(x), golden, p.tokens(x), name="port tokens")


@pytest.mark.parametrize("block", [PortEncoderBlock, torchvision_block], ids=["port-layout", "torchvision"])
def test_encoder_is_the_ports(block):
    p = port(block=block)
    model, report = load(p.state_dict(), backend="torch")
    assert (len(model.blocks), model.blocks[0].attn.num_heads, model.blocks[0].mlp.fc1.out_features) == \
        (DEPTH, DIM // 64, MLP)
    tokens = torch.randn(2, 28, DIM)
    with torch.no_grad():
        golden = port(block=block).double().encode(tokens.double())
        assert_close_to_golden(model.forward_features(tokens), golden, p.encode(tokens), name="encoder")


# The MLP key spellings of a port checkpoint: torchvision's MLPBlock is an nn.Sequential (mlp.0,
# mlp.3); before torchvision 0.14 it named its layers linear_1 and linear_2.
MLP_SPELLINGS = {"mlp.0-mlp.3": ("mlp.0.", "mlp.3."), "linear_1-linear_2": ("mlp.linear_1.", "mlp.linear_2.")}


@pytest.mark.parametrize("spelling", MLP_SPELLINGS)
def test_each_mlp_key_spelling_loads_its_weights(spelling):
    p = port()
    fc1, fc2 = MLP_SPELLINGS[spelling]
    state = {k.replace(".mlp.0.", "." + fc1).replace(".mlp.3.", "." + fc2): v
             for k, v in p.state_dict().items()}
    model, report = load(state, backend="torch")
    for i, block in enumerate(model.blocks):
        layer = f"encoder.layers.encoder_layer_{i}."
        for ours, theirs in ((block.mlp.fc1, fc1), (block.mlp.fc2, fc2)):
            assert torch.equal(ours.weight, state[layer + theirs + "weight"]) and \
                torch.equal(ours.bias, state[layer + theirs + "bias"]), (i, theirs)
        assert report["loaded"][layer + fc2 + "bias"] == f"blocks.{i}.mlp.fc2.bias"
    tokens = torch.randn(2, 28, DIM)
    with torch.no_grad():
        golden = port().double().encode(tokens.double())
        assert_close_to_golden(model.forward_features(tokens), golden, p.encode(tokens), name="encoder")


def test_report_and_warning():
    p = port()
    state = p.state_dict()
    listed = "not loaded: pos_embedding, class_token, attention_pooling.W.weight"
    with pytest.warns(UserWarning, match=listed) as record:
        model, report = from_tubevit_port(state)
    assert len(record) == 1
    assert set(report["not_loaded"]) == NOT_LOADED
    assert set(report["loaded"]) | NOT_LOADED == set(state)
    assert report["loaded"]["encoder.layers.encoder_layer_1.mlp.3.weight"] == "blocks.1.mlp.fc2.weight"
    assert report["loaded"]["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"] == \
        "blocks.0.attn.qkv.weight"
    assert report["loaded"]["encoder.ln.bias"] == "norm.bias"
    ours = model.state_dict()
    for port_key, names in report["loaded"].items():
        for name in names.split(", "):
            assert name in ours, (port_key, name)
    assert model.head.out_features == CLASSES and isinstance(model, TubeViT)


def test_lightning_checkpoint_and_file_round_trip(tmp_path):
    p = port()
    path = tmp_path / "tubevit_ucf101.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in p.state_dict().items()}, "epoch": 3}, path)
    state = torch.load(path, weights_only=True)
    model, report = load(state, num_classes=3, heads=4, backend="reference", pos_embed=False)
    assert model.head.out_features == 3 and model.blocks[0].attn.num_heads == 4
    x = torch.randn(VIDEO)
    with torch.no_grad():
        assert torch.equal(model.tube_embed(x), p.tokens(x))


def test_bad_inputs():
    state = port().state_dict()
    with pytest.raises(ValueError, match="not a daniel-code/TubeViT state_dict"):
        from_tubevit_port({"patch_embed.proj.weight": torch.randn(4, 3, 16, 16)})
    with pytest.raises(TypeError, match="takes a state_dict"):
        from_tubevit_port(port())
    with pytest.raises(ValueError, match="has 4 tubes .* but 3 tubes were given"):
        from_tubevit_port(state, tubes=PORT_TUBES[:3])
    with pytest.raises(ValueError, match=r"uses the base kernel \(8, 8, 8\) as is"):
        from_tubevit_port(state, tubes=PORT_TUBES[1:] + PORT_TUBES[:1])
    with pytest.raises(TypeError, match="interpolated_from is set by the port"):
        from_tubevit_port(state, interpolated_from=(8, 8, 8))
    narrow = {k: v for k, v in state.items() if not k.startswith("heads.")}
    with pytest.raises(ValueError, match="pass num_classes="):
        from_tubevit_port(narrow)
    missing = {k: v for k, v in state.items() if "encoder_layer_1.ln_2" not in k}
    with pytest.raises(ValueError, match="encoder.layers.encoder_layer_1.ln_2.weight"):
        from_tubevit_port(missing)
