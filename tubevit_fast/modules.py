"""Drop-in fast layers: subclasses of the reference layers with the same parameters and
state_dict, whose forward runs the fused ops."""
from __future__ import annotations

from typing import Sequence

from tubevit_fast import backends
from tubevit_fast.geometry import PAPER_TUBES, TubeSpec
from tubevit_fast.ops.tube_embed import tube_embed
from tubevit_fast.reference import model as reference


def check_backend_name(backend: str) -> str:
    if backend not in backends.BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; choose one of {backends.BACKENDS + ('auto',)}")
    return backend


class TubeEmbed(reference.TubeEmbed):
    """Sparse tube tokenizer on the fused kernels; same state_dict as the reference layer.

    backend: "auto" (best for the input's device), "reference", "torch" or "triton".
    """

    def __init__(self, tubes: Sequence[TubeSpec] = PAPER_TUBES, in_channels: int = 3, dim: int = 768,
                 pos_embed: bool = True, backend: str = "auto"):
        super().__init__(tubes, in_channels, dim, pos_embed)
        self.backend = check_backend_name(backend)

    def _embed(self, video, weights, biases, tubes, pos):
        return tube_embed(video, weights, biases, tubes, pos, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
