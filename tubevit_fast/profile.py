"""Profile TubeViT steps: a torch.profiler Chrome trace, a table of the top ops / kernels, and the
nsys / ncu command lines to run on a GPU.

    python -m tubevit_fast.profile [--device cpu|cuda] [--steps N] [--out DIR] [--preset B|tiny]
                                   [--batch B] [--mode train|inference] [--nvtx-only]

Every call of a fast op (tubevit_fast.ops.tube_embed.tube_embed and
tubevit_fast.ops.attention.attention, as the fast layers call them) runs inside a range named
`tubevit_fast.tube_embed` / `tubevit_fast.attention`: a torch.profiler.record_function (so the
ranges show in the Chrome trace, on CPU too) and, when CUDA is available, an NVTX range
(torch.cuda.nvtx.range_push/pop) for nsys and ncu's --nvtx-include. The ranges come from
`fast_op_ranges()`, a context manager that swaps the two names in tubevit_fast.modules for
wrapped versions and puts the originals back on exit: nothing stays patched. The ranges cover
the forward calls; backward kernels run from the autograd engine and appear under the ops'
backward nodes (tubevit_fast::attention_bwd, ...).

One untimed warm-up step runs first (first-use self-checks, Triton compilation, allocator
growth), then --steps steps are profiled; a line on stderr announces each. --nvtx-only skips
torch.profiler and brackets the measured steps with cudaProfilerStart/Stop: the mode to run under
nsys / ncu. On a machine without a GPU the profiler's own "gpuGetDeviceCount failed" line is
silenced (KINETO_LOG_LEVEL=5 unless set); its two "USDT ... profiler_start/stop" lines remain.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from tubevit_fast.cli import UsageError, check_positive, resolve_backends, resolve_device, run

TUBE_EMBED_RANGE = "tubevit_fast.tube_embed"
ATTENTION_RANGE = "tubevit_fast.attention"

# name -> (model kwargs, input (C, T, H, W), default batch)
PRESETS = {
    "B": ({"dim": 768, "depth": 12, "heads": 12}, (3, 32, 224, 224), 8),
    "tiny": ({"dim": 64, "depth": 1, "heads": 2}, (3, 32, 64, 64), 1),
}
NUM_CLASSES = 400


@contextlib.contextmanager
def op_range(name: str) -> Iterator[None]:
    """A record_function range, plus an NVTX range when CUDA is available."""
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def _ranged(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with op_range(name):
            return fn(*args, **kwargs)
    wrapper.__tubevit_fast_range__ = name
    return wrapper


@contextlib.contextmanager
def fast_op_ranges() -> Iterator[None]:
    """Within the block, every fast op call made by the fast layers runs inside its named range.
    Restores tubevit_fast.modules' own functions on exit (also on error)."""
    from tubevit_fast import modules

    originals = {"tube_embed": modules.tube_embed, "attention": modules.attention}
    names = {"tube_embed": TUBE_EMBED_RANGE, "attention": ATTENTION_RANGE}
    try:
        for attr, fn in originals.items():
            if not hasattr(fn, "__tubevit_fast_range__"):  # nested use: wrap once
                setattr(modules, attr, _ranged(names[attr], fn))
        yield
    finally:
        for attr, fn in originals.items():
            setattr(modules, attr, fn)


def build(preset: str, device: torch.device, batch: int | None, mode: str):
    """(model, step function) for the preset: step() runs one inference or training step."""
    from tubevit_fast import TubeViT

    kwargs, shape, default_batch = PRESETS[preset]
    batch = default_batch if batch is None else batch
    torch.manual_seed(0)
    model = TubeViT(num_classes=NUM_CLASSES, **kwargs).to(device)
    video = torch.randn(batch, *shape, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    amp = device.type == "cuda"
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if mode == "inference":
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return model(video)
        model.train()
        optim.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), \
                torch.profiler.record_function("tubevit_fast.forward"):
            loss = F.cross_entropy(model(video).float(), labels)
        with torch.profiler.record_function("tubevit_fast.backward"):
            loss.backward()
        with torch.profiler.record_function("tubevit_fast.optimizer_step"):
            optim.step()
        return loss

    return model, step


def gpu_commands(out: str, preset: str, steps: int, mode: str) -> list[str]:
    """The nsys and ncu command lines for this configuration."""
    run = ["python", "-m", "tubevit_fast.profile", "--device", "cuda", "--preset", preset, "--mode", mode]
    q = shlex.quote
    nsys = (f"nsys profile -t cuda,nvtx,osrt,cudnn,cublas --capture-range=cudaProfilerApi "
            f"--capture-range-end=stop --force-overwrite true -o {q(os.path.join(out, 'tubevit_nsys'))} "
            + " ".join(run + ["--steps", str(steps), "--nvtx-only", "--out", q(out)]))
    one_step = " ".join(run + ["--steps", "1", "--nvtx-only", "--out", q(out)])
    ncu_embed = (f"ncu --nvtx --nvtx-include {q(TUBE_EMBED_RANGE + '/')} -k regex:_tube_embed "
                 f"--set full --force-overwrite -o {q(os.path.join(out, 'ncu_tube_embed'))} {one_step}")
    ncu_attn = (f"ncu --nvtx --nvtx-include {q(ATTENTION_RANGE + '/')} -k regex:attention_fwd "
                f"--set full --force-overwrite -o {q(os.path.join(out, 'ncu_attention'))} {one_step}")
    # Backward kernels run outside the forward NVTX ranges: select them by name only.
    ncu_bwd = (f"ncu -k regex:'_tube_embed_bwd|attention_bwd' -c 20 --set full --force-overwrite "
               f"-o {q(os.path.join(out, 'ncu_backward'))} {one_step}")
    return [nsys, ncu_embed, ncu_attn, ncu_bwd,
            f"nsys stats --report cuda_gpu_kern_sum,nvtx_sum {q(os.path.join(out, 'tubevit_nsys.nsys-rep'))}"]


def _progress(message: str) -> None:
    print(f"profile: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tubevit_fast.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="profile_out")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="B")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--row-limit", type=int, default=25)
    parser.add_argument("--nvtx-only", action="store_true",
                        help="no torch.profiler; bracket the steps with cudaProfilerStart/Stop (for nsys/ncu)")
    args = parser.parse_args(argv)
    check_positive(steps=args.steps, batch=args.batch, row_limit=args.row_limit)
    device = resolve_device(args.device)
    ops = resolve_backends("auto", device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if not torch.cuda.is_available():
        # Kineto logs an ERROR line when it finds no GPU driver: expected here, not a failure.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    os.makedirs(args.out, exist_ok=True)
    _, step = build(args.preset, device, args.batch, args.mode)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _progress(f"preset {args.preset}, {args.mode}, {device}, tube_embed={ops['tube_embed']} "
              f"attention={ops['attention']}; warm-up step (first-use self-checks, compilation)")

    with fast_op_ranges():
        step()  # warm-up: self-checks, compilation, allocator
        sync()
        if args.nvtx_only:
            if device.type == "cuda":
                torch.cuda.profiler.start()
            for i in range(args.steps):
                _progress(f"step {i + 1}/{args.steps}")
                with op_range(f"tubevit_fast.step{i}"):
                    step()
            sync()
            if device.type == "cuda":
                torch.cuda.profiler.stop()
            print(f"ran {args.steps} {args.mode} steps ({args.preset}, {args.device}) with NVTX ranges only")
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities, record_shapes=True,
                                        profile_memory=False) as prof:
                for i in range(args.steps):
                    _progress(f"step {i + 1}/{args.steps} (profiled)")
                    step()
                    sync()
                    prof.step()
            _progress("writing the trace")
            trace = os.path.join(args.out, "trace.json")
            prof.export_chrome_trace(trace)
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"# top ops by {sort}: {args.steps} {args.mode} steps, preset {args.preset}, {args.device}")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.row_limit))
            ranges = [e for e in prof.key_averages() if e.key in (TUBE_EMBED_RANGE, ATTENTION_RANGE)]
            for e in ranges:
                total = e.device_time_total if device.type == "cuda" else e.cpu_time_total
                print(f"range {e.key}: {e.count} calls, {total / 1e3:.3f} ms total")
            print(f"Chrome trace: {trace} (open in chrome://tracing or https://ui.perfetto.dev)")

    print("\n# On a GPU machine:")
    for cmd in gpu_commands(args.out, args.preset, args.steps, args.mode):
        print(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
