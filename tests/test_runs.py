"""A training run on disk: an occupied --out refused, --overwrite, resume bitwise exact with random
clip sampling and augmentation, a damaged file skipped and counted, Ctrl-C printed once with
DataLoader workers, mistakes in the new flags refused before any output folder exists."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("av")

from tubevit_fast.app import checkpoint  # noqa: E402
from tubevit_fast import cli, train  # noqa: E402
from tubevit_fast.app.synthetic import SyntheticShapes  # noqa: E402
from _training_runs import TINY, start_training  # noqa: E402



@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A list-file dataset of 12 generated 16-frame clips (4 directions of motion)."""
    root = tmp_path_factory.mktemp("clips")
    shapes = SyntheticShapes(12, num_frames=16, size=32, seed=3, image_every=0)
    paths = shapes.export(root)
    lines = [f"{os.path.relpath(p, root)} {shapes.label(i)}" for i, p in enumerate(paths)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def _one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    status = cli.run(train.main, [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_ERROR and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _records(log) -> list[dict]:
    return [json.loads(line) for line in open(log)]


def test_an_occupied_out_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    first = train.main([*TINY, "--out", str(out), "--steps", "2"])
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    err = _one_line_error([*TINY, "--out", out, "--steps", "3"], capsys)
    assert f"--out {out} holds another run (last.pt, log.jsonl)" in err and "--overwrite" in err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # untouched
    train.main([*TINY, "--out", str(out), "--steps", "3", "--overwrite", "--seed", "1"])
    assert [r.get("step", r.get("summary", {}).get("step")) for r in _records(out / "log.jsonl")] == [1, 2, 3, 3]
    resumed = train.main(["--resume", first["checkpoint"], "--steps", "4", "--no-progress"])  # the new run's
    assert [r["step"] for r in resumed["history"]] == [4]


def test_resume_is_bitwise_exact_with_random_clips_and_augmentation(tmp_path, clips):
    # Random windows (8 of the 16 frames), random resized crop, flip, RandAugment, erasing,
    # MixUp/CutMix with smoothing, drop-path and an EMA: every random draw must come back on resume.
    run = ["--data", str(clips / "train.txt"), "--frames", "8", "--size", "32", "--steps", "4",
           "--batch-size", "4", "--randaug", "2,9", "--reprob", "0.5", "--mixup", "0.8", "--cutmix", "1.0",
           "--smoothing", "0.1", "--drop-path", "0.2", "--ema", "0.9", "--dim", "64", "--heads", "2", "--depth", "2",
           "--warmup", "1", "--no-progress", "--threads", "1", "--seed", "5"]
    straight = train.main([*run, "--out", str(tmp_path / "a")])
    half = train.main([*run, "--out", str(tmp_path / "b"), "--stop-after", "2"])
    resumed = train.main(["--resume", half["checkpoint"], "--no-progress", "--threads", "1", "--workers", "2"])
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"][2:]]
    assert checkpoint.state_hash(resumed["model"]) == checkpoint.state_hash(straight["model"])
    assert checkpoint.state_hash(resumed["ema"]) == checkpoint.state_hash(straight["ema"])
    # The draws differ from one seed to another: the equality above is not a constant.
    other = train.main([*run, "--out", str(tmp_path / "c"), "--seed", "6", "--steps", "1"])
    assert other["history"][0]["loss"] != straight["history"][0]["loss"]


def test_a_damaged_file_is_skipped_and_counted(tmp_path, clips, capsys):
    """Found when the clip index is built: left out from the start (one warning naming it, then the
    count) or, with --bad-files error, refused in one line before the run's folder exists."""
    damaged = tmp_path / "damaged.mp4"
    good = (clips / "move_right").iterdir().__next__().read_bytes()
    damaged.write_bytes(good[:64] + bytes(reversed(good[64:])))  # the container's header, then scrambled bytes
    listing = (clips / "train.txt").read_text() + f"{damaged} 0\n"
    (tmp_path / "train.txt").write_text(listing)
    argv = ["--data", str(tmp_path / "train.txt"), "--root", str(clips), "--frames", "8", "--size", "32",
            "--steps", "4", "--batch-size", "12", "--dim", "64", "--heads", "2", "--depth", "1",
            "--no-progress", "--threads", "1", "--out", str(tmp_path / "run")]
    capsys.readouterr()
    with pytest.raises(cli.UsageError, match=rf"^--data: 1 of 13 videos cannot be decoded, e.g. {damaged}: "):
        train.main([*argv, "--bad-files", "error"])
    assert not (tmp_path / "run").exists()
    capsys.readouterr()
    out = train.main(argv)
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and warnings[0].startswith(f"warning: skipped {damaged}: ")
    assert warnings[1] == "warning: skipped 1 of 13 videos that cannot be decoded"
    assert "12 videos" in captured.err and "1 unreadable skipped" in captured.err
    assert out["skipped"] == 0 and out["step"] == 4  # never drawn: every batch is whole
    assert [r["skipped"] for r in _records(tmp_path / "run" / "log.jsonl")[:-1]] == [0, 0, 0, 0]


def test_ctrl_c_message_is_printed_once_with_workers(tmp_path):
    proc = start_training(tmp_path, 2, "--workers", "2")
    proc.send_signal(signal.SIGINT)
    for child in _children(proc.pid):  # a terminal sends Ctrl-C to the whole process group
        os.kill(child, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
    assert err.count("Ctrl-C: stopping after this step") == 1, err[-2000:]
    assert "Traceback" not in err


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("argv, message", [
    (["--accum-steps", "3"], "--batch-size 4 must be a multiple of --accum-steps 3"),
    (["--drop-path", "1.0"], "--drop-path must be in [0, 1)"),
    (["--layer-decay", "0"], "--layer-decay must be in (0, 1]"),
    (["--ema", "1.5"], "--ema must be a decay in (0, 1)"),
    (["--num-classes", "3"], "--num-classes 3 is fewer than the data's 7 classes"),
    (["--reprob", "2"], "reprob must be in [0, 1]"),
    (["--stride", "2"], "--stride and --sampling apply to --data videos"),
    (["--data", "{clips}/train.txt", "--val-data", "{clips}/nope.txt"], "nope.txt: no such"),
    (["--data", "{clips}/train.txt", "--sampling", "segments", "--stride", "2"], "segments sampling takes no stride"),
])
def test_new_flag_mistakes_fail_before_any_output(tmp_path, clips, capsys, argv, message):
    argv = [a.format(clips=clips) for a in argv]
    err = _one_line_error([*TINY, *argv, "--out", tmp_path / "out"], capsys)
    assert message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--scale", "0.5"], "argument --scale: expected two numbers MIN,MAX, got '0.5'"),
    (["--ratio", "a,b"], "argument --ratio: expected two numbers MIN,MAX, got 'a,b'"),
    (["--randaug", "2,9.5"], "argument --randaug: expected N,M (ops, magnitude), e.g. 2,9; got '2,9.5'"),
])
def test_pair_options_that_are_not_two_values_are_refused_by_name(capsys, argv, message):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_joint_training_with_image_data(tmp_path, clips):
    images = SyntheticShapes(6, size=32, seed=4, image_every=1).export(tmp_path / "images")  # still shapes
    assert all(p.endswith(".png") for p in images)
    out = train.main(["--data", str(clips / "train.txt"), "--image-data", str(tmp_path / "images"), "--image-ratio",
                      "0.5", "--frames", "8", "--size", "32", "--steps", "2", "--batch-size", "4", "--dim", "64",
                      "--heads", "2", "--depth", "1", "--no-progress", "--threads", "1", "--out", str(tmp_path / "run")])
    assert [(r["videos"], r["images"]) for r in out["history"]] == [(2, 2), (2, 2)]
    classes = torch.load(out["checkpoint"], weights_only=True)["model_config"]["classes"]
    assert sorted(classes[:4]) == ["move_down", "move_left", "move_right", "move_up"]  # the list's, then the images'
    assert sorted(classes[4:]) == sorted({os.path.basename(os.path.dirname(p)) for p in images})


def test_joint_training_with_padded_classes_resumes(tmp_path, clips, capsys):
    """A joint run whose --num-classes pads the label space resumes: the checkpoint's padded class
    list is the data's (videos', then images') followed by its padding; data whose classes changed
    since are still refused."""
    SyntheticShapes(6, size=32, seed=4, image_every=1).export(tmp_path / "images")
    first = train.main(["--data", str(clips / "train.txt"), "--image-data", str(tmp_path / "images"),
                        "--num-classes", "12", "--frames", "8", "--size", "32", "--steps", "1", "--batch-size", "4",
                        *TINY[:6], "--no-progress", "--threads", "1", "--out", str(tmp_path / "run")])
    classes = torch.load(first["checkpoint"], weights_only=True)["model_config"]["classes"]
    assert len(classes) == 12 and classes[-1] == "class_11"
    resumed = train.main(["--resume", first["checkpoint"], "--steps", "2", "--no-progress", "--threads", "1"])
    assert [r["step"] for r in resumed["history"]][-1] == 2
    # A new image class since: the label space differs from the checkpoint's, refused in one line.
    shutil.copytree(tmp_path / "images" / "image_disk", tmp_path / "images" / "image_star")
    err = _one_line_error(["--resume", resumed["checkpoint"], "--steps", "3", "--no-progress"], capsys)
    assert "differ from the checkpoint's" in err and "image_star" in err, err


def test_joint_training_whose_videos_are_all_unreadable_fails_in_one_line(tmp_path, clips, capsys):
    """Images alone cannot fill a batch's video part: one line, not the sampler's traceback."""
    SyntheticShapes(6, size=32, seed=4, image_every=1).export(tmp_path / "images")
    good = open(clips / (clips / "train.txt").read_text().split()[0], "rb").read()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(good[:64] + bytes(reversed(good[64:])))
    (tmp_path / "videos.txt").write_text(f"{damaged} 0\n")
    argv = ["--data", tmp_path / "videos.txt", "--image-data", tmp_path / "images", "--frames", "8", "--size", "32",
            "--steps", "2", "--batch-size", "4", *TINY[:6], "--no-progress", "--out", tmp_path / "run"]
    capsys.readouterr()
    assert cli.run(train.main, [str(a) for a in argv]) == cli.EXIT_ERROR
    lines = capsys.readouterr().err.strip().splitlines()  # the skipped file's warning lines, then the error
    assert lines[-1].startswith("error: no readable video in --data"), lines
    assert all(line.startswith("warning: ") for line in lines[:-1]), lines
    assert not (tmp_path / "run").exists()


def test_val_root_is_where_the_validation_paths_are(tmp_path, clips):
    """--val-data's paths are relative to --val-root (Kinetics keeps train/ and val/ apart)."""
    (tmp_path / "val.txt").write_text((clips / "train.txt").read_text())  # paths relative to the clips' folder
    out = train.main(["--data", str(clips / "train.txt"), "--val-data", str(tmp_path / "val.txt"), "--val-root",
                      str(clips), "--frames", "8", "--size", "32", "--steps", "1", "--batch-size", "4", *TINY[:6],
                      "--no-progress", "--out", str(tmp_path / "run")])
    assert out["val_acc"] is not None


def test_the_resume_command_keeps_the_per_run_options():
    """Options a checkpoint does not carry (train.PER_RUN) come back in the printed command."""
    import argparse
    import shlex

    from tubevit_fast.app import runs

    args = argparse.Namespace(out="runs/x", device="cuda:1", threads=None, workers=4, decoder="torchcodec",
                              clip_index="/data/my index.json", compile=True, no_progress=True)
    assert shlex.split(runs.resume_command(args, 1)) == [
        "python", "-m", "tubevit_fast.train", "--resume", "runs/x/last.pt", "--device", "cuda:1", "--workers", "4",
        "--decoder", "torchcodec", "--clip-index", "/data/my index.json", "--compile", "--no-progress"]


def test_resume_refuses_options_that_built_the_model(tmp_path, capsys):
    """--num-classes (like --init, --scale-from, --gate-layer) made the checkpoint's model: a resumed
    run cannot change it, so it is refused rather than warned about and ignored."""
    first = train.main([*TINY, "--out", str(tmp_path / "run"), "--steps", "1"])
    err = _one_line_error(["--resume", first["checkpoint"], "--steps", "2", "--num-classes", "9"], capsys)
    assert "--num-classes 9 differs from the checkpoint's" in err, err
