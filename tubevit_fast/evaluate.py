"""Multi-view evaluation of a checkpoint on a labelled dataset:

    python -m tubevit_fast.evaluate --data val.txt --root videos/ --checkpoint runs/x/last.pt \
        --clips 4 --crops 3 --out runs/x/eval
    torchrun --nproc_per_node 8 -m tubevit_fast.evaluate --data ... --checkpoint ...   # each video once

Each video is read as --clips evenly spaced windows (the checkpoint's frames, stride and sampling mode)
x --crops crops (short side resized to the checkpoint's size, then the centre, or left/centre/right),
and its score is the mean of the views' softmax. Prints top-1, top-5 and mean class accuracy; with
--out also writes summary.json, scores.jsonl (one line per video: path, label, prediction, top-5,
every class's probability), per_class.json / per_class.csv and confusion.png. --ema scores the checkpoint's EMA weights. The
videos are indexed first (the clip index, cached in --clip-index as train does; rank 0 under torchrun),
so each is decoded once, at its windows only. Mistakes (a missing checkpoint or file, classes the
checkpoint does not have, an --out holding another evaluation, a video that cannot be decoded unless
--bad-files skip) fail in one line before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from tubevit_fast.cli import (UsageError, add_video_reading_args, check_positive, one_line, resolve_backends,
                              resolve_device, run)

CROP_CHOICES = (1, 3)


def build_parser() -> argparse.ArgumentParser:
    from tubevit_fast.app.sources import FORMATS
    from tubevit_fast.app.checkpoint import BACKEND_CHOICES

    p = argparse.ArgumentParser(prog="python -m tubevit_fast.evaluate",
                                description="Multi-view top-1, top-5 and mean class accuracy of a checkpoint.")
    p.add_argument("--data", required=True, help="annotations: a class-per-folder root, a list file, a Kinetics "
                                                 "CSV or a Something-Something v2 JSON")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: inferred from --data")
    p.add_argument("--root", default=None, help="folder the annotation's paths are relative to")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by tubevit_fast.train")
    p.add_argument("--clips", type=int, default=1, help="evenly spaced windows per video (default 1)")
    p.add_argument("--crops", type=int, choices=CROP_CHOICES, default=1, help="1: centre (default); 3: left/centre/right")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward pass, each with clips x crops views (default 8)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding videos (default 0: in this process)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--bad-files", choices=("error", "skip"), default="error",
                   help="a file that fails to decode: stop with its name (default), or skip it and count it")
    p.add_argument("--ema", action="store_true",
                   help="score the checkpoint's EMA weights (train --ema) instead of its raw weights")
    add_video_reading_args(p)
    p.add_argument("--out", default=None, help="folder for the report files (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace the report of another evaluation in --out")
    return p


def check_out(out: str | None, overwrite: bool) -> None:
    """UsageError for an --out that is a file, or that holds another evaluation's report."""
    from tubevit_fast.app.evaluate import REPORT_FILES

    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a folder")
    held = [name for name in REPORT_FILES if os.path.exists(os.path.join(out, name))]
    if held and not overwrite:
        raise UsageError(f"--out {out} holds another evaluation ({', '.join(held)}): choose another folder or "
                         f"pass --overwrite")


def load_dataset(args, classes: list[str]):
    """The annotations of --data in the checkpoint's label space, every file checked to exist."""
    from tubevit_fast.app.sources import check_files, load_annotations

    try:
        annotations = load_annotations(args.data, args.format, args.root, classes=classes)
        check_files(annotations, "--data")
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(one_line(err)) from None
    if not annotations.samples:
        raise UsageError(f"--data {args.data}: no videos")
    return annotations


def main(argv=None) -> dict | None:
    from tubevit_fast.app.checkpoint import (build_model, checkpoint_sampling, checkpoint_weights,
                                             read_checkpoint)
    from tubevit_fast.app.datasets import EvalViews
    from tubevit_fast.app.evaluate import evaluate, write_report
    from tubevit_fast.app.media import index_for_cli
    from tubevit_fast.app.runs import setup_distributed

    args = build_parser().parse_args(argv)
    check_positive(clips=args.clips, batch_size=args.batch_size)
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    device = resolve_device(args.device)
    ckpt = read_checkpoint(args.checkpoint)
    cfg = ckpt["model_config"]
    resolve_backends(args.backend, device, cfg["dim"] // cfg["heads"])
    annotations = load_dataset(args, cfg["classes"])
    check_out(args.out, args.overwrite)
    weights = checkpoint_weights(ckpt, args.ema, args.checkpoint)
    sampling = checkpoint_sampling(ckpt)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")

    # The process group first: rank 0 builds the clip index (in this process, before any DataLoader
    # worker starts) while the others wait for it.
    rank, world, device = setup_distributed(device)
    media = index_for_cli(annotations, "--data", args.clip_index, args.bad_files, args.decoder,
                          progress=rank == 0 and sys.stderr.isatty(), workers=args.workers)
    if not len(media):
        raise UsageError(f"--data {args.data}: none of its {len(annotations.samples)} files can be decoded")
    model = build_model(cfg, args.backend)
    model.load_state_dict(weights)
    model.to(device)
    dataset = EvalViews(media, sampling, cfg["size"], clips=args.clips, crops=args.crops,
                        bad_files=args.bad_files)
    views = args.clips * args.crops
    if rank == 0:
        print(f"evaluate: {len(dataset)} videos x {views} views ({args.clips} clips x {args.crops} crops, "
              f"{sampling.frames} frames, {sampling.mode} stride {sampling.stride}, {cfg['size']}px) | {device} "
              f"{precision}{' | EMA weights' if args.ema else ''} | {world} rank(s)", file=sys.stderr,
              flush=True)
    try:
        result = evaluate(model, dataset, args.batch_size, device, precision, args.workers, distributed=world > 1)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if result is None:  # not rank 0
        return None
    if not result.num_videos:
        raise UsageError(f"--data {args.data}: every one of its {result.skipped} files failed to decode")
    result.skipped += len(media.unreadable)  # left out when the clip index was built
    summary = result.summary()
    skipped = f", {result.skipped} skipped" if result.skipped else ""
    print(f"top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  mean class accuracy "
          f"{summary['mean_class_accuracy']:.4f}  ({result.num_videos} videos x {views} views{skipped})", flush=True)
    if args.out:
        extra = {"checkpoint": os.path.abspath(args.checkpoint), "data": args.data, "clips": args.clips,
                 "crops": args.crops, "sampling": sampling.to_dict(), "size": cfg["size"], "precision": precision}
        extra["weights"] = "ema" if args.ema else "model"
        for path in write_report(result, args.out, cfg["classes"], [p for p, _ in media.samples], extra):
            print(path, file=sys.stderr)
    return {"result": result, "summary": summary}


if __name__ == "__main__":
    sys.exit(run(main))
