"""The performance tables of README.md and docs/*.md, rendered from the stored results files.

    python benchmarks/render_tables.py           # rewrite every rendered region in place
    python benchmarks/render_tables.py --check   # exit 1 (and name the regions) where a table differs

A rendered region sits between two HTML comments, which Markdown does not show:

    <!-- rendered: KIND [FILE] -->
    ...the table, written by this script; never edit by hand...
    <!-- end rendered -->

KIND is one of RENDERERS. FILE names one file of benchmarks/results/ for the per-run kinds; the
others read every file there (a new run's file is picked up by re-rendering: one step). A results
file is what `pytest benchmarks/ --benchmark-only` (bench_results.save) or benchmarks/gpu_run.py
writes: {"meta": {...}, "rows": [...], "dispatch": [...]}. `measured_order()` rebuilds
tubevit_fast.backends.MEASURED_ORDER from the same files (tests/test_render_tables.py holds the
two equal).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
RENDERED_FILES = ("README.md", "docs/*.md")
REGION = re.compile(r"(<!-- rendered: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end rendered -->)", re.S)


# ---- reading results files ----------------------------------------------------------------------

def load(name: str, results_dir: str = RESULTS_DIR) -> dict:
    """One results file by its name in results_dir, with its name kept under "file"."""
    with open(os.path.join(results_dir, name)) as f:
        results = json.load(f)
    results["file"] = name
    return results


def all_results(results_dir: str = RESULTS_DIR) -> list[dict]:
    """Every results file, oldest first (the names start with the date)."""
    return [load(os.path.basename(p), results_dir) for p in sorted(glob.glob(os.path.join(results_dir, "*.json")))]


def is_gpu(results: dict) -> bool:
    return bool(results["meta"].get("cuda_device"))


def speedup(row: dict) -> float | None:
    """The interleaved speedup where the run measured one, else the ratio of medians."""
    if row.get("interleaved") is not None:
        return row["interleaved"]
    return row["baseline"] / row["ours"] if row.get("baseline") and row.get("ours") else None


def median_speedup(row: dict) -> float | None:
    return row["baseline"] / row["ours"] if row.get("baseline") and row.get("ours") else None


# ---- formatting -----------------------------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}"


_SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _dtype(name: str) -> str:
    return _SHORT_DTYPES.get(name, name)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _run_label(results: dict) -> str:
    meta = results["meta"]
    where = meta.get("cuda_device") or meta.get("cpu") or meta.get("machine")
    versions = f"torch {meta.get('torch')}, triton {meta.get('triton')}"
    return f"{meta['date'][:10]}, {where}, {versions}"


def _medians_cell(row: dict) -> str:
    text = _ratio(median_speedup(row))
    if row.get("median_and_interleaved_disagree"):
        text += " (!)"
    return text


def _peak_cell(row: dict) -> str:
    if row.get("peak_mib") is None:
        return "-"
    base = "-" if row.get("baseline_peak_mib") is None else f"{row['baseline_peak_mib']:.0f}"
    return f"{row['peak_mib']:.0f} / {base}"


def _floor_cell(row: dict) -> str:
    return f"{row['ours'] / row['floor']:.2f}" if row.get("floor") and row.get("ours") else "-"


# ---- the renderers --------------------------------------------------------------------------------

def render_rows(results: dict) -> str:
    """Every row of one run, in the file's order."""
    header = ("op", "device, dtype", "ours ms", "baseline ms", "baseline", "speedup", "medians",
              "ours / floor", "peak MiB ours / baseline", "notes")
    rows = [(r["op"], f"{r['device']}, {_dtype(r['dtype'])}", _ms(r["ours"]), _ms(r.get("baseline")), r["baseline_name"],
             _ratio(speedup(r)), _medians_cell(r), _floor_cell(r), _peak_cell(r), r.get("notes") or "")
            for r in results["rows"]]
    return f"Run: {_run_label(results)} ([`{results['file']}`](../benchmarks/results/{results['file']}))\n\n" + \
        _table(header, rows)


# The README's headline: per kind of run (CPU, GPU), the newest file's best row of each group.
HEADLINE = (
    ("tube embedding, forward", r"^tube_embed fwd B=\S+ \[(?!uint8)"),
    ("tube embedding from uint8 pixels, forward", r"^tube_embed fwd B=\S+ \[uint8 in\]"),
    ("reading a 32x2 clip (340x256 H.264, GOP 250)", r"^read 340x256-gop250 32x2"),
    ("reading a 32x2 clip (3840x2160 H.264, GOP 250)", r"^read 3840x2160-gop250 32x2"),
    ("tube embedding, forward + backward", r"^tube_embed fwd\+bwd B="),
    ("attention dense, forward + backward", r"^attn dense-\S+ fwd\+bwd "),
    ("attention packed (varlen), forward + backward", r"^attn varlen-\S+ fwd\+bwd "),
    ("TubeViT training step", r"^TubeViT train "),
    ("TubeViT training step, mixed images + videos", r"^TubeViT mixed \S+ train"),
)


def _backend(op: str) -> str:
    m = re.search(r"\[(\w+)\]\s*$", op)
    return m.group(1) if m else "model"


def render_headline(runs: list[dict], link_prefix: str = "") -> str:
    """The newest CPU run and the newest GPU run: each HEADLINE group's row with the largest
    speedup over its baseline, "pending" where the run has none."""
    rows = []
    for gpu in (False, True):
        same_kind = [r for r in runs if is_gpu(r) == gpu]
        if not same_kind:
            continue
        results = same_kind[-1]
        meta = results["meta"]
        where = f"{meta.get('cuda_device') or 'CPU'}, {meta['date'][:10]}"
        link = f"[{where}]({link_prefix}benchmarks/results/{results['file']})"
        for label, pattern in HEADLINE:
            matches = [r for r in results["rows"] if re.search(pattern, r["op"]) and speedup(r)]
            if not matches:
                rows.append((label, link, "pending", "-", "-", "-"))
                continue
            best = max(matches, key=speedup)  # rows of one group may differ in shape: compare ratios
            rows.append((label, link, f"{_backend(best['op'])}, {_dtype(best['dtype'])}", _ms(best["ours"]),
                         f"{_ms(best['baseline'])} ({best['baseline_name']})", _ratio(speedup(best))))
    header = ("what", "run", "ours", "ours ms", "baseline ms", "speedup")
    return _table(header, rows)


def measured_order(runs: list[dict]) -> dict[tuple, tuple[str, ...]]:
    """MEASURED_ORDER from the runs' "dispatch" records: per key (op, arch, dtype, head dim,
    layout) the backends fastest first by their forward+backward median (training is what they
    are chosen for), else by their forward median; only keys where PyTorch's own kernel ("torch")
    was timed; a newer run's record replaces an older one's."""
    order: dict[tuple, tuple[str, ...]] = {}
    for results in runs:
        for record in results.get("dispatch", ()):
            timing = record["seconds"]
            if "torch" not in timing:
                continue
            key = (record["op"], record["arch"], record["dtype"], record["head_dim"], record["layout"])
            order[key] = tuple(sorted(timing, key=timing.get))
    return order


def _chosen_pass(records: list[dict]) -> dict[tuple, dict]:
    chosen = {}
    for record in records:
        key = (record["op"], record["arch"], record["dtype"], record["head_dim"], record["layout"])
        if record["pass"] == "forward+backward" or key not in chosen:
            chosen[key] = record
    return chosen


def _key_order(item) -> tuple:
    op, arch, dtype, head_dim, layout = item[0]
    return op, arch, dtype, layout or "", head_dim or 0


def render_measured_order(runs: list[dict]) -> str:
    """One line per MEASURED_ORDER key: the order, the pass it was chosen by and the medians."""
    rows = []
    order = measured_order(runs)
    for results in runs:
        for key, record in sorted(_chosen_pass(results.get("dispatch", ())).items(), key=_key_order):
            if order.get(key) is None or "torch" not in record["seconds"]:
                continue
            op, arch, dtype, head_dim, layout = key
            shape = f"{op} {layout or ''}{f', Dh {head_dim}' if head_dim else ''}".strip()
            timing = record["seconds"]
            medians = " / ".join(f"{timing[b] * 1e3:.3f}" for b in order[key])
            rows.append((shape, f"{arch}, {dtype}", ", ".join(order[key]), f"{record['pass']}: {medians} ms",
                         f"{results['meta']['cuda_device']}, {results['meta']['date'][:10]}"))
    return _table(("op", "arch, dtype", "order, fastest first", "medians", "run"), rows)


RENDERERS = {
    "rows": render_rows,                   # rows FILE: every row of one run
    "headline": render_headline,           # headline: the newest CPU and GPU runs' best rows
    "measured-order": render_measured_order,
}


def render_region(spec: str, document: str, results_dir: str = RESULTS_DIR) -> str:
    kind, *args = spec.split()
    if kind not in RENDERERS:
        raise ValueError(f"unknown rendered region {kind!r}; known: {sorted(RENDERERS)}")
    if kind == "rows":
        if len(args) != 1:
            raise ValueError(f"'rows' names one results file: {spec!r}")
        return render_rows(load(args[0], results_dir))
    if args:
        raise ValueError(f"{kind!r} takes no file: {spec!r}")
    runs = all_results(results_dir)
    if kind == "headline":
        # Links are relative to the document: README.md sits at the root, docs/*.md one below.
        return render_headline(runs, "" if os.path.dirname(document) == "" else "../")
    return RENDERERS[kind](runs)


def render_text(text: str, document: str, results_dir: str = RESULTS_DIR) -> str:
    """text with every rendered region replaced by a fresh rendering."""
    def replace(m: re.Match) -> str:
        return m.group(1) + render_region(m.group("spec").strip(), document, results_dir) + m.group(4)
    return REGION.sub(replace, text)


def documents() -> list[str]:
    """The rendered documents, relative to the repository root."""
    found = []
    for pattern in RENDERED_FILES:
        found += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    return found


def stale_in(text: str, document: str, results_dir: str = RESULTS_DIR) -> list[str]:
    """'document: region' for each rendered region of text that differs from a fresh rendering."""
    return [f"{document}: {m.group('spec').strip()}" for m in REGION.finditer(text)
            if render_region(m.group("spec").strip(), document, results_dir) != m.group("body")]


def stale_regions(results_dir: str = RESULTS_DIR) -> list[str]:
    """stale_in over every rendered document."""
    stale = []
    for doc in documents():
        with open(os.path.join(ROOT, doc)) as f:
            stale += stale_in(f.read(), doc, results_dir)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_regions()
        for region in stale:
            print(f"stale: {region} (run: python benchmarks/render_tables.py)")
        return 1 if stale else 0
    for doc in documents():
        path = os.path.join(ROOT, doc)
        with open(path) as f:
            text = f.read()
        fresh = render_text(text, doc)
        if fresh != text:
            with open(path, "w") as f:
                f.write(fresh)
            print(f"rewrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
