"""The fast TubeViT and `patch`, which moves an existing reference TubeViT onto the fast ops."""
from __future__ import annotations

import torch.nn as nn

from tubevit_fast import modules
from tubevit_fast.backends import check_backend_name
from tubevit_fast.reference import model as reference

# Reference layer -> its fast twin (same parameters; only forward differs).
FAST_LAYERS = {
    reference.TubeEmbed: modules.TubeEmbed,
    reference.Attention: modules.Attention,
    reference.AttentionPoolLatent: modules.AttentionPoolLatent,
}


def patch(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every reference layer of `model` for its fast twin, in place, keeping the very
    same parameter tensors (so the state_dict and any optimizer state stay valid). A backend
    that does not implement one of the model's ops (e.g. "cuda", attention only, with a
    TubeEmbed in the model) is refused before anything is swapped."""
    check_backend_name(backend)
    if any(isinstance(m, reference.TubeEmbed) for m in model.modules()):
        check_backend_name(backend, "tube_embed")
    for module in model.modules():
        fast = FAST_LAYERS.get(type(module))
        if fast is not None:
            module.__class__ = fast
        if isinstance(module, tuple(FAST_LAYERS.values())):
            module.backend = backend
    return model


class TubeViT(reference.TubeViT):
    """TubeViT on the fast ops; same module tree and state_dict as the reference model."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        patch(self, backend)
