"""Compiling one Triton AuditTarget ahead of time and auditing its cubin (no GPU needed).

Each target (tubevit_fast.kernels.audit_spec.AuditTarget) is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` for sm_80 or sm_90, and its
cubin is read with the cuobjdump shipped in Triton's wheel (`--dump-resource-usage` and
`--dump-sass` in one call, parsed by cubin.py).

ptxas' own `-v` report (spill stores/loads) is captured from the compile when it runs; when the
cubin comes from Triton's cache it is read from the audit's own small cache (keyed by the
cubin's sha256, next to Triton's cache), or else reproduced by rerunning ptxas on the kernel's
PTX with Triton's flags. A ptxas-reported spill also makes a row not ok.

Triton's @triton.jit returns an interpreter object instead of a compilable JITFunction when
TRITON_INTERPRET=1 is set at decoration time; such functions are refused (AuditError).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import time

from tubevit_fast.audit.cubin import AuditError, cuobjdump, parse_ptxas_log, parse_resource_usage, parse_sass
from tubevit_fast.audit.rows import ARCHS, empty_row, make_row


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


def compile_target(target, capability: int):
    """triton.compile for one target; returns (compiled kernel, ptxas log captured or '')."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    fn = _jit_function(target.fn, target.kernel)
    src = _make_source(target, fn)
    buf = io.StringIO()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True   # Triton prints ptxas' -v log when it runs ptxas
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                    options={"num_warps": target.num_warps, "num_stages": target.num_stages})
    return kernel, buf.getvalue()


def audit_target(target, dtype: str, arch: str, workdir: str | None = None) -> dict:
    """Compile one AuditTarget for one arch and audit its cubin; returns one row."""
    if arch not in ARCHS:
        raise AuditError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    _jit_function(target.fn, target.kernel)   # refusing the interpreter is not a row error
    capability = ARCHS[arch]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tubevit_audit_"))
        try:
            compiled, log = compile_target(target, capability)
        except Exception as exc:  # a kernel that does not compile is a failed row, not a crash
            return empty_row(target.kernel, target.config, dtype, arch, target.matmul,
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
    return make_row(
        kernel=target.kernel, config=target.config, dtype=dtype, arch=arch, resources=res, sass=sass,
        dynamic_shared=int(compiled.metadata.shared),
        # On sm_90 ptxas counts the driver's 1 KB reservation as static shared memory of the
        # function (section .nv.shared.reserved.*); do not count it twice.
        reserved_in_static=b".nv.shared.reserved" in compiled.asm["cubin"],
        num_warps=int(compiled.metadata.num_warps), matmul=target.matmul, ptxas=ptxas,
        budget=getattr(target, "loop_budget", None),
        details={"num_stages": target.num_stages, "ptxas_log": ptxas_source,
                 "compile_seconds": round(compile_s, 3)})
