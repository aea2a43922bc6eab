"""Install tubevit_fast.

The CUDA extension in csrc/ (module tubevit_fast._C) is built when the machine can build it and
skipped otherwise, so an install never fails on its account:

    TUBEVIT_FAST_BUILD_CUDA unset or "auto"  build it when torch (a CUDA build of it), nvcc and ninja
                                             are all present, else install pure Python with a
                                             one-line notice; a failed compile also falls back
    TUBEVIT_FAST_BUILD_CUDA=1                build it or fail the install (CI, the README's test
                                             command), with the reason in one line
    TUBEVIT_FAST_BUILD_CUDA=0                never build it

The build compiles against the torch already installed, so it must not run in pip's isolated
build environment (there torch is absent: auto mode installs pure Python):

    pip install ninja
    TUBEVIT_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e ".[test]"

Build settings (environment):
    CUDA_HOME                  the toolkit; default /usr/local/cuda when it holds bin/nvcc, else
                               the directory above the nvcc on PATH
    TORCH_CUDA_ARCH_LIST       default "8.0+PTX;9.0a": sm_80 machine code, sm_90a machine code (the
                               Hopper build of the same kernels) and compute_80 PTX, which the
                               driver compiles for any newer GPU (sm_86/89 run the sm_80 code).
                               Entries below 8.0 are dropped: the kernels need sm_80 instructions.
    TUBEVIT_FAST_CUDA_HEADDIMS head dims to compile, default "64,80,96,128"
    MAX_JOBS                   parallel nvcc jobs, default min(cores, free memory / 2 GB)
nvcc runs with -Xptxas -v; its register/spill report is kept next to the built module as
_C.ptxas.log (tests/test_attention_cuda.py reads it). `python -m tubevit_fast.info` prints what
the built module holds (machine code and PTX per arch) and whether this machine's GPU can run it.
"""
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from setuptools import setup

CUDA_HEAD_DIMS = (64, 80, 96, 128)
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"
MIN_ARCH = (8, 0)  # mma.sync bf16, ldmatrix, cp.async
PTXAS_LOG = "_C.ptxas.log"
NOTICE = "tubevit_fast: "


def _build_mode() -> str:
    """"auto", "required" or "off", from TUBEVIT_FAST_BUILD_CUDA."""
    flag = os.environ.get("TUBEVIT_FAST_BUILD_CUDA", "").strip().lower()
    if flag in ("", "auto"):
        return "auto"
    if flag in ("1", "true", "yes", "on"):
        return "required"
    if flag in ("0", "false", "no", "off"):
        return "off"
    sys.exit(f"{NOTICE}TUBEVIT_FAST_BUILD_CUDA={flag!r}: use 1 (build or fail), 0 (never) or auto (default)")


def _find_cuda_home() -> str | None:
    """The toolkit directory holding bin/nvcc: $CUDA_HOME, else /usr/local/cuda, else nvcc on PATH."""
    def has_nvcc(home):
        return home and os.path.isfile(os.path.join(home, "bin", "nvcc"))

    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if has_nvcc(env) else None
    if has_nvcc("/usr/local/cuda"):
        # Checked before PATH: torch would derive /usr/local from a /usr/local/bin/nvcc link and
        # fail to link against /usr/local/lib64.
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        return home if has_nvcc(home) else None
    return None


def _missing_prerequisite() -> str | None:
    """Why the extension cannot be built here (None when torch+CUDA, nvcc and ninja are present).
    Sets CUDA_HOME for torch's build helper, which reads it at import."""
    try:
        import torch
    except (ImportError, OSError):
        return ("torch is not importable at build time (pip's isolated build environment? "
                "install with --no-build-isolation)")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    home = _find_cuda_home()
    if home is None:
        where = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        return (f"CUDA_HOME={where} holds no bin/nvcc" if where
                else "no CUDA toolkit found (no nvcc in /usr/local/cuda or on PATH; set CUDA_HOME)")
    os.environ["CUDA_HOME"] = home
    try:
        subprocess.run(["ninja", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "ninja not found (pip install ninja)"
    return None


def _arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST with the entries below sm_80 removed (default DEFAULT_ARCH_LIST)."""
    text = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    kept, dropped = [], []
    for entry in (e for e in re.split(r"[;\s]+", text) if e):
        m = re.match(r"(\d+)\.(\d+)", entry)
        (kept if m is None or (int(m.group(1)), int(m.group(2))) >= MIN_ARCH else dropped).append(entry)
    if dropped:
        print(f"{NOTICE}not building the CUDA extension for {';'.join(dropped)} (it needs sm_80 or newer)",
              file=sys.stderr)
    return ";".join(kept)


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
    mode = _build_mode()
    if mode == "off":
        return {}
    missing = _missing_prerequisite()
    archs = _arch_list() if missing is None else ""
    if missing is None and not archs:
        missing = "TORCH_CUDA_ARCH_LIST names no arch the kernels support (8.0 or newer)"
    if missing is not None:
        if mode == "required":
            sys.exit(f"{NOTICE}TUBEVIT_FAST_BUILD_CUDA=1 but {missing}; unset it for a pure-Python install")
        print(f"{NOTICE}installing without the CUDA extension: {missing}", file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    dims = _head_dims()
    sources = ["csrc/bindings.cpp"]
    for d in dims:
        sources += [f"csrc/attention_fwd_hdim{d}.cu", f"csrc/attention_bwd_hdim{d}.cu"]
    ext = CUDAExtension(
        name="tubevit_fast._C",
        sources=sources,
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        define_macros=[(f"TVF_HDIM_{d}", "1") for d in dims] + [("TVF_ARCH_LIST", f'"{archs}"')],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-v"],
        },
    )

    class Build(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as err:  # compiler, linker, toolkit/torch version mismatch
                if mode == "required":
                    raise
                last_line = (str(err).strip().splitlines() or [""])[-1]
                print(f"{NOTICE}installing without the CUDA extension: its build failed "
                      f"({type(err).__name__}: {last_line}; the compiler output is above)", file=sys.stderr)
                self.extensions = []  # nothing to copy or install

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
    packages=["tubevit_fast", "tubevit_fast.reference", "tubevit_fast.ops", "tubevit_fast.torch_backend", "tubevit_fast.kernels",
              "tubevit_fast.audit", "tubevit_fast.viz"],
    # kernels/ is shipped inside the package: a top-level `kernels` module would clash
    # with an unrelated PyPI package of that name.
    package_dir={"tubevit_fast.kernels": "kernels"},
    **_cuda_build(),
)
