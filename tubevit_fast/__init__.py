"""tubevit_fast: fused kernels for TubeViT (sparse video tubes, CVPR 2023)."""
from tubevit_fast import _checkout

_checkout.install(__path__[0])  # tubevit_fast.kernels from this checkout, never another clone's
from tubevit_fast.geometry import PAPER_TUBES, TubeSpec
from tubevit_fast.model import TubeViT, patch
from tubevit_fast.ops.attention import attention
from tubevit_fast.modules import TubeEmbed
from tubevit_fast.posembed import tube_position_embedding
from tubevit_fast.convert import from_image_vit

__all__ = ["attention", "from_image_vit", "PAPER_TUBES", "TubeSpec", "TubeEmbed", "TubeViT", "patch", "tube_position_embedding"]
