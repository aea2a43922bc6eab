"""Drop-in fast layers: subclasses of the reference layers with the same parameters and
state_dict, whose forward runs the fused ops."""
from __future__ import annotations

from typing import Sequence

from tubevit_fast import amp
from tubevit_fast.backends import check_backend_name
from tubevit_fast.geometry import PAPER_TUBES, TubeSpec
from tubevit_fast.ops.attention import attention
from tubevit_fast.ops.tube_embed import tube_embed
from tubevit_fast.pixels import fold_normalization
from tubevit_fast.reference import model as reference


class TubeEmbed(reference.TubeEmbed):
    """Sparse tube tokenizer on the fused kernels; same state_dict as the reference layer.

    backend: "auto" (best for the input's device), "reference", "torch" or "triton".
    interpolated_from, space_to_depth: see the reference layer. Interpolated kernels are derived
    in each forward and fed to the same fused op; space-to-depth tubes reach the op as
    TubeSpec.space_to_depth and are merged where the kernels store their tokens.
    uint8 inputs: the normalisation is folded into the tube kernels and biases once per forward
    (tubevit_fast.pixels.fold_normalization, in float32, then cast to the autocast dtype) and the op
    reads the uint8 pixels themselves: no pass over the video.
    """

    def __init__(self, tubes: Sequence[TubeSpec] = PAPER_TUBES, in_channels: int = 3, dim: int = 768,
                 pos_embed: bool = True, backend: str = "auto",
                 interpolated_from: Sequence[int] | None = None, space_to_depth: Sequence | None = None,
                 pixel_mean: Sequence[float] | None = None, pixel_std: Sequence[float] | None = None):
        super().__init__(tubes, in_channels, dim, pos_embed, interpolated_from=interpolated_from,
                         space_to_depth=space_to_depth, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.backend = check_backend_name(backend, "tube_embed")

    def _embed(self, video, weights, biases, tubes, pos):
        return tube_embed(video, weights, biases, tubes, pos, backend=self.backend)

    def _embed_pixels(self, video, weights, biases, tubes, pos):
        weights, biases = fold_normalization(weights, biases, self.pixel_mean, self.pixel_std)
        weights, biases = amp.autocast_inputs(video.device.type, weights, biases)
        return self._embed(video, weights, biases, tubes, pos)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class _FastAttend:
    """Routes a reference attention layer's core through `tubevit_fast.attention`."""

    backend = "auto"

    def _attend(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        return attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend=self.backend)


class Attention(_FastAttend, reference.Attention):
    """Self-attention on the fused attention op; same parameters as the reference layer."""


class AttentionPoolLatent(_FastAttend, reference.AttentionPoolLatent):
    """Attention pooling head on the fused attention op; same parameters as the reference layer."""
