"""Multi-view evaluation: view averaging against a hand computation, top-5 and mean class accuracy on a
known confusion, the report files, the DDP shards, and the command line's one-line mistakes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from tubevit_fast import cli
from tubevit_fast import evaluate as evaluate_cli
from tubevit_fast.app.evaluate import MultiViewMeter, evaluate, shard, write_report
from tubevit_fast.app.checkpoint import build_model


def softmax64(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class ChannelMeanModel(torch.nn.Module):
    """Logits = W @ (each channel's mean pixel) + b: a known function of every (uint8) view."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.num_classes = weight.shape[0]
        self.weight, self.bias = torch.from_numpy(weight), torch.from_numpy(bias)
        self.seen_batches = []

    def forward(self, views):
        self.seen_batches.append(len(views))
        features = torch.stack([v.double().mean(dim=tuple(range(1, v.dim()))) for v in views])
        return (features @ self.weight.T + self.bias).float()


class FakeViews(torch.utils.data.Dataset):
    """EvalViews-shaped items: (uint8 (V, 3, T, H, W) views, label, index)."""

    def __init__(self, views: list[torch.Tensor], labels: list[int]):
        self.views, self.labels = views, labels

    def __len__(self):
        return len(self.views)

    def __getitem__(self, i):
        return self.views[i], self.labels[i], i


def test_video_score_is_the_mean_of_its_views_softmax():
    rng = np.random.default_rng()
    classes, videos, views = 6, 5, 3
    weight, bias = rng.normal(size=(classes, 3)) / 40, rng.normal(size=classes)
    clips = [torch.from_numpy(rng.integers(0, 256, size=(views, 3, 2, 4, 4), dtype=np.uint8)) for _ in range(videos)]
    labels = rng.integers(0, classes, size=videos).tolist()
    model = ChannelMeanModel(weight, bias).train()
    result = evaluate(model, FakeViews(clips, labels), batch_size=2, device="cpu")
    expected = []
    for clip in clips:  # by hand: softmax of each view's logits, then the mean over the views
        feats = clip.numpy().astype(np.float64).reshape(views, 3, -1).mean(-1)
        expected.append(softmax64(feats @ weight.T + bias).mean(0))
    np.testing.assert_allclose(result.scores, np.stack(expected), rtol=1e-5, atol=1e-7)
    assert result.indices.tolist() == list(range(videos)) and result.labels.tolist() == labels
    assert model.seen_batches == [2 * views, 2 * views, views]  # a batch's views in one forward pass
    assert model.training  # left as it came


def known_confusion() -> MultiViewMeter:
    """7 classes; class 0: 4 videos, 3 right (the 4th ranks its label 3rd); class 1: 1 video, its label
    ranked 6th; class 2: 2 videos, both right; classes 3-6: no video. Rank r of the label is set by
    giving the classes probabilities in a random order with the label at place r."""
    rng = np.random.default_rng()
    cases = [(0, 0), (0, 0), (0, 0), (0, 2), (1, 5), (2, 0), (2, 0)]  # (label, 0-based rank of the label)
    meter = MultiViewMeter()
    for index, (label, rank) in enumerate(cases):
        others = rng.permutation([c for c in range(7) if c != label]).tolist()
        order = others[:rank] + [label] + others[rank:]
        probs = np.empty(7)
        probs[order] = np.sort(rng.dirichlet(np.ones(7)))[::-1]
        meter.add(torch.from_numpy(np.log(probs))[None], [1], [label], [index])
    return meter


def test_top5_and_mean_class_accuracy_on_a_known_confusion():
    result = known_confusion().result(7)
    assert result.top1 == pytest.approx(5 / 7)
    assert result.top5 == pytest.approx(6 / 7)      # the rank-6 video alone misses the top 5
    assert result.topk_accuracy(6) == pytest.approx(1.0)
    assert result.per_class_accuracy == [pytest.approx(3 / 4), 0.0, 1.0, None, None, None, None]
    assert result.mean_class_accuracy == pytest.approx((3 / 4 + 0 + 1) / 3)   # classes without videos left out
    confusion = result.confusion
    assert confusion.sum() == 7 and confusion[0, 0] == 3 and confusion[1, 1] == 0 and confusion[2, 2] == 2
    assert confusion[0].sum() == 4 and confusion[1].sum() == 1 and confusion[3:].sum() == 0


def test_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    result = known_confusion().result(7)
    classes = [f"class{c}" for c in range(7)]
    paths = [f"v{i}.mp4" for i in range(7)]
    write_report(result, str(tmp_path), classes, paths, {"clips": 2})
    with Image.open(tmp_path / "confusion.png") as png:
        assert png.size == (510, 510)   # 3 + 0.3 * 7 inches at 100 dpi
        assert len(np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not a blank canvas
    records = [json.loads(line) for line in open(tmp_path / "scores.jsonl")]
    assert [r["path"] for r in records] == paths
    assert [r["correct"] for r in records] == [True, True, True, False, False, True, True]
    assert records[3]["top5"][2][0] == "class0" and records[3]["label"] == "class0"
    assert all(abs(sum(r["scores"]) - 1) < 1e-9 for r in records)
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert [(r["class"], r["videos"], r["correct"]) for r in rows[:3]] == [("class0", "4", "3"), ("class1", "1", "0"),
                                                                         ("class2", "2", "2")]
    assert rows[3]["accuracy"] == "" and json.load(open(tmp_path / "per_class.json"))[3]["accuracy"] is None
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["videos"] == 7 and summary["clips"] == 2 and summary["top5"] == pytest.approx(6 / 7)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("videos", [0, 1, 2, 5, 7, 9])
def test_shards_cover_every_video_once(world, videos):
    shards = [list(shard(videos, rank, world)) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(videos))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_ranks_merge_into_one_score_per_video():
    rng = np.random.default_rng()
    logits = torch.from_numpy(rng.normal(size=(5, 4)))
    meters = []
    for rank in range(2):
        meter = MultiViewMeter()
        mine = list(shard(5, rank, 2))
        meter.add(logits[mine], [1] * len(mine), [0] * len(mine), mine)
        meters.append(meter)
    merged = meters[0].merge(meters[1]).result(4)
    assert merged.indices.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(merged.scores, softmax64(logits.numpy()), rtol=1e-12)
    with pytest.raises(ValueError, match="scored on two ranks"):
        meters[0].merge(meters[1])


# ---- the command line ---------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["move_right", "move_left", "move_down", "move_up", "image_square", "image_disk", "image_triangle"]


def make_checkpoint(path, **extra) -> str:
    """A tiny untrained checkpoint in train.py's format (the fields evaluate and predict read)."""
    cfg = dict(num_classes=len(CLASSES), classes=CLASSES, tubes="small", dim=24, depth=1, heads=2, mlp_ratio=2.0,
               frames=8, size=32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    torch.manual_seed(0)
    model = build_model(cfg, "reference")
    torch.save({"model": model.state_dict(), "model_config": cfg, "step": 0, "args": {"stride": None}, **extra},
               path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("av")
    from tubevit_fast import data

    root = tmp_path_factory.mktemp("eval")
    clips = data.main(["--out", str(root / "clips"), "--items", "4"])
    return make_checkpoint(root / "ckpt.pt"), str(root / "clips"), clips


def run_cli(argv, capsys):
    capsys.readouterr()
    status = cli.run(evaluate_cli.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out.strip().splitlines(), err.strip().splitlines()


def test_cli_prints_the_metrics_and_writes_the_report(setup, tmp_path, capsys):
    checkpoint, folder, clips = setup
    status, out, err = run_cli(["--data", folder, "--checkpoint", checkpoint, "--clips", "2", "--crops", "3",
                                "--batch-size", "3", "--out", tmp_path / "ev"], capsys)
    assert status == 0, err
    assert len(out) == 1 and out[0].startswith("top-1 ") and "mean class accuracy" in out[0]
    assert out[0].endswith(f"({len(clips)} videos x 6 views)")
    assert sorted(os.listdir(tmp_path / "ev")) == sorted(
        ["summary.json", "scores.jsonl", "per_class.json", "per_class.csv", "confusion.png"])
    records = [json.loads(line) for line in open(tmp_path / "ev" / "scores.jsonl")]
    assert sorted(r["path"] for r in records) == sorted(clips)
    # Another evaluation into the same folder: refused, unless --overwrite.
    again = ["--data", folder, "--checkpoint", checkpoint, "--out", tmp_path / "ev"]
    status, out, err = run_cli(again, capsys)
    assert status == cli.EXIT_ERROR and len(err) == 1 and "holds another evaluation" in err[0] and not out
    status, out, err = run_cli([*again, "--overwrite"], capsys)
    assert status == 0 and out[0].endswith("x 1 views)")


def _other_classes(tmp_path, folder):
    (tmp_path / "data" / "jumping").mkdir(parents=True)
    clip = next(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs)
    os.symlink(clip, tmp_path / "data" / "jumping" / "a.mp4")
    return tmp_path / "data"


MISTAKES = {
    "missing checkpoint": (lambda t, c, f: ["--data", f, "--checkpoint", t / "nope.pt"], "checkpoint not found"),
    "missing data": (lambda t, c, f: ["--data", t / "nope", "--checkpoint", c], "nope"),
    "classes the checkpoint lacks": (lambda t, c, f: ["--data", _other_classes(t, f), "--checkpoint", c], "jumping"),
    "out is a file": (lambda t, c, f: ["--data", f, "--checkpoint", c, "--out", (t / "out").write_text("x") and
                                       t / "out"], "exists and is not a folder"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_cli_mistakes_fail_in_one_line_before_writing(case, setup, tmp_path, capsys):
    checkpoint, folder, _ = setup
    make_argv, message = MISTAKES[case]
    argv = make_argv(tmp_path, checkpoint, folder)
    if "--out" not in argv:
        argv += ["--out", tmp_path / "ev"]
    status, out, err = run_cli(argv, capsys)
    assert status == cli.EXIT_ERROR and not out
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "ev").exists()


def test_cli_bad_files_stop_or_are_skipped_and_counted(setup, tmp_path, capsys):
    checkpoint, folder, clips = setup
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    junk = data / "move_up" / "junk.mp4"
    junk.write_text("not a video " * 40)
    # Found when the clip index is built: refused before anything is scored or written.
    status, out, err = run_cli(["--data", data, "--checkpoint", checkpoint, "--out", tmp_path / "ev"], capsys)
    assert status == cli.EXIT_ERROR and not out and len(err) == 1, err
    assert err[0].startswith(f"error: --data: 1 of 5 videos cannot be decoded, e.g. {junk}: cannot be")
    assert not (tmp_path / "ev").exists()
    status, out, err = run_cli(["--data", data, "--checkpoint", checkpoint, "--bad-files", "skip",
                                "--out", tmp_path / "ev"], capsys)
    assert status == 0 and out[0].endswith(f"({len(clips)} videos x 1 views, 1 skipped)")
    warnings = [line for line in err if line.startswith("warning")]
    assert len(warnings) == 2 and warnings[0].startswith(f"warning: skipped {junk}: cannot be decoded as a")
    assert warnings[1] == "warning: skipped 1 of 5 videos that cannot be decoded"
    assert json.load(open(tmp_path / "ev" / "summary.json"))["skipped"] == 1
    # Nothing left to score: an error, not a report of nan accuracies.
    (tmp_path / "junk" / "move_up").mkdir(parents=True)
    shutil.copy(junk, tmp_path / "junk" / "move_up")
    status, out, err = run_cli(["--data", tmp_path / "junk", "--checkpoint", checkpoint, "--bad-files", "skip",
                                "--out", tmp_path / "ev2"], capsys)
    assert status == cli.EXIT_ERROR and err[-1].endswith("none of its 1 files can be decoded")
    assert not (tmp_path / "ev2").exists()


def test_cli_under_a_process_group_scores_each_video_once_on_rank_0(setup, tmp_path, capsys):
    """Two ranks (the environment torchrun sets, gloo on the CPU): rank 0 alone prints and writes, and
    its scores are those of one process."""
    checkpoint, folder, clips = setup
    argv = ["--data", folder, "--checkpoint", checkpoint, "--clips", "2", "--batch-size", "1"]
    assert run_cli([*argv, "--out", tmp_path / "alone"], capsys)[0] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-m", "tubevit_fast.evaluate", *argv, "--out", tmp_path / "ddp"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for rank in range(2)]
    (out0, err0), (out1, err1) = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], err0[-2000:] + err1[-2000:]
    assert out0.startswith("top-1 ") and "(4 videos x 2 views)" in out0 and out1 == ""
    alone, ddp = ([json.loads(line) for line in open(tmp_path / run / "scores.jsonl")] for run in ("alone", "ddp"))
    assert [r["path"] for r in ddp] == [r["path"] for r in alone] and sorted(r["path"] for r in ddp) == sorted(clips)
    np.testing.assert_allclose([r["scores"] for r in ddp], [r["scores"] for r in alone], rtol=1e-5)


def test_bf16_autocast_on_the_cpu_scores_close_to_fp32(setup):
    from tubevit_fast.app.checkpoint import load_checkpoint
    from tubevit_fast.app.datasets import EvalViews
    from tubevit_fast.app.checkpoint import checkpoint_sampling
    from tubevit_fast.app.media import FileMedia
    from tubevit_fast.app.sources import load_annotations

    checkpoint, folder, _ = setup
    model, ckpt = load_checkpoint(checkpoint)
    views = EvalViews(FileMedia(load_annotations(folder, classes=CLASSES)), checkpoint_sampling(ckpt), 32, crops=3)
    fp32, bf16 = (evaluate(model, views, 4, "cpu", precision) for precision in ("fp32", "bf16"))
    assert not np.array_equal(fp32.scores, bf16.scores)  # autocast did run
    np.testing.assert_allclose(bf16.scores, fp32.scores, atol=0.02)
    with pytest.raises(ValueError, match="precision must be one of"):
        evaluate(model, views, 4, "cpu", "fp16")


def test_ema_scores_the_checkpoints_ema_weights(setup, tmp_path, capsys):
    """--ema (evaluate and predict): the scores of a model holding the checkpoint's EMA state, not its raw
    weights'; a checkpoint without EMA weights is refused in one line."""
    from tubevit_fast import predict
    from tubevit_fast.app.checkpoint import checkpoint_sampling
    from tubevit_fast.app.datasets import EvalViews
    from tubevit_fast.app.media import FileMedia
    from tubevit_fast.app.sources import load_annotations

    plain, folder, clips = setup
    ckpt = torch.load(plain, weights_only=True)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    averaged = build_model(ckpt["model_config"], "reference")  # fresh random weights stand in for the average
    checkpoint = str(tmp_path / "ema.pt")
    torch.save({**ckpt, "ema": averaged.state_dict()}, checkpoint)
    argv = ["--data", folder, "--checkpoint", checkpoint, "--crops", "3"]
    raw = evaluate_cli.main([str(a) for a in argv])["result"]
    ema = evaluate_cli.main([str(a) for a in [*argv, "--ema"]])["result"]
    media = FileMedia(load_annotations(folder, classes=CLASSES))
    views = EvalViews(media, checkpoint_sampling(ckpt), 32, crops=3)
    expected = evaluate(averaged, views, batch_size=2, device="cpu")
    np.testing.assert_allclose(ema.scores, expected.scores, rtol=1e-5, atol=1e-7)
    assert np.abs(ema.scores - raw.scores).max() > 1e-3
    ranked = dict(predict.main([*clips, "--checkpoint", checkpoint, "--ema", "--crops", "3", "--top-k", "1"]))
    by_path = {p: expected.scores[k] for k, p in zip(expected.indices.tolist(),
                                                      [p for p, _ in views.media.samples])}
    for path, [(name, prob)] in ranked.items():
        row = by_path[os.path.abspath(path)]
        assert name == CLASSES[row.argmax()] and abs(prob - row.max()) < 1e-5
    for cli_main in (evaluate_cli.main, predict.main):
        capsys.readouterr()
        argv = ["--data", folder] if cli_main is evaluate_cli.main else [clips[0]]
        assert cli.run(cli_main, [*argv, "--checkpoint", plain, "--ema"]) == cli.EXIT_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --ema: {plain} holds no EMA weights (train with --ema DECAY to keep them)"]
