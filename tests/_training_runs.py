"""A tiny synthetic training run as the command line starts it, for tests of runs and of Ctrl-C."""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dim", "64", "--heads", "2", "--depth", "1", "--no-progress", "--threads", "1", "--val-items", "0",
        "--train-items", "16", "--batch-size", "4", "--warmup", "1"]


def start_training(out, log_lines: int, *options: str) -> subprocess.Popen:
    """`python -m tubevit_fast.train` on TINY for 2000 steps into `out`, returned once its log holds
    `log_lines` steps (or it has exited, or 120 s have passed)."""
    cmd = [sys.executable, "-m", "tubevit_fast.train", *TINY, "--out", str(out), "--steps", "2000", *options]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(out, "log.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(open(log).read().splitlines()) >= log_lines:
            break
        time.sleep(0.2)
    return proc
