"""Classify videos or images with a train.py checkpoint:

    python -m tubevit_fast.predict clip.mp4 [more.mp4 photo.png ...] --checkpoint runs/x/last.pt --top-k 3

Each input is read as the model was trained (frames, size and normalisation come from the
checkpoint; --frames/--size override them) and one line per class is printed:
"<path>  <rank>. <class>  <probability>".
"""
from __future__ import annotations

import argparse
import sys

import torch

from tubevit_fast.cli import check_positive, resolve_backends, run
from tubevit_fast.io import read_any
from tubevit_fast.train import BACKEND_CHOICES, load_checkpoint


@torch.no_grad()
def predict(paths, checkpoint, top_k: int = 5, backend: str = "auto", frames: int | None = None,
            size: int | None = None, stride: int | None = None):
    """[(path, [(class name, probability), ...]), ...] best first."""
    model, ckpt = load_checkpoint(checkpoint, backend)
    cfg = ckpt["model_config"]
    frames, size = frames or cfg["frames"], size or cfg["size"]
    samples = [read_any(p, frames, size, stride, cfg["mean"], cfg["std"]) for p in paths]
    probs = model(samples).float().softmax(-1)
    k = min(top_k, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    return [(p, [(cfg["classes"][i], v) for v, i in zip(vals.tolist(), idx.tolist())])
            for p, vals, idx in zip(paths, values, indices)]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tubevit_fast.predict", description="Top-k classes of videos/images.")
    p.add_argument("inputs", nargs="+", help="video files (.mp4, ...) or images (.png, .jpg)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by tubevit_fast.train")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--frames", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--stride", type=int, default=None, help="take every n-th frame instead of spreading them")
    args = p.parse_args(argv)
    check_positive(top_k=args.top_k, frames=args.frames, size=args.size, stride=args.stride)
    resolve_backends(args.backend, torch.device("cpu"))
    results = predict(args.inputs, args.checkpoint, args.top_k, args.backend, args.frames, args.size, args.stride)
    for path, ranked in results:
        for rank, (name, prob) in enumerate(ranked, 1):
            print(f"{path}  {rank}. {name}  {prob:.4f}")
    return results


if __name__ == "__main__":
    sys.exit(run(main))
