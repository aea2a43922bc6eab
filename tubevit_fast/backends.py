"""Which implementation runs an op: availability, what "auto" picks, the env override and
the once-per-shape self-check on real GPUs (shared/DESIGN.md, verification point 5).

Backends:
  reference  eager PyTorch ground truth (Conv3d per tube, explicit softmax attention)
  torch      the fast pure-PyTorch path (CPU; also runs on CUDA tensors)
  triton     fused Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cuda       the compiled csrc/ extension (attention only)
  auto       the best available for the tensor's device; TUBEVIT_FAST_BACKEND overrides it
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")
ENV_BACKEND = "TUBEVIT_FAST_BACKEND"
ENV_SELFCHECK = "TUBEVIT_FAST_SELFCHECK"

# Which backends implement which op, in the order "auto" prefers them per device type.
_PREFERENCE = {
    "tube_embed": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
    "attention": {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)},
}
_IMPLEMENTED = {
    "tube_embed": ("reference", "torch", "triton"),
    "attention": ("reference", "torch", "triton", "cuda"),
}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """None if `backend` can run `op` on `device`, else a sentence saying why not."""
    if backend not in _IMPLEMENTED[op]:
        return f"backend {backend!r} does not implement {op} (it has: {', '.join(_IMPLEMENTED[op])})"
    if backend in ("reference", "torch"):
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "backend 'triton' needs the triton package, which is not installed"
        if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
            return None
        return (f"backend 'triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; "
                f"got a {device.type} tensor")
    if backend == "cuda":
        from tubevit_fast import extension

        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got a {device.type} tensor"
        return extension.unavailable_reason()
    raise AssertionError(backend)


def candidates(op: str, requested: str, device: torch.device) -> tuple[list[str], bool]:
    """The backends to try in order, and whether the user named one explicitly."""
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS + ('auto',)}")
    if requested == "auto":
        forced = os.environ.get(ENV_BACKEND, "").strip()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"{ENV_BACKEND}={forced!r} is not a backend; choose one of {BACKENDS}")
            if forced in _IMPLEMENTED[op]:
                requested = forced
    if requested != "auto":
        reason = unavailable_reason(op, requested, device)
        if reason is not None:
            raise RuntimeError(f"{op}: {reason}")
        return [requested], True
    kind = "cuda" if device.type == "cuda" else "cpu"
    return [b for b in _PREFERENCE[op][kind] if unavailable_reason(op, b, device) is None], False


# ---- self-check on first real-GPU use ---------------------------------------------------

_checked: dict[tuple, bool] = {}


def selfcheck_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(ENV_SELFCHECK, "1") != "0"


def passes_selfcheck(key: tuple, check: Callable[[], None]) -> bool:
    """Run `check` once per key and cache the verdict: it fails by raising (AssertionError on a
    wrong answer, anything else if the kernel cannot run on this device)."""
    if key not in _checked:
        try:
            check()
            _checked[key] = True
        except Exception as err:  # noqa: BLE001 - any failure demotes the backend
            warnings.warn(f"tubevit_fast self-check failed for {key}: {err}", RuntimeWarning, stacklevel=3)
            _checked[key] = False
    return _checked[key]


def pick(op: str, requested: str, device: torch.device, key: tuple,
         make_check: Callable[[str], Callable[[], None]],
         unsupported: Callable[[str], str | None] = lambda backend: None) -> str:
    """Resolve `requested` to one backend, self-checking fast backends on real GPUs.

    `unsupported(backend)` names what a backend cannot do with these particular inputs (a
    dtype, a head dim): "auto" skips it, naming it explicitly raises ValueError. With "auto"
    a backend that fails its self-check is skipped with a warning; a named one raises.
    """
    order, explicit = candidates(op, requested, device)
    for backend in order:
        reason = unsupported(backend)
        if reason is not None:
            if explicit:
                raise ValueError(f"{op}: backend {backend!r} {reason}")
            continue
        if backend == "reference" or not selfcheck_enabled(device):
            return backend
        if passes_selfcheck((op, backend, device.type, device.index) + key, make_check(backend)):
            return backend
        if explicit:
            raise RuntimeError(f"{op}: backend {backend!r} disagrees with the reference on this device "
                               f"(self-check {key}); set {ENV_SELFCHECK}=0 to skip the check")
    return "reference"
