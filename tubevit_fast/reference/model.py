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

from tubevit_fast.checks import check_positive_int, check_tube_input
from tubevit_fast.geometry import PAPER_TUBES, TubeSpec, as_tubes, check_fits, image_tubes, num_tokens
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
    """Sparse tube tokenizer: (B, C, T, H, W) -> (B, N, dim); (B, C, H, W) images use the 2D tubes."""

    def __init__(self, tubes: Sequence[TubeSpec] = PAPER_TUBES, in_channels: int = 3, dim: int = 768,
                 pos_embed: bool = True):
        super().__init__()
        self.tubes = as_tubes(tubes)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.dim = check_positive_int("dim", dim, minimum=6)
        self.pos_embed = bool(pos_embed)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(dim, in_channels, *t.kernel)) for t in self.tubes])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(dim)) for _ in self.tubes])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv3d's default initialisation, per tube.
        for weight, bias in zip(self.weights, self.biases):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(weight[0].numel())
            nn.init.uniform_(bias, -bound, bound)

    def _tubes_for(self, is_image: bool) -> tuple[list[int], tuple[TubeSpec, ...]]:
        if not is_image:
            return list(range(len(self.tubes))), self.tubes
        return [i for i, t in enumerate(self.tubes) if t.is_2d], image_tubes(self.tubes)

    def num_tokens(self, size: Sequence[int]) -> int:
        """Tokens for a (T, H, W) video or an (H, W) image."""
        size = tuple(size)
        _, tubes = self._tubes_for(len(size) == 2)
        return num_tokens(tubes, size if len(size) == 3 else (1, *size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        is_image = check_tube_input(x, self.in_channels, (self.weights[0],))
        video = x.unsqueeze(2) if is_image else x
        index, tubes = self._tubes_for(is_image)
        size = tuple(video.shape[2:])
        check_fits(tubes, size)
        pos = tube_position_embedding(tubes, size, self.dim, video.device) if self.pos_embed else None
        return self._embed(video, [self.weights[i] for i in index], [self.biases[i] for i in index], tubes, pos)

    def _embed(self, video, weights, biases, tubes, pos) -> torch.Tensor:
        return tube_embed_reference(video, weights, biases, tubes, pos)

    def extra_repr(self) -> str:
        return f"tubes={len(self.tubes)}, in_channels={self.in_channels}, dim={self.dim}, pos_embed={self.pos_embed}"


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


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


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
            cu_q = torch.arange(batch + 1, dtype=torch.int32, device=x.device)
            out = self._attend(q, k, v, cu_q, cu_seqlens, 1, max_seqlen)
        x = self.proj(out.reshape(batch, -1))
        return x + self.mlp(self.norm(x))

    def _attend(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k)


class TubeViT(nn.Module):
    """TubeViT: sparse tubes -> fixed position embedding -> global-attention ViT -> MAP head -> FC."""

    def __init__(self, num_classes: int = 400, tubes: Sequence[TubeSpec] = PAPER_TUBES, in_channels: int = 3,
                 dim: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 pos_embed: bool = True):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("depth", depth)
        check_positive_int("heads", heads)
        self.num_classes, self.dim = num_classes, dim
        self.tube_embed = TubeEmbed(tubes, in_channels, dim, pos_embed)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias) for _ in range(depth)])
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
            x = block(x, cu_seqlens, max_seqlen)
        return self.norm(x)

    def pack(self, samples: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Tokenize a list of images (C, H, W) and videos (C, T, H, W) of any sizes into one packed
        sequence: (total, dim) tokens, int32 cu_seqlens (len(samples) + 1) and the longest length.
        Samples of the same shape are embedded together as one batch."""
        if not isinstance(samples, (list, tuple)) or not samples:
            raise ValueError("a packed batch is a non-empty list of (C, H, W) images and (C, T, H, W) videos")
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):
            if not isinstance(sample, torch.Tensor) or sample.dim() not in (3, 4):
                shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
                raise ValueError(f"sample {i} must be a (C, H, W) image or a (C, T, H, W) video, got {shape}")
            groups.setdefault(tuple(sample.shape), []).append(i)
        tokens: list[torch.Tensor | None] = [None] * len(samples)
        for index in groups.values():
            embedded = self.tube_embed(torch.stack([samples[i] for i in index]))
            for row, i in enumerate(index):
                tokens[i] = embedded[row]
        lengths = [t.shape[0] for t in tokens]
        cu_seqlens = torch.tensor([0] + lengths, device=tokens[0].device).cumsum(0).to(torch.int32)
        return torch.cat(tokens), cu_seqlens, max(lengths)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_classes) of a (B, C, T, H, W) video or (B, C, H, W) image batch, or of a
        list mixing images and videos of different sizes: their tokens are packed into one
        sequence without padding, the encoder runs once, and each sample is pooled on its own."""
        if isinstance(x, (list, tuple)):
            tokens, cu_seqlens, max_seqlen = self.pack(x)
            features = self.forward_features(tokens, cu_seqlens, max_seqlen)
            return self.head(self.attn_pool(features, cu_seqlens, max_seqlen))
        return self.head(self.attn_pool(self.forward_features(self.tube_embed(x))))
