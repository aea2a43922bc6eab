"""tubevit_fast.viz: the pictures show what was planted, where it was planted. Every check reads
the written PNG/GIF back with Pillow and finds the tiles by itself (framed blocks of one size on
a white sheet), so it judges the picture, not the code that drew it."""
from __future__ import annotations

import collections
import math
import os

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from tubevit_fast import cli, viz  # noqa: E402
from tubevit_fast.data import SMALL_TUBES  # noqa: E402
from tubevit_fast.geometry import TubeSpec  # noqa: E402
from tubevit_fast.reference.model import TubeViT  # noqa: E402
from tubevit_fast.viz.attention import attention_heat, draw_attention  # noqa: E402
from tubevit_fast.viz.kernels import draw_tube_kernels, norm_order  # noqa: E402
from tubevit_fast.viz.sampling import draw_sampling  # noqa: E402

TINY_RUN = ["--dim", "24", "--heads", "2", "--depth", "1", "--no-progress", "--threads", "1",
            "--val-items", "0", "--train-items", "8", "--batch-size", "4", "--steps", "1"]


def _pixels(path, frame: int = 0) -> np.ndarray:
    with PIL.open(path) as img:
        img.seek(frame)
        return np.asarray(img.convert("RGB")).astype(np.int64)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def _tiles(img: np.ndarray) -> list[list[np.ndarray]]:
    """The tiles of a picture, row by row, left to right, without their 1-pixel frame: the blocks
    of non-white pixels (split by all-white rows, then by all-white columns) of the most common
    size; text is smaller and of varied sizes."""
    ink = (img != 255).any(-1)
    boxes = [(y0, y1, x0, x1) for y0, y1 in _runs(ink.any(1)) for x0, x1 in _runs(ink[y0:y1].any(0))]
    sizes = collections.Counter((y1 - y0, x1 - x0) for y0, y1, x0, x1 in boxes if min(y1 - y0, x1 - x0) >= 20)
    size = sizes.most_common(1)[0][0]
    rows = collections.defaultdict(list)
    for y0, y1, x0, x1 in boxes:
        if (y1 - y0, x1 - x0) == size:
            rows[y0].append(img[y0 + 1:y1 - 1, x0 + 1:x1 - 1])
    return [rows[y] for y in sorted(rows)]


def _cells(tile: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """(kh, kw, 3): the colour at the centre of each kernel weight's block."""
    fy, fx = tile.shape[0] // kh, tile.shape[1] // kw
    return tile[fy // 2::fy, fx // 2::fx][:kh, :kw]


def _planted_2d(dim=16, seed=0):
    """(dim, 3, 1, 8, 8) small noise, with kernel 5 an edge (dark left, bright right: the largest
    norm) and kernel 9 a red blob in the top-left quadrant (the second largest)."""
    w = torch.randn(dim, 3, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.01
    w[5, :, 0, :, :4], w[5, :, 0, :, 4:] = -1.0, 1.0
    w[9, :, 0] = 0.0
    w[9, 0, 0, 1:4, 1:4] = 0.9
    return w


def _check_edge(cells):
    assert (cells[:, :4] <= 8).all() and (cells[:, 4:] >= 247).all(), cells[..., 0]


def _check_red_blob(cells):
    red, rest = cells[1:4, 1:4], np.delete(np.delete(cells, [1, 2, 3], 0), [1, 2, 3], 1)
    assert (red[..., 0] >= 247).all() and (np.abs(red[..., 1:] - 128) <= 1).all(), cells[..., 0]
    assert (np.abs(cells[4:] - 128) <= 1).all() and (np.abs(rest - 128) <= 1).all()  # zero weights: grey


def test_2d_kernels_show_the_edge_and_the_blob_in_place(tmp_path):
    tube = TubeSpec((1, 8, 8), (8, 8, 8))
    written = draw_tube_kernels(2, tube, [("trained", _planted_2d())], str(tmp_path), max_filters=16)
    assert [os.path.basename(p) for p in written] == ["tube2_kernels.png"]  # no GIF for a single frame
    tiles = [t for row in _tiles(_pixels(written[0])) for t in row]
    assert len(tiles) == 16
    _check_edge(_cells(tiles[0], 8, 8))  # strongest first
    _check_red_blob(_cells(tiles[1], 8, 8))


def test_planted_upside_down_kernel_fails_the_check(tmp_path):
    """The checks above see orientation: the same kernels flipped upside down do not pass."""
    w = _planted_2d().flip(-2)
    path = draw_tube_kernels(0, TubeSpec((1, 8, 8), (8, 8, 8)), [("trained", w)], str(tmp_path), 16)[0]
    with pytest.raises(AssertionError):
        _check_red_blob(_cells(_tiles(_pixels(path))[0][1], 8, 8))


def _moving_edge(kt=4, dim=12, seed=1):
    """(dim, 3, kt, 8, 8) small noise, kernel 3 (the strongest) an edge in the top half only that
    moves right over time: dark left of column 1 + 2t, bright from it; the bottom half zero."""
    w = torch.randn(dim, 3, kt, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.01
    w[3] = 0.0
    for t in range(kt):
        w[3, :, t, :4, :1 + 2 * t], w[3, :, t, :4, 1 + 2 * t:] = -1.0, 1.0
    return w


def _check_moving_edge(cells, t):
    top, bottom = cells[:4, :, 0], cells[4:]
    assert (top[:, :1 + 2 * t] <= 8).all() and (top[:, 1 + 2 * t:] >= 247).all(), (t, top)
    assert (np.abs(bottom - 128) <= 1).all(), (t, bottom[..., 0])


def test_3d_kernels_one_row_per_kernel_one_column_per_step_and_a_gif(tmp_path):
    kt = 4
    tube = TubeSpec((kt, 8, 8), (4, 8, 8))
    written = draw_tube_kernels(0, tube, [("trained", _moving_edge(kt))], str(tmp_path), max_filters=5)
    assert [os.path.basename(p) for p in written] == ["tube0_kernels.png", "tube0_kernels.gif"]
    rows = _tiles(_pixels(written[0]))
    assert [len(r) for r in rows] == [kt] * 5
    for t in range(kt):
        _check_moving_edge(_cells(rows[0][t], 8, 8), t)
    with PIL.open(written[1]) as gif:
        assert gif.n_frames == kt
    for t in range(kt):  # the GIF's frame t: the kernels' step t, the strongest first
        _check_moving_edge(_cells(_tiles(_pixels(written[1], t))[0][0], 8, 8), t)


def test_norm_order():
    scales = torch.tensor([0.3, 2.0, 0.7, 1.5, 0.1])
    w = torch.randn(5, 3, 2, 4, 4, dtype=torch.float64) * scales.view(-1, 1, 1, 1, 1).double()
    norms = [math.sqrt(sum(float(v) ** 2 for v in k.flatten())) for k in w]
    assert list(norm_order(w.numpy())) == sorted(range(5), key=lambda i: -norms[i])


def test_sampling_shows_every_frame_some_tube_reads(tmp_path):
    tubes = [TubeSpec((2, 8, 8), (8, 8, 8)), TubeSpec((1, 8, 8), (8, 8, 8), (5, 0, 0))]
    T = 16
    clip = np.broadcast_to(np.linspace(0, 1, T)[:, None, None, None], (T, 32, 32, 3)).copy()
    rows = _tiles(_pixels(draw_sampling(clip, tubes, str(tmp_path / "sampling.png"))))
    read = [0, 1, 8, 9, 5, 13]  # tube 0: frames 0-1 and 8-9; tube 1: 5 and 13
    assert [len(r) for r in rows] == [len(read)] * 3
    # The last row is the clip itself where any tube reads (each frame is one grey level).
    assert [int(r[0, 0, 0]) for r in rows[2]] == [round(t / (T - 1) * 255) for t in sorted(read)]
    tinted = [bool((r[..., 0] != r[..., 1]).any()) for r in rows[1]]  # tube 1's tint on its frames only
    assert tinted == [t in (5, 13) for t in sorted(read)]


def _planted_pool(model: TubeViT, token: int, monkeypatch) -> None:
    """Make the pooling query attend to `token`: keys are the features themselves, the query a
    direction d, and the token's features a large multiple of d (the others random)."""
    dim, pool = model.dim, model.attn_pool
    d = torch.randn(dim)
    with torch.no_grad():
        pool.q.weight.zero_()
        pool.q.bias.copy_(d)
        pool.kv.weight[:dim] = torch.eye(dim)
        pool.kv.bias[:dim] = 0.0

    def features(tokens):
        x = torch.randn_like(tokens)
        x[:, token] = 8 * d
        return x

    monkeypatch.setattr(model, "forward_features", features)


def test_attention_probs_match_the_pooling_forward():
    pool = TubeViT(2, SMALL_TUBES, dim=24, depth=1, heads=3).attn_pool.double()
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    p = pool.attention_probs(x)
    assert p.shape == (2, 3, 11) and torch.allclose(p.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    v = pool.kv(x)[..., 24:].view(2, 11, 3, 8)
    pooled = pool.proj(torch.einsum("bhn,bnhd->bhd", p, v).reshape(2, 24))
    torch.testing.assert_close(pooled + pool.mlp(pool.norm(pooled)), pool(x))
    with pytest.raises(ValueError, match=r"\(B, N, 24\)"):
        pool.attention_probs(x[0])


@pytest.mark.parametrize("token, frames, rows, cols", [
    (57, [0], (16, 24), (8, 16)),  # SMALL_TUBES' 2D tube 2, grid index (0, 2, 1)
    (38, range(8), (12, 16), (20, 24)),  # tube 1, grid index (0, 1, 2)
], ids=["2d-tube", "3d-tube"])
def test_attention_heat_lies_on_the_attended_tokens_footprint(token, frames, rows, cols, tmp_path,
                                                              monkeypatch):
    torch.manual_seed(0)
    model = TubeViT(2, SMALL_TUBES, dim=24, depth=1, heads=2).eval()
    _planted_pool(model, token, monkeypatch)
    clip = torch.randn(3, 8, 32, 32)
    heat = attention_heat(model, clip)
    footprint = np.zeros((8, 32, 32), dtype=bool)
    footprint[np.ix_(list(frames), range(*rows), range(*cols))] = True
    assert heat[footprint].min() > 0.99 and heat[~footprint].max() < 0.01
    display = np.random.default_rng(0).random((8, 32, 32, 3))
    path = draw_attention(display, heat, SMALL_TUBES, str(tmp_path / "a.png"), "clip", 2)
    _, heat_row = _tiles(_pixels(path))
    assert len(heat_row) == 8
    for t, tile in enumerate(heat_row):
        zoomed = tile[::tile.shape[0] // 32, ::tile.shape[1] // 32]
        hot = (zoomed >= 230).all(-1)  # white: the hottest pixels; the rest at most half bright
        assert (hot == footprint[t]).all() and (zoomed[~hot] <= 140).all(), t


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint whose weights did not move (lr 1e-30): its initial weights are its weights."""
    from tubevit_fast import train

    out = tmp_path_factory.mktemp("run")
    return train.main([*TINY_RUN, "--lr", "1e-30", "--min-lr", "1e-30", "--out", str(out)])["checkpoint"]


def test_cli_from_a_checkpoint_with_clips_and_compare_init(run, tmp_path):
    pytest.importorskip("av")
    from tubevit_fast.data import SyntheticShapes

    clips = SyntheticShapes(2, seed=3, image_every=0).export(tmp_path / "clips", indices=[0, 1])
    paths = viz.main(["--checkpoint", run, "--compare", "init", "--out", str(tmp_path / "viz"),
                      "--video", clips[0], "--clip", *clips, "--max-filters", "8"])
    assert sorted(os.path.basename(p) for p in paths) == [
        "attention_00000.png", "attention_00001.png", "sampling.png", "tube0_kernels.gif",
        "tube0_kernels.png", "tube1_kernels.gif", "tube1_kernels.png", "tube2_kernels.png"]
    assert [len(r) for r in _tiles(_pixels(tmp_path / "viz" / "tube1_kernels.png"))] == [2 * 8] * 8
    assert [len(r) for r in _tiles(_pixels(tmp_path / "viz" / "attention_00001.png"))] == [8, 8]


def test_compare_puts_the_other_checkpoints_kernels_left_of_the_trained_ones(run, tmp_path):
    from tubevit_fast.app.checkpoint import read_checkpoint

    paths = {}
    for name, seed in (("trained", 0), ("other", 2)):
        ckpt, kernels = read_checkpoint(run), _planted_2d(dim=24, seed=seed)
        if name == "other":
            kernels[5], kernels[9] = kernels[9], 0.01 * kernels[5]  # the blob where trained has the edge
        ckpt["model"]["tube_embed.weights.2"] = kernels
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(ckpt, paths[name])
    viz.main(["--checkpoint", str(paths["trained"]), "--compare", str(paths["other"]),
              "--out", str(tmp_path / "v"), "--max-filters", "8"])
    row = _tiles(_pixels(tmp_path / "v" / "tube2_kernels.png"))[0]
    assert len(row) == 16  # 8 of the other checkpoint, then 8 trained, in the trained weights' order
    _check_red_blob(_cells(row[0], 8, 8))
    _check_edge(_cells(row[8], 8, 8))


def test_compare_init_rebuilds_the_runs_initial_weights(run):
    from tubevit_fast.app.checkpoint import load_checkpoint, read_checkpoint

    trained, _ = load_checkpoint(run, backend="reference")
    initial = viz._initial_model(read_checkpoint(run))
    for a, b in zip(trained.tube_embed.tube_kernels(), initial.tube_embed.tube_kernels()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_random_init_writes_every_picture(tmp_path):
    paths = viz.main(["--out", str(tmp_path), "--max-filters", "4"])
    assert sorted(os.path.basename(p) for p in paths) == [
        "sampling.png", "tube0_kernels.gif", "tube0_kernels.png", "tube1_kernels.gif", "tube1_kernels.png",
        "tube2_kernels.png"]


@pytest.mark.parametrize("case", ["missing checkpoint", "missing clip", "compare without checkpoint",
                                  "compare with other kernels", "clips with one name"])
def test_bad_inputs_are_one_line(case, run, tmp_path, capsys):
    other = tmp_path / "other.pt"
    if case == "compare with other kernels":
        from tubevit_fast.app.checkpoint import read_checkpoint

        ckpt = read_checkpoint(run)
        ckpt["model_config"] = {**ckpt["model_config"], "dim": 12}
        classes = ckpt["model_config"]["num_classes"]
        ckpt["model"] = TubeViT(classes, SMALL_TUBES, dim=12, depth=1, heads=2).state_dict()
        torch.save(ckpt, other)
    argv, message = {
        "missing checkpoint": (["--checkpoint", tmp_path / "nope.pt"], "checkpoint not found"),
        "missing clip": (["--clip", tmp_path / "nope.mp4"], "no such video or image file"),
        "compare without checkpoint": (["--compare", "init"], "--compare needs --checkpoint"),
        "compare with other kernels": (["--checkpoint", run, "--compare", other],
                                       "tube kernels are not those"),
        "clips with one name": (["--clip", tmp_path / "a" / "x.mp4", tmp_path / "b" / "x.mp4"],
                                "share a file name"),
    }[case]
    capsys.readouterr()
    status = cli.run(viz.main, [str(a) for a in [*argv, "--out", tmp_path / "out"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_ERROR and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_clips_are_read_with_the_checkpoints_sampling(run, tmp_path, monkeypatch):
    """--clip shows the frames the model was trained on: the checkpoint's window of frames `stride`
    apart (here 2), centred in the clip, not frames spread over the whole clip."""
    pytest.importorskip("av")
    from tubevit_fast.app import decode
    from tubevit_fast.app.checkpoint import read_checkpoint
    from tubevit_fast.data import SyntheticShapes

    ckpt = read_checkpoint(run)
    frames = ckpt["model_config"]["frames"]
    ckpt["sampling"] = {"frames": frames, "stride": 2, "mode": "window"}
    torch.save(ckpt, tmp_path / "strided.pt")
    clip = SyntheticShapes(1, num_frames=40, seed=3, image_every=0).export(tmp_path / "clips")[0]
    requested = []
    real = decode.read_frames
    monkeypatch.setattr(decode, "read_frames", lambda path, indices, *a, **k: requested.append(list(indices))
                        or real(path, indices, *a, **k))
    viz.main(["--checkpoint", str(tmp_path / "strided.pt"), "--clip", clip, "--out", str(tmp_path / "v")])
    span = 2 * (frames - 1) + 1
    assert requested and requested[0][0] in ((40 - span) // 2, (40 - span + 1) // 2)
    assert requested[0] == list(range(requested[0][0], requested[0][0] + span, 2))
