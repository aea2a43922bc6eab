"""Ahead-of-time compile + SASS audit of the Triton kernels; no GPU needed.

    python -m tubevit_fast.audit [--json [--details]] [--strict] [--arch sm_80] [--arch sm_90]
                                 [--dtype fp16] [--kernel NAME] [--module MOD]

Every module in AUDITED_MODULES exposes `audit_targets(dtype) -> list[AuditTarget]`
(tubevit_fast.kernels.audit_spec), one entry per kernel x kept autotune config. Each target is
compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` for sm_80
and sm_90, and its cubin is inspected with the cuobjdump shipped in Triton's wheel:

- `--dump-resource-usage`: registers per thread (REG), local memory per thread (LOCAL plus
  the STACK frame, where ptxas puts register spills; must be 0), static shared memory;
- `--dump-sass`: HMMA (sm_80/sm_90) and HGMMA (sm_90 wgmma) instruction counts, widths of the
  global loads (LDG and cp.async LDGSTS), TMA loads (UTMALDG/UBLKCP).

ptxas' own `-v` report (spill stores/loads) is captured from the compile when it runs; when
the cubin comes from Triton's cache it is read from the audit's own small cache (keyed by the
cubin's sha256, next to Triton's cache), or else reproduced by rerunning ptxas on the
kernel's PTX with Triton's flags. A ptxas-reported spill also makes a row not ok.

Rows (one per kernel x config x dtype x arch) are dicts with exactly the keys in ROW_KEYS:
    kernel, config, dtype, arch ("sm_80"/"sm_90"), registers (per thread), spill_bytes
    (local memory per thread: cuobjdump's LOCAL + STACK; register spills land in the stack
    frame, e.g. "REG:255 STACK:376 LOCAL:0" for 376 bytes of spill stores), shared_bytes
    (per block: Triton's dynamic shared memory plus any static shared memory of the kernel
    itself, not counting the 1 KB the driver reserves per block), occupancy (0..1, see
    estimate_occupancy), mma_instructions (HMMA + HGMMA),
    load_widths ({width in bits: count} over LDG and LDGSTS instructions, ascending width;
    JSON turns the keys into strings such as "128"), matmul (bool), ok (bool).
    ok = spill_bytes == 0 and no ptxas-reported spill and (not matmul or mma_instructions > 0)
         and occupancy > 0 (i.e. the kernel can be launched at all).
Python rows from `audit()` additionally carry "details" (per-instruction counts, stack,
static/dynamic shared memory, ptxas report, compile time, module, error); `--json` prints
the ROW_KEYS only unless `--details` is given.

A module of AUDITED_MODULES that does not exist yet (ModuleNotFoundError for that very
module) gives one row with config "missing" and ok False; a module without audit_targets, or
whose audit_targets returns nothing for a dtype, gives config "no-targets". A target that
fails to compile gives a row with ok False, null numbers and details["error"]. `--strict`
exits 1 if any row is not ok; otherwise the exit code is 0.

Triton's @triton.jit returns an interpreter object instead of a compilable JITFunction when
TRITON_INTERPRET=1 is set at decoration time, so the CLI removes TRITON_INTERPRET from the
environment before any kernel module is imported (re-executing itself if a kernel module
was already imported under the interpreter), and the audit refuses interpreted functions.

Kernels that are not Triton add rows with `register_external(fn, module=None)`:
`fn(archs=..., dtypes=...)` returns a list of row dicts with (at least) the ROW_KEYS, or
raises ExternalUnavailable when its kernels are not built. The compiled CUDA extension
(tubevit_fast._C, rows from tubevit_fast.extension.audit_rows, which uses this module's
cuobjdump runner, parsers, occupancy estimate and row_ok) is registered here under the module
name EXTENSION_MODULE: its rows are listed beside the Triton ones by default and with
`--module tubevit_fast._C`, and judged by --strict like them. When it is not built the audit
prints one line saying so and goes on (not a failure), unless `--module tubevit_fast._C` asked
for it by name, which gives a "missing" row.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

AUDITED_MODULES: tuple[str, ...] = (
    "tubevit_fast.kernels.tube_embed",
    "tubevit_fast.kernels.attention",
)

ARCHS: dict[str, int] = {"sm_80": 80, "sm_90": 90}
DTYPES: tuple[str, ...] = ("fp16", "bf16")

ROW_KEYS: tuple[str, ...] = (
    "kernel", "config", "dtype", "arch", "registers", "spill_bytes", "shared_bytes",
    "occupancy", "mma_instructions", "load_widths", "matmul", "ok",
)

# Module status labels used in the "config" column of rows that stand for a whole module.
MISSING = "missing"
NO_TARGETS = "no-targets"


class AuditError(RuntimeError):
    """The audit cannot run as asked (interpreted kernel, missing tool, bad target)."""


# --------------------------------------------------------------------------------------
# Hardware limits and the occupancy estimate
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchLimits:
    smem_per_sm: int                    # bytes of shared memory per SM (max carveout)
    smem_per_block_max: int             # opt-in maximum per block
    reserved_smem_per_block: int = 1024  # the driver's per-block reservation (sm_80+)
    regs_per_sm: int = 65536
    reg_sub_partitions: int = 4         # warps get registers from one of 4 quarter files
    reg_alloc_unit: int = 256           # registers per warp are allocated in this granularity
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    max_threads_per_block: int = 1024


ARCH_LIMITS: dict[str, ArchLimits] = {
    "sm_80": ArchLimits(smem_per_sm=164 * 1024, smem_per_block_max=163 * 1024),
    "sm_90": ArchLimits(smem_per_sm=228 * 1024, smem_per_block_max=227 * 1024),
}


def occupancy_limits(arch: str, registers: int, shared_bytes: int, num_warps: int) -> dict[str, int]:
    """Resident blocks per SM allowed by each resource (CUDA occupancy calculator's model)."""
    lim = ARCH_LIMITS[arch]
    if num_warps < 1 or num_warps * 32 > lim.max_threads_per_block:
        return {"regs": 0, "smem": 0, "warps": 0, "blocks": 0}
    # Registers: per warp, regs/thread x 32 rounded up to 256; each warp lives in one of the
    # four register-file quarters, so whole warps are counted per quarter.
    if registers > lim.max_regs_per_thread:
        by_regs = 0
    else:
        unit = lim.reg_alloc_unit
        regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
        warps_per_quarter = (lim.regs_per_sm // lim.reg_sub_partitions) // regs_per_warp
        by_regs = warps_per_quarter * lim.reg_sub_partitions // num_warps
    # Shared memory: the block's own plus the driver's 1 KB reservation.
    if shared_bytes > lim.smem_per_block_max:
        by_smem = 0
    else:
        by_smem = lim.smem_per_sm // (shared_bytes + lim.reserved_smem_per_block)
    return {"regs": by_regs, "smem": by_smem, "warps": lim.max_warps_per_sm // num_warps,
            "blocks": lim.max_blocks_per_sm}


def row_ok(spill_bytes: int, ptxas: dict | None, matmul: bool, mma_instructions: int, occupancy: float) -> bool:
    """The audit's verdict for one kernel: no local memory, no ptxas-reported spill, tensor-core
    MMA in a matmul kernel, and the block can be launched at all."""
    ptxas_spill = (ptxas or {}).get("spill_stores", 0) + (ptxas or {}).get("spill_loads", 0)
    return bool(spill_bytes == 0 and ptxas_spill == 0 and (not matmul or mma_instructions > 0) and occupancy > 0)


def estimate_occupancy(arch: str, registers: int, shared_bytes: int, num_warps: int) -> float:
    """Resident warps per SM / maximum warps per SM (0..1); 0 if the block cannot launch."""
    blocks = min(occupancy_limits(arch, registers, shared_bytes, num_warps).values())
    return blocks * num_warps / ARCH_LIMITS[arch].max_warps_per_sm


# --------------------------------------------------------------------------------------
# Parsers for cuobjdump and ptxas output
# --------------------------------------------------------------------------------------

_RES_FUNC = re.compile(r"^\s*Function\s+([^\s:]+)\s*:\s*$")
_RES_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str, function: str | None = None) -> dict[str, int]:
    """Parse `cuobjdump --dump-resource-usage` output for one function.

    Returns e.g. {"REG": 168, "STACK": 0, "SHARED": 0, "LOCAL": 0, "CONSTANT[0]": 416, ...}.
    With function=None the cubin must hold exactly one function.
    """
    return _pick_function(resource_usage_by_function(text), function, "resource usage")


def resource_usage_by_function(text: str) -> dict[str, dict[str, int]]:
    """{function: its resource usage} for every function of one cubin's
    `cuobjdump --dump-resource-usage` output (see parse_resource_usage)."""
    found: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _RES_FUNC.match(line)
        if m:
            current = m.group(1)
            found[current] = {}
            continue
        if current is not None and "REG:" in line:
            found[current].update({k: int(v) for k, v in _RES_FIELD.findall(line)})
            current = None
    return found


_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
# "/*0a80*/   @!P6 LDG.E.U16 R75, desc[UR10][R98.64] ;" -> opcode "LDG.E.U16"
_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P(?:[0-9]+|T)\s+)?([A-Z][A-Za-z0-9_.]*)")
_WIDTH_TOKENS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "8": 8, "16": 16, "32": 32, "64": 64,
                 "128": 128, "256": 256}


def load_width(opcode: str) -> int:
    """Bits moved per thread by an LDG/LDGSTS opcode: LDG.E.128 -> 128, LDG.E -> 32, .U16 -> 16."""
    for token in opcode.split(".")[1:]:
        if token in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[token]
    return 32


@dataclass
class SassStats:
    hmma: int = 0
    hgmma: int = 0
    tma: int = 0                        # UTMALDG / UBLKCP (bulk async copies into shared memory)
    ldsm: int = 0                       # LDSM (ldmatrix: shared memory -> MMA fragments)
    ldg: dict = None                    # width -> count, plain global loads
    ldgsts: dict = None                 # width -> count, cp.async global -> shared
    instructions: int = 0

    def __post_init__(self):
        self.ldg = {} if self.ldg is None else self.ldg
        self.ldgsts = {} if self.ldgsts is None else self.ldgsts

    @property
    def mma(self) -> int:
        return self.hmma + self.hgmma

    @property
    def load_widths(self) -> dict[int, int]:
        merged: dict[int, int] = {}
        for table in (self.ldg, self.ldgsts):
            for width, count in table.items():
                merged[width] = merged.get(width, 0) + count
        return dict(sorted(merged.items()))


def parse_sass(text: str, function: str | None = None) -> SassStats:
    """Count MMA instructions and global-load widths in `cuobjdump --dump-sass` output.
    With function=None the cubin must hold exactly one function."""
    return _pick_function(sass_by_function(text), function, "SASS")


def sass_by_function(text: str) -> dict[str, SassStats]:
    """{function: its SassStats} for every function of one cubin's `cuobjdump --dump-sass` output."""
    per_fn: dict[str, SassStats] = {}
    current = None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            current = per_fn.setdefault(m.group(1), SassStats())
            continue
        m = _SASS_INSTR.match(line)
        if m is None or current is None:
            continue
        op = m.group(1)
        base = op.split(".", 1)[0]
        current.instructions += 1
        if base == "HMMA":
            current.hmma += 1
        elif base == "HGMMA":
            current.hgmma += 1
        elif base in ("UTMALDG", "UBLKCP"):
            current.tma += 1
        elif base == "LDSM":
            current.ldsm += 1
        elif base == "LDG":
            w = load_width(op)
            current.ldg[w] = current.ldg.get(w, 0) + 1
        elif base == "LDGSTS":
            w = load_width(op)
            current.ldgsts[w] = current.ldgsts.get(w, 0) + 1
    return per_fn


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_PROPS = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_entries(text: str) -> list[dict]:
    """Every entry function of a `ptxas -v` log (one kernel or a whole nvcc build, several archs),
    in log order: {"function", "arch" (as ptxas names it: sm_80, sm_90a), "stack", "spill_stores",
    "spill_loads", "registers"}, the last four where the log reports them."""
    starts = list(_PTXAS_ENTRY.finditer(text))
    entries = []
    for i, m in enumerate(starts):
        chunk = text[m.end():starts[i + 1].start() if i + 1 < len(starts) else len(text)]
        entry = {"function": m.group(1), "arch": m.group(2)}
        for name, stack, stores, loads in _PTXAS_PROPS.findall(chunk):
            if name == m.group(1):
                entry.update(stack=int(stack), spill_stores=int(stores), spill_loads=int(loads))
        regs = _PTXAS_REGS.search(chunk)
        if regs:
            entry["registers"] = int(regs.group(1))
        entries.append(entry)
    return entries


def parse_ptxas_log(text: str, function: str | None = None, arch: str | None = None) -> dict[str, int] | None:
    """Parse a `ptxas -v` log: {"stack": ..., "spill_stores": ..., "spill_loads": ...,
    "registers": ...} for the function (compiled for arch, if given), or None if the log says
    nothing about it. With function=None the log must hold exactly one entry function."""
    found: dict[str, dict[str, int]] = {}
    for entry in parse_ptxas_entries(text):
        if arch is None or entry["arch"] == arch:
            found[entry["function"]] = {k: v for k, v in entry.items() if k not in ("function", "arch")}
    if not found or (function is not None and function not in found):
        return None
    return _pick_function(found, function, "ptxas log")


def spill_bytes(resource_usage: dict[str, int]) -> int:
    """Local memory per thread from cuobjdump's resource usage: LOCAL + STACK (cuobjdump books
    ptxas' spill slots in the STACK frame; LOCAL stays 0 for them)."""
    return resource_usage.get("LOCAL", 0) + resource_usage.get("STACK", 0)


def _pick_function(found: dict, function: str | None, what: str):
    if function is not None:
        if function not in found:
            raise AuditError(f"{what}: no function {function!r} (found {sorted(found)})")
        return found[function]
    if len(found) != 1:
        raise AuditError(f"{what}: expected exactly one function, found {sorted(found)}")
    return next(iter(found.values()))


# --------------------------------------------------------------------------------------
# Tools from Triton's wheel
# --------------------------------------------------------------------------------------

def _nvidia_bin(tool: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise AuditError(f"{tool} not found at {path}: this Triton wheel does not ship the NVIDIA tools")
    return path


def cuobjdump_path() -> str | None:
    """cuobjdump from Triton's wheel, else from $CUDA_HOME/bin or /usr/local/cuda/bin; None if none."""
    candidates = []
    try:
        candidates.append(_nvidia_bin("cuobjdump"))
    except (ImportError, AuditError):
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    return next((c for c in candidates if os.path.exists(c)), None)


def cuobjdump(binary_path: str, *flags: str) -> str:
    """stdout of `cuobjdump FLAGS binary_path` (a cubin, or a fat binary such as a .so)."""
    tool = cuobjdump_path()
    if tool is None:
        raise AuditError("cuobjdump not found (looked in Triton's wheel, $CUDA_HOME/bin and /usr/local/cuda/bin)")
    proc = subprocess.run([tool, *flags, binary_path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AuditError(f"cuobjdump {' '.join(flags)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _rerun_ptxas(ptx: str, capability: int, metadata, workdir: str) -> str:
    """Reproduce Triton's ptxas invocation (make_cubin's flags) to get its -v report."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    ptxas = get_ptxas(capability).path
    src = os.path.join(workdir, "rerun.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
    if not getattr(metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    extra = getattr(metadata, "ptx_options", None)
    flags += extra.split(" ") if extra else []
    proc = subprocess.run([ptxas, *flags, f"--gpu-name={sm_arch_from_capability(capability)}", src,
                           "-o", os.path.join(workdir, "rerun.cubin")], capture_output=True, text=True)
    return proc.stdout + proc.stderr


def _report_cache_dir() -> str | None:
    try:
        from triton import knobs
        return os.path.join(knobs.cache.dir, "tubevit_fast_audit")
    except Exception:
        return None


def _load_ptxas_report(cubin_hash: str) -> dict | None:
    """ptxas' -v report saved by an earlier audit of the identical cubin (Triton's cache hands
    back the cubin without running ptxas; rerunning it costs up to seconds per kernel)."""
    d = _report_cache_dir()
    try:
        with open(os.path.join(d, cubin_hash + ".json")) as f:
            report = json.load(f)
        return report if isinstance(report, dict) and "spill_stores" in report else None
    except (OSError, TypeError, ValueError):
        return None


def _store_ptxas_report(cubin_hash: str, report: dict) -> None:
    d = _report_cache_dir()
    if d is None:
        return
    try:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{cubin_hash}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.replace(tmp, os.path.join(d, cubin_hash + ".json"))
    except OSError:
        pass   # a read-only cache only costs a ptxas rerun next time


# --------------------------------------------------------------------------------------
# Compiling one target
# --------------------------------------------------------------------------------------

def _jit_function(fn, kernel: str):
    """The JITFunction behind fn (unwrapping Autotuner/Heuristics); refuse the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    seen = 0
    while True:
        if isinstance(fn, InterpretedFunction):
            raise AuditError(
                f"kernel {kernel!r} was decorated under TRITON_INTERPRET=1 (it is an InterpretedFunction), "
                "so it cannot be compiled ahead of time. Import the kernel modules with TRITON_INTERPRET "
                "unset, e.g. run `python -m tubevit_fast.audit`, which removes it before importing them.")
        if isinstance(fn, JITFunction):
            return fn
        inner = getattr(fn, "fn", None)
        if inner is None or seen > 8:
            raise AuditError(f"kernel {kernel!r}: {type(fn).__name__} is not a @triton.jit function")
        fn, seen = inner, seen + 1


def _normalise_attrs(fn, attrs: dict | None) -> dict:
    """ASTSource attrs: keys may be argument names or indices (-> (index,) tuples), values may be
    a plain int (-> divisibility hint) or Triton's own [[attr, value], ...] list."""
    out: dict = {}
    for key, value in (attrs or {}).items():
        if isinstance(key, str):
            key = (fn.arg_names.index(key),)
        elif isinstance(key, int):
            key = (key,)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [["tt.divisibility", value]]
        out[key] = value
    return out


def _make_source(target, fn):
    from triton.compiler import ASTSource
    kwargs = dict(fn=fn, signature=dict(target.signature), constexprs=dict(target.constexprs))
    if "attrs" in inspect.signature(ASTSource.__init__).parameters:
        kwargs["attrs"] = _normalise_attrs(fn, target.attrs) or None
    elif target.attrs:
        print(f"audit: this Triton's ASTSource takes no attrs; ignoring hints of {target.kernel}",
              file=sys.stderr)
    return ASTSource(**kwargs)


def _compile(target, fn, capability: int):
    """triton.compile for one target; returns (compiled kernel, ptxas log captured or '')."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    src = _make_source(target, fn)
    buf = io.StringIO()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True   # Triton prints ptxas' -v log when it runs ptxas
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                    options={"num_warps": target.num_warps, "num_stages": target.num_stages})
    return kernel, buf.getvalue()


def _empty_row(kernel: str, config: str, dtype, arch, matmul: bool, **details) -> dict:
    row = {"kernel": kernel, "config": config, "dtype": dtype, "arch": arch, "registers": None,
           "spill_bytes": None, "shared_bytes": None, "occupancy": None, "mma_instructions": None,
           "load_widths": {}, "matmul": matmul, "ok": False}
    row["details"] = details
    return row


def audit_target(target, dtype: str, arch: str, workdir: str | None = None) -> dict:
    """Compile one AuditTarget for one arch and audit its cubin; returns one row."""
    if arch not in ARCHS:
        raise AuditError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    fn = _jit_function(target.fn, target.kernel)   # refusing the interpreter is not a row error
    capability = ARCHS[arch]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tubevit_audit_"))
        try:
            compiled, log = _compile(target, fn, capability)
        except Exception as exc:  # a kernel that does not compile is a failed row, not a crash
            return _empty_row(target.kernel, target.config, dtype, arch, target.matmul,
                              error=f"{type(exc).__name__}: {exc}".strip()[:4000],
                              num_warps=target.num_warps, num_stages=target.num_stages)
        compile_s = time.perf_counter() - t0
        name = compiled.metadata.name
        cubin = os.path.join(workdir, f"{name}.{arch}.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        dump = cuobjdump(cubin, "--dump-resource-usage", "--dump-sass")   # one call, both reports
        res = parse_resource_usage(dump, name)
        sass = parse_sass(dump, name)
        cubin_hash = hashlib.sha256(compiled.asm["cubin"]).hexdigest()
        ptxas, ptxas_source = parse_ptxas_log(log, name), "compile"
        if ptxas is None:   # the kernel came from Triton's cache, so ptxas did not run now
            ptxas, ptxas_source = _load_ptxas_report(cubin_hash), "cached"
        if ptxas is None:
            ptxas = parse_ptxas_log(_rerun_ptxas(compiled.asm["ptx"], capability, compiled.metadata, workdir),
                                    name)
            ptxas_source = "rerun" if ptxas is not None else "unavailable"
        if ptxas is not None and ptxas_source != "cached":
            _store_ptxas_report(cubin_hash, ptxas)
    # On sm_90 ptxas counts the driver's 1 KB reservation as static shared memory of the
    # function (section .nv.shared.reserved.*); do not count it twice.
    static_smem = res.get("SHARED", 0)
    reserved_in_static = b".nv.shared.reserved" in compiled.asm["cubin"]
    reserve = ARCH_LIMITS[arch].reserved_smem_per_block
    own_static = max(static_smem - reserve, 0) if reserved_in_static else static_smem
    dynamic_smem = int(compiled.metadata.shared)
    shared = dynamic_smem + own_static
    num_warps = int(compiled.metadata.num_warps)
    occ = estimate_occupancy(arch, res["REG"], shared, num_warps)
    # cuobjdump puts ptxas' spill slots in the STACK frame (LOCAL stays 0 for them), so the
    # local memory per thread is LOCAL + STACK; either way it must be 0.
    spill = spill_bytes(res)
    ok = row_ok(spill, ptxas, target.matmul, sass.mma, occ)
    return {
        "kernel": target.kernel, "config": target.config, "dtype": dtype, "arch": arch,
        "registers": res["REG"], "spill_bytes": spill, "shared_bytes": shared,
        "occupancy": round(occ, 4), "mma_instructions": sass.mma, "load_widths": sass.load_widths,
        "matmul": bool(target.matmul), "ok": ok,
        "details": {
            "hmma": sass.hmma, "hgmma": sass.hgmma, "tma": sass.tma, "ldsm": sass.ldsm,
            "ldg_widths": dict(sorted(sass.ldg.items())), "ldgsts_widths": dict(sorted(sass.ldgsts.items())),
            "sass_instructions": sass.instructions, "stack_bytes": res.get("STACK", 0),
            "local_bytes": res.get("LOCAL", 0),
            "dynamic_shared_bytes": dynamic_smem, "static_shared_bytes": static_smem,
            "num_warps": num_warps, "num_stages": target.num_stages,
            "occupancy_blocks": occupancy_limits(arch, res["REG"], shared, num_warps),
            "ptxas": ptxas, "ptxas_log": ptxas_source, "compile_seconds": round(compile_s, 3),
        },
    }


# --------------------------------------------------------------------------------------
# The audit over modules
# --------------------------------------------------------------------------------------

_EXTERNAL: list[Callable[..., list[dict]]] = []
_EXTERNAL_MODULE: dict[Callable[..., list[dict]], str] = {}


class ExternalUnavailable(Exception):
    """Raised by an external auditor whose kernels are not built here (e.g. no tubevit_fast._C):
    not a failure, unless its module was asked for by name."""


def register_external(fn: Callable[..., list[dict]], module: str | None = None) -> Callable[..., list[dict]]:
    """Add rows from outside Triton (e.g. the csrc extension's nvcc build). `fn(archs=, dtypes=)`
    returns row dicts with at least ROW_KEYS, or raises ExternalUnavailable. With a `module`
    name the rows are audited by default and when `modules` names it (--module); without one,
    always. Returns fn."""
    if fn not in _EXTERNAL:
        _EXTERNAL.append(fn)
    if module is not None:
        _EXTERNAL_MODULE[fn] = module
    return fn


EXTENSION_MODULE = "tubevit_fast._C"


def extension_rows(archs: Iterable[str] = tuple(ARCHS), dtypes: Iterable[str] = DTYPES) -> list[dict]:
    """Rows of the compiled CUDA extension (tubevit_fast.extension.audit_rows); raises
    ExternalUnavailable if tubevit_fast._C is not built. Imports torch, so only when called."""
    from tubevit_fast import extension
    reason = extension.unavailable_reason()
    if reason is not None:
        raise ExternalUnavailable(reason)
    return extension.audit_rows(archs=tuple(archs), dtypes=tuple(dtypes))


register_external(extension_rows, module=EXTENSION_MODULE)


def _import_kernel_module(name: str):
    """The module, or None if that very module does not exist (a broken import still raises)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def _selected(kernel: str, patterns: Sequence[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(kernel, p) for p in patterns)


def audit(kernels: Sequence[str] | str | None = None, archs: Iterable[str] = ("sm_80", "sm_90"),
          dtypes: Iterable[str] = DTYPES, modules: Sequence[str] | None = None,
          progress: Callable[[dict], None] | None = None,
          notice: Callable[[str], None] | None = None) -> list[dict]:
    """Compile and audit every target of `modules` (default AUDITED_MODULES) plus the rows of the
    registered external auditors (named ones only by default or when `modules` names them).
    `kernels`: names or fnmatch patterns to keep (None: all). An unavailable external gives one
    line to `notice` (default: stderr), or a "missing" row if `modules` names it.
    Returns a list of row dicts (ROW_KEYS + "details"); see the module docstring."""
    archs, dtypes = tuple(archs), tuple(dtypes)
    for arch in archs:
        if arch not in ARCHS:
            raise AuditError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    for dt in dtypes:
        if dt not in DTYPES:
            raise AuditError(f"unknown dtype {dt!r}; choose from {list(DTYPES)}")
    patterns = [kernels] if isinstance(kernels, str) else kernels
    named = None if modules is None else set(modules)
    externals = [fn for fn in _EXTERNAL
                 if fn not in _EXTERNAL_MODULE or named is None or _EXTERNAL_MODULE[fn] in named]
    external_names = set(_EXTERNAL_MODULE.values())
    modules = AUDITED_MODULES if modules is None else tuple(m for m in modules if m not in external_names)
    if notice is None:
        def notice(text):
            print(f"audit: {text}", file=sys.stderr)
    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        if progress is not None:
            progress(row)

    with tempfile.TemporaryDirectory(prefix="tubevit_audit_") as workdir:
        for mod_name in modules:
            module = _import_kernel_module(mod_name)
            if module is None:
                emit(_empty_row(mod_name, MISSING, None, None, False, module=mod_name,
                                error=f"module {mod_name} does not exist"))
                continue
            get_targets = getattr(module, "audit_targets", None)
            for dtype in dtypes:
                targets = list(get_targets(dtype)) if callable(get_targets) else []
                if not targets:
                    emit(_empty_row(mod_name, NO_TARGETS, dtype, None, False, module=mod_name,
                                    error=f"{mod_name}.audit_targets({dtype!r}) gave no targets"
                                    if callable(get_targets) else f"{mod_name} has no audit_targets()"))
                    continue
                for target in targets:
                    if not _selected(target.kernel, patterns):
                        continue
                    for arch in archs:
                        row = audit_target(target, dtype, arch, workdir)
                        row["details"]["module"] = mod_name
                        emit(row)
        for external in externals:
            name = _EXTERNAL_MODULE.get(external)
            try:
                ext_rows = external(archs=archs, dtypes=dtypes)
            except ExternalUnavailable as exc:
                if named is not None and name in named:
                    emit(_empty_row(name, MISSING, None, None, False, module=name, error=str(exc)))
                else:
                    reason = " ".join(str(exc).split()) or "unavailable"
                    notice(f"not auditing {name or getattr(external, '__name__', external)}, it is not built: "
                           f"{reason}")
                continue
            for row in ext_rows:
                missing = [k for k in ROW_KEYS if k not in row]
                if missing:
                    raise AuditError(f"external auditor {external!r} returned a row without {missing}")
                if _selected(row["kernel"], patterns):
                    row.setdefault("details", {})
                    emit(row)
    return rows


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

def _widths_text(row: dict) -> str:
    det = row.get("details") or {}
    parts = []
    for label, table in (("", det.get("ldg_widths", row.get("load_widths") or {})),
                         ("cp.async ", det.get("ldgsts_widths", {}))):
        if table:
            ordered = sorted(table.items(), key=lambda kv: int(kv[0]))
            parts.append(label + " ".join(f"{w}b x{n}" for w, n in ordered))
    if det.get("tma"):
        parts.append(f"TMA x{det['tma']}")
    return "; ".join(parts) or "-"


def _mma_text(row: dict) -> str:
    det = row.get("details") or {}
    if row.get("mma_instructions") is None:
        return "-"
    if "hmma" not in det:
        return str(row["mma_instructions"])
    kinds = [f"{det[k]} {k.upper()}" for k in ("hmma", "hgmma") if det.get(k)]
    return ", ".join(kinds) or "0"


def format_table(rows: list[dict]) -> str:
    header = ("kernel", "config", "dtype", "arch", "regs", "spill B", "smem B", "occ %", "MMA instr",
              "load widths", "ok")
    lines = []
    for r in rows:
        if r["registers"] is None:
            err = (r.get("details") or {}).get("error", "")
            status = {MISSING: "MISSING", NO_TARGETS: "NO TARGETS"}.get(r["config"], "ERROR")
            blank = ("-",) * 5
            lines.append((r["kernel"], r["config"], r["dtype"] or "-", r["arch"] or "-", *blank,
                          err.splitlines()[0][:60] if err else "-", status))
            continue
        occ = "-" if r["occupancy"] is None else f"{100 * r['occupancy']:.1f}"
        mma = _mma_text(r) if r["matmul"] or r["mma_instructions"] else f"{_mma_text(r)} (no dot)"
        lines.append((r["kernel"], r["config"], r["dtype"], r["arch"], str(r["registers"]),
                      str(r["spill_bytes"]), str(r["shared_bytes"]), occ, mma, _widths_text(r),
                      "ok" if r["ok"] else "FAIL"))
    widths = [max([len(h)] + [len(str(line[i])) for line in lines]) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _json_row(row: dict, details: bool) -> dict:
    out = {k: row[k] for k in ROW_KEYS}
    ordered = sorted((row["load_widths"] or {}).items(), key=lambda kv: int(kv[0]))
    out["load_widths"] = {str(w): n for w, n in ordered}
    if details:
        out["details"] = row.get("details", {})
    return out


def why_not_ok(row: dict) -> str:
    det = row.get("details") or {}
    if det.get("error"):
        return det["error"]
    reasons = []
    ptxas = det.get("ptxas") or {}
    if row["spill_bytes"] or ptxas.get("spill_stores") or ptxas.get("spill_loads"):
        text = f"spills: {row['spill_bytes']} B local memory per thread at {row['registers']} registers"
        if ptxas:
            text += f" (ptxas: {ptxas['spill_stores']} B spill stores, {ptxas['spill_loads']} B spill loads)"
        reasons.append(text)
    if row["matmul"] and not row["mma_instructions"]:
        reasons.append("matmul without HMMA/HGMMA")
    if row["occupancy"] == 0:
        reasons.append("cannot launch (too many registers or too much shared memory for one block)")
    return "; ".join(reasons) or "not ok"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def _drop_interpreter(argv: list[str]) -> None:
    """Remove TRITON_INTERPRET before kernel modules are imported. If one already was imported
    (e.g. by the package's __init__) while it was set, start afresh without it."""
    value = os.environ.pop("TRITON_INTERPRET", None)
    if value is None or value.strip().lower() in ("", "0", "false", "off", "no"):
        return
    if any(m == "tubevit_fast.kernels" or m.startswith("tubevit_fast.kernels.") for m in sys.modules):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "tubevit_fast.audit", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m tubevit_fast.audit",
        description="Compile every Triton kernel ahead of time for sm_80/sm_90 and audit its SASS, and "
                    "that of the CUDA extension tubevit_fast._C if it is built (registers, spills, shared "
                    "memory, occupancy, tensor-core instructions, load widths).")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--details", action="store_true", help="with --json: add each row's 'details'")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="repeatable; default both")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeatable; default both")
    parser.add_argument("--kernel", action="append", metavar="NAME",
                        help="kernel name or fnmatch pattern; repeatable")
    parser.add_argument("--module", action="append", metavar="MOD",
                        help=f"audit these modules instead of AUDITED_MODULES and {EXTENSION_MODULE} "
                             f"(which is one of the names accepted); repeatable")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if any row is not ok or a module is missing")
    args = parser.parse_args(argv)
    _drop_interpreter(argv)

    t0 = time.perf_counter()
    progress = None
    if not args.json and sys.stderr.isatty():
        def progress(row):
            print(f"  audited {row['kernel']} {row['config']} {row['dtype']} {row['arch']}", file=sys.stderr)
    try:
        rows = audit(kernels=args.kernel, archs=args.arch or tuple(ARCHS), dtypes=args.dtype or DTYPES,
                     modules=args.module, progress=progress)
    except AuditError as exc:
        print(f"audit: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    bad = [r for r in rows if not r["ok"]]
    if args.json:
        print(json.dumps([_json_row(r, args.details) for r in rows], indent=1))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} rows, {len(bad)} not ok, {elapsed:.1f} s")
    for r in bad:
        print(f"audit: NOT OK: {r['kernel']} {r['config']} {r['dtype']} {r['arch']}: {why_not_ok(r)}",
              file=sys.stderr)
    print(f"audit: {len(rows)} rows, {len(bad)} not ok in {elapsed:.1f} s", file=sys.stderr)
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
