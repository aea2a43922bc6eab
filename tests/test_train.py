"""tubevit_fast.train / predict: exact resume, learning, backend agreement, DDP on CPU, top-k."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tqdm")

from tubevit_fast import train as T  # noqa: E402

# Tiny runs: dim 64, heads 2 (head dim 32), one block, 8x32x32 clips, one thread.
TINY = ["--dim", "64", "--heads", "2", "--depth", "1", "--no-progress", "--threads", "1", "--val-items", "0"]


def _run(tmp, *extra):
    return T.main([*TINY, "--out", str(tmp), *map(str, extra)])


def test_lr_schedule():
    f = [T.lr_factor(s, 4, 20, 0.01) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert f[-1] > 0.01


def test_resume_is_exact(tmp_path):
    common = ["--steps", 6, "--batch-size", 4, "--train-items", 32, "--warmup", 2, "--seed", 7]
    straight = _run(tmp_path / "a", *common)
    first = _run(tmp_path / "b", *common, "--stop-after", 3)
    assert first["step"] == 3 and os.path.exists(first["checkpoint"])
    resumed = _run(tmp_path / "b", *common, "--resume", first["checkpoint"])
    assert [r["step"] for r in resumed["history"]] == [4, 5, 6]
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"][3:]]
    sa, sb = straight["model"].state_dict(), resumed["model"].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ckpt = torch.load(resumed["checkpoint"], weights_only=True)  # RNG states are tensors
    assert ckpt["step"] == 6 and {"model", "optimizer", "scheduler", "rng", "args", "model_config"} <= ckpt.keys()


def test_backends_give_the_same_losses(tmp_path):
    common = ["--steps", 3, "--batch-size", 6, "--train-items", 24, "--warmup", 1]
    fast = _run(tmp_path / "fast", *common, "--backend", "torch")["history"]
    ref = _run(tmp_path / "ref", *common, "--backend", "reference")["history"]
    assert len(fast) == len(ref) == 3
    assert any(r["images"] and r["videos"] for r in fast)  # joint image + video packed steps
    for a, b in zip(fast, ref):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(b["loss"])), (a, b)


def test_small_tubevit_learns_synthetic_motion(tmp_path):
    # Chance: 1/4 on videos, 1/3 on images (0.27 overall knowing only image vs video).
    out = T.main(["--dim", "64", "--heads", "2", "--depth", "1", "--no-progress", "--threads", "1",
                  "--out", str(tmp_path), "--steps", "200", "--lr", "2e-3", "--warmup", "10",
                  "--batch-size", "16", "--val-items", "64"])
    losses = [r["loss"] for r in out["history"]]
    first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    assert last < first - 0.3, (first, last)
    assert out["val_acc"] >= 0.45, out["val_acc"]


def test_ddp_two_cpu_ranks_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tubevit_fast.train", *TINY, "--out", str(tmp_path), "--steps", "4", "--batch-size", "4",
           "--train-items", "32", "--warmup", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    hashes = [(tmp_path / f"weights_rank{r}.sha256").read_text().strip() for r in range(2)]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 64
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["args"]["batch_size"] == 4 and len(ckpt["rng"]) == 2
    # The model moved away from its initialisation, and rank 0's checkpoint is what both hold.
    model = T.build_model(ckpt["model_config"], "torch")
    model.load_state_dict(ckpt["model"])
    assert T.state_hash(model) == hashes[0]


def test_predict_prints_top_k(tmp_path, capsys):
    pytest.importorskip("av")
    from tubevit_fast import predict
    from tubevit_fast.data import SyntheticShapes

    run = _run(tmp_path / "run", "--steps", 2, "--batch-size", 4, "--train-items", 8)
    paths = SyntheticShapes(4, seed=9).export(tmp_path / "clips", indices=[0, 3])
    capsys.readouterr()
    results = predict.main([*paths, "--checkpoint", run["checkpoint"], "--top-k", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and lines[0].startswith(paths[0]) and " 1. " in lines[0]
    assert lines[-1].startswith("accuracy: top-1 ")  # the folders name the classes
    for _, ranked in results:
        probs = [p for _, p in ranked]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert {n for n, _ in ranked} <= set(SyntheticShapes.classes)
