"""The optional compiled CUDA extension (csrc/, module tubevit_fast._C).

Importing tubevit_fast._C registers low-level operators in the namespace ``tubevit_fast_C``
(separate from the package's own ``tubevit_fast`` custom ops, so neither library owns the
other's namespace whatever the import order):

    torch.ops.tubevit_fast_C.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, softmax_scale) -> (out, lse)
    torch.ops.tubevit_fast_C.attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, softmax_scale) -> (dq, dk, dv)
    torch.ops.tubevit_fast_C.compiled_head_dims() -> list[int]
    torch.ops.tubevit_fast_C.kernel_configs() -> str (JSON)

This module registers their fake (meta) kernels, so they trace under torch.compile and pass
torch.library.opcheck on fake/meta tensors, and offers:

    attention_forward / attention_backward   the launchers, same signatures as the Triton ones
    unavailable_reason()                     None, or why the extension cannot be used
    supported_head_dims()                    head dims compiled into this build
    ptxas_log_path(), audit_rows()           the build's ptxas report and a SASS audit of the .so

Layouts (as for the Triton launchers): dense q (B, Nq, H, D), k/v (B, Nk, H, D), lse (B, H, Nq);
packed varlen q (total_q, H, D), k/v (total_k, H, D) with int32 cu_seqlens (batch + 1), lse
(H, total_q). Non-causal, fp16/bf16 only (fp32 is rejected: the kernels are tensor-core
kernels), head dims 64/80/96/128 (whichever were built). Dense inputs take their sequence
lengths from the shapes; for varlen, max_seqlen_q/k must bound every segment (they size the
grid). The backward is deterministic (no atomics): a delta = rowsum(dO * O) pass, a dQ kernel
over key tiles and a dK/dV kernel over query tiles.
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

NAMESPACE = "tubevit_fast_C"
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


# ---- fake kernels ---------------------------------------------------------------------------------

def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


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
    def _attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
        varlen = _fake_checks("attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
        return q.new_empty(q.shape), q.new_empty(_lse_shape(q, varlen), dtype=torch.float32)

    @torch.library.register_fake(f"{NAMESPACE}::attention_bwd")
    def _attention_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale):
        _fake_checks("attention_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---- launchers (the Triton launchers' signatures) -------------------------------------------------

def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    """(out, lse): out like q (contiguous), lse float32 (B, H, Nq) dense or (H, total_q) varlen."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _ops().attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q or 0),
                                    int(max_seqlen_k or 0), float(softmax_scale))
    return out, lse


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       softmax_scale):
    """(dq, dk, dv), contiguous, like q, k, v; lse as returned by attention_forward."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    dq, dk, dv = _ops().attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                      int(max_seqlen_q or 0), int(max_seqlen_k or 0), float(softmax_scale))
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


_KERNEL_RE = re.compile(
    r"tvf(\d+)attention_(fwd|bwd_dq|bwd_dkdv|bwd_preprocess)_kernelI(6__half|13__nv_bfloat16)Li(\d+)E")


def describe_kernel(mangled: str) -> dict | None:
    """{"kernel", "dtype", "head_dim"} for one of this extension's mangled kernel names, else None."""
    m = _KERNEL_RE.search(mangled)
    if m is None:
        return None
    return {"kernel": f"attention_{m.group(2)}_kernel",
            "dtype": "bf16" if "bfloat16" in m.group(3) else "fp16", "head_dim": int(m.group(4))}


def parse_ptxas_log(text: str) -> list[dict]:
    """Rows {kernel, dtype, head_dim, arch, registers, stack, spill_stores, spill_loads} from a
    `ptxas -v` report (arch as ptxas names it: sm_80, sm_90a)."""
    rows = []
    pattern = re.compile(
        r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'.*?"
        r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads.*?"
        r"Used (?P<regs>\d+) registers", re.S)
    for m in pattern.finditer(text):
        info = describe_kernel(m.group("name"))
        if info is None:
            info = {"kernel": m.group("name"), "dtype": None, "head_dim": None}
        rows.append({**info, "arch": m.group("arch"), "registers": int(m.group("regs")),
                     "stack": int(m.group("stack")), "spill_stores": int(m.group("st")),
                     "spill_loads": int(m.group("ld"))})
    return rows


def cuobjdump_path() -> str | None:
    """cuobjdump from Triton's wheel, else from CUDA_HOME or /usr/local/cuda."""
    candidates = []
    try:
        import triton
        wheel_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        candidates.append(os.path.join(wheel_bin, "cuobjdump"))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    return next((c for c in candidates if os.path.exists(c)), None)


def _cuobjdump(*args: str) -> str:
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (looked in Triton's wheel and CUDA_HOME)")
    proc = subprocess.run([tool, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _split_cubins(text: str, function_re: re.Pattern | None = None) -> dict[tuple, str]:
    """cuobjdump output of a fat binary -> {(arch, identifier, function): that function's text}, or
    with function_re=None {(arch, identifier, None): the whole cubin's text}. identifier names the
    source file the cubin came from."""
    out: dict[tuple, list[str]] = {}
    arch = ident = func = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch, ident, func = m.group(1), None, None
            continue
        m = re.match(r"\s*identifier = (.*)$", line)
        if m:
            ident = m.group(1).strip()
            continue
        if function_re is not None:
            m = function_re.match(line)
            if m:
                func = m.group(1)
                continue
            if func is None:
                continue
        out.setdefault((arch, ident, func), []).append(line)
    return {key: "\n".join(lines) for key, lines in out.items()}


_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)")


def _sass_stats(sass: str) -> dict:
    hmma = hgmma = 0
    widths: dict[int, int] = {}
    ldsm = 0
    for line in sass.splitlines():
        m = _OPCODE.match(line)
        if m is None:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base == "HMMA":
            hmma += 1
        elif base == "HGMMA":
            hgmma += 1
        elif base == "LDSM":
            ldsm += 1
        elif base in ("LDG", "LDGSTS"):
            width = 32
            for token in op.split(".")[1:]:
                if token in ("U8", "S8"):
                    width = 8
                elif token in ("U16", "S16"):
                    width = 16
                elif token.isdigit():
                    width = int(token)
            widths[width] = widths.get(width, 0) + 1
    return {"hmma": hmma, "hgmma": hgmma, "ldsm": ldsm, "load_widths": dict(sorted(widths.items()))}


_ARCH_LIMITS = {  # shared memory per SM / opt-in per block (bytes); 1 KB reserved per block
    "sm_80": (164 * 1024, 163 * 1024),
    "sm_90": (228 * 1024, 227 * 1024),
}


def _occupancy(arch: str, registers: int, shared: int, threads: int) -> float:
    """Resident warps / 64 from registers, shared memory and threads (occupancy-calculator model)."""
    warps = threads // 32
    if registers > 255 or shared > _ARCH_LIMITS[arch][1]:
        return 0.0
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = ((65536 // 4) // regs_per_warp) * 4 // warps
    by_smem = _ARCH_LIMITS[arch][0] // (shared + 1024)
    blocks = min(by_regs, by_smem, 64 // warps, 32)
    return blocks * warps / 64


def audit_rows(archs=("sm_80", "sm_90"), dtypes=("fp16", "bf16")) -> list[dict]:
    """One row per kernel x head dim x dtype x arch of the built .so, from cuobjdump
    (--dump-resource-usage and --dump-sass) plus the build's ptxas report, with the keys of
    tubevit_fast.audit.ROW_KEYS: kernel, config, dtype, arch ("sm_80"/"sm_90"), registers,
    spill_bytes (LOCAL bytes per thread), shared_bytes (dynamic + static per block),
    occupancy (0..1), mma_instructions (HMMA + HGMMA), load_widths ({bits: count} over LDG and
    LDGSTS), matmul, ok; plus "details". Raises RuntimeError if the extension is not built."""
    lib = library_path()
    if lib is None or not os.path.exists(lib):
        raise RuntimeError(unavailable_reason() or "tubevit_fast._C is not built")
    configs = {(c["kernel"], c["head_dim"]): c for c in kernel_configs()}
    resources = _split_cubins(_cuobjdump("--dump-resource-usage", lib),
                              re.compile(r"^\s*Function (\S+):\s*$"))
    sass = _split_cubins(_cuobjdump("--dump-sass", lib), re.compile(r"^\s*Function : (\S+)\s*$"))
    # On sm_90 ptxas gives each cubin the driver's 1 KB per-block reservation as a static shared
    # symbol, and cuobjdump counts it in SHARED; it is not the kernel's own.
    reserved = {(a, i) for (a, i, _), body in _split_cubins(_cuobjdump("--dump-elf-symbols", lib)).items()
                if "RESERVED_SHARED" in body}
    log_path = ptxas_log_path()
    ptxas = {}
    if log_path is not None:
        with open(log_path) as f:
            for r in parse_ptxas_log(f.read()):
                ptxas[(r["arch"].rstrip("a"), r["kernel"], r["dtype"], r["head_dim"])] = r
    rows = []
    for (arch_full, ident, func), res_text in sorted(resources.items()):
        arch = arch_full.rstrip("a")
        info = describe_kernel(func)
        if info is None or arch not in archs or info["dtype"] not in dtypes:
            continue
        res = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", res_text)}
        cfg = configs.get((info["kernel"], info["head_dim"]), {})
        threads = cfg.get("threads", 128)
        static_smem = res.get("SHARED", 0)
        if (arch_full, ident) in reserved:
            static_smem = max(static_smem - 1024, 0)
        shared = cfg.get("shared_bytes", 0) + static_smem
        stats = _sass_stats(sass.get((arch_full, ident, func), ""))
        log = ptxas.get((arch, info["kernel"], info["dtype"], info["head_dim"]))
        ptxas_spill = (log["spill_stores"] + log["spill_loads"]) if log else 0
        matmul = info["kernel"] != "attention_bwd_preprocess_kernel"
        mma = stats["hmma"] + stats["hgmma"]
        occupancy = _occupancy(arch, res.get("REG", 0), shared, threads)
        config = f"D{info['head_dim']}"
        if cfg.get("block_n"):
            config += f"-BM{cfg['block_m']}-BN{cfg['block_n']}-s{cfg['stages']}"
        config += f"-w{threads // 32}"
        rows.append({
            "kernel": info["kernel"], "config": config, "dtype": info["dtype"], "arch": arch,
            "registers": res.get("REG", 0), "spill_bytes": res.get("LOCAL", 0), "shared_bytes": shared,
            "occupancy": round(occupancy, 4), "mma_instructions": mma, "load_widths": stats["load_widths"],
            "matmul": matmul,
            "ok": res.get("LOCAL", 0) == 0 and ptxas_spill == 0 and (not matmul or mma > 0) and occupancy > 0,
            "details": {"module": "tubevit_fast._C", "cubin_arch": arch_full, "function": func,
                        "hmma": stats["hmma"], "hgmma": stats["hgmma"], "ldsm": stats["ldsm"],
                        "stack_bytes": res.get("STACK", 0),
                        "dynamic_shared_bytes": cfg.get("shared_bytes", 0),
                        "static_shared_bytes": static_smem, "num_warps": threads // 32,
                        "ptxas": log, "ptxas_log": log_path},
        })
    return rows
