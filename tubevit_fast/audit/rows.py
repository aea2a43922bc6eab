"""One audit row per compiled kernel: its keys, the occupancy estimate and the verdict.

Rows (one per kernel x config x dtype x arch) are dicts with exactly the keys in ROW_KEYS:
    kernel, config, dtype, arch ("sm_80"/"sm_90"), registers (per thread), spill_bytes
    (local memory per thread: cuobjdump's LOCAL + STACK; register spills land in the stack
    frame, e.g. "REG:255 STACK:376 LOCAL:0" for 376 bytes of spill stores), shared_bytes
    (per block: Triton's dynamic shared memory plus any static shared memory of the kernel
    itself, not counting the 1 KB the driver reserves per block), occupancy (0..1, see
    estimate_occupancy), mma_instructions (HMMA + HGMMA),
    load_widths ({width in bits: count} over LDG and LDGSTS instructions, ascending width;
    JSON turns the keys into strings such as "128"),
    loop_instructions, loop_mma, loop_non_mma_per_mma, loop_load_widths: the main loop's
    instructions, its HMMA + HGMMA instructions, its non-MMA instructions per m16n8k16 MMA
    (2 decimals) and its global loads / async copies by width with TMA copies under "tma"
    (cubin.main_loop; all None, and {} for the widths, when the kernel has no loop with MMAs),
    matmul (bool), ok (bool).
    ok = spill_bytes == 0 and no ptxas-reported spill and (not matmul or mma_instructions > 0)
         and occupancy > 0 (i.e. the kernel can be launched at all) and the main loop meets the
         target's LoopBudget, if it declares one (details["budget_misses"] lists what it misses).
"""
from __future__ import annotations

from dataclasses import dataclass

from tubevit_fast.audit.cubin import LoopStats, SassStats, spill_bytes

ARCHS: dict[str, int] = {"sm_80": 80, "sm_90": 90}
DTYPES: tuple[str, ...] = ("fp16", "bf16", "fp32")

LOOP_KEYS: tuple[str, ...] = ("loop_instructions", "loop_mma", "loop_non_mma_per_mma", "loop_load_widths")
ROW_KEYS: tuple[str, ...] = (
    "kernel", "config", "dtype", "arch", "registers", "spill_bytes", "shared_bytes",
    "occupancy", "mma_instructions", "load_widths", *LOOP_KEYS, "matmul", "ok",
)

# Module status labels used in the "config" column of rows that stand for a whole module.
MISSING = "missing"
NO_TARGETS = "no-targets"


class ExternalUnavailable(RuntimeError):
    """Raised by an external auditor whose kernels are not built here (e.g. no tubevit_fast._C):
    not a failure, unless its module was asked for by name."""


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


def estimate_occupancy(arch: str, registers: int, shared_bytes: int, num_warps: int) -> float:
    """Resident warps per SM / maximum warps per SM (0..1); 0 if the block cannot launch."""
    blocks = min(occupancy_limits(arch, registers, shared_bytes, num_warps).values())
    return blocks * num_warps / ARCH_LIMITS[arch].max_warps_per_sm


# --------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------

def row_ok(spill_bytes: int, ptxas: dict | None, matmul: bool, mma_instructions: int, occupancy: float) -> bool:
    """The audit's verdict on resources: no local memory, no ptxas-reported spill, tensor-core
    MMA in a matmul kernel, and the block can be launched at all. (A row is ok when this holds
    and the main loop meets its target's budget: budget_misses.)"""
    ptxas_spill = (ptxas or {}).get("spill_stores", 0) + (ptxas or {}).get("spill_loads", 0)
    return bool(spill_bytes == 0 and ptxas_spill == 0 and (not matmul or mma_instructions > 0) and occupancy > 0)


def budget_misses(budget, loop: LoopStats | None, arch: str) -> list[str]:
    """What the main loop misses of a target's LoopBudget (tubevit_fast.kernels.audit_spec):
    one sentence per miss; [] without a budget."""
    if budget is None:
        return []
    if loop is None:
        return ["no main loop with MMA instructions found in the SASS (the budget cannot be checked)"]
    misses = []
    if budget.max_non_mma_per_mma is not None and loop.non_mma_per_mma > budget.max_non_mma_per_mma:
        misses.append(f"main loop: {loop.non_mma_per_mma:.2f} non-MMA instructions per m16n8k16 MMA "
                      f"> {budget.max_non_mma_per_mma} ({loop.instructions} instructions, {loop.mma} MMA)")
    if budget.min_load_bits is not None:
        narrow = {w: n for w, n in loop.loads.items() if w != "tma" and w < budget.min_load_bits}
        if narrow:
            text = ", ".join(f"{n} x {w}-bit" for w, n in sorted(narrow.items()))
            misses.append(f"main loop: global loads narrower than {budget.min_load_bits} bits ({text})")
    if arch in budget.hgmma_archs and loop.hgmma == 0:
        misses.append(f"main loop without HGMMA (wgmma) on {arch}")
    return misses


def loop_fields(loop: LoopStats | None) -> dict:
    """The LOOP_KEYS of a row."""
    if loop is None:
        return {"loop_instructions": None, "loop_mma": None, "loop_non_mma_per_mma": None,
                "loop_load_widths": {}}
    return {"loop_instructions": loop.instructions, "loop_mma": loop.mma,
            "loop_non_mma_per_mma": round(loop.non_mma_per_mma, 2), "loop_load_widths": loop.load_widths}


def make_row(*, kernel: str, config: str, dtype: str, arch: str, resources: dict, sass: SassStats,
             dynamic_shared: int, reserved_in_static: bool, num_warps: int, matmul: bool, ptxas: dict | None,
             budget=None, details: dict | None = None) -> dict:
    """A row (ROW_KEYS + "details") from one function's cuobjdump resource usage, its SassStats
    and its launch facts. reserved_in_static: ptxas counted the driver's 1 KB per-block
    reservation as static shared memory of the function (sm_90 cubins), so it is taken off."""
    static_smem = resources.get("SHARED", 0)
    if reserved_in_static:
        static_smem = max(static_smem - ARCH_LIMITS[arch].reserved_smem_per_block, 0)
    shared = dynamic_shared + static_smem
    registers = resources["REG"]
    occupancy = estimate_occupancy(arch, registers, shared, num_warps)
    spill = spill_bytes(resources)
    misses = budget_misses(budget, sass.loop, arch)
    loop = sass.loop
    return {
        "kernel": kernel, "config": config, "dtype": dtype, "arch": arch,
        "registers": registers, "spill_bytes": spill, "shared_bytes": shared,
        "occupancy": round(occupancy, 4), "mma_instructions": sass.mma, "load_widths": sass.load_widths,
        **loop_fields(loop), "matmul": bool(matmul),
        "ok": row_ok(spill, ptxas, matmul, sass.mma, occupancy) and not misses,
        "details": {
            "hmma": sass.hmma, "hgmma": sass.hgmma, "tma": sass.tma, "ldsm": sass.ldsm,
            "ldg_widths": dict(sorted(sass.ldg.items())), "ldgsts_widths": dict(sorted(sass.ldgsts.items())),
            "sass_instructions": sass.instructions, "stack_bytes": resources.get("STACK", 0),
            "local_bytes": resources.get("LOCAL", 0),
            "dynamic_shared_bytes": dynamic_shared, "static_shared_bytes": static_smem, "num_warps": num_warps,
            "occupancy_blocks": occupancy_limits(arch, registers, shared, num_warps), "ptxas": ptxas,
            "loop": None if loop is None else {"start": loop.start, "end": loop.end, "hmma": loop.hmma,
                                               "hgmma": loop.hgmma, "mma_units": loop.mma_units},
            "budget_misses": misses,
            **(details or {}),
        },
    }


def empty_row(kernel: str, config: str, dtype, arch, matmul: bool, **details) -> dict:
    """A row for something that produced no cubin (a missing module, a compile error)."""
    row = {"kernel": kernel, "config": config, "dtype": dtype, "arch": arch, "registers": None,
           "spill_bytes": None, "shared_bytes": None, "occupancy": None, "mma_instructions": None,
           "load_widths": {}, **loop_fields(None), "matmul": matmul, "ok": False}
    row["details"] = details
    return row


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
    reasons += det.get("budget_misses") or []
    return "; ".join(reasons) or "not ok"
