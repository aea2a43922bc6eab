"""The optimiser side of the recipe: AdamW parameter groups with layer-wise lr decay, the lr
schedule, and an exponential moving average (EMA) of the weights.

Layer-wise lr decay (BEiT / timm's `param_groups_layer_decay`): the tube embedding is layer 0,
block i is layer i + 1, everything after the blocks (final norm, pooling head, classifier, the
scaling gate) is layer L = depth + 1; layer l's lr is multiplied by decay ** (L - l), so the
head trains at the base lr and the tube embedding at decay ** L of it. Weight decay applies to
matrices and kernels (ndim >= 2) except the pooling head's learned query (`latent`).
"""
from __future__ import annotations

import copy
import math
import re

import torch


def layer_id(name: str, depth: int) -> int:
    """The layer of parameter `name` (see the module docstring)."""
    if name.startswith("tube_embed."):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def decays(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and "latent" not in name


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups over the trainable parameters, one per (layer, decays or not), each with its
    `lr_scale`. Frozen parameters (requires_grad False) are left out."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = layer_id(name, depth), decays(name, p)
        group = groups.setdefault((layer, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0):
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
        del group["names"]  # torch.optim keeps unknown keys in its state_dict: names add nothing there
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at `step`: linear warm-up to 1, then cosine down to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, after every optimiser step, for every floating
    point parameter and buffer (other buffers are copied). `module` is a frozen copy of the model
    (eval mode, no gradients) to evaluate and checkpoint beside the raw weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        for name, ema in self.module.state_dict().items():
            value = current[name].detach()
            if ema.is_floating_point():
                ema.mul_(self.decay).add_(value.to(ema.dtype), alpha=1.0 - self.decay)
            else:
                ema.copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
