"""The compiled CUDA extension (csrc/, tubevit_fast._C) as the audit sees it: its build's ptxas
report and the SASS of every kernel, as audit rows (python -m tubevit_fast.audit lists them beside
the Triton kernels'; report.py imports this module by name, EXTENSION_PROVIDER, when it runs).

The runtime loader, tubevit_fast.extension, knows nothing of this: it is imported here for where
the built module is and what it was built with.
"""
from __future__ import annotations

import os
import re

from tubevit_fast import extension
from tubevit_fast.audit import cubin
from tubevit_fast.audit.rows import ExternalUnavailable, make_row

PTXAS_LOG = "_C.ptxas.log"   # setup.py writes it beside the built module


def ptxas_log_path() -> str | None:
    """The `nvcc -Xptxas -v` report setup.py kept beside the built module, or None."""
    lib = extension.library_path()
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
    function; parsed by cubin.parse_ptxas_entries, named by describe_kernel."""
    rows = []
    for entry in cubin.parse_ptxas_entries(text):
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
    rows.ROW_KEYS (arch "sm_80"/"sm_90"; sm_90a cubins count as sm_90; the main-loop keys
    included) plus "details". One `cuobjdump --dump-resource-usage --dump-sass
    --dump-elf-symbols` of the .so, split per cubin, parsed and judged by cubin.py and rows.py,
    plus the build's ptxas report. Raises ExternalUnavailable if the extension is not built."""
    reason = extension.unavailable_reason()
    if reason is not None:
        raise ExternalUnavailable(reason)
    lib = extension.library_path()
    if lib is None or not os.path.exists(lib):
        raise ExternalUnavailable("tubevit_fast._C is not built")
    configs = {(c["kernel"], c["head_dim"]): c for c in extension.kernel_configs()}
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
            rows.append(make_row(
                kernel=info["kernel"], config=config, dtype=info["dtype"], arch=arch, resources=res,
                sass=stats, dynamic_shared=cfg.get("shared_bytes", 0),
                reserved_in_static=reserved, num_warps=num_warps,
                matmul=info["kernel"] not in ELEMENTWISE_KERNELS,
                ptxas=ptxas.get((arch, info["kernel"], info["dtype"], info["head_dim"])),
                details={"module": "tubevit_fast._C", "cubin_arch": arch_full, "source": ident, "function": func,
                         "head_dim": info["head_dim"], "ptxas_log": log_path}))
    rows.sort(key=lambda r: (r["kernel"], r["details"]["head_dim"], r["dtype"], r["arch"]))
    return rows
