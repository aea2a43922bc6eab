"""Shared benchmark machinery: devices, FLOP and minimum-byte counts, same-run baselines and
the end-of-session summary table.

Run: `pytest benchmarks/ --benchmark-only`. CPU always; CUDA too when a GPU is visible.
Benchmark files get the helpers through the `bench` fixture (a `BenchTools`), not by
importing this module: tests/ has a conftest.py of its own, and a bare `import conftest`
would pick whichever was imported last.

Timing conventions:
- CPU runs use BENCH_THREADS threads (default 2, the setting the performance targets are
  stated for); CUDA timings synchronise the device before the clock stops.
- A speedup is a ratio of medians measured in the same session: the baseline's median is
  cached when its own benchmark runs, or measured on the spot when that benchmark was
  deselected, so numbers from different machines or runs are never mixed.
  `BenchTools.interleaved` measures several callables in a shuffled order per round: the
  cross-check to read when the machine is shared and its load drifts between benchmarks.

Peak memory (`BenchTools.peak_memory`, one untimed call): the most bytes held at once by
tensors allocated during the call, above what was allocated before it. CUDA reads the caching
allocator's counters; CPU replays the profiler's allocation and free events (`_cpu_peak`).
"""
from __future__ import annotations

import datetime
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import bench_results

from tubevit_fast import backends, geometry
from tubevit_fast.geometry import TubeSpec

BENCH_THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def bench_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn, device: torch.device):
    """fn wrapped to wait for the device before returning: what a benchmark times."""
    def timed():
        result = fn()
        synchronize(device)
        return result
    return timed


# ---- work counts --------------------------------------------------------------------------

def tube_embed_flops(tubes: Sequence[TubeSpec], size: Sequence[int], batch: int, channels: int, dim: int,
                     weight_grad: bool = False, input_grad: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of the tube GEMMs: tokens x patch length x dim.

    Forward: one GEMM per tube. weight_grad adds dW = dY^T A (same count); input_grad adds
    dA = dY W (same count). Bias, position and bias-gradient sums are O(N * dim) and left out.
    """
    macs = batch * dim * sum(t.num_tokens(size) * t.patch_size(channels) for t in geometry.as_tubes(tubes))
    passes = 1 + int(weight_grad) + int(input_grad)
    return 2 * macs * passes


def tube_embed_min_bytes(tubes: Sequence[TubeSpec], size: Sequence[int], batch: int, channels: int, dim: int,
                         itemsize: int, pos: bool = True, weight_grad: bool = False,
                         input_grad: bool = False) -> int:
    """Bytes an ideal implementation must move, each tensor touched once per pass.

    Forward: the pixels some tube reads (geometry.read_mask, not the whole video), all
    weights and biases, the fp32 position table, the tokens written.
    Backward (weight_grad): grad_out read, the read pixels again, weight and bias
    gradients written. input_grad: the weights again and the whole video gradient written
    (zeros outside the read mask included: the result is a dense tensor).
    """
    tubes = geometry.as_tubes(tubes)
    size = tuple(size)
    n_tokens = geometry.num_tokens(tubes, size)
    pixels = int(np.count_nonzero(geometry.read_mask(tubes, size))) * batch * channels
    weights = sum(t.width(dim) * (t.patch_size(channels) + 1) for t in tubes)  # kernels + biases
    tokens = batch * n_tokens * dim
    total = (pixels + weights + tokens) * itemsize + (n_tokens * dim * 4 if pos else 0)
    if weight_grad or input_grad:
        total += tokens * itemsize  # grad_out
    if weight_grad:
        total += (pixels + weights) * itemsize
    if input_grad:
        total += (weights + batch * channels * int(np.prod(size))) * itemsize
    return total


# ---- same-session baselines and the summary -----------------------------------------------

def median_seconds(fn: Callable[[], object], device: torch.device, rounds: int = 15,
                   warmup: int = 2, before: Callable[[], object] | None = None) -> float:
    """Median wall time of fn(), synchronised: for baselines whose own benchmark did not run.
    `before` runs ahead of every call, outside the timing (e.g. evict_caches)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        if before is not None:
            before()
            synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_EVICT_BYTES = 256 * 2**20  # more than any CPU L3 or GPU L2 these benchmarks run on
_evict_buffers: dict[torch.device, torch.Tensor] = {}


def evict_caches(device: torch.device) -> None:
    """Read a buffer larger than the last-level cache, so the next call starts cold: its inputs
    and weights come from DRAM/HBM, as in a model where other layers ran in between. (A read:
    writing would leave dirty lines whose write-back the timed call would pay for.)"""
    buf = _evict_buffers.get(device)
    if buf is None:
        buf = _evict_buffers[device] = torch.ones(_EVICT_BYTES // 4, device=device)
    buf.sum()


@dataclass
class SummaryRow:
    """One line of the summary. The speedup it reports is the interleaved one (baseline median /
    ours, both timed in a shuffled order round by round: load drift cannot fake it); the ratio of
    the two benchmarks' own medians is kept beside it and flagged when the two disagree by more
    than the run's spread (the larger relative interquartile range of the two benchmarks)."""
    op: str
    device: str
    dtype: str
    ours: float            # seconds, median
    baseline: float | None  # seconds, median
    baseline_name: str
    floor: float | None = None
    notes: str = ""
    peak_mib: float | None = None           # peak memory of one call, ours
    baseline_peak_mib: float | None = None  # and the baseline's
    interleaved: float | None = None        # speedup measured interleaved
    spread: float | None = None             # relative IQR of the run (ours, baseline: the larger)

    @property
    def median_speedup(self) -> float | None:
        return self.baseline / self.ours if self.baseline and self.ours else None

    @property
    def speedup(self) -> float | None:
        return self.interleaved if self.interleaved is not None else self.median_speedup

    @property
    def disagree(self) -> bool:
        """The median ratio and the interleaved speedup differ by more than the run's spread."""
        if self.interleaved is None or self.median_speedup is None or self.spread is None:
            return False
        return abs(self.median_speedup / self.interleaved - 1) > self.spread


@dataclass
class BenchTools:
    """What benchmark files use: counts, baselines, extra_info filling and summary rows."""

    baselines: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    dispatch: dict = field(default_factory=dict)  # (op, dtype, head_dim, layout) -> pass -> backend -> s
    spreads: dict = field(default_factory=dict)   # baseline key -> its relative IQR

    flops = staticmethod(tube_embed_flops)
    min_bytes = staticmethod(tube_embed_min_bytes)
    synchronize = staticmethod(synchronize)
    synchronized = staticmethod(synchronized)
    median_seconds = staticmethod(median_seconds)
    evict_caches = staticmethod(evict_caches)

    @staticmethod
    def spread_of(benchmark) -> float | None:
        """The relative interquartile range (IQR / median) of a finished benchmark, or None."""
        stats = getattr(benchmark, "stats", None)
        if stats is None or not stats.stats.median:
            return None
        return stats.stats.iqr / stats.stats.median

    @staticmethod
    def median_of(benchmark) -> float | None:
        """The median (s) of a finished pytest-benchmark run; None when benchmarking is disabled."""
        stats = getattr(benchmark, "stats", None)
        return None if stats is None else stats.stats.median

    def record_baseline(self, key, benchmark) -> None:
        median = self.median_of(benchmark)
        if median is not None:
            self.baselines[key] = median
            self.spreads[key] = self.spread_of(benchmark)

    def run_spread(self, benchmark, baseline_key) -> float | None:
        """The larger relative IQR of this benchmark and of its baseline's (when it ran)."""
        spreads = [x for x in (self.spread_of(benchmark), self.spreads.get(baseline_key)) if x is not None]
        return max(spreads) if spreads else None

    def baseline(self, key, fn: Callable[[], object], device: torch.device) -> float:
        """The cached median for `key`, timing fn here if its own benchmark did not run."""
        if key not in self.baselines:
            self.baselines[key] = median_seconds(fn, device)
        return self.baselines[key]

    def peak_memory(self, fn: Callable[[], object], device: torch.device, key=None) -> tuple[int, str]:
        """(bytes, method): the peak memory of one untimed fn() above what was allocated before it.

        With a key, the result is cached under it: a baseline's peak is measured by its own
        benchmark, or by the first case asking for it when that benchmark was deselected.
        """
        if key is not None and key in self.peaks:
            return self.peaks[key]
        result = _cuda_peak(fn, device) if device.type == "cuda" else _cpu_peak(fn)
        if key is not None:
            self.peaks[key] = result
        return result

    @staticmethod
    def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int = 15,
                    seed: int = 0) -> dict[str, float]:
        """Median seconds of each callable, run in a random order every round (after one warmup
        each): ratios between them hold even when the machine's load drifts during the run."""
        order = random.Random(seed)
        names = list(fns)
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:
            fns[name]()
        for _ in range(rounds):
            order.shuffle(names)
            for name in names:
                synchronize(device)
                start = time.perf_counter()
                fns[name]()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(ts) for name, ts in times.items()}

    def annotate(self, benchmark, flops: int, min_bytes: int) -> float | None:
        """extra_info: flops, min_bytes, tflops, gbps (from the median). Returns the median."""
        median = self.median_of(benchmark)
        benchmark.extra_info["flops"] = flops
        benchmark.extra_info["min_bytes"] = min_bytes
        if median:
            benchmark.extra_info["tflops"] = flops / median / 1e12
            benchmark.extra_info["gbps"] = min_bytes / median / 1e9
        return median

    def add_row(self, op: str, device: torch.device | str, dtype: torch.dtype | str, ours: float,
                baseline: float | None, baseline_name: str, floor: float | None = None,
                notes: str = "", peak: int | None = None, baseline_peak: int | None = None,
                interleaved: float | None = None, spread: float | None = None) -> None:
        """One line of the end-of-session summary table (times in seconds, peaks in bytes;
        interleaved: the speedup measured interleaved; spread: the run's relative IQR)."""
        self.rows.append(SummaryRow(op, str(device), str(dtype).replace("torch.", ""), ours, baseline,
                                    baseline_name, floor, notes, _mib(peak), _mib(baseline_peak),
                                    interleaved, spread))


    def record_dispatch(self, op: str, device: torch.device, dtype: torch.dtype, head_dim: int | None,
                        layout: str | None, pass_: str, backend: str, seconds: float) -> None:
        """A backend's median for one MEASURED_ORDER key (CUDA only: the table is for GPUs)."""
        if device.type == "cuda":
            key = (op, backends.DTYPE_NAMES[dtype], head_dim, layout)
            self.dispatch.setdefault(key, {}).setdefault(pass_, {})[backend] = seconds

    def dispatch_records(self) -> list[dict]:
        """The timings behind dispatch_rows, one record per MEASURED_ORDER key and pass, as results
        files store them ("dispatch"; benchmarks/render_tables.measured_order reads them)."""
        if not self.dispatch:
            return []
        arch = backends.arch_name(torch.device("cuda", torch.cuda.current_device()))
        return [{"op": op, "arch": arch, "dtype": dtype, "head_dim": head_dim, "layout": layout, "pass": pass_,
                 "seconds": dict(timing)}
                for (op, dtype, head_dim, layout), passes in sorted(self.dispatch.items(), key=str)
                for pass_, timing in sorted(passes.items())]

    def dispatch_rows(self) -> list[str]:
        """tubevit_fast.backends.MEASURED_ORDER rows for this GPU, ready to paste: the backends ordered
        by their forward+backward median (training is what they are chosen for), else forward."""
        if not self.dispatch:
            return []
        device = torch.device("cuda", torch.cuda.current_device())
        arch = backends.arch_name(device)
        import triton
        lines = [f"    # {torch.cuda.get_device_name(device)}, torch {torch.__version__} + triton {triton.__version__}, "
                 f"{datetime.date.today().isoformat()}"]
        for (op, dtype, head_dim, layout), passes in sorted(self.dispatch.items(), key=str):
            pass_ = "forward+backward" if "forward+backward" in passes else "forward"
            timing = passes[pass_]
            if "torch" not in timing:
                continue  # the table orders against PyTorch's own kernels
            order = tuple(sorted(timing, key=timing.get))
            ms = ", ".join(f"{b} {timing[b] * 1e3:.3f}" for b in order)
            lines.append(f"    ({op!r}, {arch!r}, {dtype!r}, {head_dim!r}, {layout!r}): {order!r},  # {pass_} ms: {ms}")
        return lines


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start, "torch.cuda.max_memory_allocated - allocated before"


_CPU_MEMORY = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)  # what the profiler counts as CPU


def _cpu_peak(fn: Callable[[], object]) -> tuple[int, str]:
    # tracemalloc does not see ATen's allocator and ru_maxrss is a process-wide high-water
    # mark, so replay the profiler's "[memory]" events instead: one per allocation (+bytes) or
    # free (-bytes), temporaries freed inside the call included. The raw kineto events are
    # read because prof.events() folds the ones inside an op into that op's total. The running
    # sum starts at 0, i.e. at what was allocated before the call; freeing tensors allocated
    # before it (a train step's zero_grad) takes the sum below 0.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() in _CPU_MEMORY]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak, "torch.profiler CPU memory events: max running sum of allocated - freed bytes"


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


_TOOLS = BenchTools()


@pytest.fixture(scope="session")
def bench() -> BenchTools:
    return _TOOLS


@pytest.fixture(scope="session", autouse=True)
def _bench_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(BENCH_THREADS)
    yield
    torch.set_num_threads(previous)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _peaks(row: SummaryRow) -> str:
    """'ours/baseline' peak MiB, compact."""
    if row.peak_mib is None:
        return "-"
    base = "-" if row.baseline_peak_mib is None else f"{row.baseline_peak_mib:.0f}"
    return f"{row.peak_mib:.0f}/{base}"


_SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _TOOLS.rows
    if not rows:
        return
    # Kept within 120 columns: the baseline's name and the notes go on a second line.
    header = ("op", "where", "ours ms", "base ms", "speedup", "medians", "/floor", "peak MiB")
    lines = []
    for r in rows:
        where = f"{r.device} {_SHORT_DTYPES.get(r.dtype, r.dtype)}"
        speedup = f"{r.speedup:.2f}x" if r.speedup else "-"
        median = f"{r.median_speedup:.2f}x{'(!)' if r.disagree else ''}" if r.median_speedup else "-"
        vs_floor = f"{r.ours / r.floor:.2f}" if r.floor and r.ours else "-"
        lines.append((r.op, where, _ms(r.ours), _ms(r.baseline), speedup, median, vs_floor, _peaks(r)))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    terminalreporter.section(f"tubevit_fast benchmark summary (CPU threads={BENCH_THREADS})")
    for text in ("speedup: baseline / ours, the two timed interleaved (shuffled order every round); medians: the",
                 "ratio of the two benchmarks' own medians, (!) where it differs from the speedup by more than the",
                 "run's spread; /floor: ours / the floor's median; peak MiB: ours/baseline"):
        terminalreporter.write_line(text)
    terminalreporter.write_line(fmt.format(*header))
    for line, r in zip(lines, rows):
        terminalreporter.write_line(fmt.format(*line))
        terminalreporter.write_line(f"    vs {r.baseline_name}" + (f"; {r.notes}" if r.notes else ""))
    dispatch = _TOOLS.dispatch_rows()
    if dispatch:
        terminalreporter.section("measured backend order on this GPU (rows for tubevit_fast.backends.MEASURED_ORDER)")
        for line in dispatch:
            terminalreporter.write_line(line)
    for path in bench_results.save(rows, BENCH_THREADS, dispatch, _TOOLS.dispatch_records()):
        terminalreporter.write_line(f"saved {path}")
