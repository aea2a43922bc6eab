"""What the audit tool (tubevit_fast.audit) needs to compile one kernel ahead of time.

Each kernel module exposes `audit_targets(dtype) -> list[AuditTarget]`, one entry per
kernel x kept autotune config, for dtype "fp16" or "bf16".
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
