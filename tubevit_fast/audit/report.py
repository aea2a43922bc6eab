"""The audit over modules, its table/JSON/summary output and the command line.

Every module of AUDITED_MODULES exposes `audit_targets(dtype) -> list[AuditTarget]`
(tubevit_fast.kernels.audit_spec), one entry per kernel x kept autotune config; each target is
compiled for every arch (triton_targets.audit_target). A module that does not exist yet
(ModuleNotFoundError for that very module) gives one row with config "missing" and ok False; a
module without audit_targets, or whose audit_targets returns nothing for a dtype, gives config
"no-targets"; one whose audit_targets raises for a dtype gives config "error". A target that
fails to compile gives a row with ok False, null numbers and details["error"].

Kernels that are not Triton add rows with `register_external(fn, module=None)`:
`fn(archs=..., dtypes=...)` returns a list of row dicts with (at least) the ROW_KEYS, or
raises ExternalUnavailable when its kernels are not built (rows without the loop keys get
them as None). The compiled CUDA extension is one: `extension_rows` calls `audit_rows` of
extension_targets.py (EXTENSION_PROVIDER), imported by that name when the audit runs, the way
the kernel modules are, since it imports torch and the extension loader. It is registered under the module name
EXTENSION_MODULE: its rows are listed beside the Triton ones by default and with
`--module tubevit_fast._C`, and judged by --strict like them. When it is not built the audit
prints one line saying so and goes on (not a failure), unless `--module tubevit_fast._C` asked
for it by name, which gives a "missing" row.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import sys
import tempfile
import time
from typing import Callable, Iterable, Sequence

from tubevit_fast.audit.cubin import AuditError
from tubevit_fast.audit.rows import (ARCHS, DTYPES, LOOP_KEYS, MISSING, NO_TARGETS, ROW_KEYS, ExternalUnavailable,
                                     empty_row, why_not_ok)
from tubevit_fast.audit.triton_targets import audit_target

AUDITED_MODULES: tuple[str, ...] = (
    "tubevit_fast.kernels.tube_embed",
    "tubevit_fast.kernels.attention",
)
TARGETS_ERROR = "error"   # config of the row of a module whose audit_targets raised

_EXTERNAL: list[Callable[..., list[dict]]] = []
_EXTERNAL_MODULE: dict[Callable[..., list[dict]], str] = {}


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
EXTENSION_PROVIDER = "tubevit_fast.audit.extension_targets"


def extension_rows(archs: Iterable[str] = tuple(ARCHS), dtypes: Iterable[str] = DTYPES) -> list[dict]:
    """Rows of the compiled CUDA extension (EXTENSION_PROVIDER's audit_rows); raises
    ExternalUnavailable if tubevit_fast._C is not built. Imports torch, so only when called."""
    return importlib.import_module(EXTENSION_PROVIDER).audit_rows(archs=tuple(archs), dtypes=tuple(dtypes))


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


def audit(kernels: Sequence[str] | str | None = None, archs: Iterable[str] = tuple(ARCHS),
          dtypes: Iterable[str] = DTYPES, modules: Sequence[str] | None = None,
          progress: Callable[[dict], None] | None = None,
          notice: Callable[[str], None] | None = None) -> list[dict]:
    """Compile and audit every target of `modules` (default AUDITED_MODULES) plus the rows of the
    registered external auditors (named ones only by default or when `modules` names them).
    `kernels`: names or fnmatch patterns to keep (None: all). An unavailable external gives one
    line to `notice` (default: stderr), or a "missing" row if `modules` names it.
    Returns a list of row dicts (ROW_KEYS + "details"); see tubevit_fast.audit.rows."""
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
                emit(empty_row(mod_name, MISSING, None, None, False, module=mod_name,
                               error=f"module {mod_name} does not exist"))
                continue
            get_targets = getattr(module, "audit_targets", None)
            for dtype in dtypes:
                try:
                    targets = list(get_targets(dtype)) if callable(get_targets) else []
                except Exception as exc:
                    emit(empty_row(mod_name, TARGETS_ERROR, dtype, None, False, module=mod_name,
                                   error=f"{mod_name}.audit_targets({dtype!r}) raised {type(exc).__name__}: {exc}"))
                    continue
                if not targets:
                    emit(empty_row(mod_name, NO_TARGETS, dtype, None, False, module=mod_name,
                                   error=f"{mod_name}.audit_targets({dtype!r}) gave no targets"
                                   if callable(get_targets) else f"{mod_name} has no audit_targets()"))
                    continue
                for target in targets:
                    if not _selected(target.kernel, patterns):
                        continue
                    for arch in archs:
                        if getattr(target, "archs", None) and arch not in target.archs:
                            continue   # a specialisation that no launch on this arch compiles
                        row = audit_target(target, dtype, arch, workdir)
                        row["details"]["module"] = mod_name
                        emit(row)
        for external in externals:
            name = _EXTERNAL_MODULE.get(external)
            try:
                ext_rows = external(archs=archs, dtypes=dtypes)
            except ExternalUnavailable as exc:
                if named is not None and name in named:
                    emit(empty_row(name, MISSING, None, None, False, module=name, error=str(exc)))
                else:
                    reason = " ".join(str(exc).split()) or "unavailable"
                    notice(f"not auditing {name or getattr(external, '__name__', external)}, it is not built: "
                           f"{reason}")
                continue
            for row in ext_rows:
                missing = [k for k in ROW_KEYS if k not in row and k not in LOOP_KEYS]
                if missing:
                    raise AuditError(f"external auditor {external!r} returned a row without {missing}")
                if _selected(row["kernel"], patterns):
                    for key in LOOP_KEYS:
                        row.setdefault(key, {} if key == "loop_load_widths" else None)
                    row.setdefault("details", {})
                    emit(row)
    return rows


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

def _widths(table: dict) -> str:
    """'16b x8 128b x4' (widths ascending) from {width: count}; JSON's string keys too."""
    ordered = sorted(((int(w), n) for w, n in table.items() if w != "tma"))
    return " ".join(f"{w}b x{n}" for w, n in ordered)


def _widths_text(row: dict) -> str:
    det = row.get("details") or {}
    parts = []
    for label, table in (("", det.get("ldg_widths", row.get("load_widths") or {})),
                         ("cp.async ", det.get("ldgsts_widths", {}))):
        if table:
            parts.append(label + _widths(table))
    if det.get("tma"):
        parts.append(f"TMA x{det['tma']}")
    return "; ".join(parts) or "-"


def _loop_loads_text(row: dict) -> str:
    table = row.get("loop_load_widths") or {}
    parts = [_widths(table)] if any(w != "tma" for w in table) else []
    if table.get("tma"):
        parts.append(f"TMA x{table['tma']}")
    return "; ".join(parts) or "-"


def _loop_text(row: dict) -> str:
    if row.get("loop_non_mma_per_mma") is None:
        return "-"
    return f"{row['loop_non_mma_per_mma']:.2f} ({row['loop_instructions']}/{row['loop_mma']})"


def _mma_text(row: dict) -> str:
    det = row.get("details") or {}
    if row.get("mma_instructions") is None:
        return "-"
    if "hmma" not in det:
        return str(row["mma_instructions"])
    kinds = [f"{det[k]} {k.upper()}" for k in ("hmma", "hgmma") if det.get(k)]
    return ", ".join(kinds) or "0"


def format_table(rows: list[dict]) -> str:
    """One line per row. "loop non-MMA/MMA": non-MMA instructions per m16n8k16 MMA of the main
    loop, then (its instructions / its MMA instructions)."""
    header = ("kernel", "config", "dtype", "arch", "regs", "spill B", "smem B", "occ %", "MMA instr",
              "load widths", "loop non-MMA/MMA", "loop loads", "ok")
    lines = []
    for r in rows:
        if r["registers"] is None:
            err = (r.get("details") or {}).get("error", "")
            status = {MISSING: "MISSING", NO_TARGETS: "NO TARGETS"}.get(r["config"], "ERROR")
            blank = ("-",) * 5
            lines.append((r["kernel"], r["config"], r["dtype"] or "-", r["arch"] or "-", *blank,
                          err.splitlines()[0][:60] if err else "-", "-", "-", status))
            continue
        occ = "-" if r["occupancy"] is None else f"{100 * r['occupancy']:.1f}"
        mma = _mma_text(r) if r["matmul"] or r["mma_instructions"] else f"{_mma_text(r)} (no dot)"
        lines.append((r["kernel"], r["config"], r["dtype"], r["arch"], str(r["registers"]),
                      str(r["spill_bytes"]), str(r["shared_bytes"]), occ, mma, _widths_text(r),
                      _loop_text(r), _loop_loads_text(r), "ok" if r["ok"] else "FAIL"))
    return _aligned(header, lines)


def _aligned(header, lines) -> str:
    widths = [max([len(h)] + [len(str(line[i])) for line in lines]) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _span(values, fmt="{}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def format_summary(rows: list[dict]) -> str:
    """A markdown table, one line per (kernel, arch): the README's audit table."""
    header = ("kernel", "arch", "rows", "registers", "spill B", "shared KB", "occupancy", "MMA instr",
              "loop non-MMA/MMA", "loop instr / MMA", "loop load widths (bits)", "ok")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["registers"] is not None:
            groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kernel, arch), rs in sorted(groups.items()):
        widths = sorted({int(w) for r in rs for w in (r.get("loop_load_widths") or {}) if w != "tma"})
        tma = any((r.get("loop_load_widths") or {}).get("tma") for r in rs)
        loads = ", ".join(map(str, widths)) + (", TMA" if tma else "")
        instr = _span([r.get("loop_instructions") for r in rs]) + " / " + _span([r.get("loop_mma") for r in rs])
        cells = (kernel, arch, str(len(rs)), _span([r["registers"] for r in rs]),
                 _span([r["spill_bytes"] for r in rs]), _span([r["shared_bytes"] / 1024 for r in rs], "{:.0f}"),
                 _span([100 * r["occupancy"] for r in rs], "{:.1f}%"), _span([r["mma_instructions"] for r in rs]),
                 _span([r.get("loop_non_mma_per_mma") for r in rs], "{:.2f}"),
                 instr if instr != "- / -" else "-", loads or "-", f"{sum(r['ok'] for r in rs)}/{len(rs)}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _json_row(row: dict, details: bool) -> dict:
    out = {k: row[k] for k in ROW_KEYS}
    for key in ("load_widths", "loop_load_widths"):
        table = row[key] or {}
        out[key] = {str(w): n for w, n in table.items()}
    if details:
        out["details"] = row.get("details", {})
    return out


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
                    "memory, occupancy, tensor-core instructions, load widths, the main loop's instruction "
                    "mix).")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--details", action="store_true", help="with --json: add each row's 'details'")
    parser.add_argument("--summary", action="store_true",
                        help="print a markdown table with one line per kernel and arch instead of one per row")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="repeatable; default both")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeatable; default all")
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
    # A full audit compiles hundreds of kernels (minutes without a warm Triton cache): one progress
    # line on stderr per kernel and dtype, and one per row on a terminal.
    current = [None, 0]

    def progress(row):
        current[1] += 1
        group = (row["kernel"], row["dtype"])
        if sys.stderr.isatty():
            print(f"  audited {row['kernel']} {row['config']} {row['dtype']} {row['arch']}", file=sys.stderr)
        elif group != current[0]:
            current[0] = group
            print(f"audit: {row['kernel']} {row['dtype']} ({current[1]} rows, {time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
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
    elif args.summary:
        print(format_summary(rows))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} rows, {len(bad)} not ok, {elapsed:.1f} s")
    for r in bad:
        print(f"audit: NOT OK: {r['kernel']} {r['config']} {r['dtype']} {r['arch']}: {why_not_ok(r)}",
              file=sys.stderr)
    print(f"audit: {len(rows)} rows, {len(bad)} not ok in {elapsed:.1f} s", file=sys.stderr)
    return 1 if args.strict and bad else 0
