"""What the command-line tools (train, predict, viz, profile, data) share: mistakes a user can fix
print one line `error: ...` and exit with status 2, never a traceback; Ctrl-C outside training
exits with 130; the backend choice is checked before anything runs."""
from __future__ import annotations

import os
import re
import sys
from typing import Callable

import torch

from tubevit_fast import backends
from tubevit_fast.io import MediaError, MissingDependency


class UsageError(ValueError):
    """A mistake the user can fix (a missing or wrong file, a bad option value)."""


# What `run` reports as one line. FileNotFoundError: the tools only open files the user named.
USER_ERRORS = (UsageError, MediaError, MissingDependency, FileNotFoundError)
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def one_line(err: BaseException) -> str:
    """The message of `err` on one line. A DataLoader worker re-raises a dataset's error with the
    worker's traceback in its message: keep the original message, its last line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return re.sub(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Dependency): ", "", lines[-1])


def run(main: Callable, argv=None) -> int:
    """Call main(argv) and turn its outcome into an exit status (the tools' `__main__` entry)."""
    try:
        result = main(argv)
    except USER_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if isinstance(result, dict) and result.get("interrupted") else 0


def resolve_device(name: str | None) -> torch.device:
    """--device: a torch device string; default cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a device ({one_line(err)})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_backends(requested: str, device: torch.device, head_dim: int | None = None) -> dict[str, str]:
    """{op: the backend that will run it} for `requested` ("auto" or a name) on `device`, honouring
    TUBEVIT_FAST_BACKEND; a bad or unavailable choice is a UsageError. The dtype is the tools' own
    (bf16 autocast on CUDA, fp32 on CPU); on a GPU "auto" names the first candidate for it: an input
    the backend cannot take, or the self-check on first use, may still demote it."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    forced = os.environ.get(backends.ENV_BACKEND, "").strip()
    if forced and forced != "auto" and forced not in backends.BACKENDS:
        raise UsageError(f"{backends.ENV_BACKEND}={forced!r} is not a backend; "
                         f"choose one of {', '.join(backends.BACKENDS + ('auto',))} or unset it")
    if requested == "reference":
        return {"tube_embed": "reference", "attention": "reference"}
    chosen = {}
    for op in ("tube_embed", "attention"):
        try:
            dense = (head_dim, "dense") if op == "attention" else (None, None)
            order, _ = backends.candidates(op, requested, backends.auto_order(op, device, dtype, *dense), device)
        except (ValueError, RuntimeError) as err:
            source = f"{backends.ENV_BACKEND}={forced}" if requested == "auto" else f"--backend {requested}"
            raise UsageError(f"{source}: {one_line(err)}") from None
        chosen[op] = order[0] if order else "reference"
    return chosen


def check_positive(**values) -> None:
    """UsageError naming the first option whose value is below 1 (None means unset)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def add_video_reading_args(parser) -> None:
    """--decoder and --clip-index, the same for every tool that reads videos (train, evaluate,
    predict); `parser` may be an argument group."""
    from tubevit_fast.app.decode import DECODERS

    parser.add_argument("--decoder", choices=DECODERS, default="pyav",
                        help="video decoder (torchcodec: pip install torchcodec; the same frames)")
    parser.add_argument("--clip-index", default=None,
                        help="clip index cache file (frame counts and keyframes, probed once per file; default: "
                             "tubevit_fast/clip_index.json in $XDG_CACHE_HOME or ~/.cache)")
