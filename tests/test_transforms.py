"""Augmentation, test-time views and MixUp/CutMix (tubevit_fast/app/transforms.py)."""
import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from tubevit_fast.app.transforms import MixupCutmix, eval_views, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def rand_uint8(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(x):
    """float64 (x / 255 - mean) / std over the channel dim 0 of a single sample."""
    shape = (3,) + (1,) * (x.dim() - 1)
    return (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(shape)) / \
        torch.tensor(STD, dtype=torch.float64).view(shape)


# ---- training transform ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_train_transform_draws_once_per_clip(seed):
    frame = rand_uint8(3, 40, 56, seed=seed)
    clip = tv_tensors.Video(frame.expand(5, 3, 40, 56).clone())          # 5 identical frames
    augment = train_transform(24, scale=(0.2, 1.0), randaug=(3, 15), reprob=1.0)
    torch.manual_seed(seed)
    out = augment(clip)
    assert isinstance(out, tv_tensors.Video) and out.dtype == torch.uint8 and out.shape == (5, 3, 24, 24)
    for t in range(1, 5):
        assert torch.equal(out[t], out[0]), f"frame {t} got a different augmentation than frame 0"
    # the same draw on the image alone gives the same picture (images get the same spatial transforms)
    torch.manual_seed(seed)
    image = augment(tv_tensors.Image(frame))
    assert image.shape == (3, 24, 24)


def test_train_transform_random_erasing_fills_with_the_mean():
    clip = tv_tensors.Video(torch.full((2, 3, 32, 32), 7, dtype=torch.uint8))
    out = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, reprob=1.0)(clip)
    erased = (out != 7).any(dim=(0, 1))
    assert erased.any()
    assert out[:, :, erased].permute(1, 0, 2).reshape(3, -1).unique(dim=1).tolist() == \
        [[round(255 * m)] for m in MEAN]


def test_train_transform_flip_switch():
    clip = tv_tensors.Video(rand_uint8(2, 3, 16, 16, seed=1))
    keep = train_transform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    flip = train_transform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    outs = [flip(clip) for _ in range(30)]
    assert all(torch.equal(keep(clip), clip) for _ in range(5))
    assert any(torch.equal(o, clip.flip(-1)) for o in outs) and any(torch.equal(o, clip) for o in outs)


def test_train_transform_bad_values():
    for kwargs, message in [(dict(scale=(0.5, 0.1)), "scale"), (dict(ratio=(0, 1)), "ratio"),
                            (dict(reprob=2), "reprob"), (dict(randaug=(0, 9)), "randaug"),
                            (dict(randaug=(2, 9, 1)), r"randaug is \(N ops, magnitude M\)")]:
        with pytest.raises(ValueError, match=message):
            train_transform(16, **kwargs)


# ---- evaluation views --------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, boxes", [
    (16, 40, [(0, 0), (0, 12), (0, 24)]),          # landscape: left, centre, right (top, left)
    (45, 16, [(0, 0), (14, 0), (29, 0)]),          # portrait: top, centre, bottom
])
def test_eval_views_three_crops_at_hand_computed_boxes(h, w, boxes):
    clip = rand_uint8(4, 3, h, w, seed=h)
    views = eval_views(16, 3)(clip)
    assert len(views) == 3
    for view, (top, left) in zip(views, boxes, strict=True):
        assert torch.equal(view, clip[..., top:top + 16, left:left + 16])
    (centre,) = eval_views(16, 1)(clip)
    assert torch.equal(centre, views[1])


def test_eval_views_resize_short_side_first():
    clip = rand_uint8(2, 3, 32, 70, seed=5)                 # short side 32 -> 16, long side 70 -> 35
    views = eval_views(16, 3)(clip)
    golden = F.interpolate(clip.double(), size=(16, 35), mode="bilinear", antialias=True, align_corners=False)
    for view, left in zip(views, (0, 9, 19), strict=True):
        assert view.shape == (2, 3, 16, 16) and view.dtype == torch.uint8
        assert (view.double() - golden[..., left:left + 16]).abs().max() <= 1
    image_views = eval_views(16, 3)(clip[0])                  # an image (C, H, W) gets the same crops
    assert all(torch.equal(a, b[0]) for a, b in zip(image_views, views, strict=True))


def test_eval_views_bad_crops():
    with pytest.raises(ValueError, match="crops must be one of"):
        eval_views(16, 2)


# ---- MixUp / CutMix ----------------------------------------------------------------------------

def batch(seed=0):
    """Videos and images interleaved, every label distinct so a target names its partner."""
    samples = [rand_uint8(3, 2, 8, 8, seed=seed + 1), rand_uint8(3, 8, 8, seed=seed + 2),
               rand_uint8(3, 2, 8, 8, seed=seed + 3), rand_uint8(3, 2, 8, 8, seed=seed + 4),
               rand_uint8(3, 8, 8, seed=seed + 5), rand_uint8(3, 8, 8, seed=seed + 6)]
    return samples, torch.tensor([5, 0, 2, 7, 3, 1])


def partner_and_weight(target, label, labels, smoothing, classes):
    """(index of the sample mixed in, its weight) read off a smoothed mixed target."""
    base = smoothing / classes
    weights = (target - base) / (1 - smoothing)              # = lam at label, 1 - lam at the partner's
    others = [j for j, y in enumerate(labels.tolist()) if y != label and weights[y] > 1e-6]
    assert len(others) <= 1
    return (others[0] if others else None), float(weights[label])


@pytest.mark.parametrize("key", range(4))
def test_mixup_targets_sum_to_one_and_match_the_pixel_weights(key):
    samples, labels = batch(key)
    mix = MixupCutmix(8, mixup=0.8, smoothing=0.1, mean=MEAN, std=STD)
    out, targets = mix(samples, labels, key=key)
    assert targets.shape == (6, 8) and torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)
    assert targets.min() >= 0.1 / 8 - 1e-7
    for i, (x, target) in enumerate(zip(out, targets, strict=True)):
        assert x.dtype == torch.float32 and x.shape == samples[i].shape
        j, lam = partner_and_weight(target, labels[i], labels, 0.1, 8)
        if j is None:                                        # lam == 1: nothing mixed in
            assert torch.allclose(x.double(), normalised(samples[i]), atol=1e-5)
            continue
        assert samples[j].dim() == samples[i].dim(), "a video was mixed with an image"
        expected = lam * normalised(samples[i]) + (1 - lam) * normalised(samples[j])
        assert torch.allclose(x.double(), expected, atol=1e-4)


@pytest.mark.parametrize("key", range(4))
def test_cutmix_targets_match_the_pasted_area(key):
    samples, labels = batch(10 + key)
    mix = MixupCutmix(8, cutmix=1.0, smoothing=0.2, mean=MEAN, std=STD)
    out, targets = mix(samples, labels, key=key)
    assert torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)
    for i, (x, target) in enumerate(zip(out, targets, strict=True)):
        own = (x.double() - normalised(samples[i])).abs() < 1e-4
        own_positions = own.reshape(-1, 8, 8).all(0)          # (h, w) kept from sample i in every frame/channel
        j, lam = partner_and_weight(target, labels[i], labels, 0.2, 8)
        assert lam == pytest.approx(own_positions.double().mean().item(), abs=1e-6)
        if j is not None:
            pasted = ~own_positions
            assert samples[j].dim() == samples[i].dim()
            assert torch.allclose(x.double()[..., pasted], normalised(samples[j])[..., pasted], atol=1e-4)


def test_no_mixing_only_smoothing_and_normalisation():
    samples, labels = batch(3)
    out, targets = MixupCutmix(8, smoothing=0.1, mean=MEAN, std=STD)(samples, labels)
    expected = torch.full((6, 8), 0.1 / 8, dtype=torch.float64)
    expected[torch.arange(6), labels] = 0.9 + 0.1 / 8
    assert torch.allclose(targets.double(), expected, atol=1e-7)
    for x, sample in zip(out, samples, strict=True):
        assert torch.allclose(x.double(), normalised(sample), atol=1e-5)


def test_mixing_is_a_function_of_the_key():
    samples, labels = batch(4)
    mix = MixupCutmix(8, mixup=0.8, cutmix=1.0, smoothing=0.1)
    a, b, c = mix(samples, labels, key=3), mix(samples, labels, key=3), mix(samples, labels, key=4)
    assert torch.equal(a[1], b[1]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert not torch.equal(a[1], c[1])


def test_mixup_bad_inputs():
    samples, labels = batch()
    with pytest.raises(ValueError, match=r"labels must be in 0..3"):
        MixupCutmix(4, mixup=1.0)(samples, labels)
    with pytest.raises(ValueError, match="6 samples but 2 labels"):
        MixupCutmix(8)(samples, labels[:2])
    with pytest.raises(ValueError, match=r"one shape per group .*\(3, 8, 8\), \(3, 9, 8\)"):
        MixupCutmix(8)(samples[:2] + [rand_uint8(3, 9, 8)], labels[:3])
    with pytest.raises(ValueError, match="smoothing"):
        MixupCutmix(8, smoothing=1.0)
