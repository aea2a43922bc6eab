"""benchmarks/gpu_run.py, the one command for a borrowed GPU: its dry run on this CPU goes through
every phase and writes a results file of the stored files' schema; a hanging phase costs only its
own time limit."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_run = _load_module("gpu_run")

PHASES = ["environment", "install", "tests_triton", "sanitizer", "build", "tests_extension", "bench_tube_embed",
          "bench_attention", "bench_model", "selfcheck"]
DRY_RUN_SKIPS = {"bench_tube_embed", "bench_model"}   # one CPU benchmark file in the dry run
META_KEYS = {"date", "torch", "triton", "python", "cuda_device", "driver", "cuda", "nvcc", "arch", "dry_run"}
ROW_KEYS = {"op", "device", "dtype", "ours", "baseline", "baseline_name", "floor", "notes", "peak_mib",
            "baseline_peak_mib", "interleaved", "spread"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run_out")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_run.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_dry_run_writes_a_results_file_of_the_schema(dry_run):
    out, _ = dry_run
    files = sorted(os.listdir(out))
    assert len(files) == 2 and gpu_run.LOG_ARCHIVE in files, files   # $OUT takes at most 8 files
    [name] = [f for f in files if f.endswith(".json")]
    assert name.endswith("-dry-run-cpu.json")
    with open(out / name) as f:
        results = json.load(f)
    assert META_KEYS <= set(results["meta"]) and results["meta"]["dry_run"] is True
    assert results["meta"]["cuda_device"] is None       # the renderer takes it for a CPU run
    assert results["rows"] and all(ROW_KEYS <= set(r) and r["device"] == "cpu" and r["ours"] > 0
                                   for r in results["rows"])
    assert results["dispatch"] == [] and results["environment"]["cuda_available"] is False
    assert [p["name"] for p in results["phases"]] == PHASES
    assert {p["name"]: p["status"] for p in results["phases"]} == {
        p: "skipped" if p in DRY_RUN_SKIPS else "ok" for p in PHASES}


def test_dry_run_calls_each_triton_kernel_and_self_checks_each_fast_backend(dry_run):
    out, _ = dry_run
    [name] = [f for f in os.listdir(out) if f.endswith(".json")]
    with open(out / name) as f:
        results = json.load(f)
    assert [c["call"] for c in results["kernels_once"]] == [
        "tube_embed triton fwd+bwd (dW, db, dX)", "attention triton dense fwd+bwd", "attention triton packed fwd+bwd"]
    verdicts = {(e["op"], e["backend"], e["layout"]): e["status"] for e in results["selfcheck"]}
    assert verdicts[("tube_embed", "triton", None)] == "passed"
    assert verdicts[("attention", "triton", "dense")] == verdicts[("attention", "triton", "packed")] == "passed"
    assert verdicts[("attention", "cuda", "dense")] == "unavailable"       # CPU tensors
    with tarfile.open(out / gpu_run.LOG_ARCHIVE) as tar:
        logs = {os.path.basename(n) for n in tar.getnames()}
    assert {f"{p}.log" for p in PHASES if p not in DRY_RUN_SKIPS} <= logs


def test_dry_run_prints_a_short_table_then_the_measured_order(dry_run):
    _, stdout = dry_run
    lines = stdout.rstrip("\n").splitlines()
    assert lines[-1].startswith("MEASURED_ORDER rows: none measured")
    start = max(i for i, line in enumerate(lines) if line.startswith("phase "))
    table = lines[start:-1]
    assert 1 + len(PHASES) < len(table) <= gpu_run.TABLE_LINES
    assert any(line.startswith("self-check: 3 passed") for line in table), table


def test_a_hanging_phase_is_killed_with_what_it_started(tmp_path):
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    result = gpu_run.run_phase("hang", ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], 1.0,
                               str(tmp_path / "hang.log"))
    assert result.status == "timeout" and time.monotonic() - started < 20
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the phase's own child {grandchild} outlived the timeout")
    ok = gpu_run.run_phase("ok", ["bash", "-c", "exit 3"], 10.0, str(tmp_path / "ok.log"))
    assert (ok.status, ok.returncode) == ("failed", 3)


def test_the_budget_keeps_the_later_phases_minimum():
    budget = gpu_run.Budget(100, limits={"a": 90, "b": 50, "c": 50}, minimum={"a": 5, "b": 20, "c": 30},
                            order=("a", "b", "c"))
    assert 49 <= budget.limit("a") <= 50        # 100 - 20 - 30
    assert budget.limit("c") == 50              # its own limit: nothing after it
    late = gpu_run.Budget(-10, limits={"a": 90, "b": 50}, minimum={"a": 5, "b": 20}, order=("a", "b"))
    assert late.limit("a") == 5 and late.limit("b") == 20   # past the deadline: the minimum


@pytest.mark.parametrize("name, slug", [("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"), (None, "unknown-gpu")])
def test_results_file_names(name, slug):
    assert gpu_run.gpu_slug(name) == slug


def test_build_arch():
    assert gpu_run.build_arch((9, 0)) == "9.0a" and gpu_run.build_arch((8, 0)) == "8.0"
    assert gpu_run.build_arch((8, 9)) == "8.9"


def test_the_table_fits_in_thirty_lines():
    row = {"op": "x" * 80, "ours": 1e-3, "baseline": 2e-3, "baseline_name": "sdpa", "speedup": 2.0}
    results = {"phases": [{"name": p, "status": "ok", "seconds": 1.0, "note": ""} for p in PHASES],
               "selfcheck": [{"op": "attention", "backend": "triton", "dtype": "bfloat16", "layout": "dense",
                              "status": "failed"}], "rows": [row] * 100}
    lines = gpu_run.format_table(results).splitlines()
    assert len(lines) == gpu_run.TABLE_LINES and lines[-1].startswith("... ")
    assert "FAILED: attention/triton/bfloat16/dense" in "\n".join(lines)
