"""Ahead-of-time compile + SASS audit of the GPU kernels; no GPU needed.

    python -m tubevit_fast.audit [--json [--details] | --summary] [--strict] [--arch sm_80] [--arch sm_90]
                                 [--dtype fp16] [--kernel NAME] [--module MOD]

Every Triton kernel x kept autotune config x dtype (fp16, bf16, fp32) is compiled for sm_80
and sm_90 and its cubin read with the cuobjdump of Triton's wheel: registers, spills, shared
memory, occupancy, tensor-core instructions, load widths, and the main loop's instruction mix
(the static performance model: non-MMA instructions per MMA in the innermost loop holding the
MMAs, and the widths of its global loads). The CUDA extension's kernels are listed too when it
is built. `--strict` exits 1 if a row is not ok.

The package, bottom up (each imports only those above it):
  cubin.py           parsing cuobjdump/ptxas output, the main-loop model, running cuobjdump
  rows.py            the row keys, occupancy estimate, verdict (ok) and targets' loop budgets
  triton_targets.py  compiling one AuditTarget (tubevit_fast.kernels.audit_spec) and its row
  extension_targets.py  the CUDA extension's ptxas report and SASS rows (imports the loader,
                     tubevit_fast.extension, for where the built module is)
  report.py          the audit over modules and externals, table/JSON/summary, the CLI
report.py reaches extension_targets.py only by name (EXTENSION_PROVIDER), as it reaches the
kernel modules, so importing the package imports neither torch's extension nor the loader.
"""
from tubevit_fast.audit.cubin import (AuditError, Instruction, LoopStats, SassStats, branch_target, cuobjdump,
                                      cuobjdump_path, instructions_by_function, load_width, main_loop, mma_units,
                                      parse_ptxas_entries, parse_ptxas_log, parse_resource_usage, parse_sass,
                                      resource_usage_by_function, sass_by_function, spill_bytes)
from tubevit_fast.audit.report import (AUDITED_MODULES, EXTENSION_MODULE, EXTENSION_PROVIDER, audit,
                                       extension_rows, format_summary, format_table, main, register_external)
from tubevit_fast.audit.rows import (ARCH_LIMITS, ARCHS, DTYPES, LOOP_KEYS, MISSING, NO_TARGETS, ROW_KEYS,
                                     ArchLimits, ExternalUnavailable, budget_misses, empty_row,
                                     estimate_occupancy, make_row, occupancy_limits, row_ok, why_not_ok)
from tubevit_fast.audit.triton_targets import audit_target, compile_target
