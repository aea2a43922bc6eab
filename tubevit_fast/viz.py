"""Pictures of a TubeViT's tubes: `python -m tubevit_fast.viz --checkpoint CKPT --out DIR`
(without --checkpoint: a randomly initialised model of the given size).

Writes into DIR:
  patch_kernels_tube{i}.png  the 2D patch tube's learned kernels (first --max-filters of them,
                             each rescaled to [0, 1] on its own), one RGB tile per filter
  tube{i}_kernels.png        each 3D tube's kernels: one row per filter, its kt frames side by side
  tube_sampling.png          a clip (synthetic, or --video) with, per tube and for all tubes
                             together, the pixels the tube reads (tinted) and those it skips
                             (darkened); the geometry comes from tubevit_fast.geometry.read_mask
Matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from tubevit_fast.geometry import read_mask
from tubevit_fast.io import require

_TINTS = np.array([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.3, 0.5, 1.0], [1.0, 0.85, 0.2], [1.0, 0.3, 1.0],
                   [0.2, 1.0, 1.0]])


def _pyplot():
    require("matplotlib", "drawing the pictures").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)


def _rgb(kernel: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w, 3) for imshow: RGB as is, other channel counts as grey (channel mean)."""
    if kernel.shape[0] == 3:
        return kernel.transpose(1, 2, 0)
    return np.repeat(kernel.mean(0)[..., None], 3, axis=-1)


def plot_patch_kernels(weight: torch.Tensor, path: str, max_filters: int = 64, title: str = "") -> str:
    """weight (dim, C, 1, kh, kw): a grid of the first max_filters filters."""
    plt = _pyplot()
    w = weight.detach().float().cpu().numpy()[:max_filters, :, 0]
    n = w.shape[0]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(_rgb(_unit(w[i])), interpolation="nearest")
    fig.suptitle(title or f"2D patch kernels ({n} of {weight.shape[0]})", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tube_kernels(weight: torch.Tensor, path: str, max_filters: int = 8, title: str = "") -> str:
    """weight (dim, C, kt, kh, kw): one row per filter, its kt frames side by side (each filter
    rescaled over all its frames, so brightness changes across time stay visible)."""
    plt = _pyplot()
    w = weight.detach().float().cpu().numpy()[:max_filters]
    n, kt = w.shape[0], w.shape[2]
    fig, axes = plt.subplots(n, kt, figsize=(max(2.0, kt * 0.8), n * 0.8 + 0.5), squeeze=False)
    for i in range(n):
        filt = _unit(w[i])
        for t in range(kt):
            ax = axes[i, t]
            ax.axis("off")
            ax.imshow(_rgb(filt[:, t]), interpolation="nearest")
            if i == 0:
                ax.set_title(f"t={t}", fontsize=6)
    fig.suptitle(title or f"tube kernels {tuple(weight.shape[2:])}", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tube_sampling(clip: np.ndarray, tubes, path: str, max_frames: int = 16) -> str:
    """clip (T, H, W, 3) in [0, 1]. Rows: each tube, then all tubes; columns: frames (at most
    max_frames, evenly spread). Read pixels are tinted with the tube's colour, skipped ones
    darkened."""
    plt = _pyplot()
    T, H, W = clip.shape[:3]
    frames = np.unique(np.linspace(0, T - 1, min(T, max_frames)).round().astype(int))
    rows = [(f"tube {i}\nk={t.kernel}\ns={t.stride}\no={t.offset}", read_mask([t], (T, H, W)), _TINTS[i % len(_TINTS)])
            for i, t in enumerate(tubes)]
    rows.append(("all tubes", read_mask(tubes, (T, H, W)), None))
    fig, axes = plt.subplots(len(rows), len(frames), figsize=(len(frames) * 1.1 + 0.4, len(rows) * 1.25 + 0.3),
                             squeeze=False)
    for r, (label, mask, tint) in enumerate(rows):
        for c, t in enumerate(frames):
            img = clip[t] * 0.25
            if tint is None:  # union: show the clip itself where any tube reads
                img = np.where(mask[t][..., None], clip[t], img)
            else:
                img = np.where(mask[t][..., None], 0.45 * clip[t] + 0.55 * tint, img)
            ax = axes[r, c]
            ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=6)
            if c == 0:
                ax.set_ylabel(f"{label}\n{mask.mean():.1%} read", fontsize=5)
    fig.suptitle("pixels each tube samples (tinted) and skips (dark)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _display_clip(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (C, T, H, W) -> (T, H, W, 3) in [0, 1]."""
    m = torch.as_tensor(mean).view(-1, 1, 1, 1)
    s = torch.as_tensor(std).view(-1, 1, 1, 1)
    return (x * s + m).clamp(0, 1).permute(1, 2, 3, 0).numpy()


def visualize(model, cfg: dict, out: str, video: str | None = None, max_filters: int = 64) -> list[str]:
    """Write the pictures (see the module docstring) into `out`; returns their paths. The clip is
    read before the folder is created, so a bad --video leaves nothing behind."""
    if video is not None:
        from tubevit_fast.io import read_video

        clip = read_video(video, cfg["frames"], cfg["size"], mean=cfg["mean"], std=cfg["std"])
    else:
        from tubevit_fast.data import SyntheticShapes

        data = SyntheticShapes(4, cfg["frames"], cfg["size"], seed=0, image_every=0, mean=cfg["mean"], std=cfg["std"])
        clip = data[0][0]
    _pyplot()  # fails early, with the install hint, when matplotlib is missing
    os.makedirs(out, exist_ok=True)
    embed = model.tube_embed
    written = []
    for i, (tube, weight) in enumerate(zip(embed.tubes, embed.tube_kernels())):
        if tube.is_2d:
            written.append(plot_patch_kernels(weight, os.path.join(out, f"patch_kernels_tube{i}.png"), max_filters,
                                              f"tube {i}: 2D patch kernels {tube.kernel[1:]}"))
        else:
            written.append(plot_tube_kernels(weight, os.path.join(out, f"tube{i}_kernels.png"),
                                             min(8, max_filters), f"tube {i}: kernels {tube.kernel} (t, h, w)"))
    written.append(plot_tube_sampling(_display_clip(clip, cfg["mean"], cfg["std"]), embed.tubes,
                                      os.path.join(out, "tube_sampling.png")))
    return written


def main(argv=None) -> list[str]:
    from tubevit_fast.cli import UsageError, check_positive
    from tubevit_fast.io import DEFAULT_MEAN, DEFAULT_STD
    from tubevit_fast.train import TUBE_SETS, build_model, check_input_size, load_checkpoint

    p = argparse.ArgumentParser(prog="python -m tubevit_fast.viz", description="PNG pictures of TubeViT's tubes.")
    p.add_argument("--checkpoint", default=None, help="train.py checkpoint; default: a random initialisation")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--video", default=None, help="clip for the sampling picture (default: a synthetic one)")
    p.add_argument("--max-filters", type=int, default=64)
    g = p.add_argument_group("random initialisation (without --checkpoint)")
    g.add_argument("--tubes", choices=sorted(TUBE_SETS), default="small")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--depth", type=int, default=1)
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--frames", type=int, default=8)
    g.add_argument("--size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_positive(max_filters=args.max_filters, dim=args.dim, depth=args.depth, heads=args.heads,
                   frames=args.frames, size=args.size)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if not args.checkpoint:
        if args.dim % args.heads:
            raise UsageError(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
        check_input_size(args.tubes, args.frames, args.size)
    if args.checkpoint:
        model, ckpt = load_checkpoint(args.checkpoint, backend="reference")
        cfg = ckpt["model_config"]
    else:
        torch.manual_seed(args.seed)
        cfg = dict(num_classes=2, classes=["a", "b"], tubes=args.tubes, dim=args.dim, depth=args.depth,
                   heads=args.heads, frames=args.frames, size=args.size, mean=list(DEFAULT_MEAN),
                   std=list(DEFAULT_STD))
        try:
            model = build_model(cfg, backend="reference")
        except ValueError as err:  # e.g. a --dim the tube embedding refuses
            raise UsageError(str(err)) from None
    written = visualize(model, cfg, args.out, args.video, args.max_filters)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    from tubevit_fast.cli import run

    sys.exit(run(main))
