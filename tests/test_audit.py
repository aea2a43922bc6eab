"""The AOT compile + SASS audit tool (tubevit_fast.audit).

Parser and occupancy tests run on canned text. The aot tests run the real CLI in a subprocess
with TRITON_INTERPRET removed from the environment (conftest sets it for this process, and
@triton.jit under the interpreter cannot be compiled ahead of time).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tubevit_fast import audit as A
from tubevit_fast.audit import cubin as C
from tubevit_fast.audit import report as R
from tubevit_fast.kernels.audit_spec import LoopBudget

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------
# Parsers on canned cuobjdump / ptxas output
# --------------------------------------------------------------------------------------

# Shaped like `cuobjdump --dump-resource-usage --dump-sass x.cubin` (one call, both reports),
# with a second function to check that the right one is picked.
CANNED_DUMP = """
Resource usage:
 Common:
  GLOBAL:0
 Function other_kernel:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function my_kernel:
  REG:168 STACK:24 SHARED:1024 LOCAL:16 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0

\tcode for sm_90a
\t\tFunction : other_kernel
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                               /* 0x00000a00ff017b82 */
        /*0010*/                   HMMA.16816.F32 R0, R4, R8, R0 ;                      /* 0x0000000804007a3c */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;                     /* 0x0000000402047981 */
        /*0030*/                   EXIT ;                                               /* 0x000000000000794d */
\t\t..........

\t\tFunction : my_kernel
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                               /* 0x00000a00ff017b82 */
                                                                                        /* 0x000fe20000000800 */
        /*0010*/               @P3 LDG.E.U16 R84, desc[UR10][R68.64] ;                  /* 0x0000000a44543981 */
        /*0020*/              @!P4 LDG.E.S16 R82, desc[UR10][R70.64] ;                  /* 0x0000000a46524981 */
        /*0030*/                   LDG.E R5, desc[UR10][R72.64] ;                       /* 0x0000000a48057981 */
        /*0040*/                   LDG.E.64.CONSTANT R6, desc[UR10][R72.64] ;           /* 0x0000000a48067981 */
        /*0050*/                   LDG.E.128 R8, desc[UR10][R74.64] ;                   /* 0x0000000a4a087981 */
        /*0060*/               @P0 LDG.E.LTC128B.128 R12, desc[UR10][R76.64] ;          /* 0x0000000a4c0c0981 */
        /*0070*/                   LDG.E.U8 R16, desc[UR10][R78.64] ;                   /* 0x0000000a4e107981 */
        /*0080*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR10][R80.64] ; /* 0x000000005003 */
        /*0090*/              @!PT LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], desc[UR10][R82.64] ; /* 0x00000 */
        /*00a0*/                   LDGSTS.E [R3+0x1000], desc[UR10][R84.64] ;           /* 0x000000005403 */
        /*00b0*/                   UTMALDG.2D [UR8], [UR6] ;                            /* 0x00000008060075b4 */
        /*00c0*/                   WARPGROUP.ARRIVE ;                                   /* 0x00000000000079cd */
        /*00d0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ, !UPT ;       /* 0x00e00000041879f0 */
        /*00e0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24, gsb0 ;      /* 0x00e00000081879f0 */
        /*00f0*/                   HMMA.16816.F32.BF16 R40, R44, R48, R40 ;             /* 0x000000302c28723c */
        /*0100*/                   STG.E.U16 desc[UR10][R2.64], R24 ;                   /* 0x0000001802007986 */
        /*0110*/               @UP0 LDS.64 R50, [R52] ;                                 /* 0x0000000034327984 */
        /*0120*/                   EXIT ;                                               /* 0x000000000000794d */
        /*0130*/                   BRA 0x130;                                           /* 0xfffffff000007947 */
\t\t..........
"""

CANNED_PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'my_kernel' for 'sm_80'
ptxas info    : Function properties for my_kernel
    376 bytes stack frame, 380 bytes spill stores, 372 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 376 bytes cumulative stack size, 416 bytes cmem[0]
ptxas info    : Compile time = 36.065 ms
"""


def test_parse_resource_usage_picks_the_function():
    res = A.parse_resource_usage(CANNED_DUMP, "my_kernel")
    assert res["REG"] == 168 and res["STACK"] == 24 and res["LOCAL"] == 16 and res["SHARED"] == 1024
    assert res["CONSTANT[0]"] == 416
    assert A.parse_resource_usage(CANNED_DUMP, "other_kernel")["REG"] == 40
    with pytest.raises(A.AuditError):
        A.parse_resource_usage(CANNED_DUMP)          # two functions: a name is required
    with pytest.raises(A.AuditError):
        A.parse_resource_usage(CANNED_DUMP, "absent")


def test_parse_sass_counts_mma_and_load_widths():
    s = A.parse_sass(CANNED_DUMP, "my_kernel")
    assert (s.hmma, s.hgmma, s.mma, s.tma) == (1, 2, 3, 1)
    # LDG: U16 + S16 -> 16, plain -> 32, .64 -> 64, .128 and .LTC128B.128 -> 128, U8 -> 8
    assert s.ldg == {16: 2, 32: 1, 64: 1, 128: 2, 8: 1}
    assert s.ldgsts == {128: 2, 32: 1}
    assert s.load_widths == {8: 1, 16: 2, 32: 2, 64: 1, 128: 4}
    assert list(s.load_widths) == sorted(s.load_widths)
    assert s.instructions == 20                      # 0x0000..0x0130; encoding-only lines do not count
    other = A.parse_sass(CANNED_DUMP, "other_kernel")
    assert (other.hmma, other.hgmma, other.load_widths) == (1, 0, {128: 1})


@pytest.mark.parametrize("opcode, width", [
    ("LDG.E.128", 128), ("LDG.E.64", 64), ("LDG.E", 32), ("LDG.E.U16", 16), ("LDG.E.S16", 16),
    ("LDG.E.U8", 8), ("LDG.E.S8", 8), ("LDG.E.EF.128", 128), ("LDG.E.LTC128B", 32),
    ("LDGSTS.E.BYPASS.LTC128B.128", 128), ("LDGSTS.E.64", 64), ("LDGSTS.E", 32),
])
def test_load_width(opcode, width):
    assert A.load_width(opcode) == width


def test_parse_ptxas_log():
    rep = A.parse_ptxas_log(CANNED_PTXAS, "my_kernel")
    assert rep == {"stack": 376, "spill_stores": 380, "spill_loads": 372, "registers": 255}
    assert A.parse_ptxas_log(CANNED_PTXAS) == rep
    assert A.parse_ptxas_log("", "my_kernel") is None
    assert A.parse_ptxas_log(CANNED_PTXAS, "other") is None
    assert A.parse_ptxas_log(CANNED_PTXAS, "my_kernel", arch="sm_80") == rep
    assert A.parse_ptxas_log(CANNED_PTXAS, "my_kernel", arch="sm_90a") is None


# Shaped like an nvcc build's `-Xptxas -v` report: the same function for two archs, two functions.
CANNED_NVCC_PTXAS = """=== source: a.cu
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1fv' for 'sm_80'
ptxas info    : Function properties for _Z1fv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 688 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1gv' for 'sm_80'
ptxas info    : Function properties for _Z1gv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 688 bytes cmem[0]
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1fv' for 'sm_90a'
ptxas info    : Function properties for _Z1fv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 688 bytes cmem[0]
"""


def test_parse_ptxas_entries_keeps_every_arch():
    entries = A.parse_ptxas_entries(CANNED_NVCC_PTXAS)
    assert [(e["function"], e["arch"], e["registers"]) for e in entries] == [
        ("_Z1fv", "sm_80", 128), ("_Z1gv", "sm_80", 255), ("_Z1fv", "sm_90a", 168)]
    assert entries[1] == {"function": "_Z1gv", "arch": "sm_80", "stack": 8, "spill_stores": 4,
                          "spill_loads": 4, "registers": 255}
    assert A.parse_ptxas_log(CANNED_NVCC_PTXAS, "_Z1fv", arch="sm_90a")["registers"] == 168
    assert A.parse_ptxas_log(CANNED_NVCC_PTXAS, "_Z1fv", arch="sm_80")["registers"] == 128
    with pytest.raises(A.AuditError):
        A.parse_ptxas_log(CANNED_NVCC_PTXAS, arch="sm_80")   # two functions: a name is required


def test_by_function_parsers_and_spill_bytes():
    res = A.resource_usage_by_function(CANNED_DUMP)
    assert set(res) == {"my_kernel", "other_kernel"}
    assert res["my_kernel"] == A.parse_resource_usage(CANNED_DUMP, "my_kernel")
    assert A.spill_bytes(res["my_kernel"]) == 24 + 16 and A.spill_bytes(res["other_kernel"]) == 0
    sass = A.sass_by_function(CANNED_DUMP)
    assert set(sass) == {"my_kernel", "other_kernel"}
    assert sass["my_kernel"] == A.parse_sass(CANNED_DUMP, "my_kernel")
    ldsm = A.parse_sass("\t\tFunction : k\n        /*0000*/  LDSM.16.M88.4 R4, [R2] ;\n"
                        "        /*0010*/  @P0 LDSM.16.MT88.4 R8, [R2+0x10] ;\n")
    assert ldsm.ldsm == 2 and ldsm.instructions == 2


# Two loops with MMAs, one nested in an outer loop, and a self-branch after EXIT: the main loop
# is the inner loop at 0x40..0x80 (2 HMMA.16816 = 2 units of MMA work, more than the other
# innermost loop's one HMMA.1688 = 1/2 unit).
CANNED_LOOPS = """
\t\tFunction : loops
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R2, 0x1, PT ;
        /*0020*/              @!P0 BRA 0xe0 ;
        /*0030*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0040*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0050*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R10.64] ;
        /*0060*/                   HMMA.16816.F32 R12, R8, R10, R12 ;
        /*0070*/                   HMMA.16816.F32.BF16 R16, R8, R11, R16 ;
        /*0080*/               @P1 BRA 0x40 ;
        /*0090*/                   LDG.E.U16 R20, desc[UR4][R6.64] ;
        /*00a0*/               @P2 BRA 0x30 ;
        /*00b0*/                   HMMA.1688.F32.TF32 R12, R8, R10, R12 ;
        /*00c0*/                   LDG.E.U16 R21, desc[UR4][R6.64] ;
        /*00d0*/              @!UP3 BRA 0xb0 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0;
\t\t..........

\t\tFunction : hopper
        /*0000*/                   WARPGROUP.ARRIVE ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0040*/                   UTMALDG.2D [UR8], [UR6] ;
        /*0050*/                   LDGSTS.E.BYPASS.LTC128B.64 [R3], desc[UR4][R10.64] ;
        /*0060*/               @P1 BRA 0x0 ;
        /*0070*/                   EXIT ;
\t\t..........

\t\tFunction : unrolled
        /*0000*/                   HMMA.16816.F32 R12, R8, R10, R12 ;
        /*0010*/                   HMMA.16816.F32 R16, R8, R11, R16 ;
        /*0020*/                   EXIT ;
        /*0030*/                   BRA 0x30;
"""


def test_main_loop_is_the_innermost_loop_with_the_most_mma_work():
    stats = A.sass_by_function(CANNED_LOOPS)
    loop = stats["loops"].loop
    assert (loop.start, loop.end) == (0x40, 0x80)
    assert (loop.instructions, loop.hmma, loop.hgmma, loop.mma, loop.mma_units) == (5, 2, 0, 2, 2.0)
    assert loop.non_mma_per_mma == pytest.approx(3 / 2)
    assert loop.load_widths == {128: 2}            # LDG.128 + LDGSTS.128; the outer loop's U16 is outside
    # Two back edges to one target are one loop, up to the last; a warpgroup's HGMMA.64x128x16
    # gives each warp 16x128x16 = 16 m16n8k16 units; TMA copies count under "tma".
    hopper = stats["hopper"].loop
    assert (hopper.start, hopper.end, hopper.instructions, hopper.hgmma) == (0x0, 0x60, 7, 2)
    assert hopper.mma_units == 32.0 and hopper.non_mma_per_mma == pytest.approx(5 / 32)
    assert hopper.load_widths == {64: 1, "tma": 1}
    assert stats["unrolled"].loop is None          # no back edge around the MMAs
    assert A.parse_sass(CANNED_DUMP, "my_kernel").loop is None   # its only back edge holds no MMA


def test_main_loop_with_inner_trips_weights_the_nested_mma_loops():
    """The CUDA extension's rows: its MMAs sit in short head-dim loops inside the loop over key
    tiles, so the metric takes the outermost MMA loop (0x30..0xa0 here) and counts the nested
    loop's five instructions inner_trips times."""
    loop = A.main_loop(A.instructions_by_function(CANNED_LOOPS)["loops"], inner_trips=3)
    assert (loop.start, loop.end) == (0x30, 0xa0)
    assert (loop.instructions, loop.hmma, loop.mma_units) == (3 * 5 + 3, 6, 6.0)
    assert loop.non_mma_per_mma == pytest.approx((18 - 6) / 6)
    assert loop.load_widths == {16: 1, 128: 6}
    assert A.main_loop(A.instructions_by_function(CANNED_LOOPS)["loops"], inner_trips=1).instructions == 8


@pytest.mark.parametrize("opcode, units", [
    ("HMMA.16816.F32", 1.0), ("HMMA.16816.F32.BF16", 1.0), ("HMMA.1688.F32.TF32", 0.5),
    ("HGMMA.64x128x16.F32", 16.0), ("HGMMA.64x64x16.F32.BF16", 8.0), ("HGMMA.64x256x16.F32", 32.0),
    ("HGMMA.64x32x8.F32.TF32", 2.0), ("LDG.E.128", 0.0), ("IMAD", 0.0),
])
def test_mma_units(opcode, units):
    assert A.mma_units(opcode) == units


def test_unknown_mma_shape_is_an_error_not_a_guess():
    with pytest.raises(A.AuditError, match="HMMA shape"):
        A.mma_units("HMMA.999.F32")


def test_branch_target_reads_the_last_address():
    parse = A.instructions_by_function
    [bra, brx, iadd] = parse("\t\tFunction : k\n        /*0100*/ @!P0 BRA 0x40 ;\n"
                             "        /*0110*/ BRA.U !UP0, 0x1a0 ;\n        /*0120*/ IADD3 R1, R1, 0x10, RZ ;\n")["k"]
    assert (bra.address, A.branch_target(bra)) == (0x100, 0x40)
    assert A.branch_target(brx) == 0x1a0 and A.branch_target(iadd) is None


def test_loop_budget_misses_make_the_row_not_ok():
    loop = A.sass_by_function(CANNED_LOOPS)["loops"].loop     # 1.5 non-MMA per MMA, 128-bit loads, no HGMMA
    assert A.budget_misses(None, loop, "sm_90") == []
    assert A.budget_misses(LoopBudget(max_non_mma_per_mma=4, min_load_bits=64), loop, "sm_80") == []
    misses = A.budget_misses(LoopBudget(max_non_mma_per_mma=1, min_load_bits=256, hgmma_archs=("sm_90",)),
                             loop, "sm_90")
    assert len(misses) == 3 and "1.50 non-MMA" in misses[0] and "narrower than 256" in misses[1]
    assert "HGMMA" in misses[2]
    assert A.budget_misses(LoopBudget(hgmma_archs=("sm_90",)), loop, "sm_80") == []
    assert "no main loop" in A.budget_misses(LoopBudget(max_non_mma_per_mma=4), None, "sm_80")[0]
    # The same through make_row: resources fine, but the budget missed.
    sass = A.sass_by_function(CANNED_LOOPS)["loops"]
    kw = dict(kernel="k", config="c", dtype="fp16", arch="sm_80", resources={"REG": 64, "SHARED": 0},
              sass=sass, dynamic_shared=4096, reserved_in_static=False, num_warps=4, matmul=True, ptxas=None)
    good = A.make_row(**kw)
    bad = A.make_row(**kw, budget=LoopBudget(max_non_mma_per_mma=1))
    assert set(A.ROW_KEYS) <= set(good) and good["ok"] and not bad["ok"]
    assert (good["loop_instructions"], good["loop_mma"], good["loop_non_mma_per_mma"],
            good["loop_load_widths"]) == (5, 2, 1.5, {128: 2})
    assert "1.50 non-MMA" in A.why_not_ok(bad)


def test_audit_modules_do_not_import_the_extension():
    """Importing the audit package imports neither the extension loader nor its audit rows
    (report.py reaches extension_targets by name when the audit runs)."""
    code = ("import sys, tubevit_fast.audit\n"
            "assert 'tubevit_fast.extension' not in sys.modules\n"
            "assert 'tubevit_fast.audit.extension_targets' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert A.EXTENSION_PROVIDER == "tubevit_fast.audit.extension_targets"


@pytest.mark.parametrize("spill, ptxas, matmul, mma, occ, ok", [
    (0, None, True, 4, 0.5, True),
    (0, {"spill_stores": 0, "spill_loads": 0}, False, 0, 0.5, True),      # no matmul: MMA not needed
    (8, None, True, 4, 0.5, False),                                       # local memory
    (0, {"spill_stores": 4, "spill_loads": 0}, True, 4, 0.5, False),      # ptxas-reported spill
    (0, None, True, 0, 0.5, False),                                       # matmul without MMA
    (0, None, False, 0, 0.0, False),                                      # cannot launch
])
def test_row_ok(spill, ptxas, matmul, mma, occ, ok):
    assert A.row_ok(spill, ptxas, matmul, mma, occ) is ok


def test_cuobjdump_path_prefers_the_wheel_then_cuda_home(tmp_path, monkeypatch):
    try:
        wheel = C._nvidia_bin("cuobjdump")
    except A.AuditError:
        wheel = None
    if wheel is not None:
        assert A.cuobjdump_path() == wheel
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "cuobjdump").write_text("")

    def no_wheel_tool(tool):
        raise A.AuditError("not in this wheel")

    monkeypatch.setattr(C, "_nvidia_bin", no_wheel_tool)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert A.cuobjdump_path() == str(tmp_path / "bin" / "cuobjdump")


# --------------------------------------------------------------------------------------
# Occupancy on hand-computed numbers
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, regs, smem, warps, expected", [
    # 168 regs x 32 = 5376 per warp (= 21 x 256); 16384 per register quarter -> 3 warps per
    # quarter -> 12 warps -> 3 blocks of 4; smem (8192 + 1024 reserved) allows 18: 12/64.
    ("sm_80", 168, 8192, 4, 12 / 64),
    # 32 regs -> 1024 per warp -> 64 warps; no smem; 16 blocks of 4 warps = the 64-warp cap.
    ("sm_80", 32, 0, 4, 1.0),
    # smem-bound: 64 KB + 1 KB per block; sm_80 has 164 KB -> 2 blocks, sm_90 228 KB -> 3
    # blocks; regs (64 -> 2048/warp -> 32 warps -> 4 blocks of 8) do not bind.
    ("sm_80", 64, 65536, 8, 16 / 64),
    ("sm_90", 64, 65536, 8, 24 / 64),
    # 192 regs -> 6144 per warp: 2 warps per quarter -> 8 warps -> 4 blocks of 2 warps
    # (a pooled 65536 / 6144 = 10 warps would wrongly give 5 blocks).
    ("sm_90", 192, 0, 2, 8 / 64),
    # 1 warp per block hits the 32-blocks-per-SM cap: 32 warps.
    ("sm_90", 16, 0, 1, 32 / 64),
    # 33 regs round up to 1280 per warp: 12 warps per quarter -> 48 warps -> 12 blocks of 4.
    ("sm_80", 33, 0, 4, 48 / 64),
    # cannot launch: more shared memory than a block may have, or more than 255 registers.
    ("sm_80", 32, 163 * 1024 + 1, 4, 0.0),
    ("sm_90", 32, 163 * 1024 + 1, 4, 4 / 64),   # but fits sm_90 (227 KB max): 1 block of 4 warps
    ("sm_80", 256, 0, 4, 0.0),
])
def test_estimate_occupancy(arch, regs, smem, warps, expected):
    assert A.estimate_occupancy(arch, regs, smem, warps) == pytest.approx(expected)


# --------------------------------------------------------------------------------------
# In-process behaviour that needs no compilation
# --------------------------------------------------------------------------------------

def test_refuses_interpreted_function():
    from triton.runtime.interpreter import InterpretedFunction

    from tubevit_fast.kernels.audit_spec import AuditTarget

    def raw(x_ptr):
        pass

    target = AuditTarget(kernel="raw", fn=InterpretedFunction(raw), signature={"x_ptr": "*fp16"},
                         constexprs={}, config="c")
    with pytest.raises(A.AuditError, match="TRITON_INTERPRET"):
        A.audit_target(target, "fp16", "sm_80")


def test_missing_module_is_a_failed_row():
    rows = A.audit(modules=["tubevit_fast.kernels._no_such_kernel_module"])
    assert len(rows) == 1
    assert rows[0]["config"] == A.MISSING and rows[0]["ok"] is False
    assert set(A.ROW_KEYS) <= set(rows[0])


def test_broken_import_is_an_error_not_missing(tmp_path, monkeypatch):
    # Only a ModuleNotFoundError for the audited module itself means "missing"; a kernel
    # module that exists but imports something absent must fail loudly.
    (tmp_path / "_audit_broken_kernels.py").write_text("import _audit_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="_audit_no_such_dependency_xyz"):
        A.audit(modules=["_audit_broken_kernels"])
    with pytest.raises(ModuleNotFoundError):
        A.audit(modules=["_audit_no_such_parent_pkg_xyz.child"])


def test_bad_arch_and_dtype_rejected():
    with pytest.raises(A.AuditError):
        A.audit(archs=["sm_75"], modules=[])
    with pytest.raises(A.AuditError):
        A.audit(dtypes=["fp8"], modules=[])


def test_external_rows_are_added_and_checked():
    row = {k: None for k in A.ROW_KEYS}
    row.update(kernel="csrc_flash_fwd", config="nvcc", dtype="fp16", arch="sm_80", spill_bytes=0,
               mma_instructions=10, load_widths={128: 4}, matmul=True, ok=True)

    def good(archs, dtypes):
        return [dict(row)]

    def bad(archs, dtypes):
        return [{"kernel": "x"}]

    A.register_external(good)
    try:
        rows = A.audit(modules=[])
        assert [r["kernel"] for r in rows] == ["csrc_flash_fwd"]
        assert A.audit(modules=[], kernels=["other*"]) == []
        A.register_external(bad)
        with pytest.raises(A.AuditError, match="without"):
            A.audit(modules=[])
    finally:
        for fn in (good, bad):
            if fn in R._EXTERNAL:
                R._EXTERNAL.remove(fn)


def _named_row(kernel):
    row = {k: None for k in A.ROW_KEYS}
    row.update(kernel=kernel, config="nvcc", dtype="fp16", arch="sm_80", registers=64, spill_bytes=0,
               shared_bytes=0, occupancy=0.5, mma_instructions=10, load_widths={128: 4}, matmul=True, ok=True)
    return row


def test_named_external_is_audited_by_default_or_by_name(monkeypatch):
    """An external registered with a module name (as the CUDA extension is) is audited by default
    and by --module NAME, not when other modules are named; anonymous ones always."""
    monkeypatch.setattr(R, "_EXTERNAL", [])
    monkeypatch.setattr(R, "_EXTERNAL_MODULE", {})
    monkeypatch.setattr(R, "AUDITED_MODULES", ())     # no Triton compilation here

    def named(archs, dtypes):
        return [_named_row("csrc_kernel")]

    def anonymous(archs, dtypes):
        return [_named_row("other_kernel")]

    A.register_external(named, module="pkg._ext")
    A.register_external(anonymous)
    assert [r["kernel"] for r in A.audit()] == ["csrc_kernel", "other_kernel"]
    assert [r["kernel"] for r in A.audit(modules=["pkg._ext"])] == ["csrc_kernel", "other_kernel"]
    assert [r["kernel"] for r in A.audit(modules=[])] == ["other_kernel"]
    assert A.audit(modules=["pkg._ext"], kernels="csrc_*")[0]["kernel"] == "csrc_kernel"


def test_unbuilt_external_is_a_notice_or_a_missing_row(monkeypatch):
    monkeypatch.setattr(R, "_EXTERNAL", [])
    monkeypatch.setattr(R, "_EXTERNAL_MODULE", {})
    monkeypatch.setattr(R, "AUDITED_MODULES", ())

    def unbuilt(archs, dtypes):
        raise A.ExternalUnavailable("pkg._ext is not available\n(no build)")

    A.register_external(unbuilt, module="pkg._ext")
    notices = []
    assert A.audit(notice=notices.append) == []
    assert len(notices) == 1 and "pkg._ext" in notices[0] and "\n" not in notices[0]
    notices.clear()
    [row] = A.audit(modules=["pkg._ext"], notice=notices.append)    # asked for by name: a failure
    assert row["kernel"] == "pkg._ext" and row["config"] == A.MISSING and row["ok"] is False
    assert set(A.ROW_KEYS) <= set(row) and "no build" in row["details"]["error"] and notices == []


def test_extension_is_registered_and_unbuilt_is_one_line(monkeypatch, capsys):
    """tubevit_fast._C is a named external of the audit; when it is not built the CLI prints one
    line about it and --strict still passes (it only judges what is built)."""
    from tubevit_fast import extension
    assert A.extension_rows in R._EXTERNAL
    assert R._EXTERNAL_MODULE[A.extension_rows] == A.EXTENSION_MODULE == "tubevit_fast._C"
    monkeypatch.setattr(R, "_EXTERNAL", [A.extension_rows])
    monkeypatch.setattr(R, "AUDITED_MODULES", ())
    monkeypatch.setattr(extension, "unavailable_reason", lambda: "tubevit_fast._C is not available (test)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # main() must not re-exec pytest
    assert A.main(["--json", "--strict"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == []
    lines = [line for line in err.splitlines() if "tubevit_fast._C" in line]
    assert len(lines) == 1 and "not built" in lines[0], err
    assert A.main(["--json", "--strict", "--module", "tubevit_fast._C"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kernel"], r["config"], r["ok"]) for r in rows] == [("tubevit_fast._C", A.MISSING, False)]


def test_table_renders_all_row_kinds():
    ok_row = {"kernel": "k", "config": "c", "dtype": "fp16", "arch": "sm_80", "registers": 32,
              "spill_bytes": 0, "shared_bytes": 0, "occupancy": 1.0, "mma_instructions": 4,
              "load_widths": {128: 2}, "loop_instructions": 40, "loop_mma": 4, "loop_non_mma_per_mma": 9.0,
              "loop_load_widths": {16: 8, 128: 2, "tma": 1}, "matmul": True, "ok": True,
              "details": {"hmma": 4, "hgmma": 0, "ldg_widths": {128: 2}, "ldgsts_widths": {}, "tma": 0}}
    missing = A.empty_row("mod.x", A.MISSING, None, None, False, error="module mod.x does not exist")
    text = A.format_table([ok_row, missing])
    assert "4 HMMA" in text and "128b x2" in text and "MISSING" in text and "100.0" in text
    assert "9.00 (40/4)" in text and "16b x8 128b x2; TMA x1" in text and "loop non-MMA/MMA" in text
    hopper = dict(ok_row, arch="sm_90", loop_non_mma_per_mma=2.5, loop_instructions=30, loop_mma=2,
                  loop_load_widths={128: 4}, ok=False)
    summary = A.format_summary([ok_row, dict(ok_row, registers=40, loop_non_mma_per_mma=11.0), hopper, missing])
    lines = summary.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| kernel | arch | rows |")
    assert "| k | sm_80 | 2 | 32-40 |" in lines[2] and "9.00-11.00" in lines[2] and "16, 128, TMA" in lines[2]
    assert lines[2].endswith("| 2/2 |") and "2.50" in lines[3] and lines[3].endswith("| 0/1 |")


# --------------------------------------------------------------------------------------
# The CLI, compiling for real (in a subprocess without TRITON_INTERPRET)
# --------------------------------------------------------------------------------------

def _run_cli(*args: str, interpret: bool = False, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"     # the CLI must drop it itself
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "tubevit_fast.audit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(proc: subprocess.CompletedProcess) -> list[dict]:
    rows = json.loads(proc.stdout)
    for r in rows:
        assert tuple(r) == A.ROW_KEYS, f"row keys {tuple(r)}"
    return rows


# The probe kernels' tl.dot takes 16-bit inputs; fp32 would be a tf32 dot of another shape.
PROBE_DTYPES = ("fp16", "bf16")
# The library's full audit: every dtype the kernels run.
LIBRARY_DTYPES = A.DTYPES


def _dtype_flags(dtypes) -> list[str]:
    return [flag for dtype in dtypes for flag in ("--dtype", dtype)]


@pytest.mark.aot
def test_probe_kernels_audit_can_fail():
    """A declared matmul without tl.dot has no HMMA/HGMMA: the audit must flag it."""
    proc = _run_cli("--module", "_audit_probe_kernel", "--json", "--strict", *_dtype_flags(PROBE_DTYPES))
    assert proc.returncode == 1, proc.stderr
    rows = _rows(proc)
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in rows} == {
        (k, d, a) for k in ("probe_dot_matmul", "probe_nested_dot", "probe_nodot_matmul")
        for d in PROBE_DTYPES for a in A.ARCHS}
    for r in rows:
        assert r["spill_bytes"] == 0 and r["registers"] > 0 and 0 < r["occupancy"] <= 1, r
        assert r["load_widths"] and all(int(w) in (8, 16, 32, 64, 128) for w in r["load_widths"]), r
        if r["kernel"] != "probe_nodot_matmul":
            assert r["ok"] and r["mma_instructions"] > 0, r
            assert r["shared_bytes"] > 0, r        # tl.dot operands are staged in shared memory
        else:
            assert not r["ok"] and r["mma_instructions"] == 0 and r["matmul"], r
    assert "matmul without HMMA/HGMMA" in proc.stderr
    # Without --strict the same findings exit 0.
    lenient = _run_cli("--module", "_audit_probe_kernel", "--json", "--kernel", "probe_nodot_*",
                       "--arch", "sm_80", "--dtype", "fp16")
    assert lenient.returncode == 0, lenient.stderr
    assert [(r["kernel"], r["ok"]) for r in _rows(lenient)] == [("probe_nodot_matmul", False)]


@pytest.mark.aot
def test_main_loop_of_probe_kernels_is_one_k_step():
    """On real cubins the main loop found is the K loop (the inner one of probe_nested_dot): one pass
    holds exactly one K step of the tile's MMA work, on sm_80 (HMMA) and sm_90 (HGMMA); its loads
    are 16-bit without divisibility hints on K and N, 128-bit vectors with them, which also cuts the
    loop's non-MMA instructions per MMA."""
    import _audit_probe_kernel as P
    proc = _run_cli("--module", "_audit_probe_kernel", "--json", "--details", "--kernel", "probe_*dot*",
                    "--dtype", "fp16")
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kernel"], r["config"], r["arch"]): r for r in json.loads(proc.stdout)}
    # Progress on stderr, one line per kernel and dtype (the JSON on stdout stays clean).
    assert {line.split()[1] for line in proc.stderr.splitlines() if line.startswith("audit: probe_")} == \
        {kernel for kernel, _, _ in rows}
    units = {(t.kernel, t.config): P.loop_mma_units(t) for t in P.audit_targets("fp16")}
    for (kernel, config, arch), r in rows.items():
        if kernel == "probe_nodot_matmul":
            assert r["loop_instructions"] is None and r["loop_non_mma_per_mma"] is None, r
            continue
        loop = r["details"]["loop"]
        assert loop["mma_units"] == units[(kernel, config)], r
        assert (loop["hmma"], loop["hgmma"]) == ((r["loop_mma"], 0) if arch == "sm_80" else (0, r["loop_mma"])), r
        assert r["loop_non_mma_per_mma"] == pytest.approx((r["loop_instructions"] - r["loop_mma"]) / loop["mma_units"],
                                                          abs=0.01)
        assert r["loop_mma"] <= r["mma_instructions"] and r["loop_instructions"] > r["loop_mma"], r
    for arch in A.ARCHS:
        plain = rows[("probe_dot_matmul", "BM64-BN64-BK32-w4-s3", arch)]
        hinted = rows[("probe_dot_matmul", "BM64-BN64-BK32-w4-s3-KN16", arch)]
        assert set(plain["loop_load_widths"]) == {"16"} and set(hinted["loop_load_widths"]) == {"128"}, (plain, hinted)
        assert hinted["loop_non_mma_per_mma"] < plain["loop_non_mma_per_mma"]


SPILL_SCRIPT = """
import dataclasses, json
import tubevit_fast.audit as A
import _audit_probe_kernel as P
t = P.audit_targets("fp16")[0]
# A 128x128 fp32 accumulator held by a single warp: 512 values per thread cannot fit in registers.
t = dataclasses.replace(t, constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=1,
                        num_stages=1, config="BM128-BN128-BK32-w1-s1")
row = A.audit_target(t, "fp16", "sm_80")
print(json.dumps({"row": {k: row[k] for k in A.ROW_KEYS if k != "load_widths"}, "details": row["details"],
                  "why": A.why_not_ok(row)}))
"""


@pytest.mark.aot
def test_spills_are_detected():
    """cuobjdump books ptxas' spill slots as STACK (LOCAL stays 0): the audit must still see them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)])
    proc = subprocess.run([sys.executable, "-c", SPILL_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    row, det = out["row"], out["details"]
    assert row["spill_bytes"] > 0 and not row["ok"], out
    assert row["mma_instructions"] > 0, out           # not ok because of the spill alone
    assert det["ptxas"]["spill_stores"] > 0, out
    assert row["spill_bytes"] == det["stack_bytes"] + det["local_bytes"]
    assert "spills" in out["why"]


@pytest.mark.aot
def test_cli_drops_triton_interpret_and_reports_missing_modules():
    proc = _run_cli("--module", "_audit_probe_kernel", "--module", "tubevit_fast.kernels._no_such_kernel",
                    "--kernel", "probe_dot_matmul", "--arch", "sm_90", "--dtype", "bf16", "--json", "--strict",
                    interpret=True)
    assert proc.returncode == 1, proc.stderr          # the missing module fails --strict
    rows = _rows(proc)
    probe = [r for r in rows if r["kernel"] == "probe_dot_matmul"]
    assert len(probe) == 2 and all(r["ok"] and r["mma_instructions"] > 0 for r in probe), rows   # two configs
    assert [r["config"] for r in rows if r["kernel"] == "tubevit_fast.kernels._no_such_kernel"] == [A.MISSING]
    table = _run_cli("--module", "_audit_probe_kernel", "--kernel", "probe_dot_matmul", "--arch", "sm_80",
                     "--dtype", "fp16")
    assert table.returncode == 0, table.stderr
    assert "probe_dot_matmul" in table.stdout and "HMMA" in table.stdout and "occ %" in table.stdout


@pytest.mark.aot
def test_full_audit_of_library_kernels():
    """Every kept config of every library kernel compiles for sm_80 and sm_90 in fp16, bf16 and fp32
    with no spills, every matmul kernel uses the tensor cores, and the fp32 configs (exact dots on
    FMAs) declare no matmul."""
    proc = _run_cli("--json", "--strict", *_dtype_flags(LIBRARY_DTYPES))
    rows = _rows(proc)
    assert not [r for r in rows if r["config"] in (A.MISSING, A.NO_TARGETS)], proc.stderr
    assert {r["arch"] for r in rows} == set(A.ARCHS)
    assert {r["dtype"] for r in rows} == set(LIBRARY_DTYPES)
    problems = []
    for r in rows:
        where = f"{r['kernel']} {r['config']} {r['dtype']} {r['arch']}"
        if r["registers"] is None:
            problems.append(f"{where}: did not compile")
            continue
        if r["spill_bytes"] != 0:
            problems.append(f"{where}: {r['spill_bytes']} B of local memory (spills) at {r['registers']} registers")
        if r["matmul"] and not r["mma_instructions"] > 0:
            problems.append(f"{where}: matmul kernel without HMMA/HGMMA")
        if r["dtype"] == "fp32" and r["matmul"]:
            problems.append(f"{where}: an fp32 config declared as a tensor-core matmul")
    assert not problems, "\n".join(problems)
    # Every module's every target shows up for both dtypes and both archs. The targets are listed
    # in a subprocess without TRITON_INTERPRET, like the CLI's: kernel modules read it at import
    # (the interpreter keeps a single small autotune config) and conftest sets it here.
    seen = {(r["kernel"], r["config"], r["dtype"], r["arch"]) for r in rows}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)])
    listing = subprocess.run([sys.executable, "-c", TARGETS_SCRIPT], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
    assert listing.returncode == 0, listing.stderr
    targets = json.loads(listing.stdout.strip().splitlines()[-1])
    assert set(targets) == {f"{name} {dtype}" for name in A.AUDITED_MODULES for dtype in LIBRARY_DTYPES}
    for where, pairs in targets.items():
        assert pairs, f"{where}: audit_targets is empty"
        dtype = where.split()[1]
        for kernel, config in pairs:
            for arch in A.ARCHS:
                assert (kernel, config, dtype, arch) in seen, f"{where}: {kernel} {config} {arch}"
    assert proc.returncode == 0, proc.stderr[-3000:]


TARGETS_SCRIPT = f"""
import importlib, json
import tubevit_fast.audit as A
print(json.dumps({{f"{{name}} {{dtype}}": [(t.kernel, t.config) for t in importlib.import_module(name).audit_targets(dtype)]
                  for name in A.AUDITED_MODULES for dtype in {LIBRARY_DTYPES!r}}}))
"""
