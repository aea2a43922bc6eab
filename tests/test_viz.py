"""tubevit_fast.viz writes the kernel and tube-sampling pictures."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


def _check_pngs(paths, names):
    import matplotlib.image as mpimg

    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == sorted(names)
    for path in paths:
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert img[..., :3].std() > 0.01  # not a blank canvas


def test_viz_random_init(tmp_path):
    from tubevit_fast import viz

    paths = viz.main(["--out", str(tmp_path), "--max-filters", "16"])
    _check_pngs(paths, ["tube0_kernels.png", "tube1_kernels.png", "patch_kernels_tube2.png", "tube_sampling.png"])


def test_viz_from_checkpoint_and_video(tmp_path):
    pytest.importorskip("av")
    from tubevit_fast import train, viz
    from tubevit_fast.data import SyntheticShapes

    run = train.main(["--dim", "64", "--heads", "2", "--depth", "1", "--no-progress", "--threads", "1",
                      "--val-items", "0", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
                      "--train-items", "8"])
    clip = SyntheticShapes(2, seed=3, image_every=0).export(tmp_path / "clips", indices=[0])[0]
    paths = viz.main(["--checkpoint", run["checkpoint"], "--out", str(tmp_path / "viz"), "--video", clip])
    _check_pngs(paths, ["tube0_kernels.png", "tube1_kernels.png", "patch_kernels_tube2.png", "tube_sampling.png"])
