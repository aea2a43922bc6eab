"""Build a TubeViT from a timm image ViT (weight inflation; shared/TUBEVIT.md, "Optional parts").

`from_image_vit(vit, tubes, num_classes, backend)` maps a timm ``VisionTransformer`` onto a
`tubevit_fast.model.TubeViT`:

- the transformer blocks are copied one to one (the parameter names already match timm's:
  ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) and so is the
  final norm. A LayerScale (``ls1``/``ls2``, e.g. DeiT-3 or DINOv2) is folded into
  ``attn.proj`` / ``mlp.fc2`` (gamma scales their rows and bias): the same function (up to
  float rounding) with TubeViT's parameter set unchanged. Dropout / drop-path settings are
  not carried over (TubeViT has none). LayerNorm eps and the GELU variant are copied. A ViT
  whose ``norm`` is an Identity but that has an ``fc_norm`` (global-average-pool models)
  gives its ``fc_norm`` to TubeViT's final norm, the closest equivalent.
- the 2D patch projection (``patch_embed.proj``, a Conv2d) becomes the kernel of every 2D
  tube (kt == 1), whose (kh, kw) must equal the ViT's patch size;
- every 3D tube is initialised by inflation: the 2D kernel is resized spatially to (kh, kw)
  with ``F.interpolate(mode="bilinear", align_corners=False)``, repeated over the kt frames
  and divided by kt (so a video that is constant in time gives the resized 2D response);
- every tube's bias is the patch projection's bias;
- the learned position embedding, class token and register tokens are dropped (TubeViT
  uses its fixed sine/cosine embedding and an attention-pooling head); ``attn_pool`` and
  ``head`` are freshly initialised.

`scale_image_to_video` (below) builds the paper's gated image-to-video scaled model on top.

timm is an optional dependency: it is imported only when these functions run.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tubevit_fast import modules
from tubevit_fast.geometry import PAPER_TUBES, TubeSpec, as_tubes
from tubevit_fast.model import TubeViT
from tubevit_fast.reference import model as reference

__all__ = ["from_image_vit", "inflate_kernel", "Gate", "GatedTubeViT", "ProjectedTubeEmbed",
           "scale_image_to_video"]


def _timm_classes():
    try:
        from timm.layers import Mlp
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError as err:  # pragma: no cover - timm is in the test extra
        raise TypeError("from_image_vit takes a timm VisionTransformer, and timm is not installed "
                        "(pip install timm)") from err
    return VisionTransformer, Block, Mlp


def inflate_kernel(weight2d: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """(D, C, ph, pw) 2D patch kernel -> (D, C, kt, kh, kw) tube kernel: bilinear spatial resize
    (align_corners=False), repeat over kt frames, divide by kt. Computed in float32 (float64 stays
    float64) and returned in the input's dtype."""
    if weight2d.dim() != 4:
        raise ValueError(f"a 2D patch kernel is (D, C, ph, pw), got shape {tuple(weight2d.shape)}")
    kt, kh, kw = kernel
    work = weight2d.detach()
    work = work if work.dtype == torch.float64 else work.float()
    if tuple(work.shape[2:]) != (kh, kw):
        work = F.interpolate(work, size=(kh, kw), mode="bilinear", align_corners=False)
    return (work.unsqueeze(2).expand(-1, -1, kt, -1, -1) / kt).to(weight2d.dtype).contiguous()


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _check_layer_norm(name: str, module) -> nn.LayerNorm:
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        raise ValueError(f"{name} must be a LayerNorm over the channels to map onto TubeViT, got {module!r}")
    return module


def _check_block(i: int, block, block_cls, mlp_cls, dim: int) -> None:
    where = f"vit.blocks[{i}]"
    if not isinstance(block, block_cls):
        raise ValueError(f"{where} is a {type(block).__name__}; only timm's pre-norm "
                         f"timm.models.vision_transformer.Block maps onto TubeViT's blocks")
    _check_layer_norm(f"{where}.norm1", block.norm1)
    _check_layer_norm(f"{where}.norm2", block.norm2)
    attn, mlp = block.attn, block.mlp
    for name in ("qkv", "proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            raise ValueError(f"{where}.attn has no nn.Linear {name!r} "
                             f"({type(attn).__name__} is not timm's Attention)")
    if attn.qkv.in_features != dim or attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim:
        raise ValueError(f"{where}.attn projects {dim} channels to {attn.qkv.out_features // 3} per q/k/v; "
                         f"TubeViT needs q/k/v of width {dim} (attn_head_dim must not be set)")
    for name in ("q_norm", "k_norm", "norm"):
        if not _is_identity(getattr(attn, name, None)):
            raise ValueError(f"{where}.attn.{name} is {getattr(attn, name)!r}: qk-norm / scale-norm are not "
                             f"part of TubeViT's blocks")
    if getattr(attn, "gate", None) is not None:
        raise ValueError(f"{where}.attn is a gated attention: not part of TubeViT's blocks")
    plain = isinstance(mlp, mlp_cls) and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
    if not plain or (mlp.fc1.in_features, mlp.fc2.in_features, mlp.fc2.out_features) != \
            (dim, mlp.fc1.out_features, dim):
        raise ValueError(f"{where}.mlp is {type(mlp).__name__}: only timm's two-layer Mlp with nn.Linear "
                         f"layers maps onto TubeViT (GLU / SwiGLU MLPs do not)")
    if not isinstance(getattr(mlp, "act", None), nn.GELU):
        raise ValueError(f"{where}.mlp.act is {getattr(mlp, 'act', None)!r}; TubeViT's MLP uses GELU")
    if not _is_identity(getattr(mlp, "norm", None)):
        raise ValueError(f"{where}.mlp.norm is {mlp.norm!r}: a scale-norm MLP is not part of "
                         f"TubeViT's blocks")
    for name in ("ls1", "ls2"):
        ls = getattr(block, name, None)
        if not _is_identity(ls) and not isinstance(getattr(ls, "gamma", None), torch.Tensor):
            raise ValueError(f"{where}.{name} is {ls!r}: expected nn.Identity or a LayerScale with `gamma`")


def _copy_linear(dst: nn.Linear, src: nn.Linear, scale: torch.Tensor | None = None) -> None:
    weight = src.weight.detach()
    bias = src.bias.detach() if src.bias is not None else torch.zeros_like(dst.bias)
    if scale is not None:  # LayerScale folded in: gamma * (W x + b)
        weight = weight * scale.detach()[:, None]
        bias = bias * scale.detach()
    dst.weight.copy_(weight)
    if dst.bias is not None:
        dst.bias.copy_(bias)


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    dst.eps = src.eps
    dst.weight.copy_(src.weight.detach() if src.weight is not None else torch.ones_like(dst.weight))
    dst.bias.copy_(src.bias.detach() if src.bias is not None else torch.zeros_like(dst.bias))


def _layer_scale(module) -> torch.Tensor | None:
    return None if _is_identity(module) else module.gamma


def from_image_vit(vit: nn.Module, tubes: Sequence[TubeSpec] = PAPER_TUBES, num_classes: int = 400,
                   backend: str = "auto") -> TubeViT:
    """A TubeViT initialised from a timm image ViT (see the module docstring for the mapping).

    vit: a ``timm.models.vision_transformer.VisionTransformer`` with a Conv2d patch embedding
        (any patch size, e.g. 16 or 14), pre-norm blocks, GELU MLPs and no ``norm_pre``.
    tubes: the tube list; it needs at least one 2D tube (kt == 1) and every 2D tube's (kh, kw)
        must equal the ViT's patch size (pass a (1, 14, 14) tube for a patch-14 ViT).
    Returns a `tubevit_fast.model.TubeViT` on the ViT's device and dtype, in training mode.
    """
    return _from_image_vit(vit, tubes, num_classes, backend, TubeViT)


def _from_image_vit(vit, tubes, num_classes, backend, model_cls, **model_kwargs):
    vit_cls, block_cls, mlp_cls = _timm_classes()
    if not isinstance(vit, vit_cls):
        raise TypeError(f"from_image_vit takes a timm VisionTransformer, got {type(vit).__name__}")
    tubes = as_tubes(tubes)
    if not any(t.is_2d for t in tubes):
        raise ValueError(f"the tube list has no 2D tube (kt == 1) to receive the ViT's patch projection: "
                         f"{[str(t) for t in tubes]}")

    patch_embed = vit.patch_embed
    proj = getattr(patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(f"vit.patch_embed.proj must be an nn.Conv2d patch projection, got {proj!r}")
    if tuple(proj.stride) != tuple(proj.kernel_size) or any(tuple(proj.padding)) or proj.groups != 1 \
            or tuple(proj.dilation) != (1, 1):
        raise ValueError(f"vit.patch_embed.proj must be a plain non-overlapping patchify conv "
                         f"(stride == kernel, no padding/dilation/groups), got {proj!r}")
    if not _is_identity(getattr(patch_embed, "norm", None)):
        raise ValueError("vit.patch_embed has a norm layer after the projection: TubeEmbed has none")
    if not _is_identity(getattr(vit, "norm_pre", None)):
        raise ValueError("vit has a pre-norm on the tokens (norm_pre, e.g. CLIP): TubeViT has none")
    patch = tuple(proj.kernel_size)
    for i, tube in enumerate(tubes):
        if tube.is_2d and tube.kernel[1:] != patch:
            raise ValueError(f"tube {i} ({tube}) is a 2D tube with spatial kernel {tube.kernel[1:]} but the "
                             f"ViT's patch size is {patch}: give the 2D tube kernel "
                             f"(1, {patch[0]}, {patch[1]})")

    dim, in_channels = proj.out_channels, proj.in_channels
    if dim < 6:
        raise ValueError(f"the ViT's width {dim} is below 6, the smallest TubeEmbed width "
                         f"(the position embedding uses 6 channels per frequency)")
    blocks = list(vit.blocks)
    if not blocks:
        raise ValueError("the ViT has no blocks")
    for i, block in enumerate(blocks):
        _check_block(i, block, block_cls, mlp_cls, dim)
    first = blocks[0]
    heads = first.attn.num_heads
    hidden = first.mlp.fc1.out_features
    qkv_bias = first.attn.qkv.bias is not None
    for i, block in enumerate(blocks):
        if (block.attn.num_heads, block.mlp.fc1.out_features, block.attn.qkv.bias is not None) != \
                (heads, hidden, qkv_bias):
            raise ValueError(f"vit.blocks[{i}] differs in heads / MLP width / qkv bias from block 0; "
                             f"TubeViT's blocks are uniform")
    final_norm = vit.norm if not _is_identity(getattr(vit, "norm", None)) else getattr(vit, "fc_norm", None)
    if not _is_identity(final_norm):
        _check_layer_norm("vit.norm", final_norm)

    ref = proj.weight
    # mlp_ratio (hidden + 0.5) / dim: int(dim * ratio) gives back `hidden` despite float rounding.
    model = model_cls(num_classes=num_classes, tubes=tubes, in_channels=in_channels, dim=dim,
                      depth=len(blocks), heads=heads, mlp_ratio=(hidden + 0.5) / dim, qkv_bias=qkv_bias,
                      backend=backend, **model_kwargs)
    model.to(device=ref.device, dtype=ref.dtype)

    with torch.no_grad():
        embed = model.tube_embed
        weight2d = proj.weight.detach()
        bias2d = (proj.bias.detach() if proj.bias is not None
                  else torch.zeros(dim, dtype=ref.dtype, device=ref.device))
        for tube, weight, bias in zip(embed.tubes, embed.weights, embed.biases):
            if tube.is_2d:
                weight.copy_(weight2d.unsqueeze(2))
            else:
                weight.copy_(inflate_kernel(weight2d, tube.kernel))
            bias.copy_(bias2d)
        for src, dst in zip(blocks, model.blocks):
            _copy_norm(dst.norm1, src.norm1)
            _copy_norm(dst.norm2, src.norm2)
            _copy_linear(dst.attn.qkv, src.attn.qkv)
            _copy_linear(dst.attn.proj, src.attn.proj, _layer_scale(src.ls1))
            _copy_linear(dst.mlp.fc1, src.mlp.fc1)
            _copy_linear(dst.mlp.fc2, src.mlp.fc2, _layer_scale(src.ls2))
            dst.mlp.act = nn.GELU(approximate=src.mlp.act.approximate)
        if not _is_identity(final_norm):
            _copy_norm(model.norm, final_norm)
        # else: a ViT without any final norm; TubeViT's (weight 1, bias 0) stays as initialised.
    return model


# ---- Image-to-video scaling (paper: "Image-to-video scaling"; shared/TUBEVIT.md) ----------------
#
# A large image ViT becomes a video model using a small, jointly trained TubeViT's tube kernels:
#   z0       = tube tokens (with the fixed position embedding), i.e. what enters block 0
#   y_s      = output of the large model's blocks 0 .. s-1, which stay frozen
#   z_s      = MLP(LN(y_s)) + y_s + tanh(alpha) * z0, alpha = 0 at init; blocks s .. end follow.
# Choices made here (the paper leaves them open):
# - Width: the small model's tube kernels have dim_small output channels, the large model needs
#   dim_large. A learned linear projection P (dim_large x dim_small, no bias) maps them: tube i's
#   kernel is P @ W_small_i and its bias P @ b_small_i, composed in every forward so the fused
#   tube_embed op still runs once on all tubes. (Repeating channels or space-to-depth would need
#   dim_large to be a multiple of dim_small: B -> L is 768 -> 1024, B -> H 768 -> 1280, so no.)
#   P is initialised by least squares so that P maps the small model's 2D patch kernel and bias
#   onto the large ViT's (both tokenize the same 2D patches), i.e. the small model's token space
#   is mapped to where the large image ViT expects its tokens.
# - The 2D tube keeps the large image ViT's own patch kernel (frozen with blocks < s), so images
#   still go through exactly the image ViT's tokenizer; the 3D tubes come from the small model.
# - The gate's MLP has the blocks' hidden width; its last layer is zero-initialised, so with
#   alpha = 0 the gate is exactly the identity on y_s at init (the gated model equals the
#   ungated one).
# - Trained (the parameter groups): the small model's 3D tube kernels and biases and P ("tubes"),
#   the gate ("gate"), blocks s .. end and the final norm ("blocks"), attention pool and
#   classifier ("head"). Frozen (requires_grad False): blocks 0 .. s-1 and the 2D tube.

class Gate(nn.Module):
    """z_s = MLP(LN(y_s)) + y_s + tanh(alpha) * z0, an identity on y_s at init (alpha = 0, MLP's
    last layer zero)."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = reference.Mlp(dim, hidden)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.mlp.fc1.reset_parameters()
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)
        nn.init.zeros_(self.alpha)

    def forward(self, y: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(y)) + y + torch.tanh(self.alpha).to(y.dtype) * z0


def _check_gate_layer(gate_layer, depth: int) -> int:
    if not isinstance(gate_layer, int) or isinstance(gate_layer, bool) or not 1 <= gate_layer <= depth:
        raise ValueError(f"gate_layer must be an int in 1..{depth} (the model has {depth} blocks; the gate "
                         f"sits before block gate_layer, or after the last one for {depth}), "
                         f"got {gate_layer!r}")
    return gate_layer


class GatedTubeViT(TubeViT):
    """TubeViT with the paper's gated skip from the tube tokens z0 into layer `gate_layer` (s):
    the input of block s becomes ``gate(y_s, z0) = MLP(LN(y_s)) + y_s + tanh(alpha) * z0``.
    s ranges over 1..depth (s = depth gates the output of the last block). At init the model
    equals the plain TubeViT with the same weights. Works on batched and packed input."""

    def __init__(self, *args, gate_layer: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_layer = _check_gate_layer(gate_layer, len(self.blocks))
        self.gate = Gate(self.dim, self.blocks[0].mlp.fc1.out_features)

    def forward_features(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                         max_seqlen: int | None = None) -> torch.Tensor:
        z0 = x
        for i, block in enumerate(self.blocks):
            if i == self.gate_layer:
                x = self.gate(x, z0)
            x = block(x, cu_seqlens, max_seqlen)
        if self.gate_layer == len(self.blocks):
            x = self.gate(x, z0)
        return self.norm(x)

    def extra_repr(self) -> str:
        return f"gate_layer={self.gate_layer}"


class ProjectedTubeEmbed(modules.TubeEmbed):
    """A TubeEmbed whose tubes in `projected` hold kernels/biases of width `source_dim` (a smaller
    model's), mapped to `dim` by a learned projection ``proj`` (no bias): kernel P @ W_i, bias
    P @ b_i, composed in each forward. The other tubes hold ordinary (dim, ...) kernels."""

    def __init__(self, tubes: Sequence[TubeSpec], in_channels: int, dim: int, source_dim: int,
                 projected: Sequence[int], pos_embed: bool = True, backend: str = "auto"):
        super().__init__(tubes, in_channels, dim, pos_embed, backend)
        projected = tuple(sorted(set(projected)))
        if not projected or not all(isinstance(i, int) and 0 <= i < len(self.tubes) for i in projected):
            raise ValueError(f"projected must name tubes 0..{len(self.tubes) - 1}, got {projected}")
        self.projected, self.source_dim = projected, source_dim
        for i in projected:
            self.weights[i] = nn.Parameter(torch.empty(source_dim, in_channels, *self.tubes[i].kernel))
            self.biases[i] = nn.Parameter(torch.empty(source_dim))
        self.proj = nn.Linear(source_dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "proj" in self._modules:
            self.proj.reset_parameters()

    def tube_kernels(self, index: Sequence[int] | None = None) -> list[torch.Tensor]:
        index = list(range(len(self.tubes)) if index is None else index)
        kernels = super().tube_kernels(index)
        return [(self.proj.weight @ k.flatten(1)).view(self.dim, *k.shape[1:]) if i in self.projected else k
                for i, k in zip(index, kernels)]

    def tube_biases(self, index: Sequence[int] | None = None) -> list[torch.Tensor]:
        index = list(range(len(self.tubes)) if index is None else index)
        return [self.proj(b) if i in self.projected else b for i, b in zip(index, super().tube_biases(index))]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, projected={self.projected}, source_dim={self.source_dim}"


def _fit_projection(source_w, source_b, target_w, target_b) -> torch.Tensor:
    """P (target_dim x source_dim) minimising ||P [Ws | bs] - [Wt | bt]||_F (least squares, float64)."""
    a = torch.cat([source_w.flatten(1), source_b[:, None]], 1).detach().cpu().double()
    b = torch.cat([target_w.flatten(1), target_b[:, None]], 1).detach().cpu().double()
    return torch.linalg.lstsq(a.T, b.T, driver="gelsd").solution.T


def scale_image_to_video(large_vit: nn.Module, small: nn.Module, gate_layer: int, num_classes: int = 400,
                         backend: str = "auto") -> tuple[GatedTubeViT, list[dict]]:
    """The paper's image-to-video scaling: a large timm image ViT (converted by `from_image_vit`
    with the small model's tube list) + a small trained TubeViT's 3D tube kernels (through a
    learned width projection), blocks before `gate_layer` frozen, gated skip from z0 at
    `gate_layer`. See the comment block above for every choice made.

    Returns (model, param_groups): the GatedTubeViT (frozen parameters have requires_grad False)
    and torch.optim parameter groups {"name": ..., "params": [...]} ("tubes", "gate", "blocks",
    "head") holding exactly the trainable parameters.
    """
    vit_cls, _, _ = _timm_classes()
    if not isinstance(large_vit, vit_cls):
        raise TypeError(f"large_vit must be a timm VisionTransformer, got {type(large_vit).__name__}")
    if not isinstance(small, reference.TubeViT):
        raise TypeError(f"small must be a TubeViT (tubevit_fast), got {type(small).__name__}")
    _check_gate_layer(gate_layer, len(large_vit.blocks))
    small_embed = small.tube_embed
    tubes = small_embed.tubes
    projected = [i for i, t in enumerate(tubes) if not t.is_2d]
    if not projected:
        raise ValueError("the small TubeViT has no 3D tube (kt > 1) to give the large model")

    model = _from_image_vit(large_vit, tubes, num_classes, backend, GatedTubeViT, gate_layer=gate_layer)
    large_embed = model.tube_embed
    if small_embed.in_channels != large_embed.in_channels:
        raise ValueError(f"the small TubeViT takes {small_embed.in_channels} input channels, the ViT "
                         f"{large_embed.in_channels}")
    ref = large_embed.weights[0]
    embed = ProjectedTubeEmbed(tubes, large_embed.in_channels, large_embed.dim, small_embed.dim, projected,
                               large_embed.pos_embed, backend).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        small_kernels, small_biases = small_embed.tube_kernels(), small_embed.tube_biases()
        for i in range(len(tubes)):
            source_w, source_b = ((small_kernels[i], small_biases[i]) if i in projected
                                  else (large_embed.weights[i], large_embed.biases[i]))
            embed.weights[i].copy_(source_w)
            embed.biases[i].copy_(source_b)
        j = next(i for i, t in enumerate(tubes) if t.is_2d)
        embed.proj.weight.copy_(_fit_projection(small_kernels[j], small_biases[j],
                                                large_embed.weights[j], large_embed.biases[j]))
    model.tube_embed = embed

    frozen = list(model.blocks[:gate_layer].parameters())
    fixed = [i for i in range(len(tubes)) if i not in projected]  # the large ViT's 2D tube(s)
    frozen += [p for i in fixed for p in (embed.weights[i], embed.biases[i])]
    for p in frozen:
        p.requires_grad_(False)
    groups = [
        {"name": "tubes", "params": [p for i in projected for p in (embed.weights[i], embed.biases[i])]
         + [embed.proj.weight]},
        {"name": "gate", "params": list(model.gate.parameters())},
        {"name": "blocks",
         "params": list(model.blocks[gate_layer:].parameters()) + list(model.norm.parameters())},
        {"name": "head", "params": list(model.attn_pool.parameters()) + list(model.head.parameters())},
    ]
    return model, groups
