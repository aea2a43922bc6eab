"""What this installation can run: `python -m tubevit_fast.info [--json]`.

Prints the versions (tubevit_fast, torch and its CUDA, triton), the visible GPUs, and for the
compiled CUDA extension (tubevit_fast._C) where it is, what it was built for (TORCH_CUDA_ARCH_LIST,
head dims), which machine code (SASS) and PTX the binary holds (read with cuobjdump) and which of
them each visible GPU would execute. Exit status 0 whatever is missing: it reports, it does not judge.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys

import torch

from tubevit_fast import extension
from tubevit_fast.audit.cubin import cuobjdump_path


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def binary_targets(lib: str | None = None) -> dict[str, list[str]]:
    """{"sass": ["sm_80", "sm_90a"], "ptx": ["compute_80"]}: the machine code and PTX embedded in
    the built module (cuobjdump --list-elf / --list-ptx). Raises RuntimeError without cuobjdump."""
    lib = lib or extension.library_path()
    if lib is None or cuobjdump_path() is None:
        raise RuntimeError("needs the built tubevit_fast._C and cuobjdump (Triton's wheel or CUDA_HOME)")
    found = {"sass": set(), "ptx": set()}
    for kind, flag in (("sass", "--list-elf"), ("ptx", "--list-ptx")):
        proc = subprocess.run([cuobjdump_path(), flag, lib], capture_output=True, text=True)
        # "ELF file    1: attention_fwd_hdim64.sm_80.cubin", "PTX file    1: attention_fwd_hdim64.sm_80.ptx"
        for m in re.finditer(r"\.(sm_\d+[a-z]?)\.(?:cubin|ptx)\s*$", proc.stdout, flags=re.M):
            found[kind].add(m.group(1) if kind == "sass" else m.group(1).replace("sm_", "compute_"))
    return {kind: sorted(v, key=lambda a: (_version(a), a)) for kind, v in found.items()}


def runs_on(capability: tuple[int, int], targets: dict[str, list[str]]) -> str | None:
    """What a GPU of compute `capability` executes from `targets` (binary_targets()): "sm_XY machine
    code", "compute_XY PTX, compiled by the driver", or None if nothing in the binary can run there.
    Machine code runs on its own major version at the same or a higher minor one; the
    arch-specific sm_90a only on 9.0. PTX runs on its own version and everything newer, except the
    arch-specific compute_90a."""
    major, minor = capability
    sass = [a for a in targets.get("sass", ()) if _runs_sass(a, major, minor)]
    if sass:
        return f"{max(sass, key=lambda a: (_version(a), a.endswith('a')))} machine code"
    ptx = [a for a in targets.get("ptx", ()) if not a.endswith("a") and _version(a) <= (major, minor)]
    if ptx:
        return f"{max(ptx, key=_version)} PTX, compiled by the driver at first use"
    return None


def _version(arch: str) -> tuple[int, int]:
    digits = re.sub(r"\D", "", arch)
    return int(digits[:-1]), int(digits[-1])


def _runs_sass(arch: str, major: int, minor: int) -> bool:
    a_major, a_minor = _version(arch)
    if arch.endswith("a"):
        return (a_major, a_minor) == (major, minor)
    return a_major == major and a_minor <= minor


def collect() -> dict:
    gpus = [{"index": i, "name": torch.cuda.get_device_name(i),
             "capability": list(torch.cuda.get_device_capability(i))}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info = {"tubevit_fast": package_version("tubevit_fast"), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "triton": package_version("triton"), "gpus": gpus}
    ext = {"available": extension.is_available(), "reason": extension.unavailable_reason(),
           "path": extension.library_path()}
    if ext["available"]:
        ext["build"] = extension.build_info()
        try:
            ext["binary"] = binary_targets()
        except RuntimeError as err:
            ext["binary"], ext["binary_reason"] = None, str(err)
        if ext["binary"] is not None:
            for gpu in gpus:
                gpu["extension_runs"] = runs_on(tuple(gpu["capability"]), ext["binary"])
    info["extension"] = ext
    return info


def format_text(info: dict) -> str:
    lines = [f"tubevit_fast {info['tubevit_fast'] or '(not installed as a distribution)'}",
             f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU-only build'}), "
             f"triton {info['triton'] or 'not installed'}"]
    if not info["gpus"]:
        lines.append("GPU: none visible")
    ext = info["extension"]
    for gpu in info["gpus"]:
        cap = ".".join(map(str, gpu["capability"]))
        line = f"GPU {gpu['index']}: {gpu['name']} (compute capability {cap})"
        if "extension_runs" in gpu:
            runs = gpu["extension_runs"] or "nothing here (needs 8.0 or newer)"
            line += f"; the CUDA extension runs {runs}"
        lines.append(line)
    if not ext["available"]:
        lines.append(f"CUDA extension: not available: {ext['reason']}")
        return "\n".join(lines)
    build = ext["build"]
    runtime = build["cuda_runtime_version"]
    lines.append(f"CUDA extension: {ext['path']}")
    lines.append(f"  built for TORCH_CUDA_ARCH_LIST={build['arch_list']}, head dims "
                 f"{', '.join(map(str, build['head_dims']))}, CUDA {runtime // 1000}.{runtime % 1000 // 10}")
    if ext["binary"] is None:
        lines.append(f"  binary contents: unknown ({ext['binary_reason']})")
    else:
        lines.append(f"  machine code (SASS): {', '.join(ext['binary']['sass']) or 'none'}; "
                     f"PTX: {', '.join(ext['binary']['ptx']) or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tubevit_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
