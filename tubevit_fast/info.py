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
import sys

import torch

from tubevit_fast import extension


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


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
            ext["binary"] = extension.binary_targets()
        except RuntimeError as err:
            ext["binary"], ext["binary_reason"] = None, str(err)
        if ext["binary"] is not None:
            for gpu in gpus:
                gpu["extension_runs"] = extension.runs_on(tuple(gpu["capability"]), ext["binary"])
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
