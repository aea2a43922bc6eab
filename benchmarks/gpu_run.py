"""One timed command for a borrowed GPU: install, build, GPU tests, benchmarks, memcheck,
self-checks, and one results file.

    python3 benchmarks/gpu_run.py [--dry-run] [--out DIR] [--budget SECONDS]
    bash benchmarks/gpu_run.sh ...          # the same

Made for a bare H100/H200 machine with torch and triton installed and no network, for about 8
minutes in all. Every phase runs as a child process under its own time limit (and within the run's
budget), so one hang costs one phase; a phase that fails or times out is recorded and the run goes
on. In order:

  environment      the card, driver, torch, triton, CUDA, compute capability (nvidia-smi, nvcc, torch)
  install          pip install -e . without dependencies and without the extension
  build            the CUDA extension for this GPU's arch, in the background (setup.py build_ext
                   --inplace), while the next two phases run
  tests_triton     pytest tests/ -m "gpu or interpreter": every test that runs a kernel on the GPU
                   (the Triton tests carry "interpreter" and run compiled on a GPU), the extension's
                   own tests left for later
  sanitizer        one call of each Triton kernel (and of the extension's, once built), then the same
                   under compute-sanitizer memcheck (skipped with a note where it is absent)
  build_wait       waits for the build
  tests_extension  pytest tests/test_attention_cuda.py -m gpu, against the fresh build
  bench_*          the CUDA rows, one pytest run per file: tube embedding at B=32 against the cuBLAS floor, forward and
                   forward + backward; attention at the TubeViT shapes on every backend; the
                   TubeViT-B training step on a video batch and on a mixed image + video batch
                   against the reference with SDPA, eager and compiled
  selfcheck        the self-check of every fast backend, op, dtype and layout, named one by one

It writes benchmarks/results/<date>-<gpu>.json (the results-file schema of render_tables.py,
plus "phases", "selfcheck" and "environment") and, under --out ($OUT by default), a copy of it and
every log in one archive (gpu_run_logs.tar.gz): two files. It prints last a table of at most 30
lines and the MEASURED_ORDER rows.

--dry-run runs the same plumbing on a CPU in about a minute: stand-ins for install and build, the
test phases on one small file each (their GPU tests skip), the Triton kernels under the
interpreter, one small CPU benchmark, the self-checks on CPU (TUBEVIT_FAST_SELFCHECK=always). It
makes no timing claims and writes the results file under --out only. tests/test_gpu_run.py runs it.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
BUDGET_S = 470          # leaves the final writing and printing inside 8 minutes
TABLE_LINES = 30
ENV_TINY = "TUBEVIT_FAST_GPU_RUN_TINY"   # set for the children of a dry run
LOG_ARCHIVE = "gpu_run_logs.tar.gz"

# Each phase's own limit (seconds) and the least it is left when the budget runs short.
LIMITS = {"environment": 45, "install": 90, "build": 210, "tests_triton": 120, "sanitizer": 75,
          "build_wait": 210, "tests_extension": 60, "bench_tube_embed": 70, "bench_attention": 70,
          "bench_model": 110, "selfcheck": 60}
MINIMUM = {"environment": 20, "install": 20, "tests_triton": 30, "sanitizer": 15, "build_wait": 5,
           "tests_extension": 15, "bench_tube_embed": 20,
           "bench_attention": 20, "bench_model": 30, "selfcheck": 15}
ORDER = ("environment", "install", "tests_triton", "sanitizer", "build_wait", "tests_extension", "bench_tube_embed",
         "bench_attention", "bench_model",
         "selfcheck")

GPU_TEST_MARKERS = "gpu or interpreter"
PYTEST_NONE_SELECTED = 5
# pytest -k over the benchmark suite: the rows the GPU run is for.
# The benchmark phases: (file, pytest -k on a GPU, pytest -k in the dry run). One pytest run each,
# since a run writes its rows only when it ends: a phase killed at its limit loses its own rows.
BENCHMARKS = {
    "bench_tube_embed": ("benchmarks/test_tube_embed.py", "cuda-bfloat16-B32", None),
    "bench_attention": ("benchmarks/test_attention.py", "cuda and not flash_attn and not xformers",
                        "cpu and dense and not backward and (torch or sdpa)"),
    "bench_model": ("benchmarks/test_model.py", "(test_model_step and cuda-B8 and train) or "
                    "(test_mixed_batch and cuda and train)", None),
}


# ---- phases ---------------------------------------------------------------------------------------

@dataclass
class PhaseResult:
    name: str
    status: str                 # ok, failed, timeout, skipped
    seconds: float
    limit_s: float | None = None
    returncode: int | None = None
    note: str = ""


def _kill_group(proc: subprocess.Popen) -> None:
    """End the phase's process and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def start(cmd: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
    """cmd in its own process group, stdout and stderr to log_path."""
    log = open(log_path, "w")
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(name: str, proc: subprocess.Popen, started: float, limit: float) -> PhaseResult:
    """Wait for proc until `limit` seconds after `started`; kill it past that."""
    try:
        proc.wait(timeout=max(0.0, started + limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return PhaseResult(name, "timeout", time.monotonic() - started, limit, None, f"killed after {limit:.0f} s")
    status = "ok" if proc.returncode == 0 else "failed"
    return PhaseResult(name, status, time.monotonic() - started, limit, proc.returncode)


class Background:
    """A phase started now and joined later (the build): its time is its own run, not the wait."""

    def __init__(self, name: str, cmd: list[str], log_path: str, env: dict | None = None):
        self.name, self.started, self.ended = name, time.monotonic(), None
        self.proc = start(cmd, log_path, env)
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.ended = time.monotonic()

    def join(self, timeout: float) -> PhaseResult:
        """Wait at most `timeout` more seconds, then kill it."""
        self._waiter.join(max(0.0, timeout))
        if self.ended is None:
            _kill_group(self.proc)
            spent = time.monotonic() - self.started
            return PhaseResult(self.name, "timeout", spent, None, None, f"killed after {spent:.0f} s")
        status = "ok" if self.proc.returncode == 0 else "failed"
        return PhaseResult(self.name, status, self.ended - self.started, None, self.proc.returncode)


def run_phase(name: str, cmd: list[str], limit: float, log_path: str, env: dict | None = None) -> PhaseResult:
    started = time.monotonic()
    try:
        proc = start(cmd, log_path, env)
    except OSError as err:
        return PhaseResult(name, "failed", 0.0, limit, None, f"could not start: {err}")
    return finish(name, proc, started, limit)


class Budget:
    """The run's deadline: a phase gets its own limit, cut so that every later phase keeps its
    minimum."""

    def __init__(self, seconds: float, limits: dict = LIMITS, minimum: dict = MINIMUM, order=ORDER):
        self.deadline = time.monotonic() + seconds
        self.limits, self.minimum, self.order = limits, minimum, order

    def limit(self, name: str) -> float:
        later = self.order[self.order.index(name) + 1:] if name in self.order else ()
        reserve = sum(self.minimum.get(p, 0) for p in later)
        left = self.deadline - time.monotonic() - reserve
        return max(self.minimum.get(name, 5), min(self.limits[name], left))


def last_line(path: str, pattern: str = r"(passed|failed|error|skipped|deselected|no tests ran)") -> str:
    """The last line of a log matching pattern (pytest's summary line), else ''."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if re.search(pattern, line)]
    except OSError:
        return ""
    return lines[-1].strip("= ") if lines else ""


# ---- the work of the child phases (run as `gpu_run.py --child NAME OUTPUT`) ----------------------

def child_environment(out_path: str) -> None:
    import torch
    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0],
           "triton": _version("triton"), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=[major, minor], arch=f"sm_{major}{minor}",
                   multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    smi = shutil.which("nvidia-smi")
    if smi:
        proc = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        if proc.returncode == 0 and proc.stdout.strip():
            name, driver, memory = [x.strip() for x in proc.stdout.splitlines()[0].split(",")]
            env.update(driver=driver, smi_name=name, smi_memory=memory)
    nvcc = _cuda_tool("nvcc")
    if nvcc:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20)
        m = re.search(r"release ([\d.]+)", proc.stdout)
        env["nvcc"] = m.group(1) if m else None
    sanitizer = _cuda_tool("compute-sanitizer")
    env["compute_sanitizer"] = sanitizer
    print(json.dumps(env, indent=1))
    _write_json(out_path, env)


def _tiny() -> bool:
    """The dry run's shapes: the Triton interpreter runs a kernel program by program in Python."""
    return os.environ.get(ENV_TINY) == "1"


def _kernel_calls(device, dtype) -> list[tuple[str, object]]:
    """(name, fn) per call: each Triton kernel once (tube embedding forward, dW/db and dX; attention
    forward, backward preprocess, dQ and dK/dV, dense and packed), and the extension's attention
    where it is built."""
    import torch
    from tubevit_fast import TubeEmbed, TubeSpec, attention, extension
    from tubevit_fast.packing import cu_seqlens_from_lengths

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(grad)

    tiny = _tiny()
    tubes = [TubeSpec((4, 8, 8), (4, 8, 8)), TubeSpec((1, 8, 8), (4, 8, 8), (1, 2, 2))]
    n, m = (9, 5) if tiny else (67, 30)   # ragged lengths: the masked last tiles run too

    def tube_embed():
        embed = TubeEmbed(tubes, in_channels=3, dim=16 if tiny else 64, backend="triton").to(device, dtype)
        video = rand(1, 3, 4, 16, 16) if tiny else rand(2, 3, 8, 32, 32)
        embed(video).float().square().sum().backward()
        assert video.grad is not None and embed.weights[0].grad is not None

    def attn(backend, packed):
        def call():
            if packed:
                q, k, v = (rand(n + m, 2, 64) for _ in range(3))
                cu = cu_seqlens_from_lengths([n, m], device)
                out = attention(q, k, v, cu, cu, n, n, backend=backend)
            else:
                q, k, v = (rand(2, n, 2, 64) for _ in range(3))
                out = attention(q, k, v, backend=backend)
            out.float().square().sum().backward()
            assert q.grad is not None
        return call

    calls = [("tube_embed triton fwd+bwd (dW, db, dX)", tube_embed),
             ("attention triton dense fwd+bwd", attn("triton", False)),
             ("attention triton packed fwd+bwd", attn("triton", True))]
    if device.type == "cuda" and extension.is_available() and dtype in (torch.float16, torch.bfloat16):
        calls += [("attention cuda dense fwd+bwd", attn("cuda", False)),
                  ("attention cuda packed fwd+bwd", attn("cuda", True))]
    return calls


def child_kernels_once(out_path: str) -> None:
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32   # the interpreter's bf16 dot is wrong
    os.environ.setdefault("TUBEVIT_FAST_SELFCHECK", "0")                 # the kernels alone, once
    for name, fn in _kernel_calls(device, dtype):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"called: {name} ({dtype})", flush=True)
        _append_json_line(out_path, {"call": name, "dtype": str(dtype).replace("torch.", "")})


def child_selfcheck(out_path: str) -> None:
    """Every fast backend named once per op, dtype and layout: a named backend runs its self-check
    and raises when it disagrees with the reference."""
    import warnings

    import torch
    from tubevit_fast import TubeEmbed, TubeSpec, attention, extension
    from tubevit_fast.packing import cu_seqlens_from_lengths

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if cuda else [torch.float32]
    gen = torch.Generator().manual_seed(1)

    def record(op, backend, dtype, layout, fn):
        entry = {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "layout": layout}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
                entry["status"] = "passed"
            except ValueError as err:        # the backend does not take this input
                entry["status"], entry["message"] = "unsupported", str(err)
            except RuntimeError as err:      # a failed self-check, or the backend is unavailable
                text = str(err)
                entry["status"] = "failed" if "self-check" in text or "disagrees" in text else "unavailable"
                entry["message"] = text
        entry["warnings"] = [str(w.message) for w in caught if "self-check" in str(w.message)]
        print(json.dumps(entry), flush=True)
        _append_json_line(out_path, entry)

    def rand(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    for dtype in dtypes:
        video = rand(1, 3, 8, 32, 32, dtype=dtype)
        record("tube_embed", "triton", dtype, None, lambda: TubeEmbed(
            [TubeSpec((4, 8, 8), (4, 8, 8))], 3, 64, backend="triton").to(device, dtype)(video))
        for backend in ("triton", "cuda"):
            q = rand(2, 40, 2, 64, dtype=dtype)
            record("attention", backend, dtype, "dense", lambda: attention(q, q, q, backend=backend))
            p = rand(50, 2, 64, dtype=dtype)
            cu = cu_seqlens_from_lengths([30, 20], device)
            record("attention", backend, dtype, "packed", lambda: attention(p, p, p, cu, cu, 30, 30, backend=backend))
    if not extension.is_available():
        print(f"extension: {extension.unavailable_reason()}")


CHILDREN = {"environment": child_environment, "kernels_once": child_kernels_once, "selfcheck": child_selfcheck}


# ---- helpers --------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_tool(name: str) -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    return shutil.which(name)


def _append_json_line(path: str, value) -> None:
    """One record per line, written as it comes: a phase killed halfway keeps what it did."""
    with open(path, "a") as f:
        f.write(json.dumps(value) + "\n")


def _read_json_lines(path: str) -> list:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def _read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def gpu_slug(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the results file's name after its date."""
    if not name:
        return "unknown-gpu"
    words = re.sub(r"(?i)\bnvidia\b", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-") or "unknown-gpu"


def build_arch(capability) -> str:
    """TORCH_CUDA_ARCH_LIST for this GPU alone: 9.0a on Hopper (the wgmma kernel needs sm_90a)."""
    major, minor = capability
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def _pytest_plugins_args() -> list[str]:
    args = []
    if importlib.util.find_spec("xdist") is not None:
        args += ["-n", "8"]          # Triton compiles on the CPU: 16 cores there
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", "60"]
    return args


# ---- the run --------------------------------------------------------------------------------------

@dataclass
class Run:
    out: str
    dry_run: bool
    budget: Budget
    work: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="gpu_run_"))
    phases: list = field(default_factory=list)

    def __post_init__(self):
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        os.makedirs(self.out, exist_ok=True)

    def log(self, name: str) -> str:
        return os.path.join(self.logs, f"{name}.log")

    def child(self, name: str, output: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--child", name, output]

    def phase(self, name: str, cmd: list[str], env: dict | None = None, note: str = "",
              none_selected_ok: bool = False) -> PhaseResult:
        limit = self.budget.limit(name)
        print(f"[gpu_run] {name} (limit {limit:.0f} s) ...", flush=True)
        result = run_phase(name, cmd, limit, self.log(name), env)
        if none_selected_ok and result.returncode == PYTEST_NONE_SELECTED:
            result.status = "ok"
        summary = last_line(self.log(name)) if name.startswith(("tests", "bench")) else ""
        result.note = "; ".join(x for x in (result.note, note, summary) if x)
        return self.record(result)

    def record(self, result: PhaseResult) -> PhaseResult:
        self.phases.append(result)
        print(f"[gpu_run] {result.name}: {result.status} in {result.seconds:.0f} s"
              + (f" ({result.note})" if result.note else ""), flush=True)
        return result

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        if self.dry_run:
            env[ENV_TINY] = "1"
        env.pop("CI", None)   # the GPU tests must skip what is absent, not fail on it
        return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same plumbing on a CPU, tiny shapes")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_run_out"),
                        help="where the results file's copy and the log archive go (default: $OUT)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all phases together")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        CHILDREN[args.child[0]](args.child[1])
        return 0
    # The dry run's limits are doubled: a CI machine shared with other jobs is slow, and it claims no timings.
    limits = {k: v * 2 for k, v in LIMITS.items()} if args.dry_run else LIMITS
    run = Run(os.path.abspath(args.out), args.dry_run, Budget(args.budget, limits=limits))
    started = time.monotonic()
    py = sys.executable

    # environment
    env_json = os.path.join(run.work, "environment.json")
    run.phase("environment", run.child("environment", env_json), run.env())
    environment = _read_json(env_json, {})
    on_gpu = bool(environment.get("cuda_available")) and not run.dry_run

    # install (a stand-in in the dry run: CI's environment is not ours to change)
    install = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]
    run.phase("install", install if not run.dry_run else [py, "-m", "pip", "--version"],
              run.env(TUBEVIT_FAST_BUILD_CUDA="0"), note="" if not run.dry_run else "dry run: pip --version")

    # build, in the background
    if on_gpu:
        arch = build_arch(environment["capability"])
        build_cmd = [py, "setup.py", "build_ext", "--inplace"]
        build_env = run.env(TUBEVIT_FAST_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS="14")
        build_note = f"TORCH_CUDA_ARCH_LIST={arch}"
    else:
        build_cmd, build_env, build_note = [py, "-c", "print('dry run: no build')"], run.env(), "dry run: stand-in"
    print(f"[gpu_run] build started in the background ({build_note})", flush=True)
    build = Background("build", build_cmd, run.log("build"), build_env)

    # the GPU tests that need no extension
    test_paths = ["tests/"] if not run.dry_run else ["tests/test_dispatch.py"]
    # A test module that cannot be imported there (a package missing on that machine) must not stop the others.
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--durations=15",
              "--continue-on-collection-errors"]
    run.phase("tests_triton", pytest + test_paths + ["--ignore=tests/test_attention_cuda.py", "-m", GPU_TEST_MARKERS]
              + (_pytest_plugins_args() if on_gpu else []), run.env(), none_selected_ok=run.dry_run)

    # each kernel once, then under compute-sanitizer memcheck
    kernels_json = os.path.join(run.work, "kernels_once.json")
    sanitizer = environment.get("compute_sanitizer") if on_gpu else None
    once = run.child("kernels_once", kernels_json)
    sanitizer_env = run.env(TRITON_CACHE_AUTOTUNING="1", **({} if on_gpu else {"TRITON_INTERPRET": "1"}))
    if sanitizer:
        # The first call compiles and autotunes (cached on disk); under memcheck every kernel then
        # runs once with the chosen config.
        script = (f"{_quote(once)} && {_quote([sanitizer, '--tool', 'memcheck', '--error-exitcode', '99', '--print-limit', '20'] + once)}")
        run.phase("sanitizer", ["bash", "-c", script], sanitizer_env)
    else:
        why = "dry run, no GPU" if not on_gpu else "compute-sanitizer not found under /usr/local/cuda or PATH"
        run.phase("sanitizer", once, sanitizer_env, note=f"memcheck skipped: {why}; each kernel called once")

    # the build
    wait = min(build.started + run.budget.limits["build"] - time.monotonic(), run.budget.limit("build_wait"))
    result = build.join(wait)
    result.note = "; ".join(x for x in (result.note, build_note) if x)
    run.record(result)

    # the extension's GPU tests
    run.phase("tests_extension", pytest + ["tests/test_attention_cuda.py", "-m", "gpu"], run.env())

    # benchmarks: tube embedding, attention, the model, each its own pytest run
    bench = {"meta": {}, "rows": [], "dispatch": [], "dispatch_rows": []}
    for name, (path, gpu_k, dry_k) in BENCHMARKS.items():
        k = dry_k if run.dry_run else gpu_k
        if k is None:
            run.record(PhaseResult(name, "skipped", 0.0, note="dry run: one CPU benchmark file only"))
            continue
        folder = os.path.join(run.work, name)
        run.phase(name, [py, "-m", "pytest", path, "--benchmark-only", "-q", "-p", "no:cacheprovider", "-k", k],
                  run.env(BENCH_RESULTS_DIR=folder))
        summary = _read_json(os.path.join(folder, "summary.json"), {})
        bench["meta"] = bench["meta"] or summary.get("meta", {})
        for key in ("rows", "dispatch", "dispatch_rows"):
            bench[key] += summary.get(key, [])

    # self-checks
    selfcheck_json = os.path.join(run.work, "selfcheck.json")
    run.phase("selfcheck", run.child("selfcheck", selfcheck_json),
              run.env(TUBEVIT_FAST_SELFCHECK="always", **({} if on_gpu else {"TRITON_INTERPRET": "1"})))
    selfcheck = _read_json_lines(selfcheck_json)

    results = assemble(environment, bench, run, selfcheck, _read_json_lines(kernels_json), time.monotonic() - started)
    name = f"{results['meta']['date'][:10]}-{'dry-run-cpu' if run.dry_run else gpu_slug(environment.get('gpu'))}.json"
    paths = [os.path.join(run.out, name)] + ([] if run.dry_run else [os.path.join(RESULTS_DIR, name)])
    for path in paths:
        _write_json(path, results)
    with tarfile.open(os.path.join(run.out, LOG_ARCHIVE), "w:gz") as tar:
        tar.add(run.logs, arcname="logs")
        for name in BENCHMARKS:
            if os.path.exists(os.path.join(run.work, name, "summary.png")):
                tar.add(os.path.join(run.work, name, "summary.png"), arcname=f"{name}.png")
    shutil.rmtree(run.work, ignore_errors=True)
    print("\n".join(f"[gpu_run] wrote {p}" for p in paths + [os.path.join(run.out, LOG_ARCHIVE)]))
    print(format_table(results))
    print(format_measured_order(results))
    return 0


def _quote(cmd: list[str]) -> str:
    import shlex
    return " ".join(shlex.quote(c) for c in cmd)


def assemble(environment: dict, bench: dict, run: Run, selfcheck: list, kernels_once: list, seconds: float) -> dict:
    """The results file: render_tables' schema (meta, rows, dispatch, dispatch_rows) plus what this
    run did (phases, selfcheck, kernels_once, environment)."""
    meta = dict(bench.get("meta") or {})
    meta.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=environment.get("torch", meta.get("torch")), triton=environment.get("triton", meta.get("triton")),
                python=environment.get("python", meta.get("python")),
                cuda_device=environment.get("gpu") if not run.dry_run else None,
                driver=environment.get("driver"), cuda=environment.get("torch_cuda"), nvcc=environment.get("nvcc"),
                arch=environment.get("arch"), dry_run=run.dry_run, wall_s=round(seconds, 1),
                source="benchmarks/gpu_run.py" + (" --dry-run (no timing claims)" if run.dry_run else ""))
    return {"meta": meta, "rows": bench.get("rows", []), "dispatch": bench.get("dispatch", []),
            "dispatch_rows": bench.get("dispatch_rows", []), "phases": [asdict(p) for p in run.phases],
            "selfcheck": selfcheck, "kernels_once": kernels_once, "environment": environment}


def format_table(results: dict) -> str:
    """At most TABLE_LINES lines: the phases, the self-check tally, then as many rows as fit."""
    lines = ["phase            status   seconds  note"]
    for p in results["phases"]:
        lines.append(f"{p['name']:<16} {p['status']:<8} {p['seconds']:>7.0f}  {p['note'][:80]}")
    tally = {}
    for entry in results["selfcheck"]:
        tally[entry["status"]] = tally.get(entry["status"], 0) + 1
    failed = [f"{e['op']}/{e['backend']}/{e['dtype']}/{e['layout']}" for e in results["selfcheck"]
              if e["status"] == "failed"]
    lines.append("self-check: " + (", ".join(f"{n} {s}" for s, n in sorted(tally.items())) or "none ran")
                 + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    lines.append("op                                              ours ms   base ms  speedup  vs")
    room = TABLE_LINES - len(lines)
    rows = results["rows"]
    shown = rows if len(rows) <= room else rows[:room - 1]
    for r in shown:
        speed = r.get("speedup") or (r["baseline"] / r["ours"] if r.get("baseline") and r.get("ours") else None)
        base = f"{r['baseline'] * 1e3:9.3f}" if r.get("baseline") else "        -"
        lines.append(f"{r['op'][:46]:<46} {r['ours'] * 1e3:9.3f} {base} "
                     f"{(f'{speed:.2f}x' if speed else '-'):>8}  {r['baseline_name']}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows in the results file")
    return "\n".join(lines[:TABLE_LINES])


def format_measured_order(results: dict) -> str:
    rows = results.get("dispatch_rows") or []
    if not rows:
        return "MEASURED_ORDER rows: none measured (no CUDA attention or tube-embedding rows ran)"
    return "MEASURED_ORDER rows for this GPU (tubevit_fast/backends.py):\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
