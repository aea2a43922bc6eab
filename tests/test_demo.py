"""The README's end-to-end demo, command for command: generated clips written as a list-file dataset,
`train` with augmentation and validation, `evaluate` with 2 clips x 3 crops, `predict`. The commands
run in-process through each tool's entry wrapper (the same argv a shell would give, globs expanded)."""
from __future__ import annotations

import glob
import json
import os
import shlex

import pytest

pytest.importorskip("av")
pytest.importorskip("tqdm")

from tubevit_fast import data, evaluate, predict, train  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
DEMO_HEADING = "### A demo on generated clips"


def readme_demo() -> list[str]:
    """The command lines of the README's demo: the first ```bash block after its heading."""
    text = open(README).read()
    block = text[text.index(DEMO_HEADING):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


DEMO = readme_demo()

TOOLS = {"tubevit_fast.data": data.main, "tubevit_fast.train": train.main, "tubevit_fast.evaluate": evaluate.main,
         "tubevit_fast.predict": predict.main}


def test_readme_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = []
    for line in DEMO:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "-m"], line
        args = [p for a in argv[3:] for p in (sorted(glob.glob(a)) if "*" in a else [a])]
        if argv[2] == "tubevit_fast.train":
            args.append("--no-progress")  # the bar's redraws are noise in a test log
        results.append(TOOLS[argv[2]](args))  # a mistake would raise here (the CLI's exit status 2)
    out = capsys.readouterr().out
    trained, evaluated, predicted = results[2], results[3], results[4]
    assert trained["step"] == 60 and trained["val_acc"] >= 0.5  # 4 classes: chance is 0.25
    assert evaluated["summary"]["top1"] >= 0.5 and evaluated["result"].num_videos == 24
    assert json.load(open(tmp_path / "demo/eval/summary.json"))["top1"] == evaluated["summary"]["top1"]
    assert len(predicted) == len(glob.glob(str(tmp_path / "demo/val/move_left/*.mp4"))) >= 1
    assert "accuracy: top-1 " in out
