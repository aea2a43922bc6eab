"""Training and evaluation datasets, collation and the step sampler (tubevit_fast/app/datasets.py)."""
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from tubevit_fast.app.datasets import (EvalViews, StepBatchSampler, TrainClips, collate_eval,  # noqa: E402
                                       collate_train)
from tubevit_fast.app.media import FileMedia  # noqa: E402
from tubevit_fast.app.sampling import ClipSampling  # noqa: E402
from tubevit_fast.app.sources import load_annotations  # noqa: E402
from tubevit_fast.app.synthetic import SyntheticShapes  # noqa: E402
from tubevit_fast.app.transforms import train_transform  # noqa: E402
from tubevit_fast.io import MediaError, write_video  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """data/{walk,run}/*.mp4: three 24x32 clips of 20 random frames, one file of garbage bytes, one PNG."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for name, cls in [("a.mp4", "run"), ("b.mp4", "walk"), ("c.mp4", "walk")]:
        os.makedirs(root / cls, exist_ok=True)
        write_video(root / cls / name, rng.integers(0, 256, (20, 24, 32, 3), dtype=np.uint8))
    (root / "run" / "broken.mp4").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "walk" / "still.png")
    return root


def media_without_broken(folder):
    ann = load_annotations(folder)
    ann.samples = [s for s in ann.samples if "broken" not in s[0]]
    return FileMedia(ann)


class FakeMedia:
    """Random in-memory videos of 16 x 40 (already at the eval size's short side) and one image."""
    classes = ["x", "y", "z"]

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.videos = [torch.randint(0, 256, (20, 16, 40, 3), dtype=torch.uint8, generator=g) for _ in range(2)]
        self.videos.append(torch.randint(0, 256, (1, 45, 16, 3), dtype=torch.uint8, generator=g))

    def __len__(self):
        return 3

    def label(self, i):
        return 2 - i

    def name(self, i):
        return f"fake{i}"

    def is_image(self, i):
        return i == 2

    def num_frames(self, i):
        return len(self.videos[i])

    def read(self, i, indices, short_side):
        assert short_side == 16
        return self.videos[i][[0] if i == 2 else list(indices)]


# ---- training items ------------------------------------------------------------------------------

def test_train_item_is_bitwise_a_function_of_seed_epoch_index(folder):
    def dataset():
        return TrainClips(media_without_broken(folder), ClipSampling(4, stride=2),
                          train_transform(16, randaug=(2, 9), reprob=0.5), seed=7, short_side=20)

    a, b = dataset(), dataset()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = [a[(i, e)] for i in range(len(a)) for e in range(3)]
    assert torch.equal(torch.get_rng_state(), state), "an item consumed the global torch generator"
    torch.manual_seed(999)
    second = [b[(i, e)] for i in range(len(b)) for e in range(3)]
    for (x, y), (x2, y2) in zip(first, second, strict=True):
        assert x.dtype == torch.uint8 and torch.equal(x, x2) and y == y2
    videos = [x for x, _ in first if x.dim() == 4]
    assert videos[0].shape == (3, 4, 16, 16) and first[-1][0].shape == (3, 16, 16)   # the PNG
    assert not torch.equal(videos[0], videos[1]), "epochs 0 and 1 gave the same clip"


def test_train_items_are_the_same_in_loader_workers(folder):
    data = TrainClips(media_without_broken(folder), ClipSampling(3, stride=3), train_transform(16, reprob=0.5), seed=1)

    def run(workers):
        sampler = StepBatchSampler(len(data), 2, seed=3, start=0, stop=3)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate_train,
                                             num_workers=workers)
        return [x for samples, _, _ in loader for x in samples]

    in_process, in_workers = run(0), run(2)
    assert len(in_process) == 6 and all(torch.equal(x, y) for x, y in zip(in_process, in_workers, strict=True))


def test_train_clip_is_a_window_of_the_rendered_video():
    shapes = SyntheticShapes(6, num_frames=16, size=16, seed=2, image_every=0)
    data = TrainClips(shapes, ClipSampling(4, stride=3), seed=0)
    starts = set()
    for epoch in range(12):
        clip, label = data[(1, epoch)]
        frames, expected_label = shapes.render(1)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2)                      # (C, T, H, W)
        matches = [s for s in range(16 - 9) if torch.equal(clip, video[:, s:s + 10:3])]
        assert len(matches) == 1 and label == expected_label
        starts |= set(matches)
    assert len(starts) > 2, "the window start does not change with the epoch"


def test_synthetic_label_is_the_rendered_items_label():
    """label() draws only the class (no pixels); it must be the class render() draws the picture of."""
    seed = int.from_bytes(os.urandom(2), "little")
    shapes = SyntheticShapes(40, num_frames=2, size=8, seed=seed, image_every=3)
    labels = [shapes.label(i) for i in range(40)]
    assert labels == [shapes.render(i)[1] for i in range(40)]
    assert {label >= 4 for label in labels} == {True, False}  # images and videos both


def test_frames_scaled_at_decode_time(folder):
    data = TrainClips(media_without_broken(folder), ClipSampling(2), short_side=12)
    assert data[(0, 0)][0].shape == (3, 2, 12, 16)
    assert data[(3, 0)][0].shape == (3, 12, 18)                  # the 20 x 30 PNG


def test_joint_images_follow_the_videos():
    videos = SyntheticShapes(4, num_frames=8, size=16, seed=0, image_every=0)
    images = SyntheticShapes(3, num_frames=8, size=16, seed=5, image_every=1)
    data = TrainClips(videos, ClipSampling(8), train_transform(12), images=images)
    assert len(data) == 7
    x, y = data[(5, 0)]
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8 and y == images.render(1)[1]
    with pytest.raises(IndexError):
        data[(7, 0)]


# ---- bad files -----------------------------------------------------------------------------------

def test_damaged_file_skipped_with_one_warning_and_counted(folder, capfd):
    ann = load_annotations(folder)
    broken = str(folder / "run" / "broken.mp4")
    media = FileMedia.indexed(ann, progress=False, workers=0)               # skipped from the start
    assert broken not in media.infos and len(media.infos) == 3 and media.unreadable == [broken]
    assert [p for p, _ in media.samples] == [p for p, _ in ann.samples if p != broken]
    lines = [line for line in capfd.readouterr().err.splitlines() if line]
    assert lines[0].startswith(f"warning: skipped {broken}: ") and lines[1:] == [
        "warning: skipped 1 of 4 videos that cannot be decoded"]
    with pytest.raises(MediaError, match=rf"1 of 4 videos cannot be decoded, e.g. {broken}: "):
        FileMedia.indexed(ann, progress=False, workers=0, bad_files="error")

    data = TrainClips(FileMedia(ann), ClipSampling(4), seed=0)                # unindexed: skipped when drawn
    sampler = StepBatchSampler(len(data), len(data), seed=0, start=0, stop=2)   # every item in every batch
    batches = list(torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate_train))
    assert [(len(samples), len(labels), skipped) for samples, labels, skipped in batches] == [(4, 4, 1)] * 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line]
    assert len(lines) == 2 and all(line.startswith(f"warning: skipped {broken}: ") for line in lines)

    with pytest.raises(MediaError, match=broken):
        TrainClips(FileMedia(ann), ClipSampling(4), bad_files="error")[(ann.samples.index((broken, 0)), 0)]
    views = EvalViews(FileMedia(ann), ClipSampling(4), size=16, bad_files="skip")
    _, labels, indices = collate_eval([views[i] for i in range(len(views))])
    assert len(labels) == 4 and ann.samples.index((broken, 0)) not in indices.tolist()
    with pytest.raises(MediaError, match=broken):
        EvalViews(FileMedia(ann), ClipSampling(4), size=16)[ann.samples.index((broken, 0))]
    with pytest.raises(ValueError, match="bad_files"):
        TrainClips(FileMedia(ann), ClipSampling(4), bad_files="ignore")


# ---- evaluation views ----------------------------------------------------------------------------

def test_eval_views_against_hand_computed_clips_and_crops():
    media = FakeMedia()
    views, label, index = EvalViews(media, ClipSampling(3, stride=4), size=16, clips=2, crops=3)[1]
    assert views.shape == (6, 3, 3, 16, 16) and views.dtype == torch.uint8 and (label, index) == (1, 1)
    video = media.videos[1].permute(3, 0, 1, 2)                    # (C, T, 16, 40)
    # span 9, starts 0..11: clip k starts at floor((k + 1/2) * 12 / 2) = 3, 9
    for v, (frames, left) in enumerate([(f, left) for f in ([3, 7, 11], [9, 13, 17]) for left in (0, 12, 24)]):
        assert torch.equal(views[v], video[:, frames, :, left:left + 16]), f"view {v}"
    image_views, _, _ = EvalViews(media, ClipSampling(3, stride=4), size=16, clips=2, crops=3)[2]
    image = media.videos[2][0].permute(2, 0, 1)                    # (C, 45, 16): top, centre, bottom
    assert image_views.shape == (3, 3, 16, 16)
    for view, top in zip(image_views, (0, 14, 29), strict=True):
        assert torch.equal(view, image[:, top:top + 16])
    batch = collate_eval([(views, label, index), (image_views, 0, 2)])
    assert batch[1].tolist() == [1, 0] and batch[2].tolist() == [1, 2] and batch[0][1] is image_views


# ---- step sampler --------------------------------------------------------------------------------

def test_step_sampler_keys_epochs_resume_and_shards():
    full = list(StepBatchSampler(10, 2, seed=5, rank=0, world_size=2, start=0, stop=6))
    assert list(StepBatchSampler(10, 2, seed=5, rank=0, world_size=2, start=3, stop=6)) == full[3:]
    other = list(StepBatchSampler(10, 2, seed=5, rank=1, world_size=2, start=0, stop=6))
    # 5 items per rank, 2 batches of 2 per epoch (the 5th dropped): epochs 0, 0, 1, 1, 2, 2
    assert [{e for _, e in b} for b in full] == [{0}, {0}, {1}, {1}, {2}, {2}]
    for epoch in range(3):
        mine = [i for b in full[2 * epoch:2 * epoch + 2] for i, _ in b]
        theirs = [i for b in other[2 * epoch:2 * epoch + 2] for i, _ in b]
        assert len(set(mine) | set(theirs)) == 8 and not set(mine) & set(theirs)
    orders = [[i for b in full[2 * e:2 * e + 2] for i, _ in b] for e in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2], "every epoch has the same order"


@pytest.mark.parametrize("ratio", [0.25, 0.4])
def test_step_sampler_joint_image_fraction(ratio):
    videos, images, b, steps = 9, 5, 4, 12
    sampler = StepBatchSampler(videos, b, seed=1, start=0, stop=steps, num_images=images, image_ratio=ratio)
    batches = list(sampler)
    assert list(StepBatchSampler(videos, b, seed=1, start=5, stop=steps, num_images=images,
                                 image_ratio=ratio)) == batches[5:]
    image_keys = []
    for step, batch in enumerate(batches):
        count = math.floor((step + 1) * b * ratio + 1e-9) - math.floor(step * b * ratio + 1e-9)
        assert len(batch) == b and sum(i >= videos for i, _ in batch) == count
        image_keys += [(i, e) for i, e in batch if i >= videos]
    # each image epoch holds every image once, in the order the epochs come
    for epoch in range(len(image_keys) // images):
        chunk = image_keys[epoch * images:(epoch + 1) * images]
        assert sorted(i for i, _ in chunk) == list(range(videos, videos + images)) and {e for _, e in chunk} == {epoch}
    assert sum(i < videos for b_ in batches for i, _ in b_) == steps * b - len(image_keys)


def test_step_sampler_bad_values():
    with pytest.raises(ValueError, match="less than one batch"):
        StepBatchSampler(3, 4)
    with pytest.raises(ValueError, match="image_ratio"):
        StepBatchSampler(8, 4, image_ratio=0.5)


def test_data_cli_writes_a_list_file_dataset(tmp_path, capsys):
    from tubevit_fast.data import main

    paths = main(["--out", str(tmp_path / "demo"), "--items", "4", "--image-every", "4", "--list", "all.txt"])
    ann = load_annotations(tmp_path / "demo" / "all.txt")
    assert [p for p, _ in ann.samples] == [os.path.abspath(p) for p in paths]
    assert [ann.classes[y] for _, y in ann.samples] == [os.path.basename(os.path.dirname(p)) for p in paths]
    assert paths[3].endswith("00003.png") and capsys.readouterr().out.splitlines()[-1].endswith("all.txt")


def test_an_undecodable_video_is_probed_once(folder, monkeypatch):
    from tubevit_fast.app import decode

    calls = []
    probe = decode.probe
    monkeypatch.setattr(decode, "probe", lambda path: calls.append(path) or probe(path))
    media = FileMedia(load_annotations(folder))
    broken = [p for p, _ in media.samples].index(str(folder / "run" / "broken.mp4"))
    for _ in range(3):
        with pytest.raises(MediaError, match="broken.mp4"):
            media.num_frames(broken)
    assert media.num_frames(0) == media.num_frames(0) == 20
    assert len(calls) == 2


def test_datasets_pickle_for_spawned_workers(folder):
    import pickle

    media = media_without_broken(folder)
    train = TrainClips(media, ClipSampling(4, stride=2), train_transform(16, randaug=(2, 9), reprob=0.5), seed=3)
    views = EvalViews(media, ClipSampling(4, stride=2), size=16, clips=2, crops=3)
    for data, key in [(train, (1, 2)), (views, 1)]:
        copy = pickle.loads(pickle.dumps(data))
        assert torch.equal(copy[key][0], data[key][0])


def test_the_index_serves_relative_and_dotted_paths(folder, tmp_path, monkeypatch):
    """A list's `./run/a.mp4` or a relative predict input names the file the index was built for:
    reading it never probes (decodes) the file again."""
    from tubevit_fast.app import decode
    from tubevit_fast.app.sources import Annotations

    monkeypatch.chdir(folder)
    ann = Annotations([("./run/a.mp4", 0), ("walk/b.mp4", 1)], ["run", "walk"])
    media = FileMedia.indexed(ann, tmp_path / "index.json", progress=False)
    monkeypatch.setattr(decode, "probe", lambda path: pytest.fail(f"probed {path} again"))
    assert [media.num_frames(i) for i in range(2)] == [20, 20]
    assert media.read(0, [0, 19]).shape[0] == 2
