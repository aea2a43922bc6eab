"""Reference TubeViT in plain eager PyTorch: tube tokenizer, pre-norm ViT blocks, attention
pooling head (big_vision's MAP head) and a classifier.

Parameter names follow timm's VisionTransformer (norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2, attn_pool.*), so image-ViT weights map by name. The fast layers in
tubevit_fast.modules subclass these and add no parameters: swapping is lossless.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tubevit_fast.checks import check_positive_int, check_tube_input
from tubevit_fast.geometry import PAPER_TUBES, TubeSpec, as_tubes, check_fits, image_tubes, num_tokens
from tubevit_fast.packing import cu_seqlens_from_lengths
from tubevit_fast.pixels import check_pixel_stats, default_pixel_stats, normalize_pixels
from tubevit_fast.posembed import tube_position_embedding
from tubevit_fast.reference.attention import attention_reference
from tubevit_fast.reference.tube_embed import tube_embed_reference

# The paper's model sizes: (dim, depth, heads). H has head dim 80.
PRESETS = {
    "B": dict(dim=768, depth=12, heads=12),
    "L": dict(dim=1024, depth=24, heads=16),
    "H": dict(dim=1280, depth=32, heads=16),
}


class TubeEmbed(nn.Module):
    """Sparse tube tokenizer: (B, C, T, H, W) -> (B, N, dim); (B, C, H, W) images use the 2D tubes.

    Inputs: a floating-point video or image is taken as already normalised; a uint8 one (pixels
    0..255) is normalised inside the layer, (x / 255 - pixel_mean) / pixel_std per channel. Here,
    in the reference, by exactly that pass over the video before the Conv3d; the fast layer
    (tubevit_fast.modules.TubeEmbed) folds it into the tube kernels instead (tubevit_fast.pixels).
    pixel_mean, pixel_std: one value per channel (default: ImageNet's for 3 channels, 0.5 and
        0.5 otherwise), kept as float32 buffers of the same names in the state_dict. A
        state_dict saved without them (older checkpoints) loads, strict or not, and leaves the
        layer's own values in place.

    interpolated_from: None (default) gives every tube its own kernel, `weights[i]`
        (dim, in_channels, kt, kh, kw). A size (bt, bh, bw), e.g. (8, 8, 8), switches on the
        paper's interpolated kernels: the layer learns ONE base kernel `base_weight`
        (dim, in_channels, bt, bh, bw) plus one bias per tube, and derives each tube's kernel in
        every forward with ``F.interpolate(base_weight, size=kernel, mode="trilinear",
        align_corners=False)`` (daniel-code/TubeViT's convention; a tube whose kernel equals the
        base size uses the base itself, which that call would return unchanged). Gradients reach
        `base_weight` through the interpolation. In this mode there is no `weights` attribute:
        the state_dict holds `base_weight` and `biases.i` only. `tube_kernels()` returns the
        kernels in use in either mode.
    space_to_depth: None (default), or one entry per tube: None, or (axis, factor) with axis 0/1/2
        (t/h/w) or "t"/"h"/"w" and factor >= 2 dividing dim. Such a tube projects to dim/factor
        channels (`weights[i]` is (dim/factor, in_channels, kt, kh, kw), `biases[i]` (dim/factor,))
        and every `factor` neighbouring tokens along `axis` are concatenated along channels (the
        one nearer the grid origin first) into one token; a leftover partial group is dropped. The
        given TubeSpec is the sampler before merging (choose its stride to get the token count
        you want, e.g. halve it on `axis` for factor 2). The merged token's position embedding is
        taken at its centre, the mean of the merged tokens' centres. `op_tubes` lists the tubes
        with TubeSpec.space_to_depth set, the form every tube_embed backend takes: the fused
        kernels write each sampler token's projection straight into its merged token's channel
        block (an output-index mapping, no extra pass). Not combinable with interpolated_from.
    """

    def __init__(self, tubes: Sequence[TubeSpec] = PAPER_TUBES, in_channels: int = 3, dim: int = 768,
                 pos_embed: bool = True, interpolated_from: Sequence[int] | None = None,
                 space_to_depth: Sequence | None = None, pixel_mean: Sequence[float] | None = None,
                 pixel_std: Sequence[float] | None = None):
        super().__init__()
        self.tubes = as_tubes(tubes)
        self.in_channels = check_positive_int("in_channels", in_channels)
        default_mean, default_std = default_pixel_stats(in_channels)
        self.register_buffer("pixel_mean", check_pixel_stats(
            "pixel_mean", default_mean if pixel_mean is None else pixel_mean, in_channels, positive=False))
        self.register_buffer("pixel_std", check_pixel_stats(
            "pixel_std", default_std if pixel_std is None else pixel_std, in_channels, positive=True))
        self.register_load_state_dict_pre_hook(_keep_missing_pixel_stats)
        self.dim = check_positive_int("dim", dim, minimum=6)
        self.pos_embed = bool(pos_embed)
        self.interpolated_from = _check_base_size(interpolated_from)
        merges = _check_space_to_depth(space_to_depth, self.tubes, dim)
        self.op_tubes = self.tubes  # tubes may carry TubeSpec.space_to_depth themselves
        if merges is not None:
            if any(t.space_to_depth is not None for t in self.tubes):
                raise ValueError("give space-to-depth either in the TubeSpecs or as space_to_depth=[...], "
                                 "not both")
            self.op_tubes = tuple(TubeSpec(t.kernel, t.stride, t.offset, m) for t, m in zip(self.tubes, merges))
        # The effective setting, whichever way it was given (None when no tube merges).
        self.space_to_depth = (tuple(t.space_to_depth for t in self.op_tubes)
                               if any(t.merge > 1 for t in self.op_tubes) else None)
        if self.space_to_depth is not None and self.interpolated_from is not None:
            raise ValueError("space_to_depth and interpolated_from cannot be combined")
        widths = [t.width(dim) for t in self.op_tubes]
        if self.interpolated_from is None:
            self.weights = nn.ParameterList(
                [nn.Parameter(torch.empty(w, in_channels, *t.kernel)) for w, t in zip(widths, self.tubes)])
        else:
            self.base_weight = nn.Parameter(torch.empty(dim, in_channels, *self.interpolated_from))
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(w)) for w in widths])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv3d's default initialisation, per tube; with interpolation the base kernel is
        # initialised once and every tube's bias as a Conv3d of the base size would be.
        if self.interpolated_from is None:
            weights = list(self.weights)
            for weight in weights:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        else:
            nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
            weights = [self.base_weight] * len(self.tubes)
        for weight, bias in zip(weights, self.biases):
            bound = 1 / math.sqrt(weight[0].numel())
            nn.init.uniform_(bias, -bound, bound)

    def tube_kernels(self, index: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The kernels (width, in_channels, kt, kh, kw) of the tubes in `index` (default: all): the
        `weights` parameters, or the kernels derived from `base_weight` with interpolation on.
        width is dim, or dim / factor for a space-to-depth tube."""
        index = range(len(self.tubes)) if index is None else index
        if self.interpolated_from is not None:
            return [interpolate_kernel(self.base_weight, self.tubes[i].kernel) for i in index]
        return [self.weights[i] for i in index]

    def tube_biases(self, index: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The biases (width,) of the tubes in `index` (default: all). A hook, like `tube_kernels`, for
        subclasses that derive a tube's kernel and bias from other parameters."""
        index = range(len(self.tubes)) if index is None else index
        return [self.biases[i] for i in index]

    def _first_param(self) -> torch.Tensor:
        return self.weights[0] if self.interpolated_from is None else self.base_weight

    def _tubes_for(self, is_image: bool) -> tuple[list[int], tuple[TubeSpec, ...]]:
        tubes = self.op_tubes  # the tubes with their space-to-depth settings
        if not is_image:
            return list(range(len(tubes))), tubes
        return [i for i, t in enumerate(tubes) if t.is_2d], image_tubes(tubes)

    def num_tokens(self, size: Sequence[int]) -> int:
        """Tokens for a (T, H, W) video or an (H, W) image."""
        size = tuple(size)
        _, tubes = self._tubes_for(len(size) == 2)
        return num_tokens(tubes, size if len(size) == 3 else (1, *size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        is_image = check_tube_input(x, self.in_channels, (self._first_param(),))
        video = x.unsqueeze(2) if is_image else x
        index, tubes = self._tubes_for(is_image)
        size = tuple(video.shape[2:])
        check_fits(tubes, size)
        pos = tube_position_embedding(tubes, size, self.dim, video.device) if self.pos_embed else None
        weights, biases = self.tube_kernels(index), self.tube_biases(index)
        if video.dtype == torch.uint8:
            return self._embed_pixels(video, weights, biases, tubes, pos)
        return self._embed(video, weights, biases, tubes, pos)

    def _embed(self, video, weights, biases, tubes, pos) -> torch.Tensor:
        return tube_embed_reference(video, weights, biases, tubes, pos)

    def _embed_pixels(self, video, weights, biases, tubes, pos) -> torch.Tensor:
        """A uint8 video: the ground truth converts and normalises all of it, in the parameters'
        dtype, then embeds the result."""
        video = normalize_pixels(video, self.pixel_mean, self.pixel_std, weights[0].dtype)
        return self._embed(video, weights, biases, tubes, pos)

    def extra_repr(self) -> str:
        text = (f"tubes={len(self.tubes)}, in_channels={self.in_channels}, dim={self.dim}, "
                f"pos_embed={self.pos_embed}")
        if self.interpolated_from is not None:
            text += f", interpolated_from={self.interpolated_from}"
        if self.space_to_depth is not None:
            text += f", space_to_depth={self.space_to_depth}"
        return text


def _keep_missing_pixel_stats(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint saved before pixel_mean/pixel_std existed keeps the
    layer's own values (so a strict load passes); one that has them loads them as usual."""
    for name in ("pixel_mean", "pixel_std"):
        state_dict.setdefault(prefix + name, getattr(module, name).detach().clone())


def _check_space_to_depth(entries, tubes: Sequence[TubeSpec], dim: int):
    """None, or one (axis, factor) or None per tube, checked (TubeSpec parses the entries)."""
    if entries is None:
        return None
    entries = list(entries)
    if len(entries) != len(tubes):
        raise ValueError(f"space_to_depth needs one entry per tube ({len(tubes)}), got {len(entries)}")
    out = []
    for i, (entry, tube) in enumerate(zip(entries, tubes)):
        try:
            merged = TubeSpec(tube.kernel, tube.stride, tube.offset, entry)
            merged.width(dim)  # the factor must divide dim
        except (TypeError, ValueError) as err:
            raise ValueError(f"space_to_depth[{i}]: {err}") from None
        out.append(merged.space_to_depth)
    return tuple(out) if any(e is not None for e in out) else None


def _check_base_size(size) -> tuple[int, int, int] | None:
    if size is None:
        return None
    try:
        items = tuple(size)
    except TypeError:
        items = ()
    if len(items) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items):
        raise ValueError(f"interpolated_from must be None or three positive ints (t, h, w), got {size!r}")
    return items


def interpolate_kernel(base: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """A tube kernel derived from the base kernel (dim, C, bt, bh, bw): trilinear interpolation to
    `kernel` with align_corners=False (daniel-code/TubeViT's convention). Same size: the base."""
    kernel = tuple(kernel)
    if tuple(base.shape[2:]) == kernel:
        return base
    return F.interpolate(base, size=kernel, mode="trilinear", align_corners=False)


class Attention(nn.Module):
    """Multi-head self-attention over the whole token set.

    x is (B, N, dim), or packed (total, dim) with int32 cu_seqlens marking each sample's tokens.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        tokens = x.shape[:-1]
        # (..., 3, H, Dh): timm's channel order; q/k/v come out in the (B, N, H, Dh) or
        # (total, H, Dh) layout attention takes.
        q, k, v = self.qkv(x).view(*tokens, 3, self.num_heads, self.head_dim).unbind(-3)
        out = self._attend(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        return self.proj(out.reshape(*tokens, -1))

    def _attend(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Stochastic depth on a residual branch (timm's semantics): in training, each sample's branch
    is zeroed with probability p and otherwise scaled by 1 / (1 - p); an identity in eval or at
    p = 0. Samples are the rows of a (B, N, dim) batch, or the cu_seqlens segments of packed
    (total, dim) tokens (all of a sample's tokens share its draw)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    batch = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    mask = x.new_empty(batch).bernoulli_(keep)
    if keep > 0:
        mask.div_(keep)
    if cu_seqlens is not None:
        mask = mask.repeat_interleave((cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=x.shape[0])
    return x * mask.view(-1, *(1,) * (x.dim() - 1))


class Block(nn.Module):
    """Pre-norm transformer block; `drop_path`: the stochastic-depth rate of both residual branches
    (no parameters, so the state_dict is the same with or without it)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6,
                 drop_path: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        x = x + drop_path(self.attn(self.norm1(x), cu_seqlens, max_seqlen), self.drop_path, self.training, cu_seqlens)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, cu_seqlens)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}" if self.drop_path else ""


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling with a learned query, then LayerNorm + MLP (big_vision's MAP
    head; timm's AttentionPoolLatent parameter names)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """(B, N, dim) tokens, or packed (total, dim) with cu_seqlens -> (batch, dim)."""
        H, Dh = self.num_heads, self.head_dim
        if cu_seqlens is None:
            batch = x.shape[0]
            q = self.q(self.latent).expand(batch, 1, -1).view(batch, 1, H, Dh)
            k, v = self.kv(x).view(*x.shape[:2], 2, H, Dh).unbind(2)
            out = self._attend(q, k, v)
        else:
            # One query per sample: a packed query sequence with segments of length 1.
            batch = cu_seqlens.numel() - 1
            q = self.q(self.latent[0]).expand(batch, -1).view(batch, H, Dh)
            k, v = self.kv(x).view(x.shape[0], 2, H, Dh).unbind(1)
            cu_q = cu_seqlens_from_lengths([1] * batch, x.device)
            out = self._attend(q, k, v, cu_q, cu_seqlens, 1, max_seqlen)
        x = self.proj(out.reshape(batch, -1))
        return x + self.mlp(self.norm(x))

    def _attend(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) tokens -> (B, heads, N): the learned query's softmax weights over the tokens,
        formed explicitly for inspection (tubevit_fast.viz draws them); forward never builds them."""
        if x.dim() != 3 or x.shape[-1] != self.q.in_features:
            raise ValueError(f"attention_probs takes (B, N, {self.q.in_features}) tokens, got {tuple(x.shape)}")
        H, Dh = self.num_heads, self.head_dim
        q = self.q(self.latent).view(H, Dh)
        k = self.kv(x).view(*x.shape[:2], 2, H, Dh)[:, :, 0]
        return (torch.einsum("hd,bnhd->bhn", q, k) / math.sqrt(Dh)).softmax(-1)


class TubeViT(nn.Module):
    """TubeViT: sparse tubes -> fixed position embedding -> global-attention ViT -> MAP head -> FC."""

    def __init__(self, num_classes: int = 400, tubes: Sequence[TubeSpec] = PAPER_TUBES, in_channels: int = 3,
                 dim: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 pos_embed: bool = True, interpolated_from: Sequence[int] | None = None,
                 space_to_depth: Sequence | None = None, pixel_mean: Sequence[float] | None = None,
                 pixel_std: Sequence[float] | None = None, drop_path: float = 0.0):
        """interpolated_from, space_to_depth: passed to TubeEmbed (paper options; see TubeEmbed).
        pixel_mean, pixel_std: the normalisation of uint8 inputs (see TubeEmbed).
        drop_path: stochastic depth, rising linearly from 0 in the first block to this rate in the
        last (timm's schedule; a one-block model has none)."""
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("depth", depth)
        check_positive_int("heads", heads)
        self.num_classes, self.dim = num_classes, dim
        self.tube_embed = TubeEmbed(tubes, in_channels, dim, pos_embed, interpolated_from=interpolated_from,
                                    space_to_depth=space_to_depth, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # torch.linspace(0, p, depth)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias, drop_path=r) for r in rates])
        self.grad_checkpointing = False
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn_pool = AttentionPoolLatent(dim, heads, mlp_ratio, qkv_bias)
        self.head = nn.Linear(dim, num_classes)

    @classmethod
    def preset(cls, name: str, num_classes: int = 400, **kwargs) -> "TubeViT":
        """The paper's sizes: "B", "L" or "H"."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(num_classes=num_classes, **{**PRESETS[name], **kwargs})

    def forward_features(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                         max_seqlen: int | None = None) -> torch.Tensor:
        """Encoder on (B, N, dim) tokens or packed (total, dim) ones; ends with the final norm."""
        for block in self.blocks:
            x = self.run_block(block, x, cu_seqlens, max_seqlen)
        return self.norm(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block: in training, each block keeps only its input and
        recomputes its activations in the backward pass (less memory, one more forward of the
        encoder). The random state is replayed, so drop-path draws the same mask twice."""
        self.grad_checkpointing = bool(enable)

    def run_block(self, block: nn.Module, x, cu_seqlens=None, max_seqlen=None):
        if self.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, x, cu_seqlens, max_seqlen, use_reentrant=False)
        return block(x, cu_seqlens, max_seqlen)

    def pack(self, samples: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Tokenize a list of images (C, H, W) and videos (C, T, H, W) of any sizes, uint8 or float
        (see TubeEmbed), into one packed sequence: (total, dim) tokens, int32 cu_seqlens
        (len(samples) + 1) and the longest length. Samples of the same shape and dtype are
        embedded together as one batch."""
        if not isinstance(samples, (list, tuple)) or not samples:
            raise ValueError("a packed batch is a non-empty list of (C, H, W) images and (C, T, H, W) videos")
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):
            if not isinstance(sample, torch.Tensor) or sample.dim() not in (3, 4):
                shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
                raise ValueError(f"sample {i} must be a (C, H, W) image or a (C, T, H, W) video, got {shape}")
            # By dtype too: stacking uint8 pixels with float samples would promote them unnormalised.
            groups.setdefault((tuple(sample.shape), sample.dtype), []).append(i)
        tokens: list[torch.Tensor | None] = [None] * len(samples)
        for index in groups.values():
            embedded = self.tube_embed(torch.stack([samples[i] for i in index]))
            for row, i in enumerate(index):
                tokens[i] = embedded[row]
        lengths = [t.shape[0] for t in tokens]
        # Built from host lengths: the attention layers need not read it back to check it.
        return torch.cat(tokens), cu_seqlens_from_lengths(lengths, tokens[0].device), max(lengths)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_classes) of a (B, C, T, H, W) video or (B, C, H, W) image batch, or of a
        list mixing images and videos of different sizes: their tokens are packed into one
        sequence without padding, the encoder runs once, and each sample is pooled on its own."""
        if isinstance(x, (list, tuple)):
            tokens, cu_seqlens, max_seqlen = self.pack(x)
            features = self.forward_features(tokens, cu_seqlens, max_seqlen)
            return self.head(self.attn_pool(features, cu_seqlens, max_seqlen))
        return self.head(self.attn_pool(self.forward_features(self.tube_embed(x))))
