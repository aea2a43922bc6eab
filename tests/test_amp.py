"""Autocast (tubevit_fast.amp): under torch.autocast the tube embedding and attention compute in
the autocast dtype, as Conv3d and SDPA do, through the public entry points and the raw custom ops
(torch.ops.tubevit_fast.*); fp32 parameters get fp32 gradients; float64 inputs are left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tubevit_fast import TubeEmbed, TubeSpec, numerics
from tubevit_fast.geometry import pack_tubes
from tubevit_fast.ops.attention import attention
from tubevit_fast.reference import model as reference
from tubevit_fast.reference.attention import attention_reference
from tubevit_fast.reference.tube_embed import tube_embed_reference

TUBES = (TubeSpec((2, 3, 3), (2, 4, 4)), TubeSpec((1, 4, 4), (3, 4, 4), (0, 2, 0)))
SIZE = (4, 9, 10)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def test_attention_under_cpu_autocast_matches_the_reference_under_autocast():
    qkv = [torch.randn(2, 7, 2, 32, requires_grad=True) for _ in range(3)]
    dout = torch.randn(2, 7, 2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attention(*qkv)
        ref = attention_reference(*(t.to(torch.bfloat16) for t in qkv))
    assert fast.dtype == ref.dtype == torch.bfloat16
    golden = attention_reference(*(t.double() for t in qkv))
    verdict = numerics.judge(fast, golden, ref, torch.bfloat16, reduction=32)
    assert verdict.ok, verdict.describe("out")
    grads = torch.autograd.grad(fast, qkv, dout.to(torch.bfloat16))
    assert all(g.dtype == torch.float32 for g in grads)  # back through the casts to the fp32 leaves


def test_tube_embed_under_cpu_autocast_matches_the_reference_under_autocast():
    torch.manual_seed(0)
    fast = TubeEmbed(TUBES, 3, 12)
    ref = reference.TubeEmbed(TUBES, 3, 12)
    ref.load_state_dict(fast.state_dict())
    video = torch.randn(2, 3, *SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fast(video), ref(video)
    assert out.dtype == expected.dtype == torch.bfloat16
    golden = ref.double()(video.double())
    verdict = numerics.judge(out, golden, expected, torch.bfloat16, reduction=3 * 2 * 3 * 3)
    assert verdict.ok, verdict.describe("tokens")
    out.float().sum().backward()
    assert fast.weights[0].grad.dtype == torch.float32


def test_custom_ops_cast_under_autocast_when_called_directly():
    q = torch.randn(1, 5, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = torch.ops.tubevit_fast.attention_fwd(q, q, q, None, None, 5, 5, 0.25, "torch")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    video = torch.randn(1, 3, *SIZE)
    weights = [torch.randn(6, 3, *t.kernel) for t in TUBES]
    biases = [torch.randn(6) for _ in TUBES]
    with torch.autocast("cpu", dtype=torch.float16):
        tokens = torch.ops.tubevit_fast.tube_embed(video, weights, biases, None, pack_tubes(TUBES), "torch")
    assert tokens.dtype == torch.float16


def test_mixed_dtypes_are_accepted_under_autocast_only():
    embed = TubeEmbed(TUBES, 3, 12)
    video = torch.randn(1, 3, *SIZE, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="does not match the layer's parameter dtype"):
        embed(video)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert embed(video).dtype == torch.bfloat16


# ---- float64: left alone, as PyTorch does ------------------------------------------------------

@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
def test_float64_attention_is_left_alone_under_autocast(autocast_dtype):
    q, k, v = (torch.randn(2, n, 2, 16, dtype=torch.float64) for n in (5, 6, 6))
    golden = attention_reference(q, k, v, softmax_scale=0.3)  # outside autocast
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[autocast_dtype]):
        # PyTorch's own rule for the ops it casts, which these follow.
        assert F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).dtype == torch.float64
        out = attention(q, k, v, softmax_scale=0.3)
        raw, lse = torch.ops.tubevit_fast.attention_fwd(q, k, v, None, None, 5, 6, 0.3, "torch")
    assert out.dtype == raw.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(out, golden, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(raw, golden, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
def test_float64_tube_embedding_is_left_alone_under_autocast(autocast_dtype):
    embed = TubeEmbed(TUBES, 3, 12).double()
    ref = reference.TubeEmbed(TUBES, 3, 12).double()
    ref.load_state_dict(embed.state_dict())
    video = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    golden = ref(video)  # Conv3d per tube, outside autocast
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[autocast_dtype]):
        assert F.conv3d(video, embed.weights[0]).dtype == torch.float64  # PyTorch's rule
        out = embed(video)
        raw = torch.ops.tubevit_fast.tube_embed(video, list(embed.weights), list(embed.biases), None,
                                                pack_tubes(TUBES), "torch")
    assert out.dtype == raw.dtype == torch.float64
    torch.testing.assert_close(out, golden, rtol=1e-10, atol=1e-10)
    no_pos = tube_embed_reference(video, list(embed.weights), list(embed.biases), TUBES)
    torch.testing.assert_close(raw, no_pos, rtol=1e-10, atol=1e-10)
