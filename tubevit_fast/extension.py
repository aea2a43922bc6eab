"""The optional compiled CUDA extension (csrc/, module tubevit_fast._C).

Importing tubevit_fast._C registers low-level operators in the namespace ``tubevit_fast_C``
(separate from the package's own ``tubevit_fast`` custom ops, so neither library owns the
other's namespace whatever the import order):

    torch.ops.tubevit_fast_C.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, softmax_scale,
                                           wgmma=False) -> (out, lse)
    torch.ops.tubevit_fast_C.attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, softmax_scale,
                                           deterministic=True) -> (dq, dk, dv)
    torch.ops.tubevit_fast_C.compiled_head_dims() -> list[int]
    torch.ops.tubevit_fast_C.kernel_configs() -> str (JSON)

This module registers their fake (meta) kernels, so they trace under torch.compile and pass
torch.library.opcheck on fake/meta tensors, and offers:

    attention_forward / attention_backward   the launchers, same signatures as the Triton ones
    unavailable_reason()                     None, or why the extension cannot be used
    supported_head_dims()                    head dims compiled into this build
    build_info(), kernel_configs(), library_path()
                                             what the binary was built for, its kernels' tiles, and
                                             where it is (what it holds and what a GPU would run:
                                             tubevit_fast.info; its SASS audit:
                                             tubevit_fast.audit.extension_targets)

The loader imports no op module and nothing of the audit: tubevit_fast.backends and
tubevit_fast.ops.attention import it, and the audit reads the built module through it.

Layouts (as for the Triton launchers): dense q (B, Nq, H, D), k/v (B, Nk, H, D), lse (B, H, Nq);
packed varlen q (total_q, H, D), k/v (total_k, H, D) with int32 cu_seqlens (batch + 1), lse
(H, total_q). Non-causal, fp16/bf16 only (fp32 is rejected: the kernels are tensor-core
kernels), head dims 64/80/96/128 (whichever were built). Dense inputs take their sequence
lengths from the shapes; for varlen, max_seqlen_q/k must bound every segment (they size the
grid).

Backward. The default is deterministic (no atomics, bit-reproducible): a delta = rowsum(dO * O)
pass, a dQ kernel over key tiles and a dK/dV kernel over query tiles (7 tile products). With
TUBEVIT_FAST_CUDA_BACKWARD=atomic it is FlashAttention-2's 5-product backward instead: the dK/dV
kernel also adds each tile's dS K to an fp32 dQ buffer with atomics (the order of those adds, so
the last bits of dq, vary from run to run), then a pass scales and rounds it. Which is faster is
unmeasured (no GPU run yet), so the default stays the deterministic one; the atomic one is never
used while torch.use_deterministic_algorithms(True) is on.

Hopper. TUBEVIT_FAST_CUDA_WGMMA=1 runs the forward on a wgmma kernel (sm_90a machine code;
compute capability 9.0 only, an error elsewhere). It is checked here only by compilation, its SASS
(HGMMA, 0 spills) and the CPU emulator's reading of the PTX ISA's wgmma layouts, not yet on a
GPU, so it is never chosen automatically.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import os

import torch

from tubevit_fast.attention_layout import lse_shape

NAMESPACE = "tubevit_fast_C"
ENV_BACKWARD = "TUBEVIT_FAST_CUDA_BACKWARD"
ENV_WGMMA = "TUBEVIT_FAST_CUDA_WGMMA"
BACKWARDS = ("deterministic", "atomic")
KERNEL_HEAD_DIMS = (64, 80, 96, 128)


@functools.lru_cache(maxsize=1)
def _load():
    try:
        module = importlib.import_module("tubevit_fast._C")
    except ImportError as err:
        return None, (f"the CUDA extension tubevit_fast._C is not available ({err}); build it with "
                      f"`pip install ninja && TUBEVIT_FAST_BUILD_CUDA=1 "
                      f"pip install --no-build-isolation -e .`")
    _register_fakes()
    return module, None


def unavailable_reason() -> str | None:
    """None if the compiled extension is importable, else a sentence saying why not."""
    return _load()[1]


def is_available() -> bool:
    return unavailable_reason() is None


def _ops():
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return getattr(torch.ops, NAMESPACE)


def supported_head_dims() -> tuple[int, ...]:
    """Head dims compiled into this build (empty if the extension is not available)."""
    if not is_available():
        return ()
    return tuple(int(d) for d in _ops().compiled_head_dims())


def kernel_configs() -> list[dict]:
    """Tile configuration of every compiled kernel (threads, block sizes, dynamic shared memory)."""
    return json.loads(_ops().kernel_configs())


def build_info() -> dict:
    """{"arch_list", "head_dims", "cuda_runtime_version"} as compiled into the binary."""
    return json.loads(_ops().build_info())


# ---- fake kernels ---------------------------------------------------------------------------------

def _fake_checks(name: str, q, k, v, cu_q, cu_k) -> bool:
    torch._check(q.dtype in (torch.float16, torch.bfloat16),
                 lambda: f"{name}: {q.dtype} inputs are not supported by the CUDA kernels "
                                 f"(fp16/bf16 tensor-core kernels only)")
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype, lambda: f"{name}: q, k, v must share a dtype")
    torch._check((cu_q is None) == (cu_k is None), lambda: f"{name}: pass both cu_seqlens or neither")
    varlen = cu_q is not None
    torch._check(q.dim() == (3 if varlen else 4), lambda: f"{name}: q has the wrong rank {q.dim()}")
    torch._check(q.shape[-1] in KERNEL_HEAD_DIMS, lambda: f"{name}: unsupported head dim {q.shape[-1]}")
    return varlen


def _register_fakes() -> None:
    @torch.library.register_fake(f"{NAMESPACE}::attention_fwd")
    def _attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                            wgmma=False):
        varlen = _fake_checks("attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
        return q.new_empty(q.shape), q.new_empty(lse_shape(q, varlen), dtype=torch.float32)

    @torch.library.register_fake(f"{NAMESPACE}::attention_bwd")
    def _attention_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, deterministic=True):
        _fake_checks("attention_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---- launchers (the Triton launchers' signatures) -------------------------------------------------

def wgmma_requested() -> bool:
    """Whether TUBEVIT_FAST_CUDA_WGMMA=1 asks for the Hopper forward (see the module docstring)."""
    flag = os.environ.get(ENV_WGMMA, "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"{ENV_WGMMA}={flag!r}: use 1 (the wgmma forward) or 0")
    return flag == "1"


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    """(out, lse): out like q (contiguous), lse float32 (B, H, Nq) dense or (H, total_q) varlen."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _ops().attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q or 0),
                                    int(max_seqlen_k or 0), float(softmax_scale), wgmma_requested())
    return out, lse


def backward_variant() -> str:
    """"deterministic" (default) or "atomic", from TUBEVIT_FAST_CUDA_BACKWARD; "deterministic"
    whenever torch.use_deterministic_algorithms(True) is on."""
    chosen = os.environ.get(ENV_BACKWARD, "").strip().lower() or "deterministic"
    if chosen not in BACKWARDS:
        raise ValueError(f"{ENV_BACKWARD}={chosen!r}: choose one of {BACKWARDS}")
    return "deterministic" if torch.are_deterministic_algorithms_enabled() else chosen


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       softmax_scale):
    """(dq, dk, dv), contiguous, like q, k, v; lse as returned by attention_forward. The
    variant is backward_variant()'s (see the module docstring)."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    dq, dk, dv = _ops().attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                      int(max_seqlen_q or 0), int(max_seqlen_k or 0), float(softmax_scale),
                                      backward_variant() == "deterministic")
    return dq, dk, dv


# ---- where the built module is -------------------------------------------------------------------

def library_path() -> str | None:
    """Path of the built tubevit_fast._C shared object, or None."""
    module, _ = _load()
    if module is not None:
        return module.__file__
    spec = importlib.util.find_spec("tubevit_fast._C")
    return spec.origin if spec is not None else None
