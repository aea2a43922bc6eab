"""tube_embed: the op behind TubeEmbed (all tubes' tokens, bias and position embedding in one go).

Backends: "reference" (Conv3d per tube), "torch" (tubevit_fast.torch_backend.tube_embed),
"triton" (tubevit_fast.kernels.tube_embed). The fast ones run behind a torch.library
custom op with a fake kernel and registered autograd, so torch.compile traces through
them without a graph break. (Not triton_op: its fake path runs the kernel on meta tensors.)
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

from tubevit_fast import backends
from tubevit_fast.geometry import TubeSpec, as_tubes, num_tokens, pack_tubes, unpack_tubes
from tubevit_fast.reference.tube_embed import tube_embed_reference

_IMPL_MODULES = {"torch": "tubevit_fast.torch_backend.tube_embed", "triton": "tubevit_fast.kernels.tube_embed"}


def _impl(backend: str):
    return importlib.import_module(_IMPL_MODULES[backend])


@torch.library.custom_op("tubevit_fast::tube_embed", mutates_args=())
def _tube_embed_op(video: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                   pos: Optional[torch.Tensor], tubes: list[int], backend: str) -> torch.Tensor:
    return _impl(backend).tube_embed_forward(video, list(weights), list(biases), pos, unpack_tubes(tubes))


@_tube_embed_op.register_fake
def _(video, weights, biases, pos, tubes, backend):
    tubes = unpack_tubes(tubes)
    n = num_tokens(tubes, video.shape[2:])
    return video.new_empty(video.shape[0], n, tubes[0].token_dim(weights[0].shape[0]))


@torch.library.custom_op("tubevit_fast::tube_embed_backward", mutates_args=())
def _tube_embed_backward_op(grad_out: torch.Tensor, video: torch.Tensor, weights: list[torch.Tensor],
                            tubes: list[int], backend: str, input_requires_grad: bool
                            ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    grad_video, grad_weights, grad_biases = _impl(backend).tube_embed_backward(
        grad_out, video, list(weights), unpack_tubes(tubes), input_requires_grad)
    # A custom op cannot return None: an empty tensor stands for "video needs no gradient".
    return (grad_video if grad_video is not None else video.new_empty(0)), grad_weights, grad_biases


@_tube_embed_backward_op.register_fake
def _(grad_out, video, weights, tubes, backend, input_requires_grad):
    grad_video = torch.empty_like(video) if input_requires_grad else video.new_empty(0)
    return (grad_video, [torch.empty_like(w) for w in weights],
            [w.new_empty(w.shape[0]) for w in weights])


def _setup_context(ctx, inputs, output):
    video, weights, biases, pos, tubes, backend = inputs
    ctx.save_for_backward(video, *weights)
    ctx.tubes, ctx.backend = tubes, backend


def _backward(ctx, grad_out):
    video, *weights = ctx.saved_tensors
    needs_video = ctx.needs_input_grad[0]
    grad_video, grad_weights, grad_biases = _tube_embed_backward_op(
        grad_out, video, weights, ctx.tubes, ctx.backend, needs_video)
    return (grad_video if needs_video else None), grad_weights, grad_biases, None, None, None


_tube_embed_op.register_autograd(_backward, setup_context=_setup_context)


def _make_selfcheck(backend: str, weights, biases, tubes, in_channels: int, device, dtype):
    """A check that runs `backend` against the reference on a small random input."""
    def check():
        size = tuple(max(sizes) + 3 for sizes in zip(*[t.min_size() for t in tubes]))
        gen = torch.Generator(device="cpu").manual_seed(0)
        video = torch.randn(2, in_channels, *size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        ws = [torch.randn(w.shape, generator=gen).mul_(0.05).to(device=device, dtype=dtype).requires_grad_()
              for w in weights]
        bs = [torch.randn(b.shape, generator=gen).to(device=device, dtype=dtype).requires_grad_() for b in biases]
        fast = _tube_embed_op(video, ws, bs, None, pack_tubes(tubes), backend)
        ref = tube_embed_reference(video, ws, bs, tubes, None)
        grad = torch.randn(fast.shape, generator=gen).to(device=device, dtype=dtype)
        fast_grads = torch.autograd.grad(fast, [video, *ws, *bs], grad)
        ref_grads = torch.autograd.grad(ref, [video, *ws, *bs], grad)
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        for name, a, b in [("output", fast, ref)] + [("grad", a, b) for a, b in zip(fast_grads, ref_grads)]:
            err = (a.float() - b.float()).abs().max().item()
            scale = b.float().abs().max().item() + 1.0
            assert err <= tol * scale, f"{name}: max error {err:.3e} (scale {scale:.2e})"
    return check


def tube_embed(video: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
               tubes: Sequence[TubeSpec], pos: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """All tubes' tokens of a (B, C, T, H, W) video, concatenated, + bias + pos: (B, N, dim).

    Inputs are assumed checked by the caller (TubeEmbed does it). `pos` is a constant
    (the fixed embedding): no gradient flows to it.
    """
    tubes = as_tubes(tubes)
    weights, biases = list(weights), list(biases)
    key = (video.dtype, video.shape[1], weights[0].shape[0], tubes)
    chosen = backends.pick("tube_embed", backend, video.device, key,
                           lambda b: _make_selfcheck(b, weights, biases, tubes, video.shape[1],
                                                     video.device, video.dtype))
    if chosen == "reference":
        return tube_embed_reference(video, weights, biases, tubes, pos)
    return _tube_embed_op(video, weights, biases, pos, pack_tubes(tubes), chosen)
