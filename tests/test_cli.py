"""The command-line tools as a user meets them: one-line errors checked before anything is written,
train's start line, Ctrl-C -> checkpoint + resume command, --resume defaults and warnings, the log
trimmed to the resumed step, the demo-clip writer. Tiny models, few steps."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import traceback

import pytest
import torch

from tubevit_fast import cli, data, predict, profile, train, viz
from tubevit_fast.io import MediaError
from _training_runs import ROOT, TINY, start_training



def run_cli(main, argv, capsys):
    """(exit status, stderr lines) of a tool run in-process through its entry wrapper."""
    capsys.readouterr()
    status = cli.run(main, [str(a) for a in argv])
    return status, capsys.readouterr().err.strip().splitlines()


def steps_in(log_path) -> list[int]:
    with open(log_path) as f:
        return [json.loads(line)["step"] for line in f if '"summary"' not in line]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train.main([*TINY, "--out", str(out), "--steps", "1"])["checkpoint"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("av")
    return data.main(["--out", str(tmp_path_factory.mktemp("clips")), "--items", "1"])[0]


def _junk(tmp_path, name, text="not a video " * 40):
    path = tmp_path / name
    path.write_text(text)
    return path


USER_ERRORS = {
    "train: missing --data": (train.main, lambda t, c: ["--data", t / "nope", "--out", t / "out"],
                              "no such file or folder"),
    "train: empty --data": (train.main, lambda t, c: ["--data", (t / "empty").mkdir() or t / "empty",
                                                      "--out", t / "out"], "has no class sub-folders"),
    "train: missing --resume": (train.main, lambda t, c: ["--resume", t / "nope.pt"], "checkpoint not found"),
    "train: corrupt --resume": (train.main, lambda t, c: ["--resume", _junk(t, "x.pt"), "--out", t / "out"],
                                "not a PyTorch checkpoint file"),
    "train: not our checkpoint": (train.main, lambda t, c: ["--resume", torch.save({"a": torch.ones(1)}, t / "sd.pt")
                                                            or t / "sd.pt", "--out", t / "out"],
                                  "not a tubevit_fast.train checkpoint"),
    "train: batch larger than data": (train.main, lambda t, c: [*TINY, "--batch-size", "64", "--out", t / "out"],
                                      "less than one batch of 64"),
    "train: clip too small for a tube": (train.main, lambda t, c: [*TINY, "--frames", "2", "--out", t / "out"],
                                         "too small for tube"),
    "predict: missing input": (predict.main, lambda t, c: [t / "nope.mp4", "--checkpoint", c],
                               "no such video or image file"),
    "predict: not a video": (predict.main, lambda t, c: [_junk(t, "junk.mp4"), "--checkpoint", c],
                             "junk.mp4: cannot be decoded as a video"),
    "predict: missing checkpoint": (predict.main, lambda t, c: ["x.mp4", "--checkpoint", t / "nope.pt"],
                                    "checkpoint not found"),
    "viz: not a video": (viz.main, lambda t, c: ["--video", _junk(t, "junk.mp4"), "--out", t / "out"],
                         "cannot be decoded as a video"),
    "viz: wrong checkpoint": (viz.main, lambda t, c: ["--checkpoint", _junk(t, "x.pt"), "--out", t / "out"],
                              "not a PyTorch checkpoint file"),
    "profile: no GPU": (profile.main, lambda t, c: ["--device", "cuda", "--out", t / "out"],
                        "no CUDA device is available"),
    "data: --out is a file": (data.main, lambda t, c: ["--out", _junk(t, "out")], "exists and is not a folder"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_error_is_one_line_and_writes_nothing(case, tmp_path, capsys, checkpoint):
    if "video" in case:
        pytest.importorskip("av")
    main, make_argv, message = USER_ERRORS[case]
    argv = make_argv(tmp_path, checkpoint)
    status, err = run_cli(main, argv, capsys)
    assert status == cli.EXIT_ERROR
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").is_dir()


def test_bad_backend_environment_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUBEVIT_FAST_BACKEND", "fastest")
    status, err = run_cli(train.main, [*TINY, "--out", tmp_path / "out"], capsys)
    assert status == cli.EXIT_ERROR and err == [
        "error: TUBEVIT_FAST_BACKEND='fastest' is not a backend; choose one of reference, torch, triton, cuda, auto "
        "or unset it"]
    monkeypatch.setenv("TUBEVIT_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status, err = run_cli(predict.main, ["x.mp4", "--checkpoint", "x.pt"], capsys)
    assert status == cli.EXIT_ERROR and "TUBEVIT_FAST_BACKEND=triton: tube_embed: backend 'triton' runs on CUDA" \
        in err[0] and len(err) == 1
    assert not (tmp_path / "out").exists()


class UndecodableClips(torch.utils.data.Dataset):
    """A dataset whose clip cannot be decoded: the error a DataLoader worker meets."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise MediaError(f"clip_{index:04d}.mp4: cannot be decoded as a video (Invalid data found)")


def worker_error() -> MediaError:
    """The error a real DataLoader worker re-raises for UndecodableClips."""
    loader = torch.utils.data.DataLoader(UndecodableClips(), num_workers=1)
    try:
        next(iter(loader))
    except MediaError as err:
        # The traceback's frames hold the loader's iterator in a cycle; left to the garbage
        # collector its worker takes 5 s to stop. Cleared, it stops now.
        traceback.clear_frames(err.__traceback__)
        return err
    raise AssertionError("the dataset did not raise")


def test_an_error_in_a_dataloader_worker_is_reported_in_one_line(capsys):
    """The worker's error comes back with the worker's traceback in its message; the user sees
    the dataset's own message."""
    err = worker_error()
    assert "Original Traceback" in str(err)  # the multi-line message workers re-raise
    expected = "clip_0000.mp4: cannot be decoded as a video (Invalid data found)"
    assert cli.one_line(err) == expected

    def main(argv):
        raise err

    status, lines = run_cli(main, [], capsys)
    assert status == cli.EXIT_ERROR and lines == [f"error: {expected}"]


def test_entry_point_exits_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tubevit_fast.predict", str(tmp_path / "nope.mp4"),
                           "--checkpoint", str(tmp_path / "nope.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'nope.pt'}"


def test_train_prints_one_start_line(tmp_path, capsys):
    train.main([*TINY, "--out", str(tmp_path), "--steps", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert len(lines) == 1
    assert lines[0].startswith("train: cpu | tube_embed=torch attention=torch | model ")
    for part in ("params (dim 64, depth 1, heads 2, small tubes)", "data synthetic shapes: 16 train items",
                 "steps 1-1 of 1, batch 4", f"out {tmp_path}"):
        assert part in lines[0], part


def test_resume_takes_its_defaults_from_the_checkpoint(tmp_path, capsys):
    first = train.main([*TINY, "--out", str(tmp_path), "--steps", "4", "--stop-after", "2", "--lr", "3e-3",
                        "--seed", "5"])
    capsys.readouterr()
    resumed = train.main(["--resume", first["checkpoint"], "--no-progress"])
    err = capsys.readouterr().err
    assert "warning" not in err
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    saved = torch.load(resumed["checkpoint"], weights_only=True)["args"]
    assert (saved["lr"], saved["seed"], saved["depth"], saved["train_items"]) == (3e-3, 5, 1, 16)
    assert saved["out"] == str(tmp_path)
    # A different value is used and named; the model's shape cannot change.
    again = train.main(["--resume", first["checkpoint"], "--no-progress", "--steps", "5"])
    err = capsys.readouterr().err
    assert "warning: --steps 5 differs from the checkpoint's 4: using 5" in err
    assert [r["step"] for r in again["history"]] == [5]
    status, err = run_cli(train.main, ["--resume", first["checkpoint"], "--dim", "128"], capsys)
    assert status == cli.EXIT_ERROR and err == [
        "error: --dim 128 differs from the checkpoint's 64: a resumed run keeps its model and input size "
        "(drop --dim, or start a new run)"]


def test_log_drops_records_past_the_resumed_step(tmp_path, capsys):
    run = [*TINY, "--out", str(tmp_path), "--steps", "6"]
    first = train.main([*run, "--stop-after", "2"])
    early = tmp_path / "step2.pt"
    os.replace(first["checkpoint"], early)
    train.main(["--resume", str(early), "--stop-after", "4", "--no-progress"])  # log: steps 1..4
    assert steps_in(tmp_path / "log.jsonl") == [1, 2, 3, 4]
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a record cut short by a crash
    capsys.readouterr()
    train.main(["--resume", str(early), "--no-progress"])  # back to step 2: steps 3, 4 are redone
    assert "dropped the records of steps 3-4, past the checkpoint's step 2" in capsys.readouterr().err
    assert steps_in(tmp_path / "log.jsonl") == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_saves_and_prints_the_resume_command(tmp_path):
    proc, log = start_training(tmp_path, 3), tmp_path / "log.jsonl"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["step"] == steps_in(log)[-1] >= 3  # the checkpoint is the last logged step
    assert json.loads(out.strip().splitlines()[-1])["interrupted"] is True
    command = next(line for line in err.splitlines() if line.startswith("resume with: "))[len("resume with: "):]
    argv = shlex.split(command)
    assert argv[:5] == ["python", "-m", "tubevit_fast.train", "--resume", str(tmp_path / "last.pt")]
    resumed = train.main([*argv[3:], "--stop-after", str(saved["step"] + 1)])
    assert [r["step"] for r in resumed["history"]] == [saved["step"] + 1]
    assert steps_in(log) == list(range(1, saved["step"] + 2))


def test_profile_shows_progress_and_no_gpu_driver_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tubevit_fast.profile", "--device", "cpu", "--preset", "tiny",
                           "--steps", "1", "--out", str(tmp_path), "--row-limit", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "profile: step 1/1 (profiled)" in proc.stderr
    if not torch.cuda.is_available():
        assert "gpuGetDeviceCount" not in proc.stderr


def test_demo_clips_are_a_dataset_folder(tmp_path, capsys):
    pytest.importorskip("av")
    paths = data.main(["--out", str(tmp_path), "--items", "3", "--image-every", "3"])
    assert capsys.readouterr().out.split() == paths
    assert [os.path.splitext(p)[1] for p in paths] == [".mp4", ".mp4", ".png"]
    from tubevit_fast.app.sources import load_annotations

    folder = load_annotations(tmp_path)
    assert sorted(p for p, _ in folder.samples) == sorted(paths)
    assert set(folder.classes) <= set(data.SyntheticShapes.classes)
