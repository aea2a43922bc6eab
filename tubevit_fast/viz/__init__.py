"""Pictures of a TubeViT: `python -m tubevit_fast.viz --checkpoint CKPT --out DIR`
(without --checkpoint: a randomly initialised model of the given size).

Writes into DIR:
  tube{i}_kernels.png   tube i's kernels (viz.kernels): strongest first, each on its own colour
                        scale, 0 = grey; a 3D tube one row per kernel, one column per time step
  tube{i}_kernels.gif   a 3D tube's kernels animated over their time steps
  sampling.png          the pixels each tube reads on a clip (--video, or a synthetic one), on
                        every frame some tube reads (viz.sampling)
  attention_{name}.png  with --clip FILE ...: where the attention-pooling head looks on each
                        clip, its weights drawn back onto the pixels each token reads (viz.attention)
--compare CKPT puts another checkpoint's kernels (--compare init: the run's initial weights)
left of --checkpoint's in every kernel picture. Drawn with Pillow; nothing is written before
every input has been read and checked.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from tubevit_fast.viz.attention import attention_heat, draw_attention
from tubevit_fast.viz.kernels import draw_tube_kernels
from tubevit_fast.viz.sampling import draw_sampling


def _display_clip(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (C, T, H, W) -> (T, H, W, 3) in [0, 1]."""
    m = torch.as_tensor(mean).view(-1, 1, 1, 1)
    s = torch.as_tensor(std).view(-1, 1, 1, 1)
    return (x * s + m).clamp(0, 1).permute(1, 2, 3, 0).numpy()


def _initial_model(ckpt: dict):
    """The weights the checkpoint's run started from: train.py seeds torch with --seed, then builds
    the model (test_viz checks this against a run that did not move its weights)."""
    from tubevit_fast.app.checkpoint import build_model

    torch.manual_seed(ckpt["args"]["seed"])
    return build_model(ckpt["model_config"], backend="reference")


def _read_clip(path: str, cfg: dict, sampling) -> torch.Tensor:
    """The clip as evaluation reads it (the checkpoint's sampling, one centre crop), normalised
    float (C, T, H, W) for the reference model and the pictures."""
    from tubevit_fast.app.datasets import EvalViews
    from tubevit_fast.app.media import FileMedia
    from tubevit_fast.app.sources import Annotations
    from tubevit_fast.io import normalize

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video or image file: {path}")
    views, _, _ = EvalViews(FileMedia(Annotations([(path, 0)], ["clip"])), sampling, cfg["size"])[0]
    return normalize(views[0].float() / 255, cfg["mean"], cfg["std"], channel_dim=0)


def visualize(model, cfg: dict, out: str, video: str | None = None, max_filters: int = 32, compare=None,
              compare_name: str = "compare", clips=(), sampling=None) -> list[str]:
    """Write the pictures (see the module docstring) into `out`; returns their paths. compare: a
    model whose kernels go left of `model`'s; clips: paths for the attention pictures, read with
    `sampling` (a ClipSampling; default one frame per segment). Every clip is read before the folder
    is created, so a bad one leaves nothing behind."""
    from tubevit_fast.app.sampling import ClipSampling
    from tubevit_fast.io import require

    sampling = sampling or ClipSampling(cfg["frames"], 1, "segments")

    require("PIL.Image", "drawing the pictures")
    if video is not None:
        sample = _read_clip(video, cfg, sampling)
    else:
        from tubevit_fast.data import SyntheticShapes

        sample = SyntheticShapes(4, cfg["frames"], cfg["size"], seed=0, image_every=0, mean=cfg["mean"],
                                 std=cfg["std"])[0][0]
    read = {path: _read_clip(path, cfg, sampling) for path in clips}
    os.makedirs(out, exist_ok=True)
    embed, written = model.tube_embed, []
    for i, (tube, weight) in enumerate(zip(embed.tubes, embed.tube_kernels())):
        panels = [("trained", weight)]
        if compare is not None:
            panels.insert(0, (compare_name, compare.tube_embed.tube_kernels([i])[0]))
        written += draw_tube_kernels(i, tube, panels, out, max_filters)
    written.append(draw_sampling(_display_clip(sample, cfg["mean"], cfg["std"]), embed.tubes,
                                 os.path.join(out, "sampling.png")))
    for path, clip in read.items():
        name = os.path.splitext(os.path.basename(path))[0]
        display = _display_clip(clip, cfg["mean"], cfg["std"])
        picture = os.path.join(out, f"attention_{name}.png")
        written.append(draw_attention(display, attention_heat(model, clip), embed.op_tubes, picture, name,
                                      model.attn_pool.num_heads))
    return written


def _load_compare(source: str, ckpt: dict | None, model):
    """(model, name) for --compare: "init" (the run's initial weights) or a checkpoint with the same
    kernel shapes."""
    from tubevit_fast.cli import UsageError
    from tubevit_fast.app.checkpoint import load_checkpoint

    if ckpt is None:
        raise UsageError("--compare needs --checkpoint (the trained weights to compare with)")
    if source == "init":
        return _initial_model(ckpt), "initial"
    other, _ = load_checkpoint(source, backend="reference")
    shapes = [tuple(w.shape) for w in model.tube_embed.tube_kernels()]
    if [tuple(w.shape) for w in other.tube_embed.tube_kernels()] != shapes:
        raise UsageError(f"--compare {source}: its tube kernels are not those of --checkpoint ({shapes})")
    return other, os.path.basename(source)


def main(argv=None) -> list[str]:
    from tubevit_fast.cli import UsageError, check_positive
    from tubevit_fast.io import DEFAULT_MEAN, DEFAULT_STD
    from tubevit_fast.app.checkpoint import (TUBE_SETS, build_model, check_input_size, checkpoint_sampling,
                                             load_checkpoint)

    p = argparse.ArgumentParser(prog="python -m tubevit_fast.viz",
                                description="Pictures of a TubeViT's tubes and of where it looks.")
    p.add_argument("--checkpoint", default=None, help="train.py checkpoint; default: a random initialisation")
    p.add_argument("--out", required=True, help="folder for the pictures")
    p.add_argument("--compare", default=None, metavar="CKPT",
                   help="another checkpoint, or 'init' (the run's initial weights), drawn left of "
                        "--checkpoint's kernels")
    p.add_argument("--clip", nargs="+", default=[], metavar="FILE",
                   help="videos to draw where the pooling head looks on (one attention_NAME.png each)")
    p.add_argument("--video", default=None, help="clip for the sampling picture (default: a synthetic one)")
    p.add_argument("--max-filters", type=int, default=32, help="kernels drawn per tube, strongest first")
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
    names = [os.path.splitext(os.path.basename(c))[0] for c in args.clip]
    if len(set(names)) < len(names):
        raise UsageError(f"--clip: two clips share a file name ({names}); their pictures would overwrite "
                         f"each other")
    ckpt = None
    if args.checkpoint:
        model, ckpt = load_checkpoint(args.checkpoint, backend="reference")
        cfg = ckpt["model_config"]
    else:
        if args.dim % args.heads:
            raise UsageError(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
        check_input_size(args.tubes, args.frames, args.size)
        torch.manual_seed(args.seed)
        cfg = dict(num_classes=2, classes=["a", "b"], tubes=args.tubes, dim=args.dim, depth=args.depth,
                   heads=args.heads, frames=args.frames, size=args.size, mean=list(DEFAULT_MEAN),
                   std=list(DEFAULT_STD))
        try:
            model = build_model(cfg, backend="reference").eval()
        except ValueError as err:  # e.g. a --dim the tube embedding refuses
            raise UsageError(str(err)) from None
    compare, compare_name = _load_compare(args.compare, ckpt, model) if args.compare else (None, "")
    sampling = checkpoint_sampling(ckpt) if ckpt is not None else None  # the clips as the model was trained
    written = visualize(model, cfg, args.out, args.video, args.max_filters, compare, compare_name, args.clip,
                        sampling)
    for path in written:
        print(path)
    return written
