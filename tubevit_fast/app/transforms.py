"""Augmentation and test-time views, on torchvision.transforms.v2 and uint8 tensors.

    augment = train_transform(224, randaug=(2, 9), reprob=0.25)
    clip = augment(tv_tensors.Video(frames))           # uint8 (T, C, H, W): one draw for every frame
    views = eval_views(224, crops=3)(frames)           # [left, centre, right] uint8 (T, C, 224, 224)
    mix = MixupCutmix(num_classes, mixup=0.8, cutmix=1.0, smoothing=0.1)
    inputs, targets = mix(samples, labels, key=step)   # float normalised, soft targets (B, K)

Videos are tv_tensors.Video (T, C, H, W), images tv_tensors.Image (C, H, W); v2 transforms draw
their parameters once per call, so every frame of a clip gets the same crop, flip, RandAugment ops
and erased box. The training transform's randomness is torch's global generator: the dataset seeds
it per item (datasets.TrainClips), so an item's augmentation is a function of (seed, epoch, index).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tubevit_fast.app.sampling import torch_seed
from tubevit_fast.io import DEFAULT_MEAN, DEFAULT_STD

CROPS = (1, 3)


def train_transform(size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                    flip: bool = True, randaug: tuple[int, int] | None = None, reprob: float = 0.0,
                    mean: Sequence[float] = DEFAULT_MEAN) -> v2.Compose:
    """Random resized crop to size x size (area fraction `scale`, aspect `ratio`), horizontal flip
    (`flip=False` for labels that name a direction, as SSv2's do), RandAugment (N ops of magnitude M)
    and random erasing with probability `reprob` (filled with `mean`, which normalises to 0), in
    timm's order. Takes and returns uint8 Video / Image tv_tensors. scale=(1, 1), ratio=(1, 1),
    flip=False: no augmentation, the largest centred square resized to size."""
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must be 0 < min <= max <= 1, got {tuple(scale)}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must be 0 < min <= max, got {tuple(ratio)}")
    if not 0 <= reprob <= 1:
        raise ValueError(f"reprob must be in [0, 1], got {reprob}")
    steps = [v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if randaug is not None:
        if len(randaug) != 2:
            raise ValueError(f"randaug is (N ops, magnitude M), got {tuple(randaug)}")
        ops, magnitude = randaug
        if ops < 1 or not 0 <= magnitude <= 30:
            raise ValueError(f"randaug needs N >= 1 ops and a magnitude M in 0..30, got {ops},{magnitude}")
        steps.append(v2.RandAugment(num_ops=ops, magnitude=magnitude))
    if reprob > 0:
        steps.append(v2.RandomErasing(p=reprob, value=[round(255 * m) for m in mean]))
    return v2.Compose(steps)


def eval_views(size: int, crops: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """uint8 (T, C, H, W) clip or (C, H, W) image -> `crops` uint8 views of size x size: the short side
    resized to `size` (bilinear, antialiased), then the centre crop, or 3 crops along the long side at
    offsets 0, (L - size) // 2 and L - size (left/centre/right, or top/centre/bottom for portrait).
    A partial function, so datasets holding it pickle (DataLoader workers under spawn)."""
    if crops not in CROPS:
        raise ValueError(f"crops must be one of {CROPS}, got {crops}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return functools.partial(_views, size=size, crops=crops)


def _views(x: torch.Tensor, size: int, crops: int) -> list[torch.Tensor]:
    x = TF.resize(x, size, antialias=True)  # an int: the shorter side becomes `size`
    h, w = x.shape[-2:]
    long_side = max(h, w)
    offsets = [(long_side - size) // 2] if crops == 1 else [0, (long_side - size) // 2, long_side - size]
    if w >= h:
        return [x[..., :size, o:o + size] for o in offsets]
    return [x[..., o:o + size, :size] for o in offsets]


class MixupCutmix:
    """MixUp / CutMix with label smoothing on a mixed batch of videos and images.

    Videos are mixed with videos and images with images (torchvision's v2.MixUp / v2.CutMix pair
    each sample with the one before it in its group); each group is converted to float, divided by
    255 and normalised with mean/std first. With both alphas > 0 one of the two is chosen per batch
    with probability `switch_prob` for CutMix. Targets: one-hot smoothed to 1 - smoothing + smoothing/K
    and smoothing/K, then mixed with the pixels' weight, so every row sums to 1. With both alphas 0
    only the smoothing applies.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, smoothing: float = 0.0,
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD, switch_prob: float = 0.5,
                 seed: int = 0):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.num_classes, self.smoothing, self.switch_prob, self.seed = num_classes, smoothing, switch_prob, seed
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {tuple(mean)}, {tuple(std)}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.mixers = (v2.MixUp(alpha=mixup, num_classes=num_classes) if mixup > 0 else None,
                       v2.CutMix(alpha=cutmix, num_classes=num_classes) if cutmix > 0 else None)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Smoothed one-hot targets (B, num_classes), float32, on the labels' device."""
        off = self.smoothing / self.num_classes
        one_hot = torch.nn.functional.one_hot(labels.long(), self.num_classes).float()
        return one_hot * (1 - self.smoothing) + off

    def _mixer(self):
        mixup, cutmix = self.mixers
        if mixup is None or cutmix is None:
            return mixup or cutmix
        return cutmix if float(torch.rand(())) < self.switch_prob else mixup

    def __call__(self, samples: Sequence[torch.Tensor], labels, key: int | None = None):
        """(list of float normalised tensors in the input order, targets (B, num_classes)). `key`
        (e.g. the step): the draw comes from (seed, key) alone, so a resumed run mixes the same way."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if samples:
            labels = labels.to(samples[0].device)
        if len(samples) != len(labels):
            raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
        if key is None:
            return self._mix(samples, labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(self.seed, key))
            return self._mix(samples, labels)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, ...) -> float32 (x / 255 - mean) / std, on x's device, in two passes."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (1 / (255 * std)).to(x.device, torch.float32).view(shape)
        shift = (-torch.tensor(self.mean, dtype=torch.float64) / std).to(x.device, torch.float32).view(shape)
        return x.float().mul_(scale).add_(shift)

    def _mix(self, samples, labels):
        out: list[torch.Tensor | None] = [None] * len(samples)
        targets = self.targets(labels)
        for dim in (4, 3):  # videos (C, T, H, W), then images (C, H, W)
            group = [i for i, s in enumerate(samples) if s.dim() == dim]
            if not group:
                continue
            shapes = {tuple(samples[i].shape) for i in group}
            if len(shapes) > 1:
                raise ValueError(f"MixUp/CutMix need one shape per group (videos, images), got {sorted(shapes)}")
            x = self._normalised(torch.stack([samples[i] for i in group]))
            mixer = self._mixer() if len(group) > 1 else None
            if mixer is not None:
                if dim == 4:  # torchvision's videos are (B, T, C, H, W)
                    x, t = mixer(tv_tensors.Video(x.transpose(1, 2)), targets[group])
                    x = x.as_subclass(torch.Tensor).transpose(1, 2)
                else:
                    x, t = mixer(tv_tensors.Image(x), targets[group])
                    x = x.as_subclass(torch.Tensor)
                targets[group] = t
            for i, sample in zip(group, x):
                out[i] = sample.contiguous()
        if any(s is None for s in out):
            raise ValueError("samples must be (C, T, H, W) videos or (C, H, W) images")
        return out, targets
