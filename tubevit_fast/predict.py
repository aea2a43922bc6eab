"""Classify videos or images with a train.py checkpoint:

    python -m tubevit_fast.predict clip.mp4 [more.mp4 photo.png ...] --checkpoint runs/x/last.pt --top-k 3

Each input is read as the model was trained: the checkpoint's clip sampling (frames, stride, window or
segments) and size; --frames/--stride/--size override them. With --clips K x --crops {1,3} views, an
input's score is the mean of its views' softmax (as evaluate does). Inputs are read and classified
--batch-size at a time, so memory stays bounded however many are given, and one line per class is
printed as each batch is done: "<path>  <rank>. <class>  <probability>". When every input sits in a
folder named after one of the checkpoint's classes (a dataset's class-per-folder layout), a last
line gives the accuracy.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Iterator, Sequence

import torch

from tubevit_fast.cli import (UsageError, add_video_reading_args, check_positive, resolve_backends, resolve_device,
                              run)


def folder_labels(paths: Sequence[str], classes: Sequence[str]) -> list[int] | None:
    """Each path's label from its parent folder's name, or None unless every parent is a class."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if not all(name in classes for name in names):
        return None
    return [list(classes).index(name) for name in names]


def predict_stream(model, ckpt: dict, paths, top_k: int = 5, frames: int | None = None, size: int | None = None,
                   stride: int | None = None, clips: int = 1, crops: int = 1, batch_size: int = 8, device=None,
                   workers: int = 0, meter=None, decoder: str = "pyav", clip_index=None,
                   progress: bool = False) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """(path, [(class name, probability), ...] best first) per input, in input order, a batch at a
    time, from `model` (in eval mode) and its checkpoint `ckpt`. `meter` (a MultiViewMeter) also
    collects every input's scores. The videos are indexed first (the clip index, cached in the file
    `clip_index`; None: the user's cache), so each is decoded once, at its windows only."""
    from tubevit_fast.app.datasets import EvalViews, collate_eval
    from tubevit_fast.app.checkpoint import checkpoint_sampling
    from tubevit_fast.app.evaluate import MultiViewMeter, score_batches
    from tubevit_fast.app.media import index_for_cli
    from tubevit_fast.app.sources import Annotations

    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device)
    cfg = ckpt["model_config"]
    sampling = checkpoint_sampling(ckpt)
    if frames is not None:
        sampling = dataclasses.replace(sampling, frames=frames)
    if stride is not None:
        sampling = dataclasses.replace(sampling, stride=stride, mode="window")
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such video or image file: {path}")
    labels = folder_labels(paths, cfg["classes"]) or [0] * len(paths)
    media = index_for_cli(Annotations(list(zip(paths, labels)), list(cfg["classes"])), "inputs", clip_index,
                          bad_files="error", decoder=decoder, progress=progress)
    dataset = EvalViews(media, sampling, size or cfg["size"], clips=clips, crops=crops)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_eval)
    precision = "bf16" if device.type == "cuda" else "fp32"
    meter = meter if meter is not None else MultiViewMeter()
    k = min(top_k, len(cfg["classes"]))
    for indices, _, scores in score_batches(model, loader, device, precision, meter):
        for index, row in zip(indices, torch.from_numpy(scores)):
            values, best = row.topk(k)
            yield paths[index], [(cfg["classes"][c], float(v)) for v, c in zip(values.tolist(), best.tolist())]


def predict(paths, checkpoint, top_k: int = 5, backend: str = "auto", frames: int | None = None,
            size: int | None = None, stride: int | None = None, ema: bool = False, **options) -> list:
    """[(path, [(class name, probability), ...]), ...] best first, from the checkpoint's weights (its EMA
    weights with ema=True); `options` as predict_stream's."""
    from tubevit_fast.app.checkpoint import load_checkpoint

    model, ckpt = load_checkpoint(checkpoint, backend, ema=ema)
    return list(predict_stream(model, ckpt, paths, top_k, frames, size, stride, **options))


def main(argv=None):
    from tubevit_fast.app.checkpoint import BACKEND_CHOICES, check_input_size, load_checkpoint
    from tubevit_fast.app.evaluate import MultiViewMeter

    p = argparse.ArgumentParser(prog="python -m tubevit_fast.predict", description="Top-k classes of videos/images.")
    p.add_argument("inputs", nargs="+", help="video files (.mp4, ...) or images (.png, .jpg)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by tubevit_fast.train")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=8, help="inputs read and classified together")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding inputs (0: in this process)")
    p.add_argument("--clips", type=int, default=1, help="evenly spaced windows per video")
    p.add_argument("--crops", type=int, choices=(1, 3), default=1, help="1: centre; 3: left/centre/right")
    p.add_argument("--frames", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--stride", type=int, default=None, help="default: the checkpoint's sampling")
    p.add_argument("--ema", action="store_true",
                   help="the checkpoint's EMA weights (train --ema) instead of its raw weights")
    add_video_reading_args(p)
    args = p.parse_args(argv)
    check_positive(top_k=args.top_k, frames=args.frames, size=args.size, stride=args.stride, clips=args.clips,
                   batch_size=args.batch_size)
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    device = resolve_device(args.device)
    resolve_backends(args.backend, device)
    model, ckpt = load_checkpoint(args.checkpoint, args.backend, ema=args.ema)
    cfg = ckpt["model_config"]
    classes = cfg["classes"]
    if args.frames or args.size:
        check_input_size(cfg["tubes"], args.frames or cfg["frames"], args.size or cfg["size"])
    meter = MultiViewMeter()
    results = []
    for path, ranked in predict_stream(model, ckpt, args.inputs, args.top_k, args.frames, args.size, args.stride,
                                       clips=args.clips, crops=args.crops, batch_size=args.batch_size,
                                       device=device, workers=args.workers, meter=meter, decoder=args.decoder,
                                       clip_index=args.clip_index, progress=sys.stderr.isatty()):
        for rank, (name, prob) in enumerate(ranked, 1):
            print(f"{path}  {rank}. {name}  {prob:.4f}", flush=True)
        results.append((path, ranked))
    if folder_labels(args.inputs, classes) is not None:
        result = meter.result(len(classes))
        correct = int((result.predictions == result.labels).sum())
        print(f"accuracy: top-1 {result.top1:.4f} ({correct}/{result.num_videos}), top-{min(5, len(classes))} "
              f"{result.top5:.4f} (labels from the inputs' folder names)")
    return results


if __name__ == "__main__":
    sys.exit(run(main))
