import pytest
import torch

from tubevit_fast import TubeSpec, TubeViT, patch
from tubevit_fast.reference import model as reference
from tubevit_fast.reference.model import PRESETS

TINY = dict(num_classes=5, dim=64, depth=2, heads=2, mlp_ratio=2.0, tubes=(  # head dim 32
    TubeSpec((2, 4, 4), (2, 4, 4)),
    TubeSpec((4, 2, 2), (2, 5, 5), (1, 1, 1)),
    TubeSpec((1, 4, 4), (4, 4, 4)),
))


def tiny_reference():
    torch.manual_seed(0)
    return reference.TubeViT(**TINY)


@pytest.mark.parametrize("shape", [(2, 3, 8, 12, 12), (2, 3, 12, 12)], ids=["video", "image"])
def test_reference_forward_backward(shape):
    model = tiny_reference()
    x = torch.randn(*shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    used = [0, 1, 2] if len(shape) == 5 else [2]
    for i, w in enumerate(model.tube_embed.weights):
        assert (w.grad is not None and w.grad.abs().sum() > 0) == (i in used)
    for name, p in model.named_parameters():
        if not name.startswith("tube_embed"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_samples_are_independent():
    model = tiny_reference().eval()
    x = torch.randn(3, 3, 8, 12, 12)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-5, atol=1e-5)


def test_timm_parameter_names():
    names = set(dict(tiny_reference().named_parameters()))
    for name in ["blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                 "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "norm.weight",
                 "attn_pool.latent", "attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.proj.weight",
                 "attn_pool.norm.weight", "attn_pool.mlp.fc1.weight", "head.weight",
                 "tube_embed.weights.0", "tube_embed.biases.2"]:
        assert name in names, name


@pytest.mark.parametrize("name, dim, depth, heads, head_dim", [
    ("B", 768, 12, 12, 64), ("L", 1024, 24, 16, 64), ("H", 1280, 32, 16, 80)])
def test_presets_are_constructible(name, dim, depth, heads, head_dim):
    with torch.device("meta"):  # no memory, no init cost: only the structure is checked
        model = TubeViT.preset(name, num_classes=400, backend="reference")
    assert PRESETS[name] == dict(dim=dim, depth=depth, heads=heads)
    assert len(model.blocks) == depth and model.blocks[0].attn.head_dim == head_dim
    assert model.tube_embed.weights[0].shape == (dim, 3, 8, 8, 8)
    assert model.head.out_features == 400
    with pytest.raises(ValueError, match="unknown preset 'XL'"):
        TubeViT.preset("XL")


def test_fast_model_has_reference_state_dict_and_outputs():
    ref = tiny_reference()
    fast = TubeViT(**TINY, backend="torch")
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 8, 12, 12)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)


def test_patch_swaps_layers_in_place():
    model = tiny_reference()
    x = torch.randn(2, 3, 8, 12, 12)
    before = model(x)
    params = [p for p in model.parameters()]
    patch(model, backend="torch")
    assert type(model.tube_embed).__module__ == "tubevit_fast.modules"
    assert type(model.blocks[0].attn).__module__ == "tubevit_fast.modules"
    assert type(model.attn_pool).__module__ == "tubevit_fast.modules"
    assert all(a is b for a, b in zip(params, model.parameters()))
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown backend"):
        patch(model, backend="gpu")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=64, heads=5), "not divisible by num_heads 5"),
    (dict(depth=0), "depth must be an int >= 1"),
    (dict(num_classes=0), "num_classes must be an int >= 1"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference.TubeViT(**{**TINY, **kwargs})


def mixed_samples():
    torch.manual_seed(1)
    return [torch.randn(3, 12, 12), torch.randn(3, 8, 12, 12), torch.randn(3, 16, 20),
            torch.randn(3, 12, 16, 12), torch.randn(3, 8, 12, 12), torch.randn(3, 12, 12)]


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_packed_batch_equals_each_sample_alone(backend):
    model = TubeViT(**TINY, backend=backend).eval()
    samples = mixed_samples()
    packed = model(samples)
    alone = torch.cat([model(s.unsqueeze(0)) for s in samples])
    assert packed.shape == (len(samples), 5)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_packed_batch_gradients_match_per_sample():
    model = TubeViT(**TINY, backend="torch")
    samples = mixed_samples()
    model(samples).square().sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(model(s.unsqueeze(0)).square().sum() for s in samples).backward()
    for a, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-4)


def test_packing_records_segments():
    model = tiny_reference()
    samples = mixed_samples()
    tokens, cu_seqlens, max_seqlen = model.pack(samples)
    lengths = [model.tube_embed.num_tokens(s.shape[1:]) for s in samples]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert tokens.shape == (sum(lengths), 64) and max_seqlen == max(lengths)


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty list"),
    ([torch.randn(3, 12)], r"sample 0 must be a \(C, H, W\) image"),
    ([torch.randn(3, 12, 12), "video"], "sample 1 must be"),
])
def test_bad_packed_batches(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_reference()(bad)


def test_torch_compile_fullgraph_whole_model():
    """Compiled (fullgraph) forward and every parameter's gradient equal eager's."""
    model = TubeViT(**TINY, backend="torch")
    x = torch.randn(2, 3, 8, 12, 12)
    expected = model(x)
    expected.square().sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- the attention-pooling head against an independent implementation ---------------------------

POOL_BACKENDS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def pool_and_oracle(backend: str, dim: int = 64, heads: int = 2):
    """The library's pooling head on `backend` and timm's AttentionPoolLatent holding its weights
    (timm's parameter names; LayerNorm eps 1e-6 as in big_vision's MAP head)."""
    import functools
    from timm.layers import AttentionPoolLatent as TimmPool

    from tubevit_fast.modules import AttentionPoolLatent
    torch.manual_seed(0)
    pool = AttentionPoolLatent(dim, heads, mlp_ratio=2.0)
    pool.backend = backend
    oracle = TimmPool(dim, num_heads=heads, mlp_ratio=2.0, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    oracle.load_state_dict(pool.state_dict())
    return pool, oracle


def _pool_dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64  # Triton runs no float64


@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_pooling_head_matches_timm_dense(backend):
    """Forward and every gradient (input and parameters) against timm's implementation."""
    from conftest import TRITON_DEVICE
    dtype = _pool_dtype(backend)
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    pool, oracle = (m.to(device, dtype) for m in pool_and_oracle(backend))
    x = torch.randn(3, 11, 64, dtype=dtype, device=device, requires_grad=True)
    out, want = pool(x), oracle(x)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, want, **tol)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *pool.parameters()], dout)
    expected = torch.autograd.grad(want, [x, *oracle.parameters()], dout)
    names = ["x"] + [n for n, _ in pool.named_parameters()]
    assert names[1:] == [n for n, _ in oracle.named_parameters()]
    for name, got, exp in zip(names, grads, expected):
        torch.testing.assert_close(got, exp, **tol, msg=name)


@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_pooling_head_matches_timm_packed(backend):
    """A packed batch (cu_seqlens) pools every sample as timm pools it alone; gradients too."""
    from conftest import TRITON_DEVICE
    from tubevit_fast.packing import cu_seqlens_from_lengths
    dtype = _pool_dtype(backend)
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    pool, oracle = (m.to(device, dtype) for m in pool_and_oracle(backend))
    lengths = [5, 1, 9]
    x = torch.randn(sum(lengths), 64, dtype=dtype, device=device, requires_grad=True)
    out = pool(x, cu_seqlens_from_lengths(lengths, device), max(lengths))
    want = torch.cat([oracle(piece[None]) for piece in x.split(lengths)])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, want, **tol)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *pool.parameters()], dout)
    expected = torch.autograd.grad(want, [x, *oracle.parameters()], dout)
    for name, got, exp in zip(["x"] + [n for n, _ in pool.named_parameters()], grads, expected):
        torch.testing.assert_close(got, exp, **tol, msg=name)
