"""What the audit tool (tubevit_fast.audit) needs to compile one kernel ahead of time.

Each kernel module exposes `audit_targets(dtype) -> list[AuditTarget]`, one entry per
kernel x kept autotune config, for dtype "fp16", "bf16" or "fp32".
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoopBudget:
    """Static targets for a kernel's main loop (the innermost loop holding its MMAs, found in the
    SASS by tubevit_fast.audit.cubin.main_loop); the audit marks a row not ok when one is missed."""
    max_non_mma_per_mma: float | None = None  # non-MMA instructions per m16n8k16 MMA
    min_load_bits: int | None = None          # no global load / async copy narrower than this
    hgmma_archs: tuple[str, ...] = ()         # archs on which the loop must use HGMMA (wgmma)


@dataclass(frozen=True)
class AuditTarget:
    kernel: str                  # the @triton.jit function's name
    fn: object                   # the JITFunction itself (not the Autotuner wrapper)
    signature: dict              # ASTSource signature; constexpr arguments map to "constexpr"
    constexprs: dict             # values of the constexpr arguments (block sizes, flags)
    config: str                  # readable label, e.g. "BM64-BN128-BK32-w4-s3"
    num_warps: int = 4
    num_stages: int = 3
    matmul: bool = True          # a tl.dot kernel: the SASS must show HMMA/HGMMA
    attrs: dict = field(default_factory=dict)  # optional ASTSource attrs (e.g. divisibility hints)
    loop_budget: LoopBudget | None = None      # the main loop's static targets, if any
    archs: tuple[str, ...] | None = None       # the archs whose launches compile this (None: all)
