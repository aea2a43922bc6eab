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
    build_info(), binary_targets(), runs_on(capability)
                                             what the binary was built for, which machine code and
                                             PTX it holds, and what a GPU would run (tubevit_fast.info)
    ptxas_log_path(), ptxas_rows(), audit_rows()
                                             the build's ptxas report and its SASS audit (the
                                             parsers and rules of tubevit_fast.audit.cubin/rows)

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
import re
import subprocess

import torch

from tubevit_fast.ops.attention import lse_shape

NAMESPACE = "tubevit_fast_C"
ENV_BACKWARD = "TUBEVIT_FAST_CUDA_BACKWARD"
ENV_WGMMA = "TUBEVIT_FAST_CUDA_WGMMA"
BACKWARDS = ("deterministic", "atomic")
PTXAS_LOG = "_C.ptxas.log"
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


def binary_targets(lib: str | None = None) -> dict[str, list[str]]:
    """{"sass": ["sm_80", "sm_90a"], "ptx": ["compute_80"]}: the machine code and PTX embedded in
    the built module (cuobjdump --list-elf / --list-ptx). Raises RuntimeError without cuobjdump."""
    from tubevit_fast import audit as A
    lib = lib or library_path()
    if lib is None or A.cuobjdump_path() is None:
        raise RuntimeError("needs the built tubevit_fast._C and cuobjdump (Triton's wheel or CUDA_HOME)")
    found = {"sass": set(), "ptx": set()}
    for kind, flag in (("sass", "--list-elf"), ("ptx", "--list-ptx")):
        proc = subprocess.run([A.cuobjdump_path(), flag, lib], capture_output=True, text=True)
        # "ELF file    1: attention_fwd_hdim64.sm_80.cubin", "PTX file    1: attention_fwd_hdim64.sm_80.ptx"
        for m in re.finditer(r"\.(sm_\d+[a-z]?)\.(?:cubin|ptx)\s*$", proc.stdout, flags=re.M):
            found[kind].add(m.group(1) if kind == "sass" else m.group(1).replace("sm_", "compute_"))
    return {kind: sorted(v, key=lambda a: (_version(a), a)) for kind, v in found.items()}


def runs_on(capability: tuple[int, int], targets: dict[str, list[str]]) -> str | None:
    """What a GPU of compute `capability` executes from `targets` (binary_targets()): "sm_XY machine
    code", "compute_XY PTX, compiled by the driver", or None if nothing in the binary can run there.
    Machine code runs on its own major version at the same or a higher minor one; the
    arch-specific sm_90a only on 9.0. PTX runs on its own version and everything newer, except the
    arch-specific compute_90a."""
    major, minor = capability
    sass = [a for a in targets.get("sass", ()) if _runs_sass(a, major, minor)]
    if sass:
        return f"{max(sass, key=lambda a: (_version(a), a.endswith('a')))} machine code"
    ptx = [a for a in targets.get("ptx", ()) if not a.endswith("a") and _version(a) <= (major, minor)]
    if ptx:
        return f"{max(ptx, key=_version)} PTX, compiled by the driver at first use"
    return None


def _version(arch: str) -> tuple[int, int]:
    digits = re.sub(r"\D", "", arch)
    return int(digits[:-1]), int(digits[-1])


def _runs_sass(arch: str, major: int, minor: int) -> bool:
    a_major, a_minor = _version(arch)
    if arch.endswith("a"):
        return (a_major, a_minor) == (major, minor)
    return a_major == major and a_minor <= minor


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


# ---- build artefacts: ptxas report and SASS audit -------------------------------------------------

def library_path() -> str | None:
    """Path of the built tubevit_fast._C shared object, or None."""
    module, _ = _load()
    if module is not None:
        return module.__file__
    spec = importlib.util.find_spec("tubevit_fast._C")
    return spec.origin if spec is not None else None


def ptxas_log_path() -> str | None:
    """The `nvcc -Xptxas -v` report setup.py kept beside the built module, or None."""
    lib = library_path()
    if lib is None:
        return None
    path = os.path.join(os.path.dirname(lib), PTXAS_LOG)
    return path if os.path.exists(path) else None


# The Hopper kernel is machine code for sm_90a only; other cubins hold a trap in its place.
SM90_KERNELS = ("attention_fwd_sm90_kernel",)
# Kernels with no matrix product (no MMA expected in their SASS).
ELEMENTWISE_KERNELS = ("attention_bwd_preprocess_kernel", "attention_bwd_dq_convert_kernel")
_KERNEL_RE = re.compile(
    r"tvf(\d+)attention_(fwd|fwd_sm90|bwd_dq|bwd_dkdv|bwd_preprocess|bwd_dkdv_dqatomic|bwd_dq_convert)_kernel"
    r"I(6__half|13__nv_bfloat16)Li(\d+)E")


def describe_kernel(mangled: str) -> dict | None:
    """{"kernel", "dtype", "head_dim"} for one of this extension's mangled kernel names, else None."""
    m = _KERNEL_RE.search(mangled)
    if m is None:
        return None
    return {"kernel": f"attention_{m.group(2)}_kernel",
            "dtype": "bf16" if "bfloat16" in m.group(3) else "fp16", "head_dim": int(m.group(4))}


def ptxas_rows(text: str) -> list[dict]:
    """Rows {kernel, dtype, head_dim, arch, registers, stack, spill_stores, spill_loads} of a
    `ptxas -v` report of this build (arch as ptxas names it: sm_80, sm_90a), one per entry
    function; parsed by tubevit_fast.audit.cubin.parse_ptxas_entries, named by describe_kernel."""
    from tubevit_fast.audit.cubin import parse_ptxas_entries
    rows = []
    for entry in parse_ptxas_entries(text):
        info = describe_kernel(entry["function"]) or {"kernel": entry["function"], "dtype": None, "head_dim": None}
        rows.append({**info, "arch": entry["arch"], "registers": entry.get("registers"),
                     "stack": entry.get("stack", 0), "spill_stores": entry.get("spill_stores", 0),
                     "spill_loads": entry.get("spill_loads", 0)})
    return rows


def _split_cubins(text: str) -> dict[tuple[str, str | None], str]:
    """cuobjdump output of a fat binary -> {(arch, identifier): that cubin's part of the output}.
    identifier names the source file the cubin came from; arch is cuobjdump's (sm_80, sm_90a)."""
    cubins: list[list] = []    # [arch, identifier, lines]
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            cubins.append([m.group(1), None, []])
            continue
        m = re.match(r"\s*identifier = (.*)$", line)
        if m and cubins:
            cubins[-1][1] = m.group(1).strip()
            continue
        if cubins:
            cubins[-1][2].append(line)
    out: dict[tuple[str, str | None], str] = {}
    for arch, ident, lines in cubins:
        key = (arch, ident)
        out[key] = out[key] + "\n" + "\n".join(lines) if key in out else "\n".join(lines)
    return out


def audit_rows(archs=("sm_80", "sm_90"), dtypes=("fp16", "bf16")) -> list[dict]:
    """One row per kernel x head dim x dtype x arch of the built .so, with the keys and meaning of
    tubevit_fast.audit.ROW_KEYS (arch "sm_80"/"sm_90"; sm_90a cubins count as sm_90; the main-loop
    keys included) plus "details". One `cuobjdump --dump-resource-usage --dump-sass
    --dump-elf-symbols` of the .so, split per cubin, parsed and judged by tubevit_fast.audit's
    cubin and rows modules (the audit reaches this function by name and never imports this module
    itself), plus the build's ptxas report. python -m tubevit_fast.audit lists these rows beside the
    Triton kernels'. Raises ExternalUnavailable (a RuntimeError) if the extension is not built."""
    from tubevit_fast.audit import cubin, rows as audit_rows_
    lib = library_path()
    if lib is None or not os.path.exists(lib):
        raise audit_rows_.ExternalUnavailable(unavailable_reason() or "tubevit_fast._C is not built")
    configs = {(c["kernel"], c["head_dim"]): c for c in kernel_configs()}
    dump = cubin.cuobjdump(lib, "--dump-resource-usage", "--dump-sass", "--dump-elf-symbols")
    log_path = ptxas_log_path()
    ptxas = {}
    if log_path is not None:
        with open(log_path) as f:
            for r in ptxas_rows(f.read()):
                ptxas[(r["arch"].rstrip("a"), r["kernel"], r["dtype"], r["head_dim"])] = r
    rows = []
    for (arch_full, ident), cubin_text in sorted(_split_cubins(dump).items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        arch = arch_full.rstrip("a")
        if arch not in archs:
            continue
        sass = cubin.sass_by_function(cubin_text)
        instructions = cubin.instructions_by_function(cubin_text)
        # On sm_90 ptxas gives each cubin the driver's 1 KB per-block reservation as a static
        # shared symbol, and cuobjdump counts it in SHARED; it is not the kernel's own.
        reserved = "RESERVED_SHARED" in cubin_text
        for func, res in sorted(cubin.resource_usage_by_function(cubin_text).items()):
            info = describe_kernel(func)
            if info is None or info["dtype"] not in dtypes:
                continue
            if info["kernel"] in SM90_KERNELS and arch != "sm_90":
                continue
            cfg = configs.get((info["kernel"], info["head_dim"]), {})
            num_warps = cfg.get("threads", 128) // 32
            config = f"D{info['head_dim']}"
            if cfg.get("block_n"):
                config += f"-BM{cfg['block_m']}-BN{cfg['block_n']}-s{cfg['stages']}"
            config += f"-w{num_warps}"
            stats = sass.get(func, cubin.SassStats())
            # The S / dP products loop over the head dim in steps of 16 inside the loop over key
            # (or query) tiles: the metric describes one pass of that outer loop.
            stats.loop = cubin.main_loop(instructions.get(func, []), inner_trips=info["head_dim"] // 16)
            rows.append(audit_rows_.make_row(
                kernel=info["kernel"], config=config, dtype=info["dtype"], arch=arch, resources=res,
                sass=stats, dynamic_shared=cfg.get("shared_bytes", 0),
                reserved_in_static=reserved, num_warps=num_warps,
                matmul=info["kernel"] not in ELEMENTWISE_KERNELS,
                ptxas=ptxas.get((arch, info["kernel"], info["dtype"], info["head_dim"])),
                details={"module": "tubevit_fast._C", "cubin_arch": arch_full, "source": ident, "function": func,
                         "head_dim": info["head_dim"], "ptxas_log": log_path}))
    rows.sort(key=lambda r: (r["kernel"], r["details"]["head_dim"], r["dtype"], r["arch"]))
    return rows
