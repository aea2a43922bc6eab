"""Train TubeViT jointly on images and videos: `python -m tubevit_fast.train`.

With no --data it trains on the synthetic moving-shapes set (tubevit_fast.app.synthetic), so it
runs on a fresh machine with nothing downloaded; --data reads a dataset in any of the annotation
formats of tubevit_fast.app.sources (a class-per-folder root, a list file, a Kinetics CSV, a
Something-Something v2 JSON).

    python -m tubevit_fast.train --steps 300 --out runs/shapes
    python -m tubevit_fast.train --data train.txt --val-data val.txt --frames 16 --stride 4 --size 112 \\
        --randaug 2,9 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --drop-path 0.1 --ema 0.999 --out runs/ucf
    python -m tubevit_fast.train --init vit_b_16.pth --data ... --tubes paper --frames 32 --stride 2 --size 224
    python -m tubevit_fast.train --resume runs/shapes/last.pt
    torchrun --nproc_per_node 2 -m tubevit_fast.train --steps 100 --out runs/ddp

Every step feeds the model one packed list mixing images (C, H, W) and videos (C, T, H, W), so there
is no padding. AdamW with layer-wise lr decay, linear warm-up then cosine decay (per step), DDP under
torchrun (gloo on CPU, nccl on GPU), a tqdm bar with loss, accuracy and throughput.

Checkpoints (OUT/last.pt, every --ckpt-every steps and at the end) resume bitwise exactly: model,
EMA, optimizer, scheduler, step, every RNG state (as tensors), the arguments, the clip sampling;
the data order, each item's frames and augmentation and each step's MixUp/CutMix are pure
functions of (seed, step). They load with torch.load(path, weights_only=True). Ctrl-C finishes the
current step, saves a checkpoint and prints the command that resumes it, once (DataLoader workers
ignore it; a second Ctrl-C aborts at once, single process only). --resume takes every default
(output folder, steps, model, data and optimisation arguments) from the checkpoint; an option given
on the command line that differs from the checkpoint's is used and named in a warning, except the
model's shape and input size, which a resumed run cannot change. An --out holding another run is
refused unless --resume continues it or --overwrite replaces it; OUT/log.jsonl holds one record per
step (on resume the records past the checkpoint's step are dropped, so the log reads as one run).
Before any DataLoader worker starts, the videos of --data and --val-data are indexed (frame counts
and keyframes, tubevit_fast.app.clip_index; rank 0 under torchrun, the other ranks wait and read
it), cached in --clip-index (default: tubevit_fast/clip_index.json in $XDG_CACHE_HOME or ~/.cache,
keyed by path, size and mtime), so workers never probe a file and decode only each clip's window
(--decoder pyav or torchcodec). A video that cannot be decoded is then left out with one warning line
naming it and a count, or with --bad-files error refused in one line; a file that fails later, when
read, is skipped with one warning and counted (per step in the log, in total in the summary). Every
mistake in the command line or the data is one `error:` line before anything is written.

Under DDP --batch-size is per rank (a step for which some rank has no readable item is skipped by
every rank, so none waits for the others' gradients), and each rank writes weights_rank{r}.sha256 at
the end (a hash of its parameters) so a run can check the ranks agree. PyTorch prints a note once per rank that
find_unused_parameters=True "did not find any unused parameters": expected, since the flag is
needed for steps whose batch on some rank holds only images (the 3D tubes then get no gradient).
"""
from __future__ import annotations

import argparse
import os
import sys

from tubevit_fast.app import runs
from tubevit_fast.app.checkpoint import BACKEND_CHOICES, TUBE_SETS, read_checkpoint
from tubevit_fast.app.loop import train
from tubevit_fast.cli import UsageError, add_video_reading_args, run

# Options a resumed run cannot change (the model's shape and the input size it was trained on).
# (--init, --scale-from, --gate-layer, --num-classes built the model the checkpoint holds.)
FIXED_ON_RESUME = ("tubes", "dim", "depth", "heads", "mlp_ratio", "frames", "size", "num_classes", "init", "scale_from",
                   "gate_layer")
# Options that belong to one invocation: never taken from a checkpoint.
PER_RUN = ("resume", "device", "no_progress", "threads", "workers", "stop_after", "overwrite", "compile",
           "decoder", "clip_index")


def _two(kind, expected: str):
    """An argparse type for "A,B" options: two values of `kind`; `expected` (with its closing
    punctuation) names the form in the error."""
    def parse(text: str) -> tuple:
        try:
            first, second = (kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected} got {text!r}") from None
        return first, second
    return parse


_pair = _two(float, "two numbers MIN,MAX,")
_randaug = _two(int, "N,M (ops, magnitude), e.g. 2,9;")


def build_parser() -> argparse.ArgumentParser:
    from tubevit_fast.app.datasets import BAD_FILES
    from tubevit_fast.app.sampling import MODES
    from tubevit_fast.app.sources import FORMATS

    p = argparse.ArgumentParser(prog="python -m tubevit_fast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="training annotations: a class-per-folder root, a list file "
                                                "(path label), a Kinetics CSV or an SSv2 JSON; default: synthetic")
    d.add_argument("--val-data", default=None, help="validation annotations, same format (synthetic: a set "
                                                    "with seed+1)")
    d.add_argument("--format", choices=FORMATS, default=None, help="annotation format; default: inferred from "
                                                                  "the path")
    d.add_argument("--root", default=None, help="folder the annotation's paths are relative to (default: its own)")
    d.add_argument("--val-root", default=None, help="the same for --val-data (default: --root)")
    d.add_argument("--image-data", default=None, help="images for joint training: a class folder root or a list")
    d.add_argument("--image-ratio", type=float, default=0.25, help="fraction of each batch taken from --image-data")
    d.add_argument("--train-items", type=int, default=1024, help="synthetic training items")
    d.add_argument("--val-items", type=int, default=128, help="synthetic validation items (0: none)")
    d.add_argument("--image-every", type=int, default=4, help="synthetic: every n-th item is an image (0: none)")
    d.add_argument("--frames", type=int, default=8, help="frames per clip")
    d.add_argument("--stride", type=int, default=None, help="frames apart in a window (default 1)")
    d.add_argument("--sampling", choices=MODES, default="window",
                   help="window: --frames frames --stride apart at a random start; segments: one random frame in "
                        "each of --frames equal segments (SSv2/TSN)")
    d.add_argument("--size", type=int, default=32, help="frame / image side the model sees")
    d.add_argument("--bad-files", choices=BAD_FILES, default="skip",
                   help="a file that fails to decode: skip it (one warning, counted) or stop with its name")
    add_video_reading_args(d)
    d.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding videos (0: in this process)")
    a = p.add_argument_group("augmentation (training; one draw per clip, applied to every frame)")
    a.add_argument("--scale", type=_pair, default=None,
                   help="random resized crop area MIN,MAX (default 0.08,1 for --data; synthetic: no crop)")
    a.add_argument("--ratio", type=_pair, default=None, help="random resized crop aspect MIN,MAX (default 0.75,1.333)")
    a.add_argument("--no-flip", action="store_true", help="no horizontal flip (labels that name a direction, SSv2)")
    a.add_argument("--randaug", type=_randaug, default=None, help="RandAugment N,M: N ops of magnitude M (e.g. 2,9)")
    a.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    a.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha (0: off)")
    a.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    a.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    m = p.add_argument_group("model (a new run; --init and --resume take the shape from their weights)")
    m.add_argument("--tubes", choices=sorted(TUBE_SETS), default=None,
                   help="small: 3 tubes for 8x32x32 clips (default); paper: the paper's 4 for 32x224x224")
    m.add_argument("--dim", type=int, default=None, help="width (default 64)")
    m.add_argument("--depth", type=int, default=None, help="blocks (default 2)")
    m.add_argument("--heads", type=int, default=None,
                   help="default 2; head dim = dim / heads: 1 to 256 (the Triton attention takes 32/64/80/96/128). "
                        "With --init of a ViT state_dict: its heads (default width / 64)")
    m.add_argument("--mlp-ratio", type=float, default=None, help="MLP width / dim (default 4)")
    m.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the data's classes)")
    m.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="reference: eager ground truth; torch/triton: the fast ops")
    w = p.add_argument_group("weights to start from")
    w.add_argument("--init", default=None, help="a timm or torchvision ViT state_dict, a daniel-code/TubeViT "
                                                "checkpoint or a tubevit_fast checkpoint (fine-tuning)")
    w.add_argument("--scale-from", default=None, help="with --init LARGE_VIT: a small tubevit_fast checkpoint whose "
                                                      "3D tubes the gated image-to-video model takes (the paper's "
                                                      "scaling)")
    w.add_argument("--gate-layer", type=int, default=None, help="--scale-from: the block the gated skip feeds "
                                                                "(blocks before it are frozen; default depth / 2)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=500, help="total steps of the schedule")
    o.add_argument("--stop-after", type=int, default=None, help="stop (and checkpoint) after this step")
    o.add_argument("--batch-size", type=int, default=16, help="items per step and rank")
    o.add_argument("--accum-steps", type=int, default=1,
                   help="run each step's batch as this many micro-batches (same gradients, less memory)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak lr (of the head under --layer-decay)")
    o.add_argument("--min-lr", type=float, default=1e-5)
    o.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--layer-decay", type=float, default=1.0,
                   help="lr x decay^(depth+1-layer): layer 0 the tube embedding, block i layer i+1 (1: off)")
    o.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block")
    o.add_argument("--ema", type=float, default=None,
                   help="keep an EMA of the weights with this decay (e.g. 0.9998), evaluated and saved beside them")
    o.add_argument("--clip-grad", type=float, default=1.0, help="0: no clipping")
    o.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="bf16: autocast on CPU or CUDA (default: bf16 on cuda, fp32 on cpu)")
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    o.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory)")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/tubevit",
                   help="checkpoints and log.jsonl go here (with --resume: the checkpoint's folder)")
    r.add_argument("--overwrite", action="store_true", help="replace the run --out holds")
    r.add_argument("--ckpt-every", type=int, default=100, help="also always at the last step")
    r.add_argument("--eval-every", type=int, default=None, help="evaluate the validation set every N steps "
                                                                 "(always at the end)")
    r.add_argument("--resume", default=None, help="checkpoint to continue from; the other options default to its")
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def parse_args(argv=None):
    """(args, checkpoint or None, warnings). With --resume the checkpoint's arguments are the
    defaults: an option given again with a different value is used and warned about, except
    FIXED_ON_RESUME, which is a UsageError."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None:
        return args, None, []
    ckpt = read_checkpoint(args.resume)
    saved = {k: v for k, v in ckpt["args"].items() if k not in PER_RUN and hasattr(args, k)}
    saved["out"] = os.path.dirname(os.path.abspath(args.resume))  # where the checkpoint lives now
    parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    notes = []
    for key, value in saved.items():
        given = getattr(args, key)
        if isinstance(value, list):  # pairs come back from the checkpoint as lists
            value = tuple(value)
            if given is not None and not isinstance(given, tuple):
                given = tuple(given)
            setattr(args, key, given)
        if key == "out":
            if os.path.abspath(given) != value:
                notes.append(f"--out {given} is not the checkpoint's folder {value}: the run continues in {given}")
        elif given != value:
            if key in FIXED_ON_RESUME:
                raise UsageError(f"{runs.flag(key)} {given} differs from the checkpoint's {value}: a resumed run "
                                 f"keeps its model and input size (drop {runs.flag(key)}, or start a new run)")
            notes.append(f"{runs.flag(key)} {given} differs from the checkpoint's {value}: using {given}, so the run "
                         f"no longer matches an uninterrupted one")
    return args, ckpt, notes


def main(argv=None) -> dict:
    args, ckpt, notes = parse_args(argv)
    return train(args, ckpt, notes)


if __name__ == "__main__":
    sys.exit(run(main))
