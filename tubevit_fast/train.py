"""Train TubeViT jointly on images and videos: `python -m tubevit_fast.train`.

With no --data it trains on the synthetic moving-shapes set (tubevit_fast.data), so it runs
on a fresh machine with nothing downloaded; --data ROOT reads root/class_name/*.mp4|*.png|...

Every step feeds the model one packed list mixing images (C, H, W) and videos (C, T, H, W)
(model([img, vid, ...])), so there is no padding. AdamW, linear warm-up then cosine decay
(per step), bf16 autocast on CUDA only, checkpoints that resume exactly (model, optimizer,
scheduler, step, RNG states, args; the data order is a pure function of the step), a tqdm bar
with loss, accuracy and throughput, DDP under torchrun (gloo on CPU, nccl on GPU):

    python -m tubevit_fast.train --steps 300 --out runs/shapes
    python -m tubevit_fast.train --steps 300 --out runs/shapes --resume runs/shapes/last.pt
    torchrun --nproc_per_node 2 -m tubevit_fast.train --steps 100 --out runs/ddp

Under DDP --batch-size is per rank. Under DDP each rank also writes weights_rank{r}.sha256 at
the end (a hash of its parameters) so a run can check the ranks agree.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from tubevit_fast.data import SMALL_TUBES, StepBatchSampler, SyntheticShapes, VideoFolder, collate
from tubevit_fast.geometry import PAPER_TUBES
from tubevit_fast.io import DEFAULT_MEAN, DEFAULT_STD

TUBE_SETS = {"small": SMALL_TUBES, "paper": PAPER_TUBES}
BACKEND_CHOICES = ("auto", "reference", "torch", "triton")
# Model fields of the args that a checkpoint carries so predict/viz can rebuild the model.
MODEL_KEYS = ("num_classes", "classes", "tubes", "dim", "depth", "heads", "mlp_ratio", "frames", "size",
              "mean", "std")


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
    m.add_argument("--heads", type=int, default=2, help="fast attention supports head dims 32/64/80/96/128")
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
    r.add_argument("--out", default="runs/tubevit", help="checkpoints and log.jsonl go here")
    r.add_argument("--ckpt-every", type=int, default=100, help="also always at the last step")
    r.add_argument("--resume", default=None, help="checkpoint to continue from")
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


# ---- model --------------------------------------------------------------------------------------

def build_model(cfg: dict, backend: str = "auto") -> torch.nn.Module:
    """TubeViT from a checkpoint's model config (MODEL_KEYS). backend "reference" gives the
    eager reference model; the others the fast one (same state_dict either way)."""
    kwargs = dict(num_classes=cfg["num_classes"], tubes=TUBE_SETS[cfg["tubes"]], dim=cfg["dim"],
                  depth=cfg["depth"], heads=cfg["heads"], mlp_ratio=cfg.get("mlp_ratio", 4.0))
    if backend == "reference":
        from tubevit_fast.reference.model import TubeViT as ReferenceTubeViT

        return ReferenceTubeViT(**kwargs)
    from tubevit_fast.model import TubeViT

    return TubeViT(**kwargs, backend=backend)


def load_checkpoint(path, backend: str = "auto", map_location="cpu"):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint. Checkpoints hold
    pickled RNG states and args (torch.load weights_only=False): load only files you trust."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = build_model(ckpt["model_config"], backend)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def state_hash(model: torch.nn.Module) -> str:
    """sha256 of every state_dict tensor's bytes, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- schedule, RNG -----------------------------------------------------------------------------

def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at `step`: linear warm-up to 1, then cosine down to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- data ---------------------------------------------------------------------------------------

def make_datasets(args):
    """(train, val or None, class names)."""
    if args.data:
        train = VideoFolder(args.data, args.frames, args.size, args.stride)
        val = VideoFolder(args.val_data, args.frames, args.size, args.stride) if args.val_data else None
        if val is not None and val.classes != train.classes:
            raise ValueError(f"--val-data classes {val.classes} differ from --data classes {train.classes}")
        return train, val, list(train.classes)
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


# ---- distributed --------------------------------------------------------------------------------

def setup_distributed(device_arg: str | None):
    """(rank, world_size, device). Initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if world > 1:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return dist.get_rank(), world, device
    device = torch.device(device_arg) if device_arg else torch.device("cuda" if cuda else "cpu")
    return 0, 1, device


# ---- training -----------------------------------------------------------------------------------

def train(args) -> dict:
    """Run training; returns {"history": [per-step dicts], "val_acc", "checkpoint", "step"}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (slow)
    rank, world, device = setup_distributed(args.device)
    amp = device.type == "cuda"
    if args.stride is not None and not args.data:
        raise ValueError("--stride applies to --data folders only")

    ckpt = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    train_set, val_set, classes = make_datasets(args)
    if ckpt is not None:
        model_config = ckpt["model_config"]
        if model_config["classes"] != classes:
            raise ValueError(f"{args.resume}: trained on classes {model_config['classes']}, data has {classes}")
    else:
        model_config = dict(num_classes=len(classes), classes=classes, tubes=args.tubes, dim=args.dim,
                            depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio, frames=args.frames,
                            size=args.size, mean=list(DEFAULT_MEAN), std=list(DEFAULT_STD))

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = build_model(model_config, args.backend).to(device)
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
    stop = args.steps if args.stop_after is None else min(args.steps, args.stop_after)

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a batch without videos leaves the 3D tubes without gradients.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)

    sampler = StepBatchSampler(len(train_set), args.batch_size, args.seed, rank, world, start, stop)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    is_main = rank == 0
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.jsonl"), "a") if is_main else None
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
        path = os.path.join(args.out, "last.pt")
        if is_main:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "step": step, "rng": states,
                       "args": vars(args), "model_config": model_config}
            torch.save(payload, path + ".tmp")
            os.replace(path + ".tmp", path)
        return path

    net.train()
    tick = time.perf_counter()
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
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{acc:.2f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
        bar.update(1)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == stop:
            last_ckpt = save(step + 1)
    bar.close()

    val_acc = None
    if val_set is not None and stop == args.steps and is_main:
        val_acc = evaluate(model, val_set, args.batch_size, device, amp)
    if is_main:
        tail = history[-20:]
        summary = {"step": stop, "val_acc": val_acc,
                   "train_loss_last20": sum(r["loss"] for r in tail) / max(1, len(tail)),
                   "train_acc_last20": sum(r["acc"] for r in tail) / max(1, len(tail)),
                   "checkpoint": last_ckpt}
        print(json.dumps(summary), flush=True)
        log.write(json.dumps({"summary": summary}) + "\n")
        log.close()
    if world > 1:
        with open(os.path.join(args.out, f"weights_rank{rank}.sha256"), "w") as f:
            f.write(state_hash(model) + "\n")
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {"history": history, "val_acc": val_acc, "checkpoint": last_ckpt, "step": stop, "model": model}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be >= 1")
    return train(args)


if __name__ == "__main__":
    main()
