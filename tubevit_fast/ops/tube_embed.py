"""tube_embed: the op behind TubeEmbed (all tubes' tokens, bias and position embedding in one go).

Backends: "reference" (Conv3d per tube), "torch" (tubevit_fast.torch_backend.tube_embed),
"triton" (tubevit_fast.kernels.tube_embed). The fast ones run behind a torch.library
custom op with a fake kernel and registered autograd, so torch.compile traces through
them without a graph break. (Not triton_op: its fake path runs the kernel on meta tensors.)
The reference and torch backends take float64 too; Triton runs float32/float16/bfloat16.
The video may be uint8 pixels: every backend then reads the pixels as they are (no
normalisation here: TubeEmbed folds it into the weights) and computes and returns in the
weights' dtype; only floating-point videos take (and get) a gradient.
Under torch.autocast the video, weights and biases are cast to the autocast dtype
(tubevit_fast.amp), as Conv3d's are; the fixed position embedding stays float32.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

from tubevit_fast import amp, backends, numerics
from tubevit_fast.geometry import TubeSpec, as_tubes, num_tokens, pack_tubes, unpack_tubes
from tubevit_fast.pixels import compute_dtype
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
    return video.new_empty(video.shape[0], n, tubes[0].token_dim(weights[0].shape[0]),
                           dtype=compute_dtype(video, weights[0]))


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
amp.register_autocast(_tube_embed_op, "tubevit_fast::tube_embed", cast_args=(0, 1, 2))


def _unsupported(backend: str, dtype: torch.dtype, head_dim, layout, details: tuple) -> str | None:
    """What `backend` cannot do with such inputs (None if it can): backends.register_op's hook."""
    if backend == "triton" and dtype == torch.float64:
        return f"runs float32/float16/bfloat16 only, got {dtype}"
    return None


def _make_selfcheck(backend: str, device: torch.device, dtype: torch.dtype, head_dim, layout, details: tuple):
    """A check that runs `backend` forward and backward (dX, dW, db) on a small random input
    against the float64 reference, by tubevit_fast.numerics' rule (backends.register_op's hook).
    details: (in_channels, each tube's width, pack_tubes(tubes), whether the video is uint8
    pixels: then the fast op reads them as uint8, and no video gradient is checked)."""
    channels, widths, packed, pixels = details
    tubes = unpack_tubes(packed)

    def check():
        size = tuple(max(sizes) + 3 for sizes in zip(*[t.min_size() for t in tubes]))
        gen = torch.Generator(device="cpu").manual_seed(0)

        def randn(*shape, scale=1.0):
            # On the CPU whatever torch.set_default_device says, then moved.
            return (torch.randn(shape, generator=gen, dtype=torch.float64, device="cpu") * scale).to(device)

        video = (torch.randint(0, 256, (2, channels, *size), generator=gen).to(device, torch.float64) if pixels
                 else randn(2, channels, *size))
        weight_scale = 0.05 / 255 if pixels else 0.05
        inputs = [video, *(randn(w, channels, *t.kernel, scale=weight_scale) for w, t in zip(widths, tubes)),
                  *(randn(w) for w in widths)]
        n = len(tubes)
        dout = randn(2, num_tokens(tubes, size), tubes[0].token_dim(widths[0]))

        def run(fn, precision, video_dtype=None):
            leaves = [t.to(precision).requires_grad_() for t in inputs]
            if pixels:  # the same integer values: as uint8 for the fast op, without a gradient
                leaves[0] = inputs[0].to(video_dtype or precision)
            out = fn(leaves[0], leaves[1:1 + n], leaves[1 + n:])
            wrt = leaves[1:] if pixels else leaves
            return [out, *torch.autograd.grad(out, wrt, dout.to(precision))]

        fast = run(lambda v, ws, bs: _tube_embed_op(v, ws, bs, None, packed, backend), dtype, torch.uint8)
        same_dtype = run(lambda v, ws, bs: tube_embed_reference(v, ws, bs, tubes), dtype)
        golden = run(lambda v, ws, bs: tube_embed_reference(v, ws, bs, tubes), torch.float64)
        # Longest reduction: a patch (forward), a token's channels (dX), all tokens (dW, db).
        reduction = max(max(t.patch_size(channels) for t in tubes), max(widths), dout.shape[0] * dout.shape[1])
        names = (["output"] + ([] if pixels else ["grad video"]) + [f"grad weight {i}" for i in range(n)]
                 + [f"grad bias {i}" for i in range(n)])
        for name, a, r, g in zip(names, fast, same_dtype, golden):
            verdict = numerics.judge(a, g, r, dtype, reduction)
            assert verdict.ok, verdict.describe(name)
    return check


backends.register_op("tube_embed", _unsupported, _make_selfcheck)


def tube_embed(video: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
               tubes: Sequence[TubeSpec], pos: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """All tubes' tokens of a (B, C, T, H, W) video, concatenated, + bias + pos: (B, N, dim).

    The video is floating-point (already normalised) or uint8 pixels, taken as they are: the
    weights must then include the normalisation (TubeEmbed folds it in) and set the dtype.
    Inputs are assumed checked by the caller (TubeEmbed does it). `pos` is a constant
    (the fixed embedding): no gradient flows to it.
    """
    tubes = as_tubes(tubes)
    video, weights, biases = amp.autocast_inputs(video.device.type, video, list(weights), list(biases))
    pixels = video.dtype == torch.uint8
    if not (video.is_floating_point() or pixels) or not weights[0].is_floating_point():
        raise TypeError(f"tube_embed takes a floating-point or uint8 video and floating-point weights, got "
                        f"{video.dtype} and {weights[0].dtype}")
    packed = pack_tubes(tubes)
    details = (video.shape[1], tuple(w.shape[0] for w in weights), tuple(packed), pixels)
    chosen = backends.pick("tube_embed", backend, video.device, compute_dtype(video, weights[0]), details=details)
    if chosen == "reference":
        return tube_embed_reference(video, weights, biases, tubes, pos)
    return _tube_embed_op(video, weights, biases, pos, packed, chosen)
