"""tubevit_fast.train / predict: exact resume, learning, backend agreement, DDP on CPU, top-k."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tqdm")

from tubevit_fast.app import checkpoint  # noqa: E402
from tubevit_fast import train as T  # noqa: E402

# Tiny runs: dim 64, heads 2 (head dim 32), one block, 8x32x32 clips, one thread.
TINY = ["--dim", "64", "--heads", "2", "--depth", "1", "--no-progress", "--threads", "1", "--val-items", "0"]


def _run(tmp, *extra):
    return T.main([*TINY, "--out", str(tmp), *map(str, extra)])


def test_lr_schedule():
    from tubevit_fast.app.optim import lr_factor

    f = [lr_factor(s, 4, 20, 0.01) for s in range(20)]
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


def test_resume_from_a_moved_run_writes_to_its_new_folder(tmp_path):
    """A run folder moved and renamed after it stopped: --resume continues in the folder the
    checkpoint lives in now, never the one it was written from."""
    first = tmp_path / "runs" / "first"
    _run(first, "--steps", 2, "--stop-after", 1, "--batch-size", 4, "--train-items", 8, "--warmup", 1)
    moved = tmp_path / "archive" / "renamed"
    moved.parent.mkdir()
    os.rename(first, moved)
    T.main(["--resume", str(moved / "last.pt"), "--no-progress", "--threads", "1"])
    assert not first.exists()
    assert torch.load(moved / "last.pt", weights_only=True)["step"] == 2
    with open(moved / "log.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "step" in r] == [1, 2]  # one log, both steps


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
    model = checkpoint.build_model(ckpt["model_config"], "torch")
    model.load_state_dict(ckpt["model"])
    assert checkpoint.state_hash(model) == hashes[0]


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


# ---- recipe: drop-path, activation checkpointing, layer decay, EMA, accumulation ----------------

from tubevit_fast.app.loop import train_step  # noqa: E402
from tubevit_fast.app.optim import EMA, build_optimizer, param_groups  # noqa: E402
from tubevit_fast.data import SMALL_TUBES  # noqa: E402
from tubevit_fast.reference import model as reference  # noqa: E402
from tubevit_fast.reference.model import drop_path  # noqa: E402


def _tiny(depth=3, drop=0.0, seed=0, cls=reference.TubeViT):
    torch.manual_seed(seed)
    return cls(num_classes=5, tubes=SMALL_TUBES, dim=64, depth=depth, heads=2, drop_path=drop)


def test_drop_path_zeroes_or_rescales_whole_samples():
    torch.manual_seed(0)
    lengths = [3, 5, 2, 4] * 50
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    x = torch.randn(int(cu[-1]), 8) + 3.0  # no zero rows of its own
    y = drop_path(x, 0.25, True, cu)
    dropped = []
    for i in range(len(lengths)):
        seg, out = x[cu[i]:cu[i + 1]], y[cu[i]:cu[i + 1]]
        zero, kept = torch.equal(out, torch.zeros_like(out)), torch.allclose(out, seg / 0.75)
        assert zero != kept, i  # every token of a sample shares its draw
        dropped.append(zero)
    assert 0.15 < sum(dropped) / len(dropped) < 0.35
    assert torch.equal(drop_path(x, 0.25, False, cu), x)  # eval: identity
    batched = torch.randn(6, 4, 8)
    out = drop_path(batched, 0.5, True)
    assert all(torch.equal(o, torch.zeros_like(o)) or torch.allclose(o, b * 2) for o, b in zip(out, batched))


def test_drop_path_rates_and_state_dict():
    model = _tiny(depth=3, drop=0.2)
    assert [b.drop_path for b in model.blocks] == [0.0, 0.1, 0.2]  # timm: linspace(0, rate, depth)
    plain = _tiny(depth=3)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 8, 32, 32)
    assert torch.equal(model.eval()(x), plain.eval()(x))  # same weights: the same function in eval


@pytest.mark.parametrize("cls", [reference.TubeViT, __import__("tubevit_fast").TubeViT])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(cls):
    model = _tiny(depth=2, drop=0.5, cls=cls).train()
    samples = [torch.randn(3, 8, 32, 32), torch.randn(3, 32, 32), torch.randn(3, 8, 32, 32)]
    results = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(7)  # the same drop-path draws; checkpointing must replay them in the backward
        out = model(samples)
        (out * torch.arange(5.0)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_layer_decay_groups():
    model = _tiny(depth=3)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    # Layer 0: the tube embedding; block i: layer i + 1; the rest: layer 4 = depth + 1. lr 0.1 * 0.5 ** (4 - layer).
    expected = {"tube_embed.weights.0": (0.1 * 0.5 ** 4, 0.05), "tube_embed.biases.1": (0.1 * 0.5 ** 4, 0.0),
                "blocks.0.attn.qkv.weight": (0.1 * 0.5 ** 3, 0.05), "blocks.1.norm1.weight": (0.1 * 0.5 ** 2, 0.0),
                "blocks.2.mlp.fc2.weight": (0.1 * 0.5, 0.05), "blocks.2.mlp.fc2.bias": (0.1 * 0.5, 0.0),
                "norm.weight": (0.1, 0.0), "attn_pool.latent": (0.1, 0.0), "attn_pool.kv.weight": (0.1, 0.05),
                "head.weight": (0.1, 0.05), "head.bias": (0.1, 0.0)}
    for name, (lr, wd) in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(lr, rel=1e-12), name
        assert wd_of[id(params[name])] == wd, name
    assert sum(len(g["params"]) for g in param_groups(model, 0.05, 0.5)) == len(params)  # each parameter once


def test_ema_update():
    model = _tiny(depth=1)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = EMA(model, 0.9)
    steps = []
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        steps.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    for name, e in ema.module.named_parameters():
        want = 0.9 * (0.9 * start[name] + 0.1 * steps[0][name]) + 0.1 * steps[1][name]
        assert torch.allclose(e.double(), want, atol=1e-5), name
        assert not e.requires_grad


def test_accumulation_equals_one_big_batch():
    model = _tiny(depth=2).double()
    torch.manual_seed(1)
    samples = [torch.randn(3, 8, 32, 32, dtype=torch.float64) if i % 3 else torch.randn(3, 32, 32, dtype=torch.float64)
               for i in range(5)]
    labels = torch.tensor([0, 3, 1, 4, 2])
    grads, losses = [], []
    for accum in (1, 2, 5):
        model.zero_grad()
        loss, logits = train_step(model, samples, labels, accum_steps=accum, smoothing=0.1)
        assert logits.shape == (5, 5)
        losses.append(loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # The batch loss by hand: mean over the 5 samples of the smoothed cross-entropy.
    with torch.no_grad():
        logp = torch.log_softmax(model(samples), -1)
    target = torch.full((5, 5), 0.1 / 5, dtype=torch.float64)
    target[torch.arange(5), labels] += 0.9
    assert torch.allclose(losses[0], -(target * logp).sum(-1).mean(), atol=1e-12)
    for other, loss in zip(grads[1:], losses[1:]):
        assert torch.allclose(loss, losses[0], atol=1e-12)
        for name in other:
            assert torch.allclose(other[name], grads[0][name], atol=1e-12), name


def test_bf16_precision_on_cpu(tmp_path):
    out = _run(tmp_path, "--steps", 2, "--batch-size", 4, "--train-items", 8, "--precision", "bf16")
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["args"]["precision"] == "bf16" and all(math.isfinite(r["loss"]) for r in out["history"])


def test_eval_every_logs_validation_of_the_weights_and_the_ema(tmp_path):
    out = T.main([*TINY[:-2], "--val-items", "8", "--out", str(tmp_path), "--steps", "3", "--batch-size", "4",
                  "--train-items", "8", "--eval-every", "2", "--ema", "0.5"])
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [("val_top1" in r, "ema_val_top1" in r) for r in records[:3]] == [(False, False), (True, True),
                                                                              (False, False)]
    summary = records[-1]["summary"]
    assert summary["val_top1"] == out["val_acc"] and 0 <= summary["ema_val_top5"] <= 1
    assert summary["val_top1"] <= summary["val_top5"]


# ---- the data path of the command lines ------------------------------------------------------------

def test_the_clip_index_is_built_once_in_the_main_process_and_cached(tmp_path, monkeypatch):
    """train (training and validation data, 2 DataLoader workers), evaluate and predict index the videos
    before any worker starts; a worker that probes fails the run. A second run reads the cache file."""
    pytest.importorskip("av")
    from tubevit_fast import data, evaluate, predict
    from tubevit_fast.app import clip_index, decode

    folder = tmp_path / "clips"
    clips = data.main(["--out", str(folder), "--items", "8", "--seed", "5"])
    probes = tmp_path / "probes.txt"  # a file: the index may probe in a process pool
    real = decode.probe

    def probe(path, *args, **kwargs):
        worker = torch.utils.data.get_worker_info() is not None
        with open(probes, "a") as f:
            f.write(f"{'worker' if worker else 'main'} {path}\n")
        if worker:
            raise RuntimeError(f"a DataLoader worker probed {path}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(decode, "probe", probe)
    monkeypatch.setattr(clip_index, "probe", probe)
    cache = tmp_path / "index.json"
    run = ["--data", folder, "--val-data", folder, "--workers", "2", "--steps", "2", "--batch-size", "4",
           "--warmup", "1", "--clip-index", cache]
    _run(tmp_path / "run", *run)
    lines = probes.read_text().splitlines()
    # each file once, for train and val together
    assert sorted(lines) == sorted(f"main {os.path.abspath(c)}" for c in clips)
    assert set(json.loads(cache.read_text())["videos"]) == {os.path.abspath(c) for c in clips}

    _run(tmp_path / "run", *run, "--overwrite")
    checkpoint = str(tmp_path / "run" / "last.pt")
    assert evaluate.main(["--data", str(folder), "--checkpoint", checkpoint, "--clip-index", str(cache),
                          "--workers", "2"])["result"].num_videos == 8
    assert len(predict.main([*clips[:3], "--checkpoint", checkpoint, "--clip-index", str(cache)])) == 3
    assert probes.read_text().splitlines() == lines  # every later run from the cache


def test_decoder_option_reaches_the_decoder_and_both_give_the_same_batch(tmp_path, monkeypatch):
    """--decoder torchcodec: train's batches, evaluate's and predict's scores are the PyAV ones (the
    same frames, converted by another FFmpeg build: equal up to rounding), and torchcodec decoded them."""
    pytest.importorskip("av")
    try:
        import torchcodec.decoders  # noqa: F401 - loads only with FFmpeg's shared libraries
    except Exception as err:
        pytest.skip(f"torchcodec does not load: {err}")
    from tubevit_fast import data, evaluate, predict
    from tubevit_fast.app import decode
    from tubevit_fast.app.loop import make_data

    folder = tmp_path / "clips"
    clips = data.main(["--out", str(folder), "--items", "4", "--frames", "24", "--size", "40", "--seed", "7"])
    opened = []
    real = decode._read_torchcodec
    monkeypatch.setattr(decode, "_read_torchcodec", lambda path, *a: opened.append(path) or real(path, *a))
    cache = str(tmp_path / "index.json")
    checkpoint = T.main([*TINY, "--out", str(tmp_path / "run"), "--data", str(folder), "--steps", "1",
                         "--batch-size", "2", "--frames", "8", "--stride", "2",
                         "--clip-index", cache])["checkpoint"]
    batches, scores, predictions = {}, {}, {}
    for decoder in ("pyav", "torchcodec"):
        args = T.build_parser().parse_args(["--data", str(folder), "--frames", "8", "--stride", "2",
                                            "--size", "32", "--decoder", decoder, "--no-progress",
                                            "--clip-index", cache])
        train = make_data(args).train
        batches[decoder] = [train[(i, 3)] for i in range(len(train))]
        scores[decoder] = evaluate.main(["--data", str(folder), "--checkpoint", checkpoint,
                                         "--clip-index", cache, "--decoder", decoder,
                                         "--crops", "3"])["result"].scores
        predictions[decoder] = predict.main([*clips, "--checkpoint", checkpoint, "--decoder", decoder,
                                             "--top-k", "7", "--clip-index", cache])
    assert sorted(opened) == sorted(clips * 3)  # train, evaluate, predict
    for (x, label), (y, other) in zip(batches["pyav"], batches["torchcodec"]):
        assert label == other and x.shape == y.shape == (3, 8, 32, 32) and x.dtype == y.dtype == torch.uint8
        assert (x.int() - y.int()).abs().float().mean() < 1.5
    np.testing.assert_allclose(scores["torchcodec"], scores["pyav"], atol=0.02)
    for (path, ranked), (other, ranked2) in zip(predictions["pyav"], predictions["torchcodec"]):
        assert path == other
        np.testing.assert_allclose([p for _, p in ranked2], [p for _, p in ranked], atol=0.02)


RANK_SCRIPT = """
import os, sys
from tubevit_fast.app import clip_index, decode, media
from tubevit_fast.io import MediaError
if os.environ["RANK"] == "1":  # waits for rank 0's clip index, then loses its whole first batch
    def no_probe(path, *args, **kwargs):
        raise RuntimeError(f"rank 1 probed {path}")
    decode.probe = clip_index.probe = no_probe
    read, failures = media.FileMedia.read, [int(os.environ["FAILURES"])]
    def flaky(self, index, *args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise MediaError(f"{self.name(index)}: planted failure")
        return read(self, index, *args, **kwargs)
    media.FileMedia.read = flaky
from tubevit_fast import train
from tubevit_fast.cli import run
sys.exit(run(train.main, sys.argv[1:]))
"""


def test_ddp_step_where_one_rank_skipped_every_file(tmp_path):
    """Two gloo ranks (torchrun's environment): rank 0 builds the clip index while rank 1 waits and reads
    it; every file of rank 1's first batch fails, so both ranks skip step 1 together (no hang) and
    train steps 2-3 to the same weights."""
    pytest.importorskip("av")
    import socket

    from tubevit_fast import data

    folder = tmp_path / "clips"
    data.main(["--out", str(folder), "--items", "8", "--seed", "3"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*TINY, "--out", str(tmp_path / "run"), "--data", str(folder), "--steps", "3", "--batch-size", "2",
            "--warmup", "1", "--clip-index", str(tmp_path / "index.json")]
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "OMP_NUM_THREADS": "1", "FAILURES": "2",
                                   "PYTHONPATH": os.pathsep.join(sys.path)})
             for r in range(2)]
    try:
        results = [rank.communicate(timeout=40) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert results[1][1].count("planted failure") == 2
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [("loss" in r, r.get("skipped")) for r in records[:3]] == [(False, 2), (True, 0), (True, 0)]
    hashes = [(tmp_path / "run" / f"weights_rank{r}.sha256").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]


def test_the_syncing_micro_batch_is_never_empty():
    """Under DDP only the last micro-batch all-reduces the gradients (the others run under no_sync):
    however few items a rank kept, that one must hold some, or the rank never joins the all-reduce."""
    import contextlib

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 3))
            self.unsynced, self.forwards = False, []

        @contextlib.contextmanager
        def no_sync(self):
            self.unsynced = True
            yield
            self.unsynced = False

        def forward(self, samples):
            self.forwards.append((len(samples), not self.unsynced))
            return torch.stack([x.float().mean(dim=(1, 2, 3)) for x in samples]) @ self.weight

    for kept, accum in [(1, 4), (2, 4), (3, 4), (5, 4), (1, 2), (7, 3)]:
        net = Net()
        samples = [torch.randint(0, 256, (3, 2, 4, 4), dtype=torch.uint8) for _ in range(kept)]
        train_step(net, samples, torch.randint(0, 3, (kept,)), accum_steps=accum)
        assert net.forwards[-1][0] > 0 and net.forwards[-1][1], (kept, accum, net.forwards)
        assert [synced for _, synced in net.forwards].count(True) == 1
        assert sum(n for n, _ in net.forwards) == kept
