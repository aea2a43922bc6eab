"""A training run on disk and in the terminal: its output folder, log.jsonl, RNG states for exact
resuming, Ctrl-C, and the process group under torchrun.

An --out folder belongs to one run: a new run refuses a folder holding another run's files (RUN_FILES)
unless --resume continues it or --overwrite replaces it. log.jsonl holds one record per step and a
summary per invocation; on resume the records past the checkpoint's step are dropped, so the log
reads as one run.
"""
from __future__ import annotations

import json
import math
import os
import random
import shlex
import signal
import sys
import threading

import numpy as np
import torch

from tubevit_fast.app.checkpoint import CHECKPOINT
from tubevit_fast.cli import UsageError

LOG = "log.jsonl"
RUN_FILES = (CHECKPOINT, LOG)


def check_out(out: str, resume: bool, overwrite: bool) -> None:
    """UsageError for an --out that is a file, or that holds another run when neither --resume nor
    --overwrite was given. Writes nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a folder")
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if held and not (resume or overwrite):
        raise UsageError(f"--out {out} holds another run ({', '.join(held)}): choose another folder, continue it "
                         f"with --resume {os.path.join(out, CHECKPOINT)}, or pass --overwrite to replace it")


def clear_run(out: str) -> None:
    """--overwrite: remove the previous run's files (the folder's other files stay)."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
    for entry in os.listdir(out) if os.path.isdir(out) else ():
        if entry.startswith("weights_rank") and entry.endswith(".sha256"):
            os.remove(os.path.join(out, entry))


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


def save_atomically(payload: dict, path: str) -> None:
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


# ---- RNG ----------------------------------------------------------------------------------------

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


# ---- Ctrl-C -------------------------------------------------------------------------------------

def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resume_command(args, world: int) -> str:
    """The command that continues this run from its checkpoint."""
    launcher = (f"torchrun --nproc_per_node {world} -m tubevit_fast.train" if world > 1
                else "python -m tubevit_fast.train")
    parts = [launcher, "--resume", shlex.quote(os.path.join(args.out, CHECKPOINT))]
    # The per-run options (train.PER_RUN) a resumed run does not take from the checkpoint.
    defaults = {"workers": 0, "decoder": "pyav"}
    for key in ("device", "threads", "workers", "decoder", "clip_index"):
        value = getattr(args, key, None)
        if value is not None and value != defaults.get(key):
            parts += [flag(key), shlex.quote(str(value))]
    for key in ("compile", "no_progress"):
        if getattr(args, key, False):
            parts.append(flag(key))
    return " ".join(parts)


def ignore_sigint(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a worker leaves Ctrl-C to the main process (which stops the run
    and shuts the workers down), so the message is printed once, not once per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
