"""The training loop: what a run needs (prepared and checked before anything is written), one
optimiser step, and the schedule of steps with its checkpoints, log and evaluations.

Every step feeds the model one packed list mixing images (C, H, W) and videos (C, T, H, W), uint8
as the loader gives them (the model normalises them); MixUp/CutMix hands it float normalised ones.
A step's batch (--batch-size items per rank) may run as --accum-steps micro-batches whose gradients
add up to the whole batch's: the loss is the batch mean either way. The data order, each item's
frames and augmentation and each step's mixing are pure functions of (seed, step), and the RNG
states travel in the checkpoint, so a resumed run is bitwise the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from tubevit_fast.app import runs
from tubevit_fast.app.checkpoint import CHECKPOINT, build_model, check_input_size, state_hash
from tubevit_fast.app.init import Init, load_init, load_scaled
from tubevit_fast.app.optim import EMA, build_optimizer, lr_factor
from tubevit_fast.app.sampling import ClipSampling
from tubevit_fast.cli import UsageError, check_positive, one_line, resolve_backends, resolve_device
from tubevit_fast.io import DEFAULT_MEAN, DEFAULT_STD

# The model shape a new run gets when neither the command line nor --init sets it.
SHAPE_DEFAULTS = dict(tubes="small", dim=64, depth=2, heads=2, mlp_ratio=4.0)


@dataclasses.dataclass
class Data:
    train: torch.utils.data.Dataset        # datasets.TrainClips
    num_videos: int                        # items 0..num_videos-1 are videos (or synthetic items)
    num_images: int                        # the --image-data items after them
    val: torch.utils.data.Dataset | None   # datasets.EvalViews
    classes: list[str]
    sampling: ClipSampling
    description: str


def padded_classes(classes: list[str], num_classes: int) -> list[str]:
    """The label space of a model with `num_classes` outputs (--num-classes) trained on `classes`:
    those, then placeholder names for the outputs no data class uses yet."""
    return list(classes) + [f"class_{i}" for i in range(len(classes), num_classes)]


def _data_error(what: str, err: Exception) -> UsageError:
    return UsageError(f"{what}: {one_line(err)}")


def make_data(args, classes: list[str] | None = None) -> Data:
    """The training and validation sets of args (files checked to exist); `classes` forces the
    label space (a resumed or fine-tuned run's). UsageError for any bad input."""
    from tubevit_fast.app.datasets import EvalViews, TrainClips
    from tubevit_fast.app.transforms import train_transform

    try:
        sampling = ClipSampling(args.frames, args.stride or 1, args.sampling)
    except ValueError as err:
        raise _data_error("--frames/--stride/--sampling", err) from None
    augment = dict(scale=args.scale, ratio=args.ratio, randaug=args.randaug, reprob=args.reprob)
    try:
        if args.data is None:
            return _synthetic_data(args, sampling, augment)
        transform = train_transform(args.size, scale=args.scale or (0.08, 1.0), ratio=args.ratio or (3 / 4, 4 / 3),
                                    flip=not args.no_flip, randaug=args.randaug, reprob=args.reprob)
    except ValueError as err:
        raise _data_error("augmentation", err) from None
    from tubevit_fast.app.media import FileMedia, index_for_cli
    from tubevit_fast.app.sources import check_files, load_annotations, load_images, merge_label_spaces

    try:
        videos = load_annotations(args.data, args.format, args.root, classes=None if args.image_data else classes)
        check_files(videos, "--data")
        images = None
        if args.image_data:
            images = load_images(args.image_data)
            check_files(images, "--image-data")
            videos, images = merge_label_spaces(videos, images)
            if classes is not None and padded_classes(videos.classes, len(classes)) != list(classes):
                raise ValueError(f"the classes {videos.classes} differ from the checkpoint's {classes}")
        val = None
        if args.val_data:
            val = load_annotations(args.val_data, args.format, args.val_root or args.root, classes=videos.classes)
            check_files(val, "--val-data")
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(one_line(err)) from None

    def media(annotations, what):
        return index_for_cli(annotations, what, args.clip_index, args.bad_files, args.decoder,
                             progress=not args.no_progress, workers=args.workers)

    train_media, val_media = media(videos, "--data"), media(val, "--val-data") if val else None
    # Decoded with the short side a little above the crop (256 for 224), as the video stacks do.
    short_side = round(args.size * 8 / 7)
    train = TrainClips(train_media, sampling, transform, seed=args.seed, short_side=short_side,
                       bad_files=args.bad_files, images=FileMedia(images) if images else None)
    val_set = (EvalViews(val_media, sampling, args.size, bad_files=args.bad_files) if val else None)
    unreadable = len(train_media.unreadable) + (len(val_media.unreadable) if val_media else 0)
    kinds = f"{len(train_media)} videos" + (
        f" + {len(images)} images (ratio {args.image_ratio})" if images else "")
    description = (f"data {args.data}: {kinds}, {len(videos.classes)} classes"
                   + (f", {len(val_media)} val" if val else "")
                   + (f", {unreadable} unreadable skipped" if unreadable else ""))
    return Data(train, len(train_media), len(images) if images else 0, val_set, list(videos.classes),
                sampling, description)


def _synthetic_data(args, sampling: ClipSampling, augment: dict) -> Data:
    """The synthetic moving shapes (app/synthetic.py): no augmentation unless asked for, and never a
    flip (the classes are directions)."""
    from tubevit_fast.app.datasets import EvalViews, TrainClips
    from tubevit_fast.app.synthetic import SyntheticShapes
    from tubevit_fast.app.transforms import train_transform

    if args.stride is not None or args.sampling != "window":
        raise UsageError("--stride and --sampling apply to --data videos (the synthetic clips are --frames long)")
    if args.image_data or args.val_data:
        raise UsageError("--image-data and --val-data need --data (without it the data are synthetic)")
    check_positive(train_items=args.train_items)
    if args.size < 8:
        raise UsageError(f"--size {args.size}: the synthetic shapes need frames of at least 8x8")
    transform = None
    if any(v for v in augment.values()):
        transform = train_transform(args.size, scale=args.scale or (1.0, 1.0), ratio=args.ratio or (1.0, 1.0),
                                    flip=False, randaug=args.randaug, reprob=args.reprob)
    train = SyntheticShapes(args.train_items, args.frames, args.size, args.seed, args.image_every)
    val = (SyntheticShapes(args.val_items, args.frames, args.size, args.seed + 1, args.image_every)
           if args.val_items > 0 else None)
    kinds = f"{args.frames}x{args.size}x{args.size} clips" + (" + images" if args.image_every else "")
    description = (f"data synthetic shapes: {len(train)} train" + (f", {len(val)} val" if val else "")
                   + f" items, {kinds}")
    return Data(TrainClips(train, sampling, transform, seed=args.seed, bad_files=args.bad_files), len(train), 0,
                EvalViews(val, sampling, args.size) if val else None, list(SyntheticShapes.classes), sampling,
                description)


@dataclasses.dataclass
class Prepared:
    device: torch.device
    ops: dict
    data: Data
    model_config: dict
    init: Init | None
    notes: list[str]


def prepare(args, ckpt) -> Prepared:
    """Everything that can fail because of the user's input, checked before anything is written."""
    check_positive(steps=args.steps, batch_size=args.batch_size, frames=args.frames, size=args.size,
                   ckpt_every=args.ckpt_every, stop_after=args.stop_after, threads=args.threads, stride=args.stride,
                   accum_steps=args.accum_steps, eval_every=args.eval_every, num_classes=args.num_classes)
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.batch_size % args.accum_steps:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of --accum-steps {args.accum_steps} "
                         f"(each step's batch is split into that many micro-batches)")
    if not 0.0 <= args.drop_path < 1.0:
        raise UsageError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if not 0.0 < args.layer_decay <= 1.0:
        raise UsageError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        raise UsageError(f"--ema must be a decay in (0, 1), e.g. 0.9998; got {args.ema}")
    if args.scale_from and not args.init:
        raise UsageError("--scale-from needs --init LARGE_IMAGE_VIT (the large model it scales to video)")
    if ckpt is None:
        runs.check_out(args.out, resume=False, overwrite=args.overwrite)
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    device = resolve_device(args.device)
    if args.backend == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (slow)

    data = make_data(args, ckpt["model_config"]["classes"] if ckpt is not None else None)
    notes: list[str] = []
    init = None
    if ckpt is not None:
        model_config = ckpt["model_config"]
    else:
        num_classes = args.num_classes or len(data.classes)
        if num_classes < len(data.classes):
            raise UsageError(f"--num-classes {num_classes} is fewer than the data's {len(data.classes)} classes")
        classes = padded_classes(data.classes, num_classes)
        shape = {k: getattr(args, k) for k in SHAPE_DEFAULTS}
        if args.init:
            given = [runs.flag(k) for k in ("dim", "depth", "mlp_ratio") if shape[k] is not None]
            if given:
                raise UsageError(f"{', '.join(given)}: the model's shape comes from --init {args.init}'s weights")
            if args.scale_from:
                init = load_scaled(args.init, args.scale_from, args.gate_layer, num_classes, args.heads)
            else:
                init = load_init(args.init, args.tubes or SHAPE_DEFAULTS["tubes"], classes, num_classes, args.heads)
            if args.tubes is not None and args.tubes != init.config["tubes"]:
                notes.append(f"--tubes {args.tubes}: the weights of --init use the {init.config['tubes']} tubes")
            shape = init.config
        else:
            shape = {k: SHAPE_DEFAULTS[k] if v is None else v for k, v in shape.items()}
        model_config = dict(shape, num_classes=num_classes, classes=classes, frames=args.frames, size=args.size,
                            mean=list(DEFAULT_MEAN), std=list(DEFAULT_STD))
        for key in SHAPE_DEFAULTS:  # the run's arguments say what the model is, for --resume
            setattr(args, key, model_config[key])
    cfg = model_config
    if cfg["heads"] < 1 or cfg["dim"] % cfg["heads"]:
        raise UsageError(f"--dim {cfg['dim']} must be a multiple of --heads {cfg['heads']}")
    ops = resolve_backends(args.backend, device, cfg["dim"] // cfg["heads"])
    check_input_size(cfg["tubes"], args.frames, args.size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if data.num_images and not data.num_videos and args.image_ratio < 1:
        raise UsageError("no readable video in --data: every one was left out (see the warnings above), so "
                         "nothing fills the video part of a batch")
    if not data.num_images and math.ceil(data.num_videos / world) < args.batch_size:
        raise UsageError(f"{data.num_videos} training items over {world} rank(s) is less than one batch of "
                         f"{args.batch_size}: lower --batch-size")
    return Prepared(device, ops, data, model_config, init, notes)


def describe(args, prep: Prepared, model, start: int, stop: int) -> str:
    """The one line train prints at start."""
    params = sum(p.numel() for p in model.parameters())
    cfg = prep.model_config
    steps = f"steps {start + 1}-{stop} of {args.steps}"
    recipe = [f"{k} {getattr(args, a)}" for k, a in (("drop-path", "drop_path"), ("ema", "ema"),
                                                      ("accum", "accum_steps"), ("layer-decay", "layer_decay"))
              if getattr(args, a) not in (None, 0.0, 1, 1.0)]
    return (f"train: {prep.device} | tube_embed={prep.ops['tube_embed']} attention={prep.ops['attention']} | "
            f"model {params / 1e6:.2f}M params (dim {cfg['dim']}, depth {cfg['depth']}, heads {cfg['heads']}, "
            f"{cfg['tubes']} tubes) | {prep.data.description} | {steps}, batch {args.batch_size} | "
            f"{args.precision}{''.join(', ' + r for r in recipe)} | out {args.out}")


# ---- one step -----------------------------------------------------------------------------------

def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against soft targets (rows summing to 1)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def train_step(net, samples: list, labels: torch.Tensor, *, accum_steps: int = 1, mixer=None, key: int = 0,
               smoothing: float = 0.0, precision: str = "fp32", forward=None):
    """Forward and backward of one step's batch in `accum_steps` micro-batches (gradients summed:
    the loss is the batch mean, as one big batch would give). Returns (loss, logits) of the whole
    batch, detached. The caller zeroes the gradients before and steps the optimiser after."""
    forward = forward or net
    targets = None
    if mixer is not None:  # one draw for the whole batch, keyed by the step
        samples, targets = mixer(samples, labels, key=key)
        targets = targets.to(labels.device)
    total = len(samples)
    # Floor: the last micro-batch, the one that syncs DDP's gradients, is never empty.
    bounds = [i * total // accum_steps for i in range(accum_steps + 1)]
    device_type = labels.device.type
    losses, all_logits = [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if a == b:
            continue
        sync = contextlib.nullcontext() if i == accum_steps - 1 or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = forward(samples[a:b])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
            if targets is None:
                per_sample = F.cross_entropy(logits, labels[a:b], label_smoothing=smoothing, reduction="none")
            else:
                per_sample = soft_cross_entropy(logits, targets[a:b])
            loss = per_sample.sum() / total
            loss.backward()
        losses.append(loss.detach())
        all_logits.append(logits.detach())
    return torch.stack(losses).sum(), torch.cat(all_logits)


# ---- the run ------------------------------------------------------------------------------------

def step_agreement(has_samples: bool, skipped: int, world: int, device) -> tuple[bool, int]:
    """(whether this step trains, items skipped on all ranks). Under DDP every rank must take part in
    a step's gradient all-reduce, so a rank whose every file was skipped would leave the others
    waiting: when any rank has nothing to train on, every rank skips the step together."""
    if world == 1:
        return has_samples, skipped
    import torch.distributed as dist

    t = torch.tensor([float(not has_samples), float(skipped)], device=device)
    dist.all_reduce(t)
    return t[0].item() == 0, int(t[1].item())


def evaluate_model(model, dataset, args, device, world: int):
    """EvalResult on `dataset` (rank 0; None elsewhere)."""
    from tubevit_fast.app.evaluate import evaluate

    return evaluate(model, dataset, args.batch_size, device, args.precision, args.workers, distributed=world > 1)


def train(args, ckpt: dict | None = None, notes=()) -> dict:
    """Run training; returns {"history": [per-step dicts], "val_acc", "checkpoint", "step", "model",
    "ema", "interrupted"}. `ckpt`: the checkpoint --resume names, already read."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = "bf16" if resolve_device(args.device).type == "cuda" else "fp32"
    # The process group first: rank 0 builds the clip index while the others wait for it.
    rank, world, device = runs.setup_distributed(resolve_device(args.device))
    prep = prepare(args, ckpt)
    is_main = rank == 0
    data, cfg = prep.data, prep.model_config

    torch.manual_seed(args.seed)  # same initial weights on every rank
    try:
        model = build_model(cfg, args.backend, drop_path=args.drop_path)
    except ValueError as err:  # e.g. a --dim the tube embedding refuses
        raise UsageError(one_line(err)) from None
    frozen = list(ckpt.get("frozen", [])) if ckpt is not None else (prep.init.frozen if prep.init else [])
    if prep.init is not None:
        missing, unexpected = model.load_state_dict(prep.init.state, strict=False)
        stray = [k for k in missing if not k.startswith(tuple(f + "." for f in prep.init.fresh))]
        if unexpected or stray:
            raise UsageError(f"--init {args.init}: its weights do not fit the model (unexpected "
                             f"{unexpected[:3]}, missing {stray[:3]})")
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.layer_decay)
    min_ratio = args.min_lr / args.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps, min_ratio))
    ema = EMA(model, args.ema) if args.ema else None
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            if "ema" in ckpt:
                ema.load_state_dict(ckpt["ema"])
            else:
                ema = EMA(model, args.ema)  # --ema switched on at resume: the average starts here
        start = ckpt["step"]
        runs.set_rng_states(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
        saved = ckpt["args"]
        if any(saved.get(k) != getattr(args, k) for k in ("lr", "min_lr", "warmup", "steps", "weight_decay")):
            # The optimizer and scheduler states carry the old schedule: restart it from here.
            scheduler.base_lrs = [args.lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["initial_lr"] = base
                group["lr"] = base * lr_factor(start, args.warmup, args.steps, min_ratio)
                if group["weight_decay"]:
                    group["weight_decay"] = args.weight_decay
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
    forward = torch.compile(net) if args.compile else net
    mixer = None
    if args.mixup > 0 or args.cutmix > 0:
        from tubevit_fast.app.transforms import MixupCutmix

        mixer = MixupCutmix(cfg["num_classes"], args.mixup, args.cutmix, args.smoothing, cfg["mean"], cfg["std"],
                            seed=args.seed)

    from tubevit_fast.app.datasets import StepBatchSampler, collate_train

    sampler = StepBatchSampler(data.num_videos, args.batch_size, args.seed, rank, world, start, stop,
                               num_images=data.num_images, image_ratio=args.image_ratio if data.num_images else 0.0)
    loader = torch.utils.data.DataLoader(data.train, batch_sampler=sampler, collate_fn=collate_train,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=runs.ignore_sigint if args.workers else None,
                                         # Its own generator: drawing the workers' base seed must not move
                                         # the global one that drop-path draws from (resume would differ).
                                         generator=torch.Generator().manual_seed(args.seed))
    log = None
    log_path = os.path.join(args.out, runs.LOG)
    if is_main:
        for note in notes + prep.notes:
            print(f"warning: {note}", file=sys.stderr)
        if prep.init is not None:
            print(prep.init.describe(args.init), file=sys.stderr)
        print(describe(args, prep, model, start, stop), file=sys.stderr, flush=True)
        if ckpt is None and args.overwrite:
            runs.clear_run(args.out)
        os.makedirs(args.out, exist_ok=True)
        dropped = runs.trim_log(log_path, start) if ckpt is not None else []
        if dropped:
            print(f"log.jsonl: dropped the records of steps {dropped[0]}-{dropped[-1]}, past the checkpoint's step "
                  f"{start}: this run redoes them", file=sys.stderr)
        log = open(log_path, "a")
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=not is_main or args.no_progress, dynamic_ncols=True,
               desc="train", file=sys.stderr)
    history, last_ckpt, skipped_total = [], None, 0

    def save(step: int) -> str:
        import torch.distributed as dist

        states = [runs.rng_states()]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, states[0])
            states = gathered
        path = os.path.join(args.out, CHECKPOINT)
        if is_main:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "step": step, "rng": states, "args": vars(args),
                       "model_config": cfg, "sampling": data.sampling.to_dict(), "frozen": frozen}
            if ema is not None:
                payload["ema"] = ema.state_dict()
            runs.save_atomically(payload, path)
        return path

    def validate(record: dict) -> None:
        for prefix, m in (("val", model), ("ema_val", ema.module if ema else None)):
            if m is None:
                continue
            result = evaluate_model(m, data.val, args, device, world)
            if result is not None:
                s = result.summary()
                record.update({f"{prefix}_top1": s["top1"], f"{prefix}_top5": s["top5"],
                               f"{prefix}_mean_class_accuracy": s["mean_class_accuracy"]})

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
    with runs.StopRequest(world) as ctrl_c:
        for step, (samples, labels, skipped) in zip(range(start, stop), loader):
            trainable, skipped = step_agreement(bool(samples), skipped, world, device)
            skipped_total += skipped
            lr = optimizer.param_groups[-1]["lr"]  # the head's group: the base lr
            record = {"step": step + 1, "lr": lr, "skipped": skipped}
            if trainable:
                samples = [s.to(device, non_blocking=True) for s in samples]
                labels = labels.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss, logits = train_step(net, samples, labels, accum_steps=args.accum_steps, mixer=mixer, key=step,
                                          smoothing=args.smoothing, precision=args.precision, forward=forward)
                if args.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                if ema is not None:
                    ema.update(model)
                record.update(loss=loss.item(), acc=(logits.argmax(-1) == labels).float().mean().item(),
                              videos=sum(s.dim() == 4 for s in samples), images=sum(s.dim() == 3 for s in samples))
            scheduler.step()
            now = time.perf_counter()
            record["samples_per_s"] = len(samples) * world / max(now - tick, 1e-9)
            if data.val is not None and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                validate(record)
            tick = time.perf_counter()
            history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", acc=f"{record.get('acc', 0):.2f}",
                            lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}")
            bar.update(1)
            interrupted = stop_requested(ctrl_c.requested) and step + 1 < stop
            if interrupted or (step + 1) % args.ckpt_every == 0 or step + 1 == stop:
                last_ckpt = save(step + 1)
            if interrupted:
                break
    bar.close()
    done = history[-1]["step"] if history else start

    final: dict = {}
    if data.val is not None and done == args.steps:
        validate(final)
    if is_main:
        trained = [r for r in history[-20:] if "loss" in r]
        summary = {"step": done, "val_acc": final.get("val_top1"), **{k: v for k, v in final.items()},
                   "train_loss_last20": sum(r["loss"] for r in trained) / max(1, len(trained)),
                   "train_acc_last20": sum(r["acc"] for r in trained) / max(1, len(trained)),
                   "skipped_files": skipped_total, "checkpoint": last_ckpt}
        if interrupted:
            summary["interrupted"] = True
            print(f"interrupted at step {done} of {args.steps}: saved {last_ckpt}\n"
                  f"resume with: {runs.resume_command(args, world)}", file=sys.stderr, flush=True)
        if skipped_total:
            print(f"skipped {skipped_total} item(s) whose file failed to decode (see the warnings above)",
                  file=sys.stderr, flush=True)
        print(json.dumps(summary), flush=True)
        log.write(json.dumps({"summary": summary}) + "\n")
        log.close()
    if world > 1:
        with open(os.path.join(args.out, f"weights_rank{rank}.sha256"), "w") as f:
            f.write(state_hash(model) + "\n")
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {"history": history, "val_acc": final.get("val_top1"), "checkpoint": last_ckpt, "step": done,
            "model": model, "ema": ema.module if ema else None, "interrupted": interrupted,
            "skipped": skipped_total}
