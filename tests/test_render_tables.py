"""The README's and docs' performance tables are the rendering of the stored results files, and
MEASURED_ORDER is what those files measured (benchmarks/render_tables.py)."""
import importlib.util
import json
import os
import re

import pytest

from tubevit_fast import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _load_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_tables = _load_module("render_tables")

META_KEYS = {"date", "torch", "triton", "cuda_device"}
ROW_KEYS = {"op", "device", "dtype", "ours", "baseline", "baseline_name", "floor", "notes", "peak_mib",
            "baseline_peak_mib", "interleaved", "spread"}
DISPATCH_KEYS = {"op", "arch", "dtype", "head_dim", "layout", "pass", "seconds"}


def _read(doc):
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


def test_stored_results_files_have_the_schema():
    names = sorted(os.listdir(RESULTS))
    assert names, "no results files"
    for name in names:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.json", name), name
        with open(os.path.join(RESULTS, name)) as f:
            results = json.load(f)
        assert META_KEYS <= set(results["meta"]), name
        assert results["rows"], name
        for row in results["rows"]:
            assert ROW_KEYS <= set(row), (name, row["op"])
            assert row["ours"] > 0 and row["device"] in ("cpu", "cuda"), (name, row["op"])
        for record in results.get("dispatch", ()):
            assert DISPATCH_KEYS <= set(record) and record["pass"] in ("forward", "forward+backward"), name


def test_every_rendered_region_matches_its_results_files():
    docs = render_tables.documents()
    assert "README.md" in docs and "docs/performance.md" in docs
    regions = sum(len(render_tables.REGION.findall(_read(d))) for d in docs)
    assert regions >= 4  # README: headline, measured order; docs: a CPU run, a GPU run
    assert render_tables.stale_regions() == [], "run: python benchmarks/render_tables.py"


def _edit_one_number(body: str) -> str:
    """The region with its first decimal number below the table's header changed."""
    m = re.compile(r"(\d+\.\d+)").search(body, body.index("|---"))
    assert m, body
    edited = f"{float(m.group(1)) + 0.01:.{len(m.group(1).split('.')[1])}f}"
    return body[:m.start(1)] + edited + body[m.end(1):]


@pytest.mark.parametrize("doc", ["README.md", "docs/performance.md"])
def test_an_edited_number_is_caught(doc):
    text = _read(doc)
    m = next(render_tables.REGION.finditer(text))
    edited = text[:m.start("body")] + _edit_one_number(m.group("body")) + text[m.end("body"):]
    assert edited != text
    assert render_tables.stale_in(edited, doc) == [f"{doc}: {m.group('spec').strip()}"]


def test_rendering_rewrites_an_edited_table():
    text = _read("README.md")
    m = next(render_tables.REGION.finditer(text))
    edited = text[:m.start("body")] + _edit_one_number(m.group("body")) + text[m.end("body"):]
    assert render_tables.render_text(edited, "README.md") == text


def test_measured_order_is_what_the_results_files_measured():
    assert backends.MEASURED_ORDER == render_tables.measured_order(render_tables.all_results())


def _record(op, head_dim, pass_, **seconds):
    return {"op": op, "arch": "sm_90", "dtype": "bf16", "head_dim": head_dim, "layout": "dense" if head_dim else None,
            "pass": pass_, "seconds": seconds}


def test_measured_order_prefers_training_timings_and_newer_runs():
    old = {"dispatch": [_record("attention", 64, "forward+backward", torch=3.0, triton=1.0, cuda=2.0)]}
    new = {"dispatch": [
        _record("attention", 64, "forward", torch=9.0, cuda=1.0),             # forward only: loses to fwd+bwd
        _record("attention", 64, "forward+backward", torch=1.0, cuda=3.0, triton=2.0),
        _record("attention", 128, "forward", triton=1.0, cuda=2.0),            # PyTorch's not timed: no row
        _record("tube_embed", None, "forward", torch=2.0, triton=1.0),
    ]}
    assert render_tables.measured_order([old, new]) == {
        ("attention", "sm_90", "bf16", 64, "dense"): ("torch", "triton", "cuda"),
        ("tube_embed", "sm_90", "bf16", None, None): ("triton", "torch"),
    }
    assert render_tables.measured_order([new, old])[("attention", "sm_90", "bf16", 64, "dense")] == \
        ("triton", "cuda", "torch")


def test_a_region_of_an_unknown_kind_or_arguments_is_refused():
    with pytest.raises(ValueError, match="unknown rendered region"):
        render_tables.render_region("speedups", "README.md")
    with pytest.raises(ValueError, match="one results file"):
        render_tables.render_region("rows", "README.md")
