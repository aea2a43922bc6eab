"""Reading compiled GPU code: cuobjdump and ptxas output, parsed; the main-loop model.

Everything here works on text (or runs cuobjdump on a file): no Triton, no torch, no kernel
module. The Triton targets (triton_targets.py) and the CUDA extension's rows
(extension_targets.py) both build on it.

The main loop (`main_loop`). SASS is printed with each instruction's address
(`/*3920*/ @!P0 BRA 0x2cb0 ;`). A branch whose target is at or before its own address closes a
loop: the instructions from the target to the branch are its body (several back edges to one
target are one loop, ending at the last of them). The kernel's main loop is the innermost loop
holding MMA instructions (HMMA, HGMMA): of the loops with MMAs, those that contain no smaller
loop with MMAs; if there are several (e.g. two phases of one kernel), the one with the most
MMA work. A loop that the compiler unrolled completely has no back edge: then there is no main
loop (None). Its static cost, one pass of the body:

  instructions        every instruction from the branch target to the back edge, inclusive
  mma                 HMMA + HGMMA instructions in it
  mma_units           the MMA work in m16n8k16 multiply-adds per warp (HMMA.16816 = 1,
                      HMMA.1688 = 1/2; a warpgroup's HGMMA.64xNxK gives each of its four warps
                      16xNxK, i.e. N*K/128 units), so HMMA and HGMMA loops compare
  non_mma_per_mma     (instructions - mma) / mma_units: the issue slots spent beside each unit of
                      tensor-core work. An m16n8k16 takes a sub-partition's tensor core about 8
                      cycles on an A100 (4 on an H100) and a warp scheduler issues one
                      instruction per cycle, so a loop far above ~4 is issue-bound.
  loads               global loads (LDG) and async copies to shared memory (LDGSTS) in the body
                      by width in bits per thread, TMA copies (UTMALDG, UBLKCP) under "tma"
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field


class AuditError(RuntimeError):
    """The audit cannot run as asked (interpreted kernel, missing tool, bad target, bad input)."""


# --------------------------------------------------------------------------------------
# cuobjdump --dump-resource-usage
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


def spill_bytes(resource_usage: dict[str, int]) -> int:
    """Local memory per thread from cuobjdump's resource usage: LOCAL + STACK (cuobjdump books
    ptxas' spill slots in the STACK frame; LOCAL stays 0 for them)."""
    return resource_usage.get("LOCAL", 0) + resource_usage.get("STACK", 0)


# --------------------------------------------------------------------------------------
# cuobjdump --dump-sass
# --------------------------------------------------------------------------------------

_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
# "/*0a80*/   @!P6 LDG.E.U16 R75, desc[UR10][R98.64] ;" -> address 0x0a80, opcode "LDG.E.U16",
# operands "R75, desc[UR10][R98.64]"
_SASS_INSTR = re.compile(
    r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@!?U?P(?:[0-9]+|T)\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*)")
_HEX = re.compile(r"0x([0-9a-fA-F]+)")
_WIDTH_TOKENS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "8": 8, "16": 16, "32": 32, "64": 64,
                 "128": 128, "256": 256}
# HMMA shapes as SASS spells them (m, n, k run together) -> (m, n, k).
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "1684": (16, 8, 4),
                "884": (8, 8, 4)}
_HGMMA_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_TMA = ("UTMALDG", "UBLKCP")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str          # with its modifiers, e.g. "LDG.E.U16"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


def load_width(opcode: str) -> int:
    """Bits moved per thread by an LDG/LDGSTS opcode: LDG.E.128 -> 128, LDG.E -> 32, .U16 -> 16."""
    for token in opcode.split(".")[1:]:
        if token in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[token]
    return 32


def mma_units(opcode: str) -> float:
    """Multiply-adds per warp of one HMMA/HGMMA instruction, in m16n8k16 units (0 for others)."""
    parts = opcode.split(".")
    if parts[0] == "HMMA":
        shape = next((_HMMA_SHAPES[p] for p in parts[1:] if p in _HMMA_SHAPES), None)
        if shape is None:
            raise AuditError(f"unknown HMMA shape in {opcode!r}")
        m, n, k = shape
        return m * n * k / (16 * 8 * 16)
    if parts[0] == "HGMMA":
        shape = next((_HGMMA_SHAPE.match(p) for p in parts[1:] if _HGMMA_SHAPE.match(p)), None)
        if shape is None:
            raise AuditError(f"unknown HGMMA shape in {opcode!r}")
        m, n, k = (int(g) for g in shape.groups())
        return (m // 4) * n * k / (16 * 8 * 16)     # a warpgroup is 4 warps, each m/4 rows
    return 0.0


def _count(table: dict, key, n: int = 1) -> None:
    table[key] = table.get(key, 0) + n


@dataclass
class LoopStats:
    """One pass of a kernel's main loop (see the module docstring)."""
    start: int                          # address of the first instruction (the back edge's target)
    end: int                            # address of the back edge
    instructions: int
    hmma: int
    hgmma: int
    mma_units: float
    loads: dict = field(default_factory=dict)  # width in bits -> count; "tma" -> count

    @property
    def mma(self) -> int:
        return self.hmma + self.hgmma

    @property
    def non_mma_per_mma(self) -> float:
        return (self.instructions - self.mma) / self.mma_units

    @property
    def load_widths(self) -> dict:
        """loads, widths ascending, "tma" last."""
        widths = sorted(k for k in self.loads if k != "tma")
        out = {w: self.loads[w] for w in widths}
        if "tma" in self.loads:
            out["tma"] = self.loads["tma"]
        return out


def _loop_stats(body: list[Instruction], weights: list[int] | None = None) -> LoopStats:
    """Stats of one pass of `body`; weights[i] counts instruction i that many times (inner loops)."""
    weights = weights or [1] * len(body)
    loads: dict = {}
    for ins, n in zip(body, weights):
        if ins.base in ("LDG", "LDGSTS"):
            _count(loads, load_width(ins.opcode), n)
        elif ins.base in _TMA:
            _count(loads, "tma", n)
    return LoopStats(start=body[0].address, end=body[-1].address, instructions=sum(weights),
                     hmma=sum(n for i, n in zip(body, weights) if i.base == "HMMA"),
                     hgmma=sum(n for i, n in zip(body, weights) if i.base == "HGMMA"),
                     mma_units=sum(mma_units(i.opcode) * n for i, n in zip(body, weights)), loads=loads)


def branch_target(ins: Instruction) -> int | None:
    """The address a BRA jumps to (the last hex number of its operands), else None."""
    if ins.base != "BRA":
        return None
    found = _HEX.findall(ins.operands)
    return int(found[-1], 16) if found else None


def main_loop(instructions: list[Instruction], inner_trips: int | None = None) -> LoopStats | None:
    """The innermost loop holding MMA instructions (see the module docstring), or None.

    inner_trips: for kernels whose MMAs sit in short inner loops of known trip count (the CUDA
    extension's head-dim loops, head_dim / 16 passes): take the outermost loop holding MMAs
    instead, and count each instruction of an MMA loop nested in it inner_trips times per level
    of nesting, so the metric describes one pass of the loop that streams the tiles."""
    ends: dict[int, int] = {}                 # loop start -> its last back edge
    for ins in instructions:
        target = branch_target(ins)
        if target is not None and target <= ins.address:
            ends[target] = max(ends.get(target, target), ins.address)
    index = {ins.address: i for i, ins in enumerate(instructions)}
    loops = []
    for start, end in ends.items():
        if start not in index:
            continue
        body = instructions[index[start]:index[end] + 1]
        if any(i.base in ("HMMA", "HGMMA") for i in body):
            loops.append((start, end, body))
    if inner_trips is not None:
        outermost = [(s, e, b) for s, e, b in loops
                     if not any((s2, e2) != (s, e) and s2 <= s and e <= e2 for s2, e2, _ in loops)]
        stats = []
        for s, e, body in outermost:
            nested = [(s2, e2) for s2, e2, _ in loops if (s2, e2) != (s, e) and s <= s2 and e2 <= e]
            weights = [inner_trips ** sum(s2 <= i.address <= e2 for s2, e2 in nested) for i in body]
            stats.append(_loop_stats(body, weights))
        return max(stats, key=lambda st: (st.mma_units, -st.start)) if stats else None
    innermost = [(s, e, b) for s, e, b in loops
                 if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2, _ in loops)]
    if not innermost:
        return None
    stats = [_loop_stats(body) for _, _, body in innermost]
    return max(stats, key=lambda st: (st.mma_units, -st.start))


@dataclass
class SassStats:
    hmma: int = 0
    hgmma: int = 0
    tma: int = 0                        # UTMALDG / UBLKCP (bulk async copies into shared memory)
    ldsm: int = 0                       # LDSM (ldmatrix: shared memory -> MMA fragments)
    ldg: dict = None                    # width -> count, plain global loads
    ldgsts: dict = None                 # width -> count, cp.async global -> shared
    instructions: int = 0
    loop: LoopStats | None = None       # the main loop (main_loop), None if there is none

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
    """Count MMA instructions and global-load widths in `cuobjdump --dump-sass` output, and find
    the main loop. With function=None the cubin must hold exactly one function."""
    return _pick_function(sass_by_function(text), function, "SASS")


def instructions_by_function(text: str) -> dict[str, list[Instruction]]:
    """{function: its instructions in address order} of one cubin's `cuobjdump --dump-sass` output."""
    per_fn: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            current = per_fn.setdefault(m.group(1), [])
            continue
        m = _SASS_INSTR.match(line)
        if m is not None and current is not None:
            current.append(Instruction(int(m.group(1), 16), m.group(2), m.group(3).strip()))
    return per_fn


def sass_stats(instructions: list[Instruction]) -> SassStats:
    stats = SassStats(instructions=len(instructions), loop=main_loop(instructions))
    for ins in instructions:
        base = ins.base
        if base == "HMMA":
            stats.hmma += 1
        elif base == "HGMMA":
            stats.hgmma += 1
        elif base in _TMA:
            stats.tma += 1
        elif base == "LDSM":
            stats.ldsm += 1
        elif base == "LDG":
            _count(stats.ldg, load_width(ins.opcode))
        elif base == "LDGSTS":
            _count(stats.ldgsts, load_width(ins.opcode))
    return stats


def sass_by_function(text: str) -> dict[str, SassStats]:
    """{function: its SassStats} for every function of one cubin's `cuobjdump --dump-sass` output."""
    return {name: sass_stats(ins) for name, ins in instructions_by_function(text).items()}


# --------------------------------------------------------------------------------------
# ptxas -v
# --------------------------------------------------------------------------------------

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


def _pick_function(found: dict, function: str | None, what: str):
    if function is not None:
        if function not in found:
            raise AuditError(f"{what}: no function {function!r} (found {sorted(found)})")
        return found[function]
    if len(found) != 1:
        raise AuditError(f"{what}: expected exactly one function, found {sorted(found)}")
    return next(iter(found.values()))


# --------------------------------------------------------------------------------------
# cuobjdump itself (Triton's wheel ships one)
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
