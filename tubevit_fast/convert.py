"""Build a TubeViT from weights users already have.

`from_image_vit(vit, tubes, num_classes, backend, interpolated_from)` maps an image ViT, timm's
``VisionTransformer`` or torchvision's (``vit_b_16`` and friends), onto a
`tubevit_fast.model.TubeViT` (weight inflation; shared/TUBEVIT.md, "Optional parts"):

- the transformer blocks are copied one to one. timm's parameter names already match TubeViT's
  (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``); torchvision's
  ``EncoderBlock`` maps as ``ln_1`` -> ``norm1``, ``self_attention.in_proj_*`` -> ``attn.qkv``
  (the same [q; k; v] row order, heads contiguous), ``self_attention.out_proj`` -> ``attn.proj``,
  ``ln_2`` -> ``norm2``, ``mlp.0`` -> ``mlp.fc1``, ``mlp.3`` -> ``mlp.fc2``, and the encoder's
  ``ln`` -> ``norm``. A timm LayerScale (``ls1``/``ls2``, e.g. DeiT-3 or DINOv2) is folded into
  ``attn.proj`` / ``mlp.fc2`` (gamma scales their rows and bias): the same function (up to float
  rounding) with TubeViT's parameter set unchanged. Dropout / drop-path settings are not carried
  over (set TubeViT's drop_path= yourself). LayerNorm eps and the GELU variant are copied. A timm ViT whose
  ``norm`` is an Identity but that has an ``fc_norm`` (global-average-pool models) gives its
  ``fc_norm`` to TubeViT's final norm, the closest equivalent.
- the 2D patch projection (timm's ``patch_embed.proj``, torchvision's ``conv_proj``, a Conv2d)
  becomes the kernel of every 2D tube (kt == 1), whose (kh, kw) must equal the ViT's patch size;
- every 3D tube is initialised by inflation: the 2D kernel is resized spatially to (kh, kw)
  with ``F.interpolate(mode="bilinear", align_corners=False)``, repeated over the kt frames
  and divided by kt (so a video that is constant in time gives the resized 2D response);
- with ``interpolated_from=(bt, bh, bw)`` the model learns one base kernel instead (see
  TubeEmbed): it is the patch kernel inflated to (bt, bh, bw) the same way, and every tube,
  the 2D ones included, derives its kernel from it, so no tube needs the ViT's patch size;
- every tube's bias is the patch projection's bias;
- the learned position embedding, class token and register tokens are dropped (TubeViT
  uses its fixed sine/cosine embedding and an attention-pooling head); ``attn_pool`` and
  ``head`` are freshly initialised.

`from_tubevit_port(state_dict)` loads a checkpoint of daniel-code/TubeViT, the public PyTorch
port (see its docstring); `scale_image_to_video` (below) builds the paper's gated image-to-video
scaled model on top of `from_image_vit`.

timm and torchvision are optional: a ViT is recognised by its class, and neither library is
imported unless one of their models is passed.
"""
from __future__ import annotations

import re
import sys
import warnings
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tubevit_fast import modules
from tubevit_fast.geometry import PAPER_TUBES, TubeSpec, as_tubes
from tubevit_fast.model import TubeViT
from tubevit_fast.reference import model as reference

__all__ = ["from_image_vit", "from_tubevit_port", "inflate_kernel", "PORT_TUBES", "PORT_UCF101_TUBES", "Gate",
           "GatedTubeViT", "ProjectedTubeEmbed", "scale_image_to_video"]


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


# ---- Reading an encoder: each source gives TubeViT's blocks as plain tensors --------------------

class _Norm(NamedTuple):
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


class _Linear(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None


class _Block(NamedTuple):
    """One pre-norm block in TubeViT's terms: x += proj(attn(qkv(norm1 x))); x += fc2(act(fc1(norm2 x)))."""
    norm1: _Norm
    qkv: _Linear
    proj: _Linear
    norm2: _Norm
    fc1: _Linear
    fc2: _Linear
    gelu_approximate: str


class _Encoder(NamedTuple):
    heads: int
    blocks: list[_Block]
    norm: _Norm | None  # None: the source has no final norm


class _ImageViT(NamedTuple):
    """An image ViT read into plain tensors: its patch projection and its encoder."""
    patch_weight: torch.Tensor      # (D, C, ph, pw)
    patch_bias: torch.Tensor | None
    encoder: _Encoder


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _check_layer_norm(name: str, module) -> nn.LayerNorm:
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        raise ValueError(f"{name} must be a LayerNorm over the channels to map onto TubeViT, got {module!r}")
    return module


def _norm(module: nn.LayerNorm) -> _Norm:
    return _Norm(module.weight, module.bias, module.eps)


def _linear(module: nn.Linear, scale: torch.Tensor | None = None) -> _Linear:
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    if scale is not None:  # LayerScale folded in: gamma * (W x + b)
        weight = weight * scale.detach()[:, None]
        bias = (torch.zeros_like(scale) if bias is None else bias) * scale.detach()
    return _Linear(weight, bias)


def _class_of(obj, module: str, name: str) -> bool:
    """isinstance(obj, module.name) without importing `module` when the caller has not."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(obj, getattr(mod, name, ()))


def _check_patch_conv(name: str, proj) -> nn.Conv2d:
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(f"{name} must be an nn.Conv2d patch projection, got {proj!r}")
    if tuple(proj.stride) != tuple(proj.kernel_size) or any(tuple(proj.padding)) or proj.groups != 1 \
            or tuple(proj.dilation) != (1, 1):
        raise ValueError(f"{name} must be a plain non-overlapping patchify conv "
                         f"(stride == kernel, no padding/dilation/groups), got {proj!r}")
    return proj


def _check_timm_block(i: int, block, dim: int) -> None:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block

    where = f"vit.blocks[{i}]"
    if not isinstance(block, Block):
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
    plain = isinstance(mlp, Mlp) and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
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


def _read_timm_vit(vit) -> _ImageViT:
    patch_embed = vit.patch_embed
    proj = _check_patch_conv("vit.patch_embed.proj", getattr(patch_embed, "proj", None))
    if not _is_identity(getattr(patch_embed, "norm", None)):
        raise ValueError("vit.patch_embed has a norm layer after the projection: TubeEmbed has none")
    if not _is_identity(getattr(vit, "norm_pre", None)):
        raise ValueError("vit has a pre-norm on the tokens (norm_pre, e.g. CLIP): TubeViT has none")
    blocks = list(vit.blocks)
    for i, block in enumerate(blocks):
        _check_timm_block(i, block, proj.out_channels)
    final_norm = vit.norm if not _is_identity(getattr(vit, "norm", None)) else getattr(vit, "fc_norm", None)
    if not _is_identity(final_norm):
        _check_layer_norm("vit.norm", final_norm)

    def scale(ls):
        return None if _is_identity(ls) else ls.gamma

    read = [_Block(_norm(b.norm1), _linear(b.attn.qkv), _linear(b.attn.proj, scale(b.ls1)), _norm(b.norm2),
                   _linear(b.mlp.fc1), _linear(b.mlp.fc2, scale(b.ls2)), b.mlp.act.approximate) for b in blocks]
    heads = blocks[0].attn.num_heads if blocks else 1
    if any(b.attn.num_heads != heads for b in blocks):
        raise ValueError("the ViT's blocks differ in their number of heads; TubeViT's blocks are uniform")
    encoder = _Encoder(heads, read, None if _is_identity(final_norm) else _norm(final_norm))
    return _ImageViT(proj.weight.detach(), None if proj.bias is None else proj.bias.detach(), encoder)


def _read_torchvision_vit(vit) -> _ImageViT:
    from torchvision.models.vision_transformer import EncoderBlock, MLPBlock

    proj = _check_patch_conv("vit.conv_proj", vit.conv_proj)  # a conv stem (conv_stem_configs) is refused
    blocks = list(vit.encoder.layers)
    for i, block in enumerate(blocks):
        where = f"vit.encoder.layers[{i}]"
        if not isinstance(block, EncoderBlock):
            raise ValueError(f"{where} is a {type(block).__name__}; only torchvision's EncoderBlock maps "
                             f"onto TubeViT's blocks")
        _check_layer_norm(f"{where}.ln_1", block.ln_1)
        _check_layer_norm(f"{where}.ln_2", block.ln_2)
        mha = block.self_attention
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None or mha.bias_k is not None:
            raise ValueError(f"{where}.self_attention must be a plain nn.MultiheadAttention over one width "
                             f"(packed in_proj, no bias_k/bias_v) to map onto TubeViT's attention")
        if not isinstance(block.mlp, MLPBlock) or not isinstance(block.mlp[1], nn.GELU):
            raise ValueError(f"{where}.mlp must be torchvision's MLPBlock with GELU")
    state = {k: v.detach() for k, v in vit.state_dict().items()}
    heads = blocks[0].num_heads if blocks else 1
    encoder = _read_torchvision_encoder(state, "encoder.", len(blocks), heads,
                                        [(b.ln_1.eps, b.ln_2.eps) for b in blocks], vit.encoder.ln.eps)
    return _ImageViT(proj.weight.detach(), None if proj.bias is None else proj.bias.detach(), encoder)


def _read_torchvision_encoder(state: Mapping[str, torch.Tensor], prefix: str, depth: int, heads: int,
                              eps: Sequence[tuple[float, float]], final_eps: float,
                              used: set | None = None) -> _Encoder:
    """torchvision's encoder layout in a state_dict (`prefix` + layers.encoder_layer_{i}.* and
    ln.*): the layout of torchvision's ViTs and of daniel-code/TubeViT. Keys read are added to
    `used`. MLPBlock's pre-0.14 names (linear_1, linear_2) are read too."""
    used = set() if used is None else used

    def get(key: str, *alternatives: str, required: bool = True):
        for name in (key, *alternatives):
            if prefix + name in state:
                used.add(prefix + name)
                return state[prefix + name]
        if required:
            raise ValueError(f"the state_dict has no {prefix + key!r} (torchvision's encoder layout expected)")
        return None

    blocks = []
    for i in range(depth):
        layer = f"layers.encoder_layer_{i}."
        blocks.append(_Block(
            _Norm(get(layer + "ln_1.weight"), get(layer + "ln_1.bias"), eps[i][0]),
            _Linear(get(layer + "self_attention.in_proj_weight"),
                    get(layer + "self_attention.in_proj_bias", required=False)),
            _Linear(get(layer + "self_attention.out_proj.weight"),
                    get(layer + "self_attention.out_proj.bias", required=False)),
            _Norm(get(layer + "ln_2.weight"), get(layer + "ln_2.bias"), eps[i][1]),
            _Linear(get(layer + "mlp.0.weight", layer + "mlp.linear_1.weight"),
                    get(layer + "mlp.0.bias", layer + "mlp.linear_1.bias")),
            _Linear(get(layer + "mlp.3.weight", layer + "mlp.linear_2.weight"),
                    get(layer + "mlp.3.bias", layer + "mlp.linear_2.bias")),
            "none"))
    return _Encoder(heads, blocks, _Norm(get("ln.weight"), get("ln.bias"), final_eps))


# Both libraries' ViTs use LayerNorm eps 1e-6; a state_dict does not record it.
_VIT_EPS = 1e-6
_TIMM_BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                    "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                    "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"}


def _default_heads(dim: int, heads: int | None) -> int:
    if heads is not None:
        return heads
    if dim % 64:
        raise ValueError(f"width {dim} is not a multiple of 64: pass heads= (a state_dict does not record it)")
    return dim // 64  # the head width of ViT-Ti/S/B/L


def _read_timm_state_dict(state: Mapping[str, torch.Tensor], heads: int | None) -> _ImageViT:
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    for key in state:
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m and m.group(2) not in _TIMM_BLOCK_KEYS:
            raise ValueError(f"the state_dict has {key!r}: not part of a plain timm ViT block (qk-norm, "
                             f"scale-norm or GLU MLPs do not map onto TubeViT)")
    for key in ("norm_pre.weight", "patch_embed.norm.weight"):
        if key in state:
            raise ValueError(f"the state_dict has {key!r}: TubeViT has no norm there")

    def linear(prefix: str, scale: str | None = None) -> _Linear:
        weight, bias = state[prefix + ".weight"], state.get(prefix + ".bias")
        gamma = state.get(scale) if scale else None
        if gamma is not None:  # LayerScale folded in, as _linear does for a module
            weight, bias = weight * gamma[:, None], (torch.zeros_like(gamma) if bias is None else bias) * gamma
        return _Linear(weight, bias)

    def norm(prefix: str) -> _Norm:
        return _Norm(state[prefix + ".weight"], state.get(prefix + ".bias"), _VIT_EPS)

    try:
        blocks = [_Block(norm(f"blocks.{i}.norm1"), linear(f"blocks.{i}.attn.qkv"),
                         linear(f"blocks.{i}.attn.proj", f"blocks.{i}.ls1.gamma"), norm(f"blocks.{i}.norm2"),
                         linear(f"blocks.{i}.mlp.fc1"), linear(f"blocks.{i}.mlp.fc2", f"blocks.{i}.ls2.gamma"), "none")
                  for i in range(depth)]
    except KeyError as err:
        raise ValueError(f"the state_dict has no {err.args[0]!r} (timm's ViT layout expected)") from None
    final = "norm" if "norm.weight" in state else "fc_norm" if "fc_norm.weight" in state else None
    patch = state["patch_embed.proj.weight"]
    encoder = _Encoder(_default_heads(patch.shape[0], heads), blocks, norm(final) if final else None)
    return _ImageViT(patch, state.get("patch_embed.proj.bias"), encoder)


def _read_state_dict_vit(state: Mapping[str, torch.Tensor], heads: int | None) -> _ImageViT:
    """An image ViT's state_dict, timm's layout (patch_embed.proj, blocks.i) or torchvision's
    (conv_proj, encoder.layers.encoder_layer_i); the shape is read from the tensors, the heads
    are `heads` (default width / 64)."""
    state = {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "patch_embed.proj.weight" in state:
        return _read_timm_state_dict(state, heads)
    if "conv_proj.weight" in state:
        depth = len({m.group(1) for k in state if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k))})
        patch = state["conv_proj.weight"]
        encoder = _read_torchvision_encoder(state, "encoder.", depth, _default_heads(patch.shape[0], heads),
                                            [(_VIT_EPS, _VIT_EPS)] * depth, _VIT_EPS)
        return _ImageViT(patch, state.get("conv_proj.bias"), encoder)
    raise ValueError(f"not an image ViT state_dict: neither timm's patch_embed.proj.weight nor torchvision's "
                     f"conv_proj.weight (found {len(state)} keys, e.g. {sorted(state)[:3]})")


def _read_image_vit(vit, heads: int | None = None) -> _ImageViT:
    if isinstance(vit, Mapping):
        return _read_state_dict_vit(vit, heads)
    if _class_of(vit, "timm.models.vision_transformer", "VisionTransformer"):
        return _read_timm_vit(vit)
    if _class_of(vit, "torchvision.models.vision_transformer", "VisionTransformer"):
        return _read_torchvision_vit(vit)
    raise TypeError(f"from_image_vit takes a timm or torchvision VisionTransformer or its state_dict, "
                    f"got {type(vit).__name__}")


def _encoder_config(encoder: _Encoder, dim: int) -> dict:
    """TubeViT's depth / heads / mlp_ratio / qkv_bias for `encoder`, checking its blocks are uniform."""
    if not encoder.blocks:
        raise ValueError("the encoder has no blocks")
    first = encoder.blocks[0]
    hidden, qkv_bias = first.fc1.weight.shape[0], first.qkv.bias is not None
    for i, block in enumerate(encoder.blocks):
        shapes = (block.qkv.weight.shape, block.proj.weight.shape, block.fc1.weight.shape, block.fc2.weight.shape)
        if shapes != ((3 * dim, dim), (dim, dim), (hidden, dim), (dim, hidden)) or \
                (block.qkv.bias is not None) != qkv_bias:
            raise ValueError(f"block {i} has weights of shapes {[tuple(s) for s in shapes]}; TubeViT's blocks are "
                             f"uniform: qkv (3*{dim}, {dim}), proj ({dim}, {dim}), fc1 ({hidden}, {dim}), "
                             f"fc2 ({dim}, {hidden}), with or without qkv bias like block 0")
    if dim % encoder.heads:
        raise ValueError(f"width {dim} is not divisible by {encoder.heads} heads")
    # mlp_ratio (hidden + 0.5) / dim: int(dim * ratio) gives back `hidden` despite float rounding.
    return dict(depth=len(encoder.blocks), heads=encoder.heads, mlp_ratio=(hidden + 0.5) / dim, qkv_bias=qkv_bias)


def _copy_norm(dst: nn.LayerNorm, src: _Norm) -> None:
    dst.eps = src.eps
    dst.weight.copy_(src.weight if src.weight is not None else torch.ones_like(dst.weight))
    dst.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(dst.bias))


def _copy_linear(dst: nn.Linear, src: _Linear) -> None:
    dst.weight.copy_(src.weight)
    if dst.bias is not None:
        dst.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(dst.bias))


@torch.no_grad()
def _load_encoder(model: reference.TubeViT, encoder: _Encoder) -> None:
    for src, dst in zip(encoder.blocks, model.blocks):
        _copy_norm(dst.norm1, src.norm1)
        _copy_linear(dst.attn.qkv, src.qkv)
        _copy_linear(dst.attn.proj, src.proj)
        _copy_norm(dst.norm2, src.norm2)
        _copy_linear(dst.mlp.fc1, src.fc1)
        _copy_linear(dst.mlp.fc2, src.fc2)
        dst.mlp.act = nn.GELU(approximate=src.gelu_approximate)
    if encoder.norm is not None:
        _copy_norm(model.norm, encoder.norm)
    # else: a ViT without any final norm; TubeViT's (weight 1, bias 0) stays as initialised.


# ---- Image ViT -> TubeViT ---------------------------------------------------------------------

def _check_tube_list(tubes, num_classes, caller: str) -> tuple[TubeSpec, ...]:
    if isinstance(tubes, int) and not isinstance(tubes, bool):
        raise TypeError(f"{caller}(vit, tubes, num_classes, ...): `tubes` is the tube list (a sequence of "
                        f"TubeSpec), got the int {tubes}; for a {tubes}-class head pass num_classes={tubes}")
    return as_tubes(tubes)


def from_image_vit(vit: nn.Module | Mapping[str, torch.Tensor], tubes: Sequence[TubeSpec] = PAPER_TUBES,
                   num_classes: int = 400, backend: str = "auto", interpolated_from: Sequence[int] | None = None,
                   heads: int | None = None, **model_kwargs) -> TubeViT:
    """A TubeViT initialised from an image ViT (see the module docstring for the mapping).

    vit: a timm ``VisionTransformer`` or a torchvision ``VisionTransformer`` (``vit_b_16`` ...)
        with a Conv2d patch embedding (any patch size, e.g. 16 or 14), pre-norm blocks, GELU MLPs
        and no ``norm_pre``; or the state_dict of one (e.g. ``torch.load(path, weights_only=True)``),
        its shape read from the tensors: depth, width, MLP width, patch size, LayerScale.
    heads: a state_dict's attention heads (it does not record them); default width / 64, as
        ViT-Ti/S/B/L have (ViT-H/14 has 16 heads of 80: pass heads=16). Ignored for a model.
    model_kwargs: passed to TubeViT (e.g. drop_path=0.1).
    tubes: the tube list. Without `interpolated_from` it needs at least one 2D tube (kt == 1), and
        every 2D tube's (kh, kw) must equal the ViT's patch size (pass a (1, 14, 14) tube for a
        patch-14 ViT).
    interpolated_from: None, or the base kernel size (e.g. (8, 8, 8)) of the paper's interpolated
        kernels: the base kernel is the patch kernel inflated to that size.
    Returns a `tubevit_fast.model.TubeViT` on the ViT's device and dtype, in training mode.
    """
    tubes = _check_tube_list(tubes, num_classes, "from_image_vit")
    return _from_image_vit(_read_image_vit(vit, heads), tubes, num_classes, backend, TubeViT,
                           interpolated_from=interpolated_from, **model_kwargs)


def _from_image_vit(source: _ImageViT, tubes, num_classes, backend, model_cls, interpolated_from=None,
                    **model_kwargs):
    tubes = as_tubes(tubes)
    patch = tuple(source.patch_weight.shape[2:])
    if interpolated_from is None:
        if not any(t.is_2d for t in tubes):
            raise ValueError(f"the tube list has no 2D tube (kt == 1) to receive the ViT's patch projection: "
                             f"{[str(t) for t in tubes]}")
        for i, tube in enumerate(tubes):
            if tube.is_2d and tube.kernel[1:] != patch:
                raise ValueError(f"tube {i} ({tube}) is a 2D tube with spatial kernel {tube.kernel[1:]} but the "
                                 f"ViT's patch size is {patch}: give the 2D tube kernel "
                                 f"(1, {patch[0]}, {patch[1]}), or use interpolated_from=")
    dim, in_channels = source.patch_weight.shape[:2]
    if dim < 6:
        raise ValueError(f"the ViT's width {dim} is below 6, the smallest TubeEmbed width "
                         f"(the position embedding uses 6 channels per frequency)")
    ref = source.patch_weight
    model = model_cls(num_classes=num_classes, tubes=tubes, in_channels=in_channels, dim=dim,
                      backend=backend, interpolated_from=interpolated_from,
                      **_encoder_config(source.encoder, dim), **model_kwargs)
    model.to(device=ref.device, dtype=ref.dtype)

    with torch.no_grad():
        embed = model.tube_embed
        bias2d = source.patch_bias if source.patch_bias is not None else torch.zeros(dim, dtype=ref.dtype,
                                                                                    device=ref.device)
        if embed.interpolated_from is not None:
            embed.base_weight.copy_(inflate_kernel(ref, embed.interpolated_from))
        else:
            for tube, weight in zip(embed.tubes, embed.weights):
                weight.copy_(ref.unsqueeze(2) if tube.is_2d else inflate_kernel(ref, tube.kernel))
        for bias in embed.biases:
            bias.copy_(bias2d)
    _load_encoder(model, source.encoder)
    return model


# ---- daniel-code/TubeViT (the public PyTorch port) -> TubeViT --------------------------------------

# The port's tubes (its TubeViT.kernel_sizes / strides / offsets, in that order). Its main branch
# uses the paper's four; its exp/ucf101 branch changes tube 1's kernel to 12x4x4 and tube 3's
# stride to (16, 16, 16). The first tube's kernel is the base kernel itself.
PORT_TUBES: tuple[TubeSpec, ...] = PAPER_TUBES
PORT_UCF101_TUBES: tuple[TubeSpec, ...] = (
    TubeSpec(kernel=(8, 8, 8), stride=(16, 32, 32), offset=(0, 0, 0)),
    TubeSpec(kernel=(12, 4, 4), stride=(6, 32, 32), offset=(4, 8, 8)),
    TubeSpec(kernel=(4, 12, 12), stride=(16, 32, 32), offset=(0, 16, 16)),
    TubeSpec(kernel=(1, 16, 16), stride=(16, 16, 16), offset=(0, 0, 0)),
)
_PORT_TOKENIZER = "sparse_tubes_tokenizer."
_PORT_ENCODER = "encoder."
_PORT_EPS = 1e-6  # the port's norm_layer: LayerNorm(eps=1e-6), as torchvision's ViTs


def _port_state_dict(state_dict) -> dict[str, torch.Tensor]:
    """The port's own keys from a state_dict, a Lightning checkpoint ({"state_dict": ...}) or a
    TubeViTLightningModule's state_dict (keys under "model.")."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_tubevit_port takes a state_dict (a mapping of names to tensors), "
                        f"got {type(state_dict).__name__}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if _PORT_TOKENIZER + "conv_proj_weight" not in state_dict and \
            "model." + _PORT_TOKENIZER + "conv_proj_weight" in state_dict:
        state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    if _PORT_TOKENIZER + "conv_proj_weight" not in state_dict:
        raise ValueError(f"not a daniel-code/TubeViT state_dict: no {_PORT_TOKENIZER}conv_proj_weight "
                         f"(found {len(state_dict)} keys, e.g. {sorted(state_dict)[:3]})")
    return dict(state_dict)


def from_tubevit_port(state_dict, num_classes: int | None = None, heads: int | None = None,
                      backend: str = "auto", **model_kwargs) -> tuple[TubeViT, dict]:
    """A TubeViT carrying the weights of a daniel-code/TubeViT checkpoint (the public port).

    state_dict: the port's ``TubeViT.state_dict()``, its Lightning checkpoint, or the
        LightningModule's state_dict (tensors; load files with ``torch.load(path, weights_only=True)``).
    num_classes: the classifier size; default the port head's (``heads.head.weight`` rows).
    heads: attention heads; default dim // 64 (the port's ViT-B: 768 / 12). The state_dict does
        not record it.
    model_kwargs: passed to TubeViT, e.g. ``pos_embed=False``, or ``tubes=PORT_UCF101_TUBES``
        for a checkpoint of the port's exp/ucf101 branch (default `PORT_TUBES`, its main branch).

    What is carried over, exactly:
    - the tokenizer: the port learns one base kernel ``conv_proj_weight`` (dim, C, 8, 8, 8) and
      one bias row per tube ``conv_proj_bias`` (tubes, dim); its tube i convolves the video
      cropped at the tube's offset with ``F.interpolate(base, size=kernel_i, mode="trilinear")``
      (tube 0 with the base itself) and concatenates the tubes' tokens in tube order, each tube's
      grid row-major. TubeViT(interpolated_from=base size) computes the same tokens in the same
      order: `base_weight` and `biases.i` are the port's tensors.
    - the encoder: torchvision EncoderBlocks (``encoder.layers.encoder_layer_{i}``: ln_1,
      self_attention in_proj / out_proj, ln_2, mlp.0, mlp.3) and ``encoder.ln`` map onto
      norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2 and norm (the same maths).
    - nothing else: the port's class token, its position-embedding table (TubeViT adds its own
      fixed embedding unless pos_embed=False), its attention pooling and its head have no
      counterpart; they are listed in the report and named in one warning. TubeViT's
      attention-pooling head and classifier start fresh: fine-tune before use.

    Returns (model, report): report["loaded"] maps each loaded port key to its TubeViT name,
    report["not_loaded"] lists the port keys with no counterpart.
    """
    state = _port_state_dict(state_dict)
    base = state[_PORT_TOKENIZER + "conv_proj_weight"]
    bias_rows = state.get(_PORT_TOKENIZER + "conv_proj_bias")
    if base.dim() != 5 or bias_rows is None or bias_rows.dim() != 2 or bias_rows.shape[1] != base.shape[0]:
        raise ValueError(f"the port's tokenizer must hold conv_proj_weight (dim, C, bt, bh, bw) and "
                         f"conv_proj_bias (tubes, dim); got {tuple(base.shape)} and "
                         f"{None if bias_rows is None else tuple(bias_rows.shape)}")
    for name in ("interpolated_from", "space_to_depth", "in_channels", "dim", "depth", "mlp_ratio", "qkv_bias"):
        if name in model_kwargs:
            raise TypeError(f"from_tubevit_port: {name} is set by the port's weights, not an argument")
    tubes = as_tubes(model_kwargs.pop("tubes", PORT_TUBES))
    dim, in_channels, base_size = base.shape[0], base.shape[1], tuple(base.shape[2:])
    if len(tubes) != bias_rows.shape[0]:
        raise ValueError(f"the port's checkpoint has {bias_rows.shape[0]} tubes (conv_proj_bias rows) but "
                         f"{len(tubes)} tubes were given")
    if tubes[0].kernel != base_size:
        raise ValueError(f"the port's first tube uses the base kernel {base_size} as is, but tube 0 is {tubes[0]}")
    depth = len({m.group(1) for k in state
                 if (m := re.match(rf"{re.escape(_PORT_ENCODER)}layers\.encoder_layer_(\d+)\.", k))})
    if heads is None:
        if dim % 64:
            raise ValueError(f"width {dim} is not a multiple of 64: pass heads= (the state_dict does not record it)")
        heads = dim // 64
    if num_classes is None:
        if "heads.head.weight" not in state:
            raise ValueError("the state_dict has no heads.head.weight to size the classifier: pass num_classes=")
        num_classes = state["heads.head.weight"].shape[0]

    used: set[str] = set()
    encoder = _read_torchvision_encoder(state, _PORT_ENCODER, depth, heads, [(_PORT_EPS, _PORT_EPS)] * depth,
                                        _PORT_EPS, used)
    model = TubeViT(num_classes=num_classes, tubes=tubes, in_channels=in_channels, dim=dim, backend=backend,
                    interpolated_from=base_size, **_encoder_config(encoder, dim), **model_kwargs)
    model.to(device=base.device, dtype=base.dtype)
    with torch.no_grad():
        model.tube_embed.base_weight.copy_(base)
        for bias, row in zip(model.tube_embed.biases, bias_rows):
            bias.copy_(row)
    _load_encoder(model, encoder)

    loaded = {_PORT_TOKENIZER + "conv_proj_weight": "tube_embed.base_weight",
              _PORT_TOKENIZER + "conv_proj_bias": ", ".join(f"tube_embed.biases.{i}" for i in range(len(tubes)))}
    loaded.update(_port_encoder_names(sorted(used)))
    not_loaded = [k for k in state if k not in loaded]
    if not_loaded:
        warnings.warn(f"from_tubevit_port: {len(not_loaded)} port weights have no counterpart in TubeViT and were "
                      f"not loaded: {', '.join(not_loaded)} (TubeViT has no class token, adds its own fixed "
                      f"position embedding and starts its attention-pooling head and classifier fresh)",
                      UserWarning, stacklevel=2)
    return model, {"loaded": loaded, "not_loaded": not_loaded}


_TORCHVISION_TO_TUBEVIT = {
    "ln_1": "norm1", "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj", "ln_2": "norm2",
    "mlp.0": "mlp.fc1", "mlp.linear_1": "mlp.fc1", "mlp.3": "mlp.fc2", "mlp.linear_2": "mlp.fc2",
}


def _port_encoder_names(keys: Sequence[str]) -> dict[str, str]:
    """torchvision encoder key -> TubeViT key, for the report."""
    names = {}
    for key in keys:
        rest = key[len(_PORT_ENCODER):]
        m = re.match(r"layers\.encoder_layer_(\d+)\.(.+)", rest)
        if m is None:  # the final norm: ln.weight / ln.bias
            names[key] = "norm" + rest[len("ln"):]
            continue
        block, name = m.groups()
        for src, dst in _TORCHVISION_TO_TUBEVIT.items():
            if name == src or name.startswith(src + "."):
                names[key] = f"blocks.{block}.{dst}{name[len(src):]}"
                break
    return names


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
            x = self.run_block(block, x, cu_seqlens, max_seqlen)
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


def scale_image_to_video(large_vit: nn.Module | Mapping[str, torch.Tensor], small: nn.Module, gate_layer: int,
                         num_classes: int = 400, backend: str = "auto",
                         heads: int | None = None) -> tuple[GatedTubeViT, list[dict]]:
    """The paper's image-to-video scaling: a large image ViT (converted by `from_image_vit`
    with the small model's tube list) + a small trained TubeViT's 3D tube kernels (through a
    learned width projection), blocks before `gate_layer` frozen, gated skip from z0 at
    `gate_layer`. See the comment block above for every choice made. `large_vit` may be a
    state_dict (then `heads`: see from_image_vit).

    Returns (model, param_groups): the GatedTubeViT (frozen parameters have requires_grad False)
    and torch.optim parameter groups {"name": ..., "params": [...]} ("tubes", "gate", "blocks",
    "head") holding exactly the trainable parameters.
    """
    try:
        source = _read_image_vit(large_vit, heads)
    except TypeError:
        raise TypeError(f"large_vit must be a timm or torchvision VisionTransformer or its state_dict, "
                        f"got {type(large_vit).__name__}") from None
    if not isinstance(small, reference.TubeViT):
        raise TypeError(f"small must be a TubeViT (tubevit_fast), got {type(small).__name__}")
    _check_gate_layer(gate_layer, len(source.encoder.blocks))
    small_embed = small.tube_embed
    tubes = small_embed.tubes
    projected = [i for i, t in enumerate(tubes) if not t.is_2d]
    if not projected:
        raise ValueError("the small TubeViT has no 3D tube (kt > 1) to give the large model")

    model = _from_image_vit(source, tubes, num_classes, backend, GatedTubeViT, gate_layer=gate_layer)
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
