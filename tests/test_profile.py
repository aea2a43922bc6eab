"""python -m tubevit_fast.profile on CPU: tiny preset, 2 steps, a valid Chrome trace holding the
fast-op ranges, the GPU command lines printed, and nothing left patched afterwards."""
from __future__ import annotations

import json

import pytest
import torch

from tubevit_fast import modules, profile


def _names(trace: dict) -> set[str]:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {e.get("name") for e in events if isinstance(e, dict)}


def test_profile_cpu_tiny(tmp_path, capsys):
    originals = (modules.tube_embed, modules.attention)
    assert profile.main(["--device", "cpu", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    trace_path = tmp_path / "trace.json"
    assert trace_path.is_file()
    names = _names(json.loads(trace_path.read_text()))
    assert profile.TUBE_EMBED_RANGE in names
    assert profile.ATTENTION_RANGE in names
    out = capsys.readouterr().out
    assert "nsys profile -t cuda,nvtx" in out
    assert "ncu --nvtx --nvtx-include tubevit_fast.tube_embed/ -k regex:_tube_embed" in out
    assert "tubevit_fast.attention" in out
    # The ranges were scoped: the fast layers call the undecorated ops again.
    assert (modules.tube_embed, modules.attention) == originals


def test_fast_op_ranges_restores_on_error():
    originals = (modules.tube_embed, modules.attention)
    with pytest.raises(RuntimeError, match="boom"):
        with profile.fast_op_ranges():
            assert modules.attention is not originals[1]
            raise RuntimeError("boom")
    assert (modules.tube_embed, modules.attention) == originals


def test_range_wraps_attention_call():
    q = torch.randn(1, 7, 2, 32)
    with profile.fast_op_ranges(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        modules.attention(q, q, q)
    assert any(e.key == profile.ATTENTION_RANGE for e in prof.key_averages())
