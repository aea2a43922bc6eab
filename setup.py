"""Install tubevit_fast.

A plain `pip install .` is pure Python. The CUDA extension in csrc/ (module tubevit_fast._C)
is built with ninja only when asked (TUBEVIT_FAST_BUILD_CUDA=1) or when a GPU is visible;
TUBEVIT_FAST_BUILD_CUDA=0 turns the build off even with a GPU.

The build compiles against the torch already installed, so it must not run in pip's isolated
build environment (that would need a second torch there):

    pip install ninja
    TUBEVIT_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e ".[test]"

Build settings (environment):
    CUDA_HOME                  default /usr/local/cuda when it holds bin/nvcc
    TORCH_CUDA_ARCH_LIST       default "8.0;9.0a" when no GPU is visible (torch's own choice
                               otherwise): sm_80 code, also compiled for Hopper
    TUBEVIT_FAST_CUDA_HEADDIMS head dims to compile, default "64,80,96,128" (CI: "64,128")
    MAX_JOBS                   parallel nvcc jobs, default min(cores, free memory / 2 GB)
nvcc runs with -Xptxas -v; its register/spill report is kept next to the built module as
_C.ptxas.log (tests/test_attention_cuda.py reads it).
"""
import os
import re
import sys
import threading
import time

from setuptools import setup

CUDA_HEAD_DIMS = (64, 80, 96, 128)
PTXAS_LOG = "_C.ptxas.log"


def _cuda_requested() -> bool:
    flag = os.environ.get("TUBEVIT_FAST_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    try:
        import torch
    except ImportError:  # e.g. pip's isolated build environment: no GPU build there
        return False
    return torch.cuda.is_available()


def _head_dims() -> list[int]:
    text = os.environ.get("TUBEVIT_FAST_CUDA_HEADDIMS", "").strip()
    if not text:
        return list(CUDA_HEAD_DIMS)
    dims = sorted({int(t) for t in re.split(r"[,;\s]+", text) if t})
    bad = [d for d in dims if d not in CUDA_HEAD_DIMS]
    if bad or not dims:
        sys.exit(f"TUBEVIT_FAST_CUDA_HEADDIMS={text!r}: choose from {CUDA_HEAD_DIMS}")
    return dims


def _default_max_jobs() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_mem = max(1, avail_kb // (2 * 1024 * 1024))  # ~2 GB per nvcc job, to be safe
    except (OSError, StopIteration, ValueError):
        by_mem = 1
    return max(1, min(cores, by_mem))


class _Tee:
    """Copy everything written to file descriptor 1 (where torch's ninja runner prints each
    compile's output) into a string, while still printing it."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def __enter__(self):
        sys.stdout.flush()
        self._saved = os.dup(1)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.close(write_end)

        def pump():
            while True:
                data = os.read(read_end, 65536)
                if not data:
                    break
                self.chunks.append(data)
                os.write(self._saved, data)
            os.close(read_end)

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self._saved, 1)  # closes the pipe's last write end: the pump sees EOF
        self._thread.join()
        os.close(self._saved)
        return False

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def _merge_ptxas_log(path: str, build_output: str, header: str) -> None:
    """Keep one section per compiled source: ninja recompiles only what changed, so sections of
    sources not rebuilt this time are carried over from the previous log."""
    sections: dict[str, str] = {}
    if os.path.exists(path):
        with open(path) as f:
            for block in re.split(r"^=== source: ", f.read(), flags=re.M)[1:]:
                name, _, body = block.partition("\n")
                sections[name.strip()] = body
    # ninja -v prints "[i/n] <command>" and then that command's output.
    for block in re.split(r"^\[\d+/\d+\] ", build_output, flags=re.M)[1:]:
        command, _, output = block.partition("\n")
        m = re.search(r"\s-c\s+(\S+\.cu)\b", command)
        if m and "ptxas info" in output:
            sections[os.path.basename(m.group(1))] = output
    with open(path, "w") as f:
        f.write(header)
        for name in sorted(sections):
            f.write(f"=== source: {name}\n{sections[name]}")
            if not sections[name].endswith("\n"):
                f.write("\n")


def _cuda_build() -> dict:
    """ext_modules + cmdclass for the CUDA extension, or {} for a pure-Python install."""
    if not _cuda_requested():
        return {}
    cuda_home = "/usr/local/cuda"
    if "CUDA_HOME" not in os.environ and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        # torch would otherwise derive /usr/local from /usr/local/bin/nvcc and fail to link.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as err:
        sys.exit(f"TUBEVIT_FAST_BUILD_CUDA=1 needs torch importable at build time ({err}). Install with\n"
                 f"    pip install --no-build-isolation ...\n"
                 f"so the build uses the torch already installed (no second copy in an isolated env).")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    dims = _head_dims()
    sources = ["csrc/bindings.cpp"]
    for d in dims:
        sources += [f"csrc/attention_fwd_hdim{d}.cu", f"csrc/attention_bwd_hdim{d}.cu"]
    ext = CUDAExtension(
        name="tubevit_fast._C",
        sources=sources,
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        define_macros=[(f"TVF_HDIM_{d}", "1") for d in dims],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-v"],
        },
    )

    class Build(BuildExtension):
        def build_extension(self, extension):
            start = time.time()
            with _Tee() as tee:
                super().build_extension(extension)
            out_dir = os.path.dirname(self.get_ext_fullpath(extension.name))
            header = (f"# tubevit_fast._C ptxas -v report (nvcc -Xptxas -v)\n"
                      f"# TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}\n"
                      f"# head dims: {','.join(map(str, dims))}\n"
                      f"# last build: {time.time() - start:.0f} s, MAX_JOBS={os.environ.get('MAX_JOBS')}\n")
            _merge_ptxas_log(os.path.join(out_dir, PTXAS_LOG), tee.text, header)
            print(f"tubevit_fast._C built in {time.time() - start:.0f} s (head dims {dims})", flush=True)

        def copy_extensions_to_source(self):
            # Editable / --inplace builds: the module is copied next to the sources; so is its log.
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for extension in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, extension)
                src = os.path.join(os.path.dirname(regular_file), PTXAS_LOG)
                if os.path.exists(src):
                    dst = os.path.join(os.path.dirname(inplace_file), PTXAS_LOG)
                    self.copy_file(src, dst, level=self.verbose)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": Build.with_options(use_ninja=True)}}


setup(
    packages=["tubevit_fast", "tubevit_fast.reference", "tubevit_fast.ops", "tubevit_fast.torch_backend", "tubevit_fast.kernels"],
    # kernels/ is shipped inside the package: a top-level `kernels` module would clash
    # with an unrelated PyPI package of that name.
    package_dir={"tubevit_fast.kernels": "kernels"},
    **_cuda_build(),
)
