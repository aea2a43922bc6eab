"""Train TubeViT jointly on images and videos: `python -m tubevit_fast.train`.

With no --data it trains on the synthetic moving-shapes set (tubevit_fast.data), so it runs
on a fresh machine with nothing downloaded; --data ROOT reads root/class_name/*.mp4|*.png|...

Every step feeds the model one packed list mixing images (C, H, W) and videos (C, T, H, W)
(model([img, vid, ...])), so there is no padding. AdamW, linear warm-up then cosine decay
(per step), bf16 autocast on CUDA only, a tqdm bar with loss, accuracy and throughput, DDP under
torchrun (gloo on CPU, nccl on GPU):

    python -m tubevit_fast.train --steps 300 --out runs/shapes
    python -m tubevit_fast.train --resume runs/shapes/last.pt
    torchrun --nproc_per_node 2 -m tubevit_fast.train --steps 100 --out runs/ddp

Checkpoints (OUT/last.pt, every --ckpt-every steps and at the end) resume exactly: model,
optimizer, scheduler, step, every RNG state (as tensors), the arguments; the data order is a pure
function of the step. They load with torch.load(path, weights_only=True). Ctrl-C finishes the
current step, saves a checkpoint and prints the command that resumes it (a second Ctrl-C aborts
at once, single process only). --resume takes every default (output folder, steps, model, data
and optimisation arguments) from the checkpoint; an option given on the command line that
differs from the checkpoint's is used and named in a warning, except the model's shape and input
size, which a resumed run cannot change. OUT/log.jsonl holds one record per step; on resume the
records past the checkpoint's step are dropped, so the log reads as one run.

Under DDP --batch-size is per rank, and each rank writes weights_rank{r}.sha256 at the end (a hash
of its parameters) so a run can check the ranks agree. PyTorch prints a note once per rank that
find_unused_parameters=True "did not find any unused parameters": expected, since the flag is
needed for steps whose batch on some rank holds only images (the 3D tubes then get no gradient).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from tubevit_fast.app.checkpoint import (  # noqa: F401 - re-exported for predict/viz until they import app
    BACKEND_CHOICES, CHECKPOINT, MODEL_KEYS, TUBE_SETS, build_model, load_checkpoint, read_checkpoint, state_hash)
from tubevit_fast.app.sampling import ClipSampling
from tubevit_fast.cli import UsageError, check_positive, one_line, resolve_backends, resolve_device, run
from tubevit_fast.data import StepBatchSampler, SyntheticShapes, VideoFolder, collate
from tubevit_fast.geometry import check_fits
from tubevit_fast.io import DEFAULT_MEAN, DEFAULT_STD

# Options a resumed run cannot change (the model's shape and the input size it was trained on).
FIXED_ON_RESUME = ("tubes", "dim", "depth", "heads", "mlp_ratio", "frames", "size")
# Options that belong to one invocation: never taken from a checkpoint.
PER_RUN = ("resume", "device", "no_progress", "threads", "workers", "stop_after")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tubevit_fast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="folder root/class_name/<videos, images>; default: synthetic")
    d.add_argument("--val-data", default=None, help="folder for validation (synthetic: a set with seed+1)")
    d.add_argument("--train-items", type=int, default=1024, help="synthetic training items")
    d.add_argument("--val-items", type=int, default=128, help="synthetic validation items (0: none)")
    d.add_argument("--image-every", type=int, default=4, help="synthetic: every n-th item is an image (0: none)")
    d.add_argument("--frames", type=int, default=8, help="frames per clip")
    d.add_argument("--size", type=int, default=32, help="frame / image side")
    d.add_argument("--stride", type=int, default=None, help="folder videos: take every n-th frame")
    d.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    m = p.add_argument_group("model")
    m.add_argument("--tubes", choices=sorted(TUBE_SETS), default="small",
                   help="small: 3 tubes for 8x32x32 clips; paper: the paper's 4 for 32x224x224")
    m.add_argument("--dim", type=int, default=64)
    m.add_argument("--depth", type=int, default=2)
    m.add_argument("--heads", type=int, default=2,
                   help="head dim = dim / heads: 1 to 256 (the Triton attention takes 32/64/80/96/128)")
    m.add_argument("--mlp-ratio", type=float, default=4.0)
    m.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="reference: eager ground truth; torch/triton: the fast ops")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=500, help="total steps of the schedule")
    o.add_argument("--stop-after", type=int, default=None, help="stop (and checkpoint) after this step")
    o.add_argument("--batch-size", type=int, default=16, help="per rank")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--min-lr", type=float, default=1e-5)
    o.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--clip-grad", type=float, default=1.0, help="0: no clipping")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/tubevit",
                   help="checkpoints and log.jsonl go here (with --resume: the checkpoint's folder)")
    r.add_argument("--ckpt-every", type=int, default=100, help="also always at the last step")
    r.add_argument("--resume", default=None, help="checkpoint to continue from; the other options default to its")
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


# ---- schedule, RNG -----------------------------------------------------------------------------

def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at `step`: linear warm-up to 1, then cosine down to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def rng_states() -> dict:
    """Every RNG state as tensors and plain numbers (what torch.load(weights_only=True) reads)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": torch.tensor(mt, dtype=torch.int64), "python_version": version, "python_gauss": gauss,
              "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
              "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate((states["python_version"], tuple(states["python"].tolist()), states["python_gauss"]))
    has_gauss, cached = states["numpy_gauss"]
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"], has_gauss,
                         cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- data ---------------------------------------------------------------------------------------

def make_datasets(args):
    """(train, val or None, class names); UsageError for a missing or empty folder."""
    if args.data:
        try:
            train = VideoFolder(args.data, args.frames, args.size, args.stride)
            val = VideoFolder(args.val_data, args.frames, args.size, args.stride) if args.val_data else None
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"{one_line(err)} (expected DATASET/class_name/*.mp4|*.png|..., one sub-folder "
                             f"per class)") from None
        if val is not None and val.classes != train.classes:
            raise UsageError(f"--val-data classes {list(val.classes)} differ from --data classes "
                             f"{list(train.classes)}")
        return train, val, list(train.classes)
    if args.stride is not None:
        raise UsageError("--stride applies to --data folders only")
    if args.train_items < 1:
        raise UsageError(f"--train-items must be >= 1, got {args.train_items}")
    if args.size < 8:
        raise UsageError(f"--size {args.size}: the synthetic shapes need frames of at least 8x8")
    train = SyntheticShapes(args.train_items, args.frames, args.size, args.seed, args.image_every)
    val = (SyntheticShapes(args.val_items, args.frames, args.size, args.seed + 1, args.image_every)
           if args.val_items > 0 else None)
    return train, val, list(SyntheticShapes.classes)


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device, amp: bool) -> float:
    """Top-1 accuracy over `dataset`."""
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        samples, labels = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model([s.to(device) for s in samples])
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
    model.train()
    return correct / len(dataset)


def trim_log(path: str, step: int) -> list[int]:
    """Drop the records of `path` (log.jsonl) past `step`, what a resumed run redoes (per-step
    records, the summaries of runs that went further, and a line cut short by a crash). Returns
    the dropped steps."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append((line, json.loads(line)))
            except json.JSONDecodeError:
                records.append((line, {"step": math.inf}))  # a partial last line
    kept = [line for line, r in records if r.get("step", r.get("summary", {}).get("step", 0)) <= step]
    if len(kept) < len(records):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return [r["step"] for _, r in records if step < r.get("step", 0) < math.inf]


# ---- command line, resume -----------------------------------------------------------------------

def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


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
        if key == "out":
            if os.path.abspath(given) != value:
                notes.append(f"--out {given} is not the checkpoint's folder {value}: the run continues in {given}")
        elif given != value:
            if key in FIXED_ON_RESUME:
                raise UsageError(f"{_flag(key)} {given} differs from the checkpoint's {value}: a resumed run keeps "
                                 f"its model and input size (drop {_flag(key)}, or start a new run)")
            notes.append(f"{_flag(key)} {given} differs from the checkpoint's {value}: using {given}, so the run no "
                         f"longer matches an uninterrupted one")
    return args, ckpt, notes


def resume_command(args, world: int) -> str:
    """The command that continues this run from its checkpoint."""
    launcher = (f"torchrun --nproc_per_node {world} -m tubevit_fast.train" if world > 1
                else "python -m tubevit_fast.train")
    parts = [launcher, "--resume", shlex.quote(os.path.join(args.out, CHECKPOINT))]
    for key in ("device", "threads", "workers"):
        value = getattr(args, key)
        if value is not None and (key != "workers" or value != 0):
            parts += [_flag(key), shlex.quote(str(value))]
    if args.no_progress:
        parts.append("--no-progress")
    return " ".join(parts)


class StopRequest:
    """Ctrl-C (SIGINT) asks training to stop after the current step, save and exit. A second
    Ctrl-C aborts at once in a single process; under torchrun, whose agent forwards the signal
    again, it is ignored so every rank reaches the checkpoint."""

    def __init__(self, world: int):
        self.requested, self.world, self._previous = False, world, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and self.world == 1:
            raise KeyboardInterrupt
        if not self.requested and int(os.environ.get("RANK", "0")) == 0:
            print("\nCtrl-C: stopping after this step to save a checkpoint (Ctrl-C again to abort without saving)",
                  file=sys.stderr, flush=True)
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ---- distributed --------------------------------------------------------------------------------

def setup_distributed(device: torch.device):
    """(rank, world_size, device). Initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        return dist.get_rank(), world, torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return 0, 1, device


# ---- training -----------------------------------------------------------------------------------

def prepare(args, ckpt):
    """Everything that can fail because of the user's input, checked before anything is written:
    returns (device, backends per op, train set, val set, class names)."""
    check_positive(steps=args.steps, batch_size=args.batch_size, frames=args.frames, size=args.size,
                   ckpt_every=args.ckpt_every, stop_after=args.stop_after, threads=args.threads, stride=args.stride)
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    device = resolve_device(args.device)
    if args.backend == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (slow)
    ops = resolve_backends(args.backend, device, args.dim // args.heads if args.heads >= 1 else None)
    train_set, val_set, classes = make_datasets(args)
    if ckpt is not None and ckpt["model_config"]["classes"] != classes:
        raise UsageError(f"{args.resume}: trained on classes {ckpt['model_config']['classes']}, the data has "
                         f"{classes}")
    if args.heads < 1 or args.dim % args.heads:
        raise UsageError(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    check_input_size(args.tubes, args.frames, args.size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if math.ceil(len(train_set) / world) < args.batch_size:
        raise UsageError(f"{len(train_set)} training items over {world} rank(s) is less than one batch of "
                         f"{args.batch_size}: lower --batch-size")
    return device, ops, train_set, val_set, classes


def check_input_size(tubes: str, frames: int, size: int) -> None:
    """UsageError when a --frames x --size x --size clip is too small for a tube of the set."""
    try:
        check_fits(TUBE_SETS[tubes], (frames, size, size))
    except ValueError as err:
        raise UsageError(f"--frames {frames} --size {size}: {one_line(err)}") from None


def describe(args, device, ops, model, train_set, val_set, start: int, stop: int) -> str:
    """The one line train prints at start."""
    params = sum(p.numel() for p in model.parameters())
    data = args.data if args.data else "synthetic shapes"
    kinds = f"{args.frames}x{args.size}x{args.size} clips" + (" + images" if args.data or args.image_every else "")
    val = f", {len(val_set)} val" if val_set is not None else ""
    steps = f"steps {start + 1}-{stop} of {args.steps}" if start else f"steps 1-{stop} of {args.steps}"
    return (f"train: {device} | tube_embed={ops['tube_embed']} attention={ops['attention']} | "
            f"model {params / 1e6:.2f}M params (dim {args.dim}, depth {args.depth}, heads {args.heads}, "
            f"{args.tubes} tubes) | data {data}: {len(train_set)} train{val} items, {kinds} | "
            f"{steps}, batch {args.batch_size} | out {args.out}")


def train(args, ckpt: dict | None = None, notes=()) -> dict:
    """Run training; returns {"history": [per-step dicts], "val_acc", "checkpoint", "step", "model",
    "interrupted"}. `ckpt`: the checkpoint --resume names, already read."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, ops, train_set, val_set, classes = prepare(args, ckpt)
    rank, world, device = setup_distributed(device)
    amp = device.type == "cuda"
    is_main = rank == 0

    if ckpt is not None:
        model_config = ckpt["model_config"]
    else:
        model_config = dict(num_classes=len(classes), classes=classes, tubes=args.tubes, dim=args.dim,
                            depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio, frames=args.frames,
                            size=args.size, mean=list(DEFAULT_MEAN), std=list(DEFAULT_STD))

    torch.manual_seed(args.seed)  # same initial weights on every rank
    try:
        model = build_model(model_config, args.backend).to(device)
    except ValueError as err:  # e.g. a --dim the tube embedding refuses
        raise UsageError(one_line(err)) from None
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "latent" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "latent" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    min_ratio = args.min_lr / args.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps, min_ratio))
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
        set_rng_states(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
        saved = ckpt["args"]
        if any(saved.get(k) != getattr(args, k) for k in ("lr", "min_lr", "warmup", "steps", "weight_decay")):
            # The optimizer and scheduler states carry the old schedule: restart it from here.
            scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
            for group in optimizer.param_groups:
                group["initial_lr"] = args.lr
                group["lr"] = args.lr * lr_factor(start, args.warmup, args.steps, min_ratio)
            optimizer.param_groups[0]["weight_decay"] = args.weight_decay
    stop = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    if start >= stop:
        raise UsageError(f"{args.resume} is at step {start}, already at --steps {args.steps}"
                         + (f" / --stop-after {args.stop_after}" if args.stop_after else "")
                         + ": raise --steps to train on")

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a batch without videos leaves the 3D tubes without gradients.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)

    sampler = StepBatchSampler(len(train_set), args.batch_size, args.seed, rank, world, start, stop)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    log = None
    if is_main:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        print(describe(args, device, ops, model, train_set, val_set, start, stop), file=sys.stderr, flush=True)
        os.makedirs(args.out, exist_ok=True)
        log_path = os.path.join(args.out, "log.jsonl")
        dropped = trim_log(log_path, start) if ckpt is not None else []
        if dropped:
            print(f"log.jsonl: dropped the records of steps {dropped[0]}-{dropped[-1]}, past the checkpoint's step "
                  f"{start}: this run redoes them", file=sys.stderr)
        log = open(log_path, "a")
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=not is_main or args.no_progress, dynamic_ncols=True,
               desc="train", file=sys.stderr)
    history, last_ckpt = [], None

    def save(step: int) -> str:
        import torch.distributed as dist

        states = [rng_states()]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, states[0])
            states = gathered
        path = os.path.join(args.out, CHECKPOINT)
        if is_main:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "step": step, "rng": states,
                       "args": vars(args), "model_config": model_config,
                       "sampling": ClipSampling(args.frames, args.stride or 1).to_dict()}
            torch.save(payload, path + ".tmp")
            os.replace(path + ".tmp", path)
        return path

    def stop_requested(flag: bool) -> bool:
        if world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(t.item())

    interrupted = False
    net.train()
    tick = time.perf_counter()
    with StopRequest(world) as ctrl_c:
        for step, (samples, labels) in zip(range(start, stop), loader):
            samples = [s.to(device, non_blocking=True) for s in samples]
            labels = labels.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = net(samples)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            acc = (logits.detach().argmax(-1) == labels).float().mean().item()
            now = time.perf_counter()
            rate = len(samples) * world / max(now - tick, 1e-9)
            tick = now
            record = {"step": step + 1, "loss": loss.item(), "acc": acc, "lr": lr, "samples_per_s": rate,
                      "videos": sum(s.dim() == 4 for s in samples), "images": sum(s.dim() == 3 for s in samples)}
            history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{acc:.2f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
            bar.update(1)
            interrupted = stop_requested(ctrl_c.requested) and step + 1 < stop
            if interrupted or (step + 1) % args.ckpt_every == 0 or step + 1 == stop:
                last_ckpt = save(step + 1)
            if interrupted:
                break
    bar.close()
    done = history[-1]["step"] if history else start

    val_acc = None
    if val_set is not None and done == args.steps and is_main:
        val_acc = evaluate(model, val_set, args.batch_size, device, amp)
    if is_main:
        tail = history[-20:]
        summary = {"step": done, "val_acc": val_acc,
                   "train_loss_last20": sum(r["loss"] for r in tail) / max(1, len(tail)),
                   "train_acc_last20": sum(r["acc"] for r in tail) / max(1, len(tail)),
                   "checkpoint": last_ckpt}
        if interrupted:
            summary["interrupted"] = True
            print(f"interrupted at step {done} of {args.steps}: saved {last_ckpt}\n"
                  f"resume with: {resume_command(args, world)}", file=sys.stderr, flush=True)
        print(json.dumps(summary), flush=True)
        log.write(json.dumps({"summary": summary}) + "\n")
        log.close()
    if world > 1:
        with open(os.path.join(args.out, f"weights_rank{rank}.sha256"), "w") as f:
            f.write(state_hash(model) + "\n")
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {"history": history, "val_acc": val_acc, "checkpoint": last_ckpt, "step": done, "model": model,
            "interrupted": interrupted}


def main(argv=None) -> dict:
    args, ckpt, notes = parse_args(argv)
    return train(args, ckpt, notes)


if __name__ == "__main__":
    sys.exit(run(main))
