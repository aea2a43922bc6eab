"""Which implementation runs an op: availability, what "auto" picks, the env override and the
once-per-shape self-check (shared/DESIGN.md, verification point 5).

Backends:
  reference  eager PyTorch ground truth (Conv3d per tube, explicit softmax attention)
  torch      plain PyTorch done well: the fast CPU path; on CUDA PyTorch's own fused kernels
  triton     fused Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cuda       the compiled csrc/ extension (attention only)
  auto       the fastest backend measured for the input (MEASURED_ORDER); TUBEVIT_FAST_BACKEND
             overrides it

"auto" never picks a backend measured slower than "torch": on CUDA its order comes from
MEASURED_ORDER, timings taken on real GPUs, and a combination nobody has measured runs "torch"
first. `pytest benchmarks/ --benchmark-only` on a GPU prints the rows for that GPU (see
benchmarks/test_attention.py and benchmarks/test_tube_embed.py).

Each op registers two hooks with `register_op`: what a backend cannot take (a dtype, a head
dim: "auto" skips it, naming it raises ValueError) and a self-check factory. The choice is a
pure function of constants (device, dtype, head dim, layout, op details), computed once per
combination: under torch.compile it runs at trace time and is baked into the graph as a
constant (torch.compiler.assume_constant_result), so neither the choice nor the self-check is
ever traced.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")
ENV_BACKEND = "TUBEVIT_FAST_BACKEND"
ENV_SELFCHECK = "TUBEVIT_FAST_SELFCHECK"

_IMPLEMENTED = {
    "tube_embed": ("reference", "torch", "triton"),
    "attention": ("reference", "torch", "triton", "cuda"),
}

# ---- what "auto" prefers ------------------------------------------------------------------------

# CUDA: fastest first, measured. Key: (op, arch, dtype, head dim, layout); tube_embed has no head
# dim or layout. "torch" is PyTorch's own kernel for the op (for attention the flash kernel that
# F.scaled_dot_product_attention runs). Rows come from `pytest benchmarks/ --benchmark-only` on
# that GPU, which prints them; only measured rows go here.
MEASURED_ORDER: dict[tuple, tuple[str, ...]] = {
    # H100 SXM, torch 2.11 + triton 3.6, 2026-11-25, bf16. Attention B=32 N=539 H=12, fwd and
    # fwd+bwd ms: SDPA 0.116 / 0.499, cuda 0.189 / 0.773, triton 0.259 / 1.276.
    ("attention", "sm_90", "bf16", 64, "dense"): ("torch", "cuda", "triton"),
    # B=8 N=539 H=16, fwd+bwd ms: SDPA 0.377, cuda 0.765, triton 1.254.
    ("attention", "sm_90", "bf16", 80, "dense"): ("torch", "cuda", "triton"),
    # B=8 N=1176 H=16, fwd ms: SDPA 0.193, triton 0.427, cuda 0.445.
    ("attention", "sm_90", "bf16", 128, "dense"): ("torch", "triton", "cuda"),
    # Paper tubes, B=32, 3x32x224x224, dim 768, fwd and fwd+bwd (dW, db) ms: triton 0.841 / 2.79,
    # torch 1.704 / 6.33, reference (Conv3d) 2.445 / 12.56.
    ("tube_embed", "sm_90", "bf16", None, None): ("triton", "torch"),
}
# Unmeasured CUDA combinations, and CPU: PyTorch's kernels first.
_DEFAULT_ORDER = {
    "tube_embed": {"cuda": ("torch", "triton"), "cpu": ("torch",)},
    "attention": {"cuda": ("torch", "cuda", "triton"), "cpu": ("torch",)},
}

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def arch_name(device: torch.device) -> str:
    """"sm_90" for an H100, "sm_80" for an A100: the MEASURED_ORDER key of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def auto_order(op: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
               layout: str | None = None) -> tuple[str, ...]:
    """The backends "auto" tries, in order, before availability and support are checked."""
    if device.type != "cuda":
        return _DEFAULT_ORDER[op]["cpu"]
    key = (op, arch_name(device), DTYPE_NAMES.get(dtype), head_dim, layout)
    return MEASURED_ORDER.get(key, _DEFAULT_ORDER[op]["cuda"])


# ---- availability ---------------------------------------------------------------------------------

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


def check_backend_name(backend: str, op: str | None = None) -> str:
    """`backend` if it names a backend (and, given `op`, one that implements that op), else ValueError."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS + ('auto',)}")
    if op is not None and backend != "auto" and backend not in _IMPLEMENTED[op]:
        raise ValueError(f"backend {backend!r} does not implement {op}; choose one of {_IMPLEMENTED[op] + ('auto',)}")
    return backend


def candidates(op: str, requested: str, order: tuple[str, ...], device: torch.device) -> tuple[list[str], bool]:
    """The backends to try in order, and whether the user named one explicitly."""
    check_backend_name(requested)
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
    return [b for b in order if unavailable_reason(op, b, device) is None], False


# ---- per-op hooks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpHooks:
    """unsupported(backend, dtype, head_dim, layout, details) -> None or what the backend cannot do;
    selfcheck(backend, device, dtype, head_dim, layout, details) -> a check that raises on failure."""
    unsupported: Callable[..., str | None]
    selfcheck: Callable[..., Callable[[], None]]


_OPS: dict[str, OpHooks] = {}


def register_op(op: str, unsupported: Callable[..., str | None],
                selfcheck: Callable[..., Callable[[], None]]) -> None:
    _OPS[op] = OpHooks(unsupported, selfcheck)


# ---- the self-check ---------------------------------------------------------------------------

_verdicts: dict[tuple, bool] = {}


def reset_selfchecks() -> None:
    """Forget every self-check verdict (they are cached for the process)."""
    _verdicts.clear()


def selfcheck_mode() -> str:
    """"cuda" (default: check on CUDA devices), "always" (any device) or "off", from TUBEVIT_FAST_SELFCHECK."""
    value = os.environ.get(ENV_SELFCHECK, "").strip().lower()
    if value in ("", "1", "cuda"):
        return "cuda"
    if value in ("0", "off"):
        return "off"
    if value == "always":
        return "always"
    raise ValueError(f"{ENV_SELFCHECK}={value!r}: use 0 (skip the check), always (check on every device) "
                     f"or leave it unset (check on CUDA devices)")


def selfcheck_enabled(device: torch.device) -> bool:
    mode = selfcheck_mode()
    return mode == "always" or (mode == "cuda" and device.type == "cuda")


@contextlib.contextmanager
def clean_context(device: torch.device):
    """Whatever mode the caller is in: grad on, autocast off, outside inference_mode. (The checks
    draw their inputs from a private generator, so the caller's RNG state is never used.)"""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in {"cpu", device.type}:
            if torch.amp.is_autocast_available(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _run_isolated(check: Callable[[], None], device: torch.device) -> Exception | None:
    """Run `check` in a clean context on a worker thread, whose autograd state starts fresh: the
    caller's saved-tensor hooks (activation checkpointing, offloading) and dispatch modes are
    thread-local and stay out of it. Returns what it raised, or None."""
    failure: list[Exception] = []

    def work():
        try:
            with contextlib.ExitStack() as stack:
                if device.type == "cuda":
                    stack.enter_context(torch.cuda.device(device))  # the thread starts on GPU 0
                stack.enter_context(clean_context(device))
                check()
        except Exception as err:  # noqa: BLE001 - reported by the caller
            failure.append(err)

    thread = threading.Thread(target=work, name="tubevit_fast-selfcheck")
    thread.start()
    thread.join()
    return failure[0] if failure else None


def passes_selfcheck(key: tuple, check: Callable[[], None], device: torch.device) -> bool:
    """Run `check` once per key, isolated from the caller (_run_isolated), and cache the verdict:
    it fails by raising (AssertionError on a wrong answer, anything else if the kernel cannot run
    on this device)."""
    if key not in _verdicts:
        err = _run_isolated(check, device)
        if err is not None:  # any failure demotes the backend
            warnings.warn(f"tubevit_fast self-check failed for {key}: {err}", RuntimeWarning, stacklevel=4)
        _verdicts[key] = err is None
    return _verdicts[key]


# ---- the choice -----------------------------------------------------------------------------------

def pick(op: str, requested: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
         layout: str | None = None, details: tuple = ()) -> str:
    """Resolve `requested` ("auto" or a backend name) to the backend that runs `op` on inputs
    described by constants: device, dtype (the one that computes, autocast applied), head dim and
    layout (attention), `details` (anything else the op's hooks need; ints and strings only).

    A backend that cannot take the inputs is skipped by "auto"; named, it raises ValueError. Where
    the self-check is on (TUBEVIT_FAST_SELFCHECK), a fast backend is checked once per
    combination: "auto" skips one that fails (with a "self-check failed" warning), a named one
    raises RuntimeError. Safe under torch.compile: evaluated once at trace time, never traced.
    """
    return _pick(op, requested, device, dtype, head_dim, layout, details)


@torch.compiler.assume_constant_result
def _pick(op, requested, device, dtype, head_dim, layout, details) -> str:
    hooks = _OPS[op]
    order, explicit = candidates(op, requested, auto_order(op, device, dtype, head_dim, layout), device)
    for backend in order:
        reason = hooks.unsupported(backend, dtype, head_dim, layout, details)
        if reason is not None:
            if explicit:
                raise ValueError(f"{op}: backend {backend!r} {reason}")
            continue
        if backend == "reference" or not selfcheck_enabled(device):
            return backend
        key = (op, backend, device.type, device.index, DTYPE_NAMES.get(dtype, str(dtype)), head_dim, layout, details)
        if passes_selfcheck(key, hooks.selfcheck(backend, device, dtype, head_dim, layout, details), device):
            return backend
        if explicit:
            raise RuntimeError(f"{op}: backend {backend!r} disagrees with the reference on this device "
                               f"(self-check {key}); set {ENV_SELFCHECK}=0 to skip the check")
    return "reference"
