"""predict: the checkpoint's clip sampling (its stride), batches that keep memory bounded, the accuracy
line when the inputs' folders name their classes, and bad inputs in one line."""
from __future__ import annotations

import shutil
import weakref

import pytest
import torch

from tubevit_fast import cli, predict
from tubevit_fast.app import datasets, decode

from test_evaluate import CLASSES, make_checkpoint

pytest.importorskip("av")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four 40-frame clips in class folders (move_*/NNNNN.mp4)."""
    from tubevit_fast import data

    return data.main(["--out", str(tmp_path_factory.mktemp("clips")), "--items", "4", "--frames", "40"])


def run_cli(argv, capsys):
    capsys.readouterr()
    status = cli.run(predict.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out.strip().splitlines(), err.strip().splitlines()


@pytest.fixture
def decoded(monkeypatch):
    """The frame indices each read asks the decoder for."""
    calls = []
    read = decode.read_frames

    def recording(path, indices, *args, **kwargs):
        calls.append(list(indices))
        return read(path, indices, *args, **kwargs)

    monkeypatch.setattr(decode, "read_frames", recording)
    return calls


# n = 40 frames, 8 frames `stride` apart: a window spans s = 7 * stride + 1 frames; the one evaluation
# window starts at floor((40 - s + 1) / 2).
@pytest.mark.parametrize("saved, option, expected", [
    ({"args": {"stride": 2}}, [], list(range(13, 28, 2))),                        # older checkpoint: --stride 2
    ({"args": {"stride": None}, "sampling": {"frames": 8, "stride": 3, "mode": "window"}}, [],
     list(range(9, 31, 3))),
    ({"args": {"stride": 2}}, ["--stride", "4"], list(range(6, 35, 4))),          # the option overrides it
    ({"args": {"stride": None}}, [], [2, 7, 12, 17, 22, 27, 32, 37]),              # segment centres: 5 i + 2
], ids=["args-stride2", "sampling-stride3", "option-stride4", "segments"])
def test_predict_reads_the_checkpoints_sampling(saved, option, expected, clips, tmp_path, capsys, decoded):
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(checkpoint, weights_only=True)
    torch.save({**ckpt, **saved}, checkpoint)
    status, out, err = run_cli([clips[0], "--checkpoint", checkpoint, "--top-k", "1", *option], capsys)
    assert status == 0, err
    assert decoded == [expected]


def test_batches_keep_memory_bounded(clips, tmp_path, monkeypatch, capsys):
    """At most two batches of clips are alive at once (the one being scored, the one being read),
    however many inputs are given."""
    live = {"now": 0, "most": 0}
    get = datasets.EvalViews.__getitem__

    def counted(self, index):
        item = get(self, index)
        live["now"] += 1
        live["most"] = max(live["most"], live["now"])
        weakref.finalize(item[0], lambda: live.update(now=live["now"] - 1))
        return item

    monkeypatch.setattr(datasets.EvalViews, "__getitem__", counted)
    inputs = clips * 3
    status, out, err = run_cli([*inputs, "--checkpoint", make_checkpoint(tmp_path / "ckpt.pt"), "--top-k", "2",
                                "--batch-size", "2", "--clips", "2"], capsys)
    assert status == 0, err
    assert [line.split("  ")[0] for line in out[:-1:2]] == inputs   # input order, two lines each
    assert 1 <= live["most"] <= 4


def test_accuracy_line_when_folders_name_the_classes(clips, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt")
    status, out, err = run_cli([*clips, "--checkpoint", checkpoint, "--top-k", "1", "--crops", "3"], capsys)
    assert status == 0, err
    best = {line.split("  ")[0]: line.split("  ")[1][3:] for line in out[:-1]}
    right = sum(best[path] == path.split("/")[-2] for path in clips)
    assert out[-1].startswith(f"accuracy: top-1 {right / len(clips):.4f} ({right}/{len(clips)}), top-5 ")
    # An input outside the class folders: no labels, no accuracy line.
    loose = shutil.copy(clips[0], tmp_path / "loose.mp4")
    status, out, err = run_cli([*clips, loose, "--checkpoint", checkpoint, "--top-k", "1"], capsys)
    assert status == 0 and len(out) == len(clips) + 1 and not out[-1].startswith("accuracy")


def test_images_and_videos_together(clips, tmp_path, capsys):
    from PIL import Image
    from tubevit_fast.data import SyntheticShapes

    frames, _ = SyntheticShapes(1, 1, 48, seed=3, image_every=1).render(0)
    image = tmp_path / "shape.png"
    Image.fromarray(frames[0]).save(image)
    results = predict.predict([image, clips[0]], make_checkpoint(tmp_path / "ckpt.pt"), top_k=3, batch_size=2)
    assert [path for path, _ in results] == [str(image), clips[0]]
    for _, ranked in results:
        assert len(ranked) == 3 and {name for name, _ in ranked} <= set(CLASSES)
        assert ranked[0][1] >= ranked[1][1] >= ranked[2][1] > 0


@pytest.mark.parametrize("argv, message", [
    (lambda t, c: [c[0], "--clips", "0"], "--clips must be >= 1"),
    (lambda t, c: [c[0], "--batch-size", "0"], "--batch-size must be >= 1"),
    (lambda t, c: [c[0], "--frames", "2"], "--frames 2 --size 32: "),
    (lambda t, c: [c[0], t / "nope.mp4"], "no such video or image file"),
    (lambda t, c: [c[0], (t / "junk.mp4").write_text("junk " * 50) and t / "junk.mp4"], "junk.mp4: cannot be decoded"),
    (lambda t, c: [c[0], "--device", "cuda:7"] if not torch.cuda.is_available() else [t / "nope.mp4"], "cuda"
     if not torch.cuda.is_available() else "no such video"),
], ids=["clips0", "batch0", "frames2", "missing", "junk", "no-gpu"])
def test_bad_inputs_fail_in_one_line(argv, message, clips, tmp_path, capsys):
    status, out, err = run_cli([*argv(tmp_path, clips), "--checkpoint", make_checkpoint(tmp_path / "ckpt.pt")], capsys)
    assert status == cli.EXIT_ERROR
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
