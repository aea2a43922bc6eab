"""Saving the end-of-session benchmark summary: JSON rows and a PNG chart of the speedups.

Written to benchmark_results/ (not committed; BENCH_RESULTS_DIR overrides the folder).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform

import torch

from tubevit_fast.info import package_version

RESULTS_DIR = os.environ.get("BENCH_RESULTS_DIR", "benchmark_results")


def save(rows: list, threads: int, dispatch_rows: list[str] = (), dispatch: list[dict] = ()) -> list[str]:
    """Write summary.json (and summary.png when matplotlib is installed); return the paths.
    dispatch_rows: BenchTools.dispatch_rows(), the measured backend order on this GPU, ready to
    paste; dispatch: BenchTools.dispatch_records(), the timings it was ordered by."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    records = []
    for row in rows:
        record = dataclasses.asdict(row)
        record["speedup"] = row.speedup                # interleaved where measured
        record["median_speedup"] = row.median_speedup
        record["median_and_interleaved_disagree"] = row.disagree
        record["ours_over_floor"] = row.ours / row.floor if row.floor and row.ours else None
        records.append(record)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "triton": package_version("triton"), "python": platform.python_version(), "cpu_threads": threads,
            "machine": platform.machine(), "cpu": _cpu_name(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    json_path = os.path.join(RESULTS_DIR, "summary.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": records, "dispatch": list(dispatch), "dispatch_rows": list(dispatch_rows)},
                  f, indent=2)
    paths = [json_path]
    chart = _chart(records, os.path.join(RESULTS_DIR, "summary.png"))
    if chart:
        paths.append(chart)
    return paths


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _chart(records: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [r for r in records if r["speedup"]]
    if not shown:
        return None
    labels = [f"{r['op']} ({r['device']}, {r['dtype']}) vs {r['baseline_name']}" for r in shown]
    speedups = [r["speedup"] for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(shown) + 1.2))
    ax.barh(range(len(shown)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the baseline (same run, timed interleaved)")
    for i, s in enumerate(speedups):
        ax.text(s, i, f" {s:.2f}x", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
